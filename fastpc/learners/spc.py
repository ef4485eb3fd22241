"""sPC: state-based predictive coding, a.k.a. inference learning (PAPERS.md §1), and iPC."""

from __future__ import annotations

import math

import torch

from .base import check_option
from .descent import Stack
from .chain import Chain
from .pc import ChainRelaxation, PCLearner
from .registry import register_learner
from .sequential import SequentialRelaxation, sweeps


class _SPCRelaxation(ChainRelaxation):
    """sPC's energy over the states v = (s_1, ..., s_{L-1}): ε_i = s_i − f_i(s_{i-1}),
    ∇_{s_i}E = ε_i − J_{i+1}ᵀ ε_{i+1} (the top hidden layer: + J_Lᵀ ∂ℓ/∂ŷ).

    Activity tracking: ``stale`` is the first block whose input moved since its tape (L: none),
    ``nz`` the first hidden layer whose error may be non-zero. From the FF state only the output
    cost is non-zero and the signal moves down one layer per step, so the blocks it has not
    reached keep their FF tapes and no product touches their exactly-zero errors.

    Generative mode (``chain.x`` None): v = (s_0, s_1, ..., s_{L-1}) with the latent s_0 free,
    ∇_{s_0}E = prior·s_0 − J_1ᵀ ε_1; every error is tracked (``nz`` = 1) and the whole gradient
    written. ``from_ff``: the hidden states are the FF pass from s_0 (tapes current, errors 0)."""

    def __init__(self, chain: Chain, states0, target, loss, from_ff: bool, whole: bool, prior: float = 0.0):
        super().__init__(chain, target, loss, whole)
        shapes = chain.state_shapes()
        self.g = g = int(chain.x is None)  # generative: views[i] is s_i, else s_{i+1}
        self.v = chain.stack("v", [chain.tapes[0].s.shape] * g + shapes, per_tensor=whole)
        # views[filled:] hold the states; below, the FF states (from_ff: states0) are copied in
        # only when a layer first moves (at depth most layers never do within T steps)
        self._ff, self.filled = list(states0), 0
        if from_ff and not g and not whole:
            self.filled = len(shapes)
        else:
            self.v.assign(states0)
        self.err = chain.stack("err", shapes, bool(g), whole)  # ε_i is read from layer nz on only
        self.nz = 1 if g else self.L
        self.from_ff, self.stale = from_ff, (self.L if from_ff else 1 - g)
        if g:
            self.latent, self.prior, self.sparse_grad = self.v.views[0], prior, False

    def _fill(self, first: int) -> None:
        """Make views[first:] hold the states (copy in the FF states not yet there)."""
        for i in range(first, self.filled):
            self.v.views[i].copy_(self._ff[i])
        self.filled = min(self.filled, first)

    def moved(self, start: int) -> None:
        self.stale = min(self.stale, self.v.index(start) + 1 - self.g)  # views[i] is block i + 1 - g's input

    def weights_changed(self) -> None:
        """Every tape is out of date, the clamped input's prediction too (iPC)."""
        self._fill(0)
        self.stale = 0

    def forward(self) -> None:
        lo, L = self.stale, self.L
        if lo >= L:
            return
        self._fill(max(lo, 1) - 1)  # the blocks from lo read s_lo.. (views lo - 1..), the errors too
        chain, s, eps = self.chain, self.v.views, self.err.views
        g = self.g
        if lo == 0:
            chain.forward(0, s[0] if g else chain.x)
        for k in range(max(lo, 1), L):
            chain.forward(k, s[k - 1 + g])
        self.nz = min(self.nz, max(lo, 1))
        if self.whole:
            self.err.put([None if j + 1 < self.nz else s[j + g] - chain.tapes[j].out for j in range(L - 1)])
        else:  # ε_i = s_i − μ_i for every i whose state or prediction moved (views index i - 1)
            for j in range(max(lo, 1) - 1, L - 1):
                torch.sub(s[j + g], chain.tapes[j].out, out=eps[j])
        self.stale = L
        self._output_changed()

    @property
    def grad_scratch(self) -> Stack | None:  # type: ignore[override]
        """The errors' flat stack (the states' shapes): :meth:`grad` may write ∇E over it."""
        return None if self.g or self.whole else self.err

    def grad(self, out: Stack) -> int:
        chain, eps, L, nz = self.chain, self.err.views, self.L, self.nz
        lo = max(1, min(nz - 1, L - 1))  # the first hidden layer with a non-zero gradient
        o = self.g  # generative: hidden layer i is views index i, the latent index 0
        parts: list[torch.Tensor | None] = [None] * (L - 1 + o)
        # bottom-up: with out the errors themselves (grad_scratch), layer i reads ε_{i+1} before
        # layer i + 1 overwrites it, and writes ∇_{s_i}E over ε_i in place (one addmm, no copy)
        for i in range(lo - o, L):  # hidden layer i: views index i - 1 + o
            g, sign = (self.out_grad(), 1.0) if i == L - 1 else (eps[i], -1.0)  # ε_{i+1} = eps[i]
            acc = self.latent * self.prior if i == 0 else None if i < nz else eps[i - 1]  # ε_i, zero below nz
            if self.whole:
                gv = chain.vjp(i, g) * sign
                parts[i - 1 + o] = gv if acc is None else acc + gv
            else:
                chain.vjp_into(i, g, out.views[i - 1 + o], acc, sign)
        if self.whole:
            out.put(parts)
        if o:
            return 0
        self._fill(lo - 1)  # the loop moves the variables from here on
        return out.offsets[lo - 1]

    def states(self) -> list[torch.Tensor]:
        v, f = self.v.views, self.filled
        return [*self._ff[:f], *v[f:]] if f else list(v)

    def final_states(self) -> list[torch.Tensor]:
        # a state below nz never moved from the FF state: its tensor from the FF pass
        if self.whole:
            return self.states()
        return [self._ff[i] if self.from_ff and i + 1 < self.nz else s.clone() for i, s in enumerate(self.states())]


