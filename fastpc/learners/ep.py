"""Equilibrium propagation for PCNs (PAPERS.md §5; Kerjan, Høier, Scellier 2026).

The output is a free state h_L; the total energy is F = E + Σ_b w_b·C(h_{L,b}, y_b) with
E = Σ_{k=1}^{L} ½‖h_k − f_k(h_{k-1})‖² (h_0 = x) and w_b the nudge of sample b (β, −β, or ±β
drawn per sample). The free equilibrium (w = 0) of a PCN is its feedforward (FF) state, where
∂F/∂θ = 0, so every estimator of ∇_θ C needs at most the two nudged phases:

- ``centered``: (1/2β)[∂F/∂θ(h*_{+β}) − ∂F/∂θ(h*_{−β})], bias O(β²);
- ``positive`` / ``negative``: ±(1/β)·∂F/∂θ(h*_{±β}), bias O(β);
- ``random``: one phase with w_b = s_b·β, s_b = ±1 drawn per sample; the estimate
  Σ_b (s_b/β)·∂F_b/∂θ is unbiased for the centered one: its mean over the signs is it, exactly;
- ``clamp``: the output clamped to h_L = h_L⁰ − β·∂C/∂h_L(h_L⁰) (= (1 − β)·h_L⁰ + β·y for mse)
  and the hidden states relaxed; (1/β)·∂F/∂θ, bias O(β).

∂F/∂θ_k at a state is the local gradient −(∂f_k/∂θ_k)ᵀ ε_k of ½‖h_k − f_k(h_{k-1}.detach())‖²;
the update is scaled by 1/B (batch mean, like ``bp``). β = 0 gives zero gradients (no nudge:
the phases stay at the FF state, every ε is exactly zero; the 1/β is not applied).

Equilibration from the FF state, ``iters`` = K iterations, each a sweep over the even layers
(1-based, the output is layer L) and then over the odd ones (``synchronous``: all at once):

- ``mod_pgd``: h_k ← σ_k(a_k + Δ_k), the closed form per layer from the pre-activation a_k
  (σ_k(a_k) = f_k(h_{k-1}); conv → max-pool → σ blocks have a_k = pool(conv(h_{k-1}))), with
  Δ_k = J_{k+1}ᵀ ε_{k+1} (one vector-Jacobian product) and Δ_L = −w·∂C/∂h_L;
- ``pgd``: h_k ← σ_k(f_k(h_{k-1}) + Δ_k), projected gradient steps of size 1 on F;
- ``gd``: h_k ← h_k − state_lr·∂F/∂h_k = h_k − state_lr·(ε_k − Δ_k) (any block);
- ``fixed_point``: h_k ← f_k(h_{k-1}) + Δ_k (any block), a gradient step of size 1 on F per layer;
  its fixed point is F's stationary point (ε_k = Δ_k for every layer, the states are free).

mod_pgd's fixed point is not F's stationary point: on a unit with a_k < 0 it keeps
h_k = σ(a_k + Δ_k) where F asks for h_k = Δ_k. For a nudge small enough that no a_k + Δ_k changes
sign it is the stationary point of F with those units held at their FF value 0, which is still an
exact EP (bias O(β²)); a unit whose a_k + Δ_k crosses zero breaks that. For every equilibration the
O(β²) bias of ``centered`` needs F smooth over the states the ±β phases reach: a ReLU or max-pool
kink crossed between the phases (a pre-activation within reach of zero) leaves an error that does
not shrink until β falls below that crossing. pgd's constraint h ≥ 0 is weakly active at the FF
state, so its ±β phases free different units and its centered bias is O(β).

mod_pgd and pgd need σ to be the Euclidean projection onto its range (σ∘σ = σ): ReLU (onto
[0, ∞)) or Identity; every hidden block must end in one (a pre-activation split,
:func:`fastpc.blocks.preactivation_split`); an output block without a split is its own
pre-activation (σ = identity). A mod_pgd fixed point satisfies, per layer, h_k = P(a_k + Δ_k):
the projected gradient of ½‖h_k − a_k‖² − ⟨Δ_k, h_k⟩ over σ's range is zero (F's own projected
gradient is zero on the units with a_k ≥ 0 and at the output). Sweeps skip the layers the
nudge has not reached: from the FF state a layer can only move once a neighbour has moved.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .. import energy as E
from ..blocks import Tape, preactivation_split
from .base import Equilibrium, check_option
from .chain import Chain
from .pc import ChainLearner
from .registry import register_learner

__all__ = ["EP", "EQUILIBRATIONS", "ESTIMATORS", "PROJECTIONS"]

ESTIMATORS = ("centered", "positive", "negative", "random", "clamp")
EQUILIBRATIONS = ("fixed_point", "mod_pgd", "pgd", "gd")
PROJECTIONS: tuple[type[nn.Module], ...] = (nn.ReLU, nn.Identity)
"""Activations mod_pgd / pgd accept: Euclidean projections onto their range (σ∘σ = σ)."""


def closed_form_unsupported(blocks) -> str | None:
    """Why mod_pgd / pgd cannot run on these blocks (None: they can)."""
    names = ", ".join(t.__name__ for t in PROJECTIONS)
    for k, block in enumerate(blocks):
        try:
            _, act = preactivation_split(block)
        except ValueError:
            if k == len(blocks) - 1:
                continue  # the output block is its own pre-activation
            return (f"block {k} ({type(block).__name__}) has no pre-activation split; a hidden block must "
                    f"be a Sequential ending in one of {names}")
        if type(act) not in PROJECTIONS:
            return (f"block {k} ends in {type(act).__name__}, which has no closed-form projection; "
                    f"supported: {names}")
    return None


@dataclass
class Phase:
    """One nudged phase: the states h_1..h_L (``h[k-1]`` is h_k, ``h[-1]`` the output), the tapes
    at them, the errors ε_k (None: exactly zero, below ``low``), the per-sample nudge ``w`` of
    the cost, and ``coef``: the phase's factor in the estimate (its sign per sample for random)."""

    name: str
    h: list[torch.Tensor]
    tapes: list[Tape]
    eps: list[torch.Tensor | None]
    low: int
    w: torch.Tensor | float
    coef: torch.Tensor | float
    iters: int
    trace: torch.Tensor | None


