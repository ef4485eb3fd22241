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
import math
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
        init_options: dict[str, Any] | None = None,
    ):
        if not isinstance(net, PCNet):
            raise TypeError(f"a learner needs a fastpc.PCNet, got {type(net).__name__}")
        if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"optimizer must be a torch.optim.Optimizer or None, got {type(optimizer).__name__}")
        if init_options is not None and not isinstance(init_options, dict):
            raise TypeError(f"init_options must be a dict, got {type(init_options).__name__}")
        self.net = net
        self.loss = E.check_loss(loss)
        self.optimizer = optimizer
        self.init = make_init(init, **(init_options or {}))

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
        y = self._check_target(y, out)
        return self._relax(x, y, ff_states, out, trace, callback)

    def grads(self, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        """Inference + the weight gradients ``step`` would apply, without applying them."""
        ff_states, out = self._feedforward(x)
        y = self._check_target(y, out)
        eq = self._relax(x, y, ff_states, out, False)
        self.net.zero_grad(set_to_none=True)
        self._weight_grads(x, y, eq)
        named = {n: p.grad.detach().clone() for n, p in self.net.named_parameters() if p.grad is not None}
        self.net.zero_grad(set_to_none=True)
        return named

    def step(self, x: torch.Tensor, y: torch.Tensor) -> StepResult:
        """Inference + one weight update with the learner's optimizer."""
        self._check_optimizer()
        ff_states, out = self._feedforward(x)
        y = self._check_target(y, out)
        eq = self._relax(x, y, ff_states, out, False)
        self.optimizer.zero_grad(set_to_none=True)
        cost = self._output_cost(out, y).detach()  # before _weight_grads releases buffers
        self._weight_grads(x, y, eq)
        self._apply_update()
        self.init.observe(x, y, eq.states)
        return self._step_result(cost, out, eq)

    def to(self, *args: Any, **kwargs: Any) -> "Learner":
        """Move (or cast) the net and the initializer's state like ``nn.Module.to``; returns
        the learner. Make the optimizer after moving, as with any torch module."""
        self.net.to(*args, **kwargs)
        self.init.to(*args, **kwargs)
        return self

    def options(self) -> dict[str, Any]:
        """The learner's hyperparameters (saved with checkpoints)."""
        return {"loss": self.loss, "init": self.init.name, "init_options": self.init.options()}

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

    # ---- the learner's door and the one update path -------------------------------------
    skipped_updates: int = 0  # steps whose gradient was not finite (the weights were kept)

    def _check_optimizer(self) -> None:
        if self.optimizer is None:
            raise ValueError("step() needs an optimizer: pass optimizer=... to make_learner")

    def _check_input(self, x: torch.Tensor) -> None:
        """``ValueError``/``TypeError`` unless ``x`` is a non-empty, finite floating batch in
        the net's dtype and on its device."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor batch (B, ...), got {type(x).__name__}")
        p = next(self.net.parameters(), None)
        if x.dim() < 1 or x.shape[0] == 0:
            raise ValueError(f"x must be a non-empty batch (B >= 1, shape (B, ...)), got shape {tuple(x.shape)}")
        if p is not None and (x.dtype != p.dtype or x.device != p.device):
            raise TypeError(f"x must have the net's dtype and device ({p.dtype}, {p.device}), got ({x.dtype}, {x.device})")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating tensor, got dtype {x.dtype}")
        if not bool(torch.isfinite(x).all()):
            raise ValueError("x holds NaN or inf")

    def _check_target(self, y: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``y`` as the energy takes it (integer class indices as int64), or a clear error."""
        if isinstance(y, torch.Tensor) and not y.is_floating_point() and y.dtype not in (torch.bool, torch.int64) \
                and not y.is_complex():
            y = y.long()
        E.check_target(y, out.shape, self.loss)
        if y.device != out.device:
            raise ValueError(f"y must be on the net's device {out.device}, got {y.device}")
        return y

    def _apply_update(self) -> bool:
        """The one place where a weight update reaches the net: every learner's ``step`` ends
        here, with the gradients in ``p.grad`` (data-parallel averaging, clipping and loss
        scaling belong here). A non-finite gradient is dropped, the weights kept and
        ``skipped_updates`` counted; returns whether the optimizer stepped."""
        opt = self.optimizer
        grads = [p.grad for g in opt.param_groups for p in g["params"] if p.grad is not None]
        if grads and not bool(torch.isfinite(torch.stack(torch._foreach_norm(grads)).sum())):
            opt.zero_grad(set_to_none=True)
            self.skipped_updates += 1
            return False
        opt.step()
        return True

    # ---- pieces subclasses compose ----------------------------------------------------
    def _set_inference_options(
        self, iters: int, state_lr: float, momentum: float, safeguard: bool, armijo: float
    ) -> None:
        """Validate and store the options every iterative-inference learner shares."""
        _check(isinstance(iters, (int, float)) and int(iters) == iters and iters >= 0,
               f"iters must be an integer >= 0, got {iters!r}")
        _check(isinstance(state_lr, (int, float)) and math.isfinite(state_lr) and state_lr > 0,
               f"state_lr must be a finite number > 0, got {state_lr!r}")
        _check(0 <= momentum < 1, f"momentum must be in [0, 1), got {momentum}")
        _check(0 <= armijo < 1, f"armijo must be in [0, 1), got {armijo}")
        self.iters, self.state_lr, self.momentum = int(iters), float(state_lr), float(momentum)
        self.safeguard, self.armijo = bool(safeguard), float(armijo)

    @property
    def blocks(self) -> nn.ModuleList:
        return self.net.blocks

    def _feedforward(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """FF pass without autograd; the one pass that updates batch-norm running stats."""
        self._check_input(x)
        with torch.no_grad():
            return self._fitting(x, self.net.forward_states)

    def _fitting(self, x: torch.Tensor, fn: Callable[[torch.Tensor], Any]) -> Any:
        """``fn(x)`` (a forward pass), with a shape mismatch inside the net reported as the
        input's ``ValueError``."""
        try:
            return fn(x)
        except RuntimeError as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if any(k in first for k in ("shape", "size", "dimension", "mat1", "Expected", "expected")):
                raise ValueError(f"x of shape {tuple(x.shape)} does not fit the net ({first})") from e
            raise

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
            preds, out = E.predictions(self.blocks, x, states)
            parts = E.layer_energies(E.errors(states, preds), out, y, self.loss)
        layer_trace = torch.stack([*traces, parts]) if traces is not None else None
        return Equilibrium(
            states=states,
            output=out,
            energy=parts.sum(),
            iters=iters,
            trace=None if layer_trace is None else layer_trace.sum(1),
            layer_trace=layer_trace,
        )
