"""sPC: state-based predictive coding, a.k.a. inference learning (PAPERS.md §1), and iPC."""

from __future__ import annotations

import torch

from .descent import Stack
from .pc import Chain, ChainRelaxation, PCLearner
from .registry import register_learner


class _SPCRelaxation(ChainRelaxation):
    """sPC's energy over the states v = (s_1, ..., s_{L-1}): ε_i = s_i − f_i(s_{i-1}),
    ∇_{s_i}E = ε_i − J_{i+1}ᵀ ε_{i+1} (the top hidden layer: + J_Lᵀ ∂ℓ/∂ŷ).

    Activity tracking: ``stale`` is the first block whose input moved since its tape (L: none),
    ``nz`` the first hidden layer whose error may be non-zero. From the FF state only the output
    cost is non-zero and the signal moves down one layer per step, so the blocks it has not
    reached keep their FF tapes and no product touches their exactly-zero errors."""

    def __init__(self, chain: Chain, states0, target, loss, from_ff: bool, whole: bool):
        super().__init__(chain, target, loss, whole)
        shapes = chain.state_shapes()
        self.v = chain.stack("v", shapes)
        self.v.assign(states0, whole)
        self.err = chain.stack("err", shapes)  # ε_i is read from layer nz on only
        self.nz = self.L
        self.from_ff, self.stale = from_ff, (self.L if from_ff else 1)

    def moved(self, start: int) -> None:
        self.stale = min(self.stale, self.v.index(start) + 1)  # views[i] is s_{i+1}, block i+1's input

    def weights_changed(self) -> None:
        """Every tape is out of date, the clamped input's prediction too (iPC)."""
        self.stale = 0

    def forward(self) -> None:
        lo, L = self.stale, self.L
        if lo >= L:
            return
        chain, s, eps = self.chain, self.v.views, self.err.views
        if lo == 0:
            chain.forward(0, chain.x)
        for k in range(max(lo, 1), L):
            chain.forward(k, s[k - 1])
        self.nz = min(self.nz, max(lo, 1))
        if self.whole:
            self.err.assign([None if j + 1 < self.nz else s[j] - chain.tapes[j].out for j in range(L - 1)], True)
        else:  # ε_i = s_i − μ_i for every i whose state or prediction moved (views index i - 1)
            for j in range(max(lo, 1) - 1, L - 1):
                torch.sub(s[j], chain.tapes[j].out, out=eps[j])
        self.stale = L
        self._output_changed()

    def grad(self, out: Stack) -> int:
        chain, eps, L, nz = self.chain, self.err.views, self.L, self.nz
        lo = max(1, min(nz - 1, L - 1))  # the first hidden layer with a non-zero gradient
        parts: list[torch.Tensor | None] = [None] * (L - 1)
        for i in range(L - 1, lo - 1, -1):  # hidden layer i: views index i - 1
            g, sign = (self.out_grad(), 1.0) if i == L - 1 else (eps[i], -1.0)  # ε_{i+1} = eps[i]
            acc = None if i < nz else eps[i - 1]  # ε_i, exactly zero below nz
            if self.whole:
                gv = chain.vjp(i, g) * sign
                parts[i - 1] = gv if acc is None else acc + gv
            else:
                chain.vjp_into(i, g, out.views[i - 1], acc, sign)
        if self.whole:
            out.assign(parts, True)
        return out.offsets[lo - 1]

    def states(self) -> list[torch.Tensor]:
        return list(self.v.views)

    def final_states(self) -> list[torch.Tensor]:
        # a state below nz never moved from the FF state: its tensor from the FF pass
        if self.whole:
            return self.states()
        return [self.chain.tapes[i].out if self.from_ff and i + 1 < self.nz else s.clone()
                for i, s in enumerate(self.v.views)]


@register_learner("spc")
class SPC(PCLearner):
    """State-based PC. Inference: ``iters`` steps of gradient descent on E w.r.t. the hidden
    states s_1..s_{L-1} (step ``state_lr`` = λ, optional ``momentum``, or Adam with
    ``state_optimizer="adam"``), from the states ``init`` gives (FF state by default). Then the
    local weight update. ``incremental=True`` is iPC: a weight step after every inference step
    (later steps see the new weights). ``safeguard=True``: the backtracking line search of
    :mod:`fastpc.learners.descent` with ``armijo`` (``armijo=0``: the energy must not rise).
    ``fast`` and ``compile``: see :class:`~fastpc.learners.pc.PCLearner` (iPC runs eagerly).
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
    ):
        super().__init__(net, loss, optimizer, init, init_options, iters=iters, state_lr=state_lr,
                         momentum=momentum, safeguard=safeguard, armijo=armijo, fast=fast, compile=compile,
                         state_optimizer=state_optimizer)
        self.incremental = bool(incremental)

    def options(self):
        return {**super().options(), "state_optimizer": self.state_optimizer, "incremental": self.incremental}

    def _compilable(self) -> bool:
        return not self.incremental

    def _problem(self, chain, states0, target, from_ff, whole):
        return _SPCRelaxation(chain, states0, target, self.loss, from_ff, whole)

    def step(self, x, y):
        if not self.incremental:
            return super().step(x, y)
        self._check_optimizer()
        ff_states, out = self._feedforward(x)
        y = self._check_target(y, out)
        scale = self._weight_scale(y.shape[0])

        def weight_step(problem: _SPCRelaxation, t: int) -> None:
            self.optimizer.zero_grad(set_to_none=True)
            problem.weight_grads(scale)
            self._apply_update()
            problem.weights_changed()

        eq = self._run_relax(x, y, ff_states, out, False, weight_step)
        self.init.observe(x, y, eq.states)
        cost = self._output_cost(out, y)
        self._chain = self._last = None
        return self._step_result(cost, out, eq)
