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
    trace: bool = False,
    after_step: Callable[[int, list[torch.Tensor]], bool | None] | None = None,
) -> tuple[list[torch.Tensor], list[torch.Tensor] | None, int]:
    """Gradient descent on an energy over ``variables`` (states for sPC, errors for ePC).

    ``energy_fn(vars) -> (per_sample_energy (B,), hidden errors, output)`` is evaluated with
    autograd on; the gradient w.r.t. every variable comes from one backward pass, which
    computes no weight gradients.

    ``safeguard``: per-sample backtracking. Samples are independent (E is a sum over the
    batch), so each keeps its own step size; a step that raised a sample's energy is undone
    and that sample's step halved. The energy of every sample is then non-increasing.

    ``after_step(t, vars)`` runs after iteration t (1-based); returning True stops inference.

    Returns the final variables (detached), with ``trace`` the per-layer energies before every
    iteration (a list of tensors of shape (L,), else None), and the iterations run.
    """
    B = y.shape[0]
    vs = [v.detach().clone().requires_grad_(True) for v in variables]
    traces: list[torch.Tensor] | None = [] if trace else None
    vel = [torch.zeros_like(v) for v in vs] if (momentum > 0 or optimizer == "adam") else None
    sq = [torch.zeros_like(v) for v in vs] if optimizer == "adam" else None
    if safeguard:
        step = torch.full((B,), lr, dtype=vs[0].dtype, device=vs[0].device)
        prev_v: list[torch.Tensor] | None = None
        prev_g: list[torch.Tensor] = []
        prev_e = torch.empty(0)
        prev_parts = torch.empty(0)
        tol = 8 * torch.finfo(vs[0].dtype).eps
    for t in range(iters):
        with torch.enable_grad():
            e_b, errs, out = energy_fn(vs)
            grads = list(torch.autograd.grad(e_b.sum(), vs))
        parts = None
        if traces is not None:
            if safeguard:  # per sample, so rejected samples can keep their accepted energies
                parts = E.layer_energies_per_sample(errs, out, y, loss)
            else:
                traces.append(E.layer_energies(errs, out, y, loss))
        with torch.no_grad():
            if safeguard:
                e_b = e_b.detach()
                if prev_v is not None:
                    rose = e_b > prev_e + tol * prev_e.abs()
                    keep = [rose.view(-1, *[1] * (v.dim() - 1)) for v in vs]
                    for v, pv, g, pg, k in zip(vs, prev_v, grads, prev_g, keep):
                        v.copy_(torch.where(k, pv, v))
                        g.copy_(torch.where(k, pg, g))
                    e_b = torch.where(rose, prev_e, e_b)
                    step = torch.where(rose, step * 0.5, step)
                    if vel is not None:  # a rejected sample restarts its momentum
                        for m, k in zip(vel, keep):
                            m.masked_fill_(k, 0.0)
                    if parts is not None:
                        parts = torch.where(rose[:, None], prev_parts, parts)
                if parts is not None:
                    traces.append(parts.sum(0))
                    prev_parts = parts
                prev_v = [v.detach().clone() for v in vs]
                prev_g, prev_e = grads, e_b
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
                for v, u in zip(vs, upd):
                    v.sub_(step.view(-1, *[1] * (v.dim() - 1)) * u)
            else:
                torch._foreach_add_(vs, upd, alpha=-lr)
        if after_step is not None and after_step(t + 1, vs) is True:
            iters = t + 1
            break
    if safeguard and prev_v is not None:
        # the last step is accepted only if it did not raise the energy either
        with torch.no_grad():
            e_b, _, _ = energy_fn(vs)
            rose = e_b > prev_e + tol * prev_e.abs()
            for v, pv in zip(vs, prev_v):
                v.copy_(torch.where(rose.view(-1, *[1] * (v.dim() - 1)), pv, v))
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
        self._weight_grads(x, y, eq)
        self.optimizer.step()
        self.init.observe(x, y, eq.states)
        B = y.shape[0]
        return StepResult(
            loss=E.output_cost(out, y, self.loss).detach() / B,
            output=out.detach(),
            energy=eq.energy.detach() / B,
            equilibrium=eq,
        )

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