@register_learner("spc")
class SPC(PCLearner):
    """State-based PC. Inference: ``iters`` steps of gradient descent on E w.r.t. the hidden
    states s_1..s_{L-1} (step ``state_lr`` = λ, optional ``momentum``, or Adam with
    ``state_optimizer="adam"``), from the states ``init`` gives (FF state by default). Then the
    local weight update. ``incremental=True`` is iPC: a weight step after every inference step
    (later steps see the new weights). ``safeguard=True``: the backtracking line search of
    :mod:`fastpc.learners.descent` with ``armijo`` (``armijo=0``: the energy must not rise).
    The Armijo constant governs the first ``armijo_steps``
    steps (20); later steps need only not raise E and grow while safe, so a long inference
    converges at the rate of a good fixed step. ``tol``: stop once ‖∇E‖ ≤ tol·‖∇E at the first
    step‖ (``iters`` is the cap; ``infer(...).iters`` tells how many ran).
    ``fast`` and ``compile``: see :class:`~fastpc.learners.pc.PCLearner` (iPC runs eagerly).
    ``schedule="sequential"`` is SeqIL (PAPERS.md §4, :mod:`fastpc.learners.sequential`):
    ``iters`` top-down sweeps with steps state_lr/(1+t), always eager; ``beta`` soft-clamps
    the target (m = 1/(1+β)), for the sweeps and the weight update. It takes none of momentum,
    state_optimizer='adam', safeguard, incremental (``ValueError``); ``tol`` stops the sweeps once
    a sweep's gradient norm is ≤ tol × the first sweep's.
    Generative mode (``step(None, images)``, schedule 'simultaneous'): the latent s_0 is one more
    state, with the prior ½·``prior``·‖s_0‖² (default 1: E is then −log p(y, s) of a model with
    s_0 ~ N(0, I) and unit-variance Gaussian layers, and inference its MAP estimate; 0: none).
    """

    def __init__(
        self,
        net,
        loss="ce",
        optimizer=None,
        init="forward",
        init_options=None,
        iters: int = 5,
        state_lr: float = 0.1,
        momentum: float = 0.0,
        state_optimizer: str = "sgd",
        incremental: bool = False,
        safeguard: bool = False,
        armijo: float = 0.0,
        fast: bool | str = "auto",
        compile: bool = False,
        tol: float | None = None,
        armijo_steps: int = 20,
        schedule: str = "simultaneous",
        beta: float | None = None,
        prior: float = 1.0,
        precision: str = "fp32",
    ):
        super().__init__(net, loss, optimizer, init, init_options, iters=iters, state_lr=state_lr,
                         momentum=momentum, safeguard=safeguard, armijo=armijo, fast=fast, compile=compile,
                         state_optimizer=state_optimizer, tol=tol, armijo_steps=armijo_steps, prior=prior,
                         precision=precision)
        self.incremental = bool(incremental)
        self.schedule, self.beta = schedule, (None if beta is None else float(beta))
        self._check_schedule()

    def options(self):
        return {**super().options(), "state_optimizer": self.state_optimizer, "incremental": self.incremental,
                "schedule": self.schedule, "beta": self.beta}

    def _check_schedule(self) -> None:
        """``ValueError`` for a schedule, beta or an option that does not combine with them."""
        check_option(self.schedule in ("simultaneous", "sequential"),
                     f"schedule must be 'simultaneous' or 'sequential', got {self.schedule!r}")
        b = self.beta
        check_option(b is None or (math.isfinite(b) and b > 0), f"beta must be a finite number > 0 or None, got {b!r}")
        if self.schedule == "simultaneous":
            check_option(b is None, "beta (the soft-clamped target) applies with schedule='sequential' only")
            return
        clash = [name for name, on in (("incremental", self.incremental), ("safeguard", self.safeguard),
                                       ("momentum", self.momentum != 0),
                                       ("state_optimizer='adam'", self.state_optimizer != "sgd")) if on]
        check_option(not clash, f"schedule='sequential' takes plain sweeps with steps state_lr/(1+t); it does not "
                     f"combine with {', '.join(clash)} (its options: iters, state_lr, beta, tol, init, fast)")

    def smm(self, iters):
        """2 per inference step (every prediction μ_i = f_i(s_{i−1}) at once, then every
        J_{i+1}ᵀ ε_{i+1} at once): 2T, iPC too (its weight step runs beside the next products);
        the sequential schedule (SeqIL) sweeps the layers top-down: 2(L − 1) per sweep."""
        if self.schedule == "sequential":
            return 2 * (len(self.net.blocks) - 1) * int(iters)
        return 2 * int(iters)

    def _compilable(self) -> bool:
        return not self.incremental and self.schedule == "simultaneous"

    @property
    def generative(self) -> bool:  # type: ignore[override]
        return self.schedule == "simultaneous"

    def _problem(self, chain, states0, target, from_ff, whole):
        if self.schedule == "sequential":
            return SequentialRelaxation(chain, states0, target, self.loss, from_ff, self.beta)
        return _SPCRelaxation(chain, states0, target, self.loss, from_ff, whole, self.prior)

    def _infer_on(self, problem, trace, after_step):
        if self.schedule == "sequential":  # SeqIL: top-down sweeps instead of minimize
            return sweeps(problem, self.iters, self.state_lr, trace, after_step, self.tol)
        return super()._infer_on(problem, trace, after_step)

    def _step(self, x, y):
        if not self.incremental:
            return super()._step(x, y)
        self._check_optimizer()
        ff_states, out, y = self._start(x, y)
        scale = self._weight_scale(y.shape[0])

        refused = []  # inference steps whose weight update was refused

        def weight_step(problem: _SPCRelaxation, t: int) -> None:
            self.optimizer.zero_grad(set_to_none=True)
            problem.weight_grads(scale)
            if not self._apply_update():
                refused.append(t)
            problem.weights_changed()

        eq = self._run_relax(x, y, ff_states, out, False, weight_step)
        self._observe(x, y, eq, not refused)
        out = out if x is not None else eq.output
        cost = self._output_cost(out, y)
        self._chain = self._last = None
        return self._step_result(cost, out, eq)
