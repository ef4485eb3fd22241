"""A plain autograd reference of sPC, iPC and ePC: the ground truth the learners are compared
with. Every energy is built from the blocks with autograd on, every gradient is one
``torch.autograd.grad`` of the batch energy, nothing is cached or skipped; the weight update is
the gradient of ``energy.local_energy``. It shares no code with fastpc's inference loop."""

from __future__ import annotations

from collections.abc import Callable

import torch

import fastpc as fpc
from fastpc import energy as E
from fastpc.learners import Equilibrium, StepResult
from fastpc.nets import frozen_batchnorm_stats


def descend(variables, energy_fn, iters, lr, momentum=0.0, optimizer="sgd", safeguard=False, armijo=0.0,
            trace=False, after_step=None, tol=None, armijo_steps=20):
    """Gradient descent on ``energy_fn(vars) -> (per-sample energy (B,), errors, output, parts)``:
    SGD (with momentum), Adam, or the safeguard line search (one step for the batch, Armijo
    test, curvature refit of a rejected step, momentum restart; after ``armijo_steps`` steps
    the test is "E must not rise" and a step that achieved 3/4 of its predicted decrease doubles).
    ``tol``: stop once the gradient norm is ≤ tol × the first one. Returns (variables, per-layer
    traces or None, iterations run)."""
    vs = [v.detach().clone().requires_grad_(True) for v in variables]
    traces = [] if trace else None
    vel = [torch.zeros_like(v) for v in vs] if (momentum > 0 or optimizer == "adam") else None
    sq = [torch.zeros_like(v) for v in vs] if optimizer == "adam" else None
    if safeguard:
        step = torch.tensor(lr, dtype=vs[0].dtype)
        prev_v, prev_g, prev_e, prev_parts, pred = None, [], None, None, None
        tol_e = 8 * torch.finfo(vs[0].dtype).eps
    g0 = None
    converged = False
    for t in range(iters):
        with torch.enable_grad():
            e_b, parts = energy_fn(vs)
            grads = list(torch.autograd.grad(e_b.sum(), vs))
        with torch.no_grad():
            if safeguard:
                e = e_b.detach().sum()
                if prev_v is not None:
                    late = t > armijo_steps
                    c = 0.0 if late else armijo
                    fit = min(1.0, 1.8 * (1 - c))
                    rose = e > prev_e - c * step * pred + tol_e * prev_e.abs()
                    old_step = step
                    if rose:
                        for v, pv in zip(vs, prev_v):
                            v.copy_(pv)
                        grads = prev_g
                        if vel is not None:
                            for b in vel:
                                b.zero_()
                        curv = (2 * (e - prev_e + step * pred) / step.pow(2)).clamp_min(torch.finfo(e.dtype).tiny)
                        step = torch.minimum(torch.maximum(fit * pred / curv, step * 1e-6), step * 0.5)
                        e, parts = prev_e, prev_parts
                    if late and not rose and prev_e - e >= 0.75 * old_step * pred \
                            and old_step * pred > tol_e * prev_e.abs():
                        step = step * 2
                prev_v = [v.detach().clone() for v in vs]
                prev_g, prev_e, prev_parts = grads, e, parts
            if tol is not None:
                gn = torch.sqrt(sum((g * g).sum() for g in grads))
                g0 = gn if g0 is None else g0
                if gn <= tol * g0:
                    iters, converged = t, True
                    break
            if traces is not None:
                traces.append(parts)
            if optimizer == "adam":
                b1, b2 = 0.9, 0.999
                upd = []
                for m, s, g in zip(vel, sq, grads):
                    m.lerp_(g, 1 - b1)
                    s.mul_(b2).addcmul_(g, g, value=1 - b2)
                    den = (s / (1 - b2 ** (t + 1))).sqrt() + 1e-8
                    upd.append(m / den / (1 - b1 ** (t + 1)))
            elif vel is not None:
                for b, g in zip(vel, grads):
                    b.mul_(momentum).add_(g)
                upd = vel
            else:
                upd = grads
            if safeguard:
                pred = sum((g * u).sum() for g, u in zip(grads, upd))
                for v, u in zip(vs, upd):
                    v.sub_(u * step)
            else:
                for v, u in zip(vs, upd):
                    v.sub_(u, alpha=lr)
        if after_step is not None and after_step(t + 1, [v.detach() for v in vs]) is True:
            iters = t + 1
            break
    if safeguard and prev_v is not None and not converged:  # the last step must pass the same test
        c = 0.0 if iters > armijo_steps else armijo
        with torch.no_grad():
            if energy_fn(vs)[0].sum() > prev_e - c * step * pred + tol_e * prev_e.abs():
                for v, pv in zip(vs, prev_v):
                    v.copy_(pv)
    return [v.detach() for v in vs], traces, iters


