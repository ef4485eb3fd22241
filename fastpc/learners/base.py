"""The Learner contract every algorithm implements (DESIGN.md).

A learner owns a PCNet, an output loss and (optionally) a torch optimizer over the net's
parameters. Per batch it

1. runs the feedforward pass (this is also the test-time prediction, and the only pass that
   updates batch-norm running statistics),
2. ``infer``: relaxes its variables (states, errors, nudged phases, ...) to an
   :class:`Equilibrium`,
3. ``grads``: turns the equilibrium into the weight gradients ``step`` hands the optimizer,
4. ``step``: applies them.

Subclasses implement ``_relax`` (step 2 from the FF state) and may override ``_weight_grads``
(step 3; the default is the local PC update of PAPERS.md §0, shared by sPC, ePC and EP).
Hooks that later algorithms use without reshaping the contract:

- ``init`` is a :class:`fastpc.init.StateInit` that sees ``y`` (label-aware initializers) and
  observes converged states (memory initializers);
- ``Equilibrium.phases`` carries extra equilibria (EP's ±β nudged phases);
- ``Equilibrium.output`` is the output at equilibrium, a free state when a learner treats it so.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .. import energy as E
from ..init import StateInit, make_init
from ..nets import PCNet, frozen_batchnorm_stats

__all__ = ["Equilibrium", "StepResult", "Learner", "descend"]


@dataclass
class Equilibrium:
    """Where inference ended.

    states: final hidden states s_1 .. s_{L-1} (detached).
    output: the output at the final states, f_L(s_{L-1}) (or the output state).
    energy: total energy E at the final states, summed over the batch (scalar tensor).
    iters: inference iterations run.
    trace: (iters + 1,) total energy before every iteration and at the end, when traced.
    layer_trace: (iters + 1, L) per-layer energies [½‖ε_1‖², …, ½‖ε_{L-1}‖², ℓ] likewise.
    phases: extra named equilibria (e.g. EP's "+beta" / "-beta"), empty otherwise.
    """

    states: list[torch.Tensor]
    output: torch.Tensor
    energy: torch.Tensor
    iters: int
    trace: torch.Tensor | None = None
    layer_trace: torch.Tensor | None = None
    phases: dict[str, "Equilibrium"] = field(default_factory=dict)


@dataclass
class StepResult:
    """One training step.

    loss: batch-mean output cost of the feedforward prediction (what test time sees).
    output: feedforward output (logits), detached — accuracy comes from it.
    energy: final inference energy divided by the batch size.
    equilibrium: the Equilibrium the update came from.
    """

    loss: torch.Tensor
    output: torch.Tensor
    energy: torch.Tensor
    equilibrium: Equilibrium


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ValueError(msg)


EnergyFn = Callable[[list[torch.Tensor]], tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]]


def descend(
    variables: list[torch.Tensor],
    energy_fn: EnergyFn,
    y: torch.Tensor,
    loss: str,
    iters: int,
    lr: float,
    momentum: float = 0.0,
    optimizer: str = "sgd",
    safeguard: bool = False,
    armijo: float = 0.0,
    trace: bool = False,
    after_step: Callable[[int, list[torch.Tensor]], bool | None] | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor] | None, int]:
    """Gradient descent on an energy over ``variables`` (states for sPC, errors for ePC).

    ``energy_fn(vars) -> (per_sample_energy (B,), hidden errors, output)`` is evaluated with
    autograd on; the gradient w.r.t. every variable comes from one backward pass, which
    computes no weight gradients.

    ``safeguard``: a backtracking line search on the batch energy E with one step size η for
    the whole batch (so that, as in plain ePC, every sample's errors move by the same η and the
    weight update keeps BP's weighting of the samples). A step is accepted when it decreases E
    by at least ``armijo`` × the decrease its gradient predicts, E_new ≤ E_old − armijo·η⟨g, u⟩
    (the Armijo condition; ``armijo=0``: E must not rise). A rejected step is undone and η
    shrunk to fit the curvature κ along it, measured by the quadratic through E_old, its slope
    and E_new: 90 % of the largest step that quadratic accepts, η·κ = 2(1 − armijo), at most
    its minimiser η·κ = 1 (clipped to [η·1e-6, η/2]). The step then stays in force for the
    rest of the batch. With ``armijo`` near 1 every step is far below 1/κ: after T steps
    η·κ·T ≲ 2T(1 − armijo), the regime in which one ePC update is η·T × the BP gradient
    (PAPERS.md §2) even where the deep Jacobian has grown large.

    ``after_step(t, vars)`` runs after iteration t (1-based); returning True stops inference.

    Returns the final variables (detached), with ``trace`` the per-layer energies before every
    iteration (a list of tensors of shape (L,), else None), and the iterations run.
    """
    vs = [v.detach().clone().requires_grad_(True) for v in variables]
    traces: list[torch.Tensor] | None = [] if trace else None
    vel = [torch.zeros_like(v) for v in vs] if (momentum > 0 or optimizer == "adam") else None
    sq = [torch.zeros_like(v) for v in vs] if optimizer == "adam" else None
    if safeguard:
        step = torch.tensor(lr, dtype=vs[0].dtype, device=vs[0].device)
        prev_v: list[torch.Tensor] | None = None
        prev_g: list[torch.Tensor] = []
        prev_e = prev_parts = pred = step  # placeholders until the first step
        tol = 8 * torch.finfo(vs[0].dtype).eps
        fit = min(1.0, 1.8 * (1 - armijo))
    for t in range(iters):
        with torch.enable_grad():
            e_b, errs, out = energy_fn(vs)
            grads = list(torch.autograd.grad(e_b.sum(), vs))
        parts = E.layer_energies(errs, out, y, loss) if traces is not None else None
        with torch.no_grad():
            if safeguard:
                e = e_b.detach().sum()
                if prev_v is not None:
                    rose = e > prev_e - armijo * step * pred + tol * prev_e.abs()
                    for v, pv, g, pg in zip(vs, prev_v, grads, prev_g):
                        v.copy_(torch.where(rose, pv, v))
                        g.copy_(torch.where(rose, pg, g))
                    # quadratic φ(a) = E_old − a·pred + ½κa² through E_new at a = step
                    curv = (2 * (e - prev_e + step * pred) / step.pow(2)).clamp_min(torch.finfo(e.dtype).tiny)
                    shrunk = torch.minimum(torch.maximum(fit * pred / curv, step * 1e-6), step * 0.5)
                    step = torch.where(rose, shrunk, step)
                    e = torch.where(rose, prev_e, e)
                    if vel is not None:  # a rejected step restarts the momentum
                        torch._foreach_mul_(vel, (~rose).to(e.dtype))
                    if parts is not None:
                        parts = torch.where(rose, prev_parts, parts)
                prev_v = [v.detach().clone() for v in vs]
                prev_g, prev_e, prev_parts = grads, e, parts
            if traces is not None:
                traces.append(parts)
            if optimizer == "adam":
                b1, b2 = 0.9, 0.999
                torch._foreach_lerp_(vel, grads, 1 - b1)
                torch._foreach_mul_(sq, b2)
                torch._foreach_addcmul_(sq, grads, grads, 1 - b2)
                c1, c2 = 1 - b1 ** (t + 1), 1 - b2 ** (t + 1)
                den = torch._foreach_sqrt(torch._foreach_div(sq, c2))
                torch._foreach_add_(den, 1e-8)
                upd = torch._foreach_div(vel, den)
                torch._foreach_mul_(upd, 1.0 / c1)
            elif vel is not None:
                torch._foreach_mul_(vel, momentum)
                torch._foreach_add_(vel, grads)
                upd = vel
            else:
                upd = grads
            if safeguard:
                pred = sum((g * u).sum() for g, u in zip(grads, upd))
                torch._foreach_sub_(vs, torch._foreach_mul(upd, step))
            else:
                torch._foreach_add_(vs, upd, alpha=-lr)
        if after_step is not None and after_step(t + 1, vs) is True:
            iters = t + 1
            break
    if safeguard and prev_v is not None:
        # the last step must pass the same test
        with torch.no_grad():
            e_b, _, _ = energy_fn(vs)
            rose = e_b.sum() > prev_e - armijo * step * pred + tol * prev_e.abs()
            for v, pv in zip(vs, prev_v):
                v.copy_(torch.where(rose, pv, v))
    return [v.detach() for v in vs], traces, iters


class Learner(abc.ABC):
    """Base class of every learning algorithm. See the module docstring for the contract."""

    name: str = ""

    def __init__(
        self,
        net: PCNet,
        loss: str = "ce",
        optimizer: torch.optim.Optimizer | None = None,
        init: str | StateInit = "forward",
    ):
        if not isinstance(net, PCNet):
            raise TypeError(f"a learner needs a fastpc.PCNet, got {type(net).__name__}")
        self.net = net
        self.loss = E.check_loss(loss)
        self.optimizer = optimizer
        self.init = make_init(init)

    # ---- public API -------------------------------------------------------------------
    def infer(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        trace: bool = False,
        callback: Callable[[int, list[torch.Tensor]], bool | None] | None = None,
    ) -> Equilibrium:
        """Run inference on a batch (no weight change) and return the equilibrium.

        ``trace=True`` records the total and per-layer energy at every iteration.
        ``callback(t, states)`` is called after iteration t with the current hidden states
        (detached; for ePC rebuilt from the errors); returning True stops inference early.
        """
        ff_states, out = self._feedforward(x)
        return self._relax(x, y, ff_states, out, trace, callback)

    def grads(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """Inference + the weight gradients ``step`` would apply, without applying them."""
        ff_states, out = self._feedforward(x)
        eq = self._relax(x, y, ff_states, out, False)
        self.net.zero_grad(set_to_none=True)
        self._weight_grads(x, y, eq)
        named = {n: p.grad.detach().clone() for n, p in self.net.named_parameters() if p.grad is not None}
        self.net.zero_grad(set_to_none=True)
        return named

    def step(self, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        """Inference + one weight update with the learner's optimizer."""
        if self.optimizer is None:
            raise ValueError("step() needs an optimizer: pass optimizer=... to make_learner")
        ff_states, out = self._feedforward(x)
        eq = self._relax(x, y, ff_states, out, False)
        self.optimizer.zero_grad(set_to_none=True)
        cost = self._output_cost(out, y).detach()  # before _weight_grads releases buffers
        self._weight_grads(x, y, eq)
        self.optimizer.step()
        self.init.observe(x, y, eq.states)
        return self._step_result(cost, out, eq)

    def options(self) -> dict[str, Any]:
        """The learner's hyperparameters (saved with checkpoints)."""
        return {"loss": self.loss, "init": self.init.name}

    def state_dict(self) -> dict[str, Any]:
        """Net, optimizer and initializer state."""
        return {
            "learner": self.name,
            "options": self.options(),
            "net": self.net.state_dict(),
            "optimizer": None if self.optimizer is None else self.optimizer.state_dict(),
            "init": self.init.state_dict(),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("learner") != self.name:
            raise ValueError(f"state of learner {state.get('learner')!r} cannot load into {self.name!r}")
        self.net.load_state_dict(state["net"])
        if self.optimizer is not None and state.get("optimizer") is not None:
            self.optimizer.load_state_dict(state["optimizer"])
        self.init.load_state_dict(state.get("init", {}))

    # ---- pieces subclasses compose ----------------------------------------------------
    def _set_inference_options(
        self, iters: int, state_lr: float, momentum: float, safeguard: bool, armijo: float
    ) -> None:
        """Validate and store the options every iterative-inference learner shares."""
        _check(int(iters) == iters and iters >= 0, f"iters must be an integer >= 0, got {iters}")
        _check(state_lr > 0, f"state_lr must be > 0, got {state_lr}")
        _check(0 <= momentum < 1, f"momentum must be in [0, 1), got {momentum}")
        _check(0 <= armijo < 1, f"armijo must be in [0, 1), got {armijo}")
        self.iters, self.state_lr, self.momentum = int(iters), float(state_lr), float(momentum)
        self.safeguard, self.armijo = bool(safeguard), float(armijo)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.net.blocks

    def _feedforward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """FF pass without autograd; the one pass that updates batch-norm running stats."""
        with torch.no_grad():
            return self.net.forward_states(x)

    @abc.abstractmethod
    def _relax(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        ff_states: list[torch.Tensor],
        out: torch.Tensor,
        trace: bool,
        callback: Callable[[int, list[torch.Tensor]], bool | None] | None = None,
    ) -> Equilibrium:
        """Inference from the FF state (``callback`` as in :meth:`infer`)."""

    def _step_result(self, cost: torch.Tensor, out: torch.Tensor, eq: Equilibrium) -> StepResult:
        """A step's result from the FF output's summed cost and the equilibrium, per example."""
        B = out.shape[0]
        return StepResult(loss=cost.detach() / B, output=out.detach(), energy=eq.energy.detach() / B,
                          equilibrium=eq)

    def _output_cost(self, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """ℓ(out, y) summed over the batch (``E.output_cost``; the fast path has a quicker one)."""
        return E.output_cost(out, y, self.loss)

    def _weight_scale(self, B: int) -> float:
        """Factor applied to the local energy's gradient (1/B: batch-mean)."""
        return 1.0 / B

    def _weight_grads(self, x: torch.Tensor, y: torch.Tensor, eq: Equilibrium) -> None:
        """Accumulate the local PC update (PAPERS.md §0) into ``p.grad``."""
        with frozen_batchnorm_stats(self.net), torch.enable_grad():
            e_local = E.local_energy(self.blocks, x, eq.states, y, self.loss)
            (e_local * self._weight_scale(y.shape[0])).backward()

    def _equilibrium(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        states: list[torch.Tensor],
        iters: int,
        traces: Sequence[torch.Tensor] | None,
    ) -> Equilibrium:
        """Package final states: energy at them and the trace (with the final point)."""
        with torch.no_grad(), frozen_batchnorm_stats(self.net):
            preds = [self.blocks[0](x)] + [b(s) for b, s in zip(self.blocks[1:-1], states[:-1])]
            out = self.blocks[-1](states[-1] if states else x)
            errs = E.errors(states, preds)
            parts = E.layer_energies(errs, out, y, self.loss)
        layer_trace = torch.stack([*traces, parts]) if traces is not None else None
        return Equilibrium(
            states=states,
            output=out,
            energy=parts.sum(),
            iters=iters,
            trace=None if layer_trace is None else layer_trace.sum(1),
            layer_trace=layer_trace,
        )