@register_learner("ep")
class EP(ChainLearner):
    """Equilibrium propagation (see the module docstring). ``beta`` ≥ 0 (≤ 1 for clamp);
    ``estimator`` and ``equilibration`` as above (``equilibration=None``: mod_pgd when every
    block allows it, else gd); ``iters`` = K; ``state_lr``: gd's step; ``synchronous``: every
    layer updates at once (None: True for gd, False otherwise); ``fast``: see
    :class:`~fastpc.learners.pc.ChainLearner`.
    ``init`` must be ``"forward"``: every phase starts from the free equilibrium, the FF state.
    No compiled step (each sweep's layer set changes with the iteration)."""

    def __init__(self, net, loss="mse", optimizer=None, init="forward", init_options=None, iters: int = 5,
                 beta: float = 0.02, estimator: str = "centered", equilibration: str | None = None,
                 state_lr: float = 0.1, synchronous: bool | None = None, fast: bool | str = "auto",
                 precision: str = "fp32"):
        check_option(init == "forward", f"ep starts every phase from the free equilibrium, the FF state: init "
                     f"must be 'forward', got {init!r}")
        super().__init__(net, loss, optimizer, init, init_options, fast, precision)
        check_option(isinstance(iters, (int, float)) and int(iters) == iters and iters >= 0,
                     f"iters must be an integer >= 0, got {iters!r}")
        check_option(estimator in ESTIMATORS, f"unknown estimator {estimator!r}; expected one of {list(ESTIMATORS)}")
        check_option(equilibration is None or equilibration in EQUILIBRATIONS,
                     f"unknown equilibration {equilibration!r}; expected one of {list(EQUILIBRATIONS)}")
        top = 1.0 if estimator == "clamp" else math.inf
        check_option(isinstance(beta, (int, float)) and 0 <= beta <= top and math.isfinite(beta),
                     f"beta must be a finite number >= 0{' and <= 1 for clamp' if top == 1 else ''}, got {beta!r}")
        check_option(isinstance(state_lr, (int, float)) and math.isfinite(state_lr) and state_lr > 0,
                     f"state_lr must be a finite number > 0, got {state_lr!r}")
        check_option(synchronous in (None, True, False), f"synchronous must be True, False or None, got {synchronous!r}")
        why = closed_form_unsupported(net.blocks)
        if equilibration is None:
            equilibration = "mod_pgd" if why is None else "gd"
        check_option(equilibration in ("gd", "fixed_point") or why is None,
                     f"ep with equilibration {equilibration!r}: {why}; equilibration 'gd' runs on any block")
        self.iters, self.beta, self.estimator, self.equilibration = int(iters), float(beta), estimator, equilibration
        self.state_lr = float(state_lr)
        self.synchronous = (equilibration == "gd") if synchronous is None else bool(synchronous)

    def options(self) -> dict[str, Any]:
        return {**super().options(), "iters": self.iters, "beta": self.beta, "estimator": self.estimator,
                "equilibration": self.equilibration, "state_lr": self.state_lr, "synchronous": self.synchronous,
                "fast": self.fast}

    def draw_signs(self, B: int, like: torch.Tensor) -> torch.Tensor:
        """The random estimator's signs s_b = ±1, shape (B,) (torch's global generator)."""
        return torch.randint(0, 2, (B,), device=like.device).to(like.dtype).mul_(2).sub_(1)

    # ---- the phases ------------------------------------------------------------------------------
    def _phases(self, B: int, like: torch.Tensor) -> list[tuple[str, torch.Tensor | float, torch.Tensor | float]]:
        """(name, nudge w, coefficient) per phase; β = 0 gives coefficient 0 (zero gradients)."""
        b, inv = self.beta, (1.0 / self.beta if self.beta > 0 else 0.0)
        est = self.estimator
        if est == "centered":
            return [("+beta", b, inv / 2), ("-beta", -b, -inv / 2)]
        if est == "positive":
            return [("+beta", b, inv)]
        if est == "negative":
            return [("-beta", -b, -inv)]
        if est == "clamp":
            return [("clamp", b, inv)]
        s = self.draw_signs(B, like)
        return [("random", s * b, s * inv)]

    def _relax(self, x, y, ff_states, out, trace, callback=None):
        chain = self._chain
        if chain is None or chain.x is not x:
            _ff_states, out = self._feedforward(x)
            chain = self._chain
        target = E.dense_target(y, out)
        ff_tapes = list(chain.tapes)
        phases = []
        with self._frozen(chain.netops), torch.no_grad():
            for name, w, coef in self._phases(x.shape[0], out):
                phases.append(self._equilibrate(chain, ff_tapes, target, name, w, coef, trace, callback))
        eqs = {p.name: self._equilibrium(p, target) for p in phases}
        eq = dataclasses.replace(eqs[phases[0].name], phases=eqs)  # the first phase, with all of them
        self._last = (eq, phases)
        return eq

    def _equilibrium(self, p: Phase, target) -> Equilibrium:
        trace = p.trace
        return Equilibrium(states=p.h[:-1], output=p.h[-1], energy=self._parts(p.eps, p.h[-1], target, p).sum(),
                           iters=p.iters, trace=None if trace is None else trace.sum(1), layer_trace=trace)

    def _parts(self, eps, out, target, p_or_w) -> torch.Tensor:
        """[½‖ε_1‖², …, ½‖ε_L‖², Σ_b w_b·C_b], each summed over the batch; their sum is F."""
        w = p_or_w.w if isinstance(p_or_w, Phase) else p_or_w
        zero = out.new_zeros(())
        parts = [zero if e is None else 0.5 * torch.dot(e.reshape(-1), e.reshape(-1)) for e in eps]
        parts.append(zero if self.estimator == "clamp" else E.energy([], out, target, self.loss, weight=w))
        return torch.stack(parts)

    # ---- EP's one equilibration loop ------------------------------------------------------------
    def _equilibrate(self, chain: Chain, ff_tapes: list[Tape], target: torch.Tensor, name: str,
                     w: torch.Tensor | float, coef: torch.Tensor | float, trace: bool, callback) -> Phase:
        """K sweeps of the configured equilibration from the FF state at nudge ``w``."""
        ops, L, x = chain.ops, len(chain.ops), chain.x
        chain.tapes[:] = ff_tapes
        h = [t.out for t in ff_tapes]  # h[k-1] = h_k; the FF tensors are never written into
        stale = [False] * (L + 2)  # stale[k]: block k's tape is not at the current h_{k-1}
        wcol = w.reshape(-1, *([1] * (h[-1].dim() - 1))) if isinstance(w, torch.Tensor) else w
        clamp = self.estimator == "clamp"
        low = L + 1  # the lowest layer that may differ from the FF state
        if clamp:
            h[-1] = h[-1] - self.beta * E.output_cost_grad(h[-1], target, self.loss)
            low = L

        def tape(k: int) -> Tape:
            if stale[k]:
                chain.forward(k - 1, x if k == 1 else h[k - 2])
                stale[k] = False
            return chain.tapes[k - 1]

        def error(k: int) -> torch.Tensor:
            return h[k - 1] - tape(k).out

        def delta(k: int) -> torch.Tensor | float:
            """Δ_k = J_{k+1}ᵀ ε_{k+1}, or −w·∂C/∂h_L at the output."""
            if k == L:
                return -wcol * E.output_cost_grad(h[-1], target, self.loss)
            tape(k + 1)
            return chain.vjp(k, error(k + 1))

        def update(k: int) -> torch.Tensor:
            if self.equilibration == "gd":
                return h[k - 1] - self.state_lr * (error(k) - delta(k))
            if self.equilibration == "fixed_point":
                return tape(k).out + delta(k)
            t, act = tape(k), ops[k - 1].act
            base = ops[k - 1].preact(t) if self.equilibration == "mod_pgd" else t.out
            return act(base + delta(k))

        def errors() -> list[torch.Tensor | None]:
            return [error(k) if k >= low else None for k in range(1, L + 1)]

        if self.synchronous:
            order = [list(range(1, L + 1))]
        else:
            order = [list(range(2, L + 1, 2)), list(range(1, L + 1, 2))]
        traces = [self._parts(errors(), h[-1], target, w)] if trace else None
        t = 0
        while t < self.iters:
            for layers in order:
                todo = [k for k in layers if k >= low - 1 and not (clamp and k == L)]
                new = [update(k) for k in todo]  # from the states before this sweep
                for k, v in zip(todo, new):
                    h[k - 1] = v
                    stale[k + 1] = True
                if todo:
                    low = min(low, todo[0])
            t += 1
            if traces is not None:
                traces.append(self._parts(errors(), h[-1], target, w))
            if callback is not None and callback(t, list(h[:-1])):
                break
        eps = errors()
        return Phase(name, list(h), list(chain.tapes), eps, low, w, coef, t,
                     None if traces is None else torch.stack(traces))

    # ---- the update ------------------------------------------------------------------------------
    def _weight_grads(self, x, y, eq):
        if self._last is None or self._last[0] is not eq:
            raise ValueError("ep computes its update from the phases of its own last inference")
        phases, chain = self._last[1], self._chain
        B = y.shape[0]
        with self._frozen(chain.netops), torch.no_grad():
            touched = set()
            for p in phases:
                for k, e in enumerate(p.eps):
                    if e is None:
                        continue
                    chain.tapes[k] = p.tapes[k]
                    if isinstance(p.coef, torch.Tensor):  # per-sample signs: (s_b/β)·ε_b
                        g = e * p.coef.reshape(-1, *([1] * (e.dim() - 1)))
                        chain.weight_grads(k, g, -1.0 / B)
                    else:
                        chain.weight_grads(k, e, -p.coef / B)
                    touched.add(k)
            for k in range(len(chain.ops)):
                if k not in touched:  # the nudge never reached block k: its gradient is exactly zero
                    chain.zero_weight_grads(k)
        self._flops_of = (chain.netops, chain.calls, chain.in_shapes())
        self._chain = self._last = None