class Reference:
    """``infer`` / ``grads`` / ``step`` of a fastpc learner (its options and initializer), by
    the reference loop above."""

    def __init__(self, learner: fpc.learners.Learner):
        self.lrn = learner
        self.net, self.loss = learner.net, learner.loss

    def _states_from_errors(self, x, errs):
        blocks = self.net.blocks
        states = [blocks[0](x) + errs[0]]
        for block, eps in zip(blocks[1:-1], errs[1:]):
            states.append(block(states[-1]) + eps)
        return states

    def _energy_fn(self, x, y):
        blocks, epc = self.net.blocks, self.lrn.name == "epc"

        def energy_fn(vs):
            states = self._states_from_errors(x, vs) if epc else vs
            preds, out = E.predictions(blocks, x, states)
            errs = E.errors(states, preds)
            return E.energy_per_sample(errs, out, y, self.loss), E.layer_energies(errs, out, y, self.loss)

        return energy_fn

    def _relax(self, x, y, trace=False, callback=None, weight_step=None) -> tuple[Equilibrium, torch.Tensor]:
        """(equilibrium, FF output)."""
        lrn, blocks = self.lrn, self.net.blocks
        with torch.no_grad():
            ff, ff_out = self.net.forward_states(x)  # the one pass that updates batch-norm statistics
        states0 = lrn.init(ff, x, y)
        epc = lrn.name == "epc"
        with frozen_batchnorm_stats(self.net):
            v0 = states0
            if epc:
                with torch.no_grad():
                    preds, _ = E.predictions(blocks, x, states0)
                    v0 = E.errors(states0, preds)

            def after(t, vs):
                with torch.no_grad():
                    states = self._states_from_errors(x, vs) if epc else vs
                if weight_step is not None:
                    weight_step(states)
                return None if callback is None else callback(t, states)

            vs, traces, iters = descend(v0, self._energy_fn(x, y), lrn.iters, lrn.state_lr, lrn.momentum,
                                        getattr(lrn, "state_optimizer", "sgd"), lrn.safeguard, lrn.armijo,
                                        trace, after, lrn.tol, lrn.armijo_steps)
            with torch.no_grad():
                states = self._states_from_errors(x, vs) if epc else vs
                preds, out = E.predictions(blocks, x, states)
                parts = E.layer_energies(E.errors(states, preds), out, y, self.loss)
        layer_trace = torch.stack([*traces, parts]) if trace else None
        eq = Equilibrium(states=states, output=out, energy=parts.sum(), iters=iters,
                         trace=None if layer_trace is None else layer_trace.sum(1), layer_trace=layer_trace)
        return eq, ff_out

    def _weight_grads(self, x, y, states):
        with frozen_batchnorm_stats(self.net), torch.enable_grad():
            e_local = E.local_energy(self.net.blocks, x, states, y, self.loss)
            (e_local * self.lrn._weight_scale(y.shape[0])).backward()

    def infer(self, x, y, trace=False, callback: Callable | None = None) -> Equilibrium:
        return self._relax(x, y, trace, callback)[0]

    def grads(self, x, y):
        eq, _ = self._relax(x, y)
        self.net.zero_grad(set_to_none=True)
        self._weight_grads(x, y, eq.states)
        named = {n: p.grad.detach().clone() for n, p in self.net.named_parameters() if p.grad is not None}
        self.net.zero_grad(set_to_none=True)
        return named

    def step(self, x, y) -> StepResult:
        opt = self.lrn.optimizer

        def update(states):
            opt.zero_grad(set_to_none=True)
            self._weight_grads(x, y, states)
            opt.step()

        incremental = getattr(self.lrn, "incremental", False)
        eq, out = self._relax(x, y, weight_step=update if incremental else None)
        if not incremental:
            update(eq.states)
        B = x.shape[0]
        return StepResult(loss=E.output_cost(out, y, self.loss) / B, output=out, energy=eq.energy / B, equilibrium=eq)
