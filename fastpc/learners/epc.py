"""ePC: error-based predictive coding (PAPERS.md §2)."""

from __future__ import annotations

import torch

from .descent import Stack
from .pc import Chain, ChainRelaxation, PCLearner
from .registry import register_learner


class _EPCRelaxation(ChainRelaxation):
    """ePC's energy over the errors v = (ε_1, ..., ε_{L-1}): the states are rebuilt by the
    perturbed forward pass s_1 = f_1(x) + ε_1, s_i = f_i(s_{i-1}) + ε_i (f_1(x) from the FF
    pass), and ∇_{ε_i}E = ε_i + (∂ŷ/∂s_i)ᵀ ∂ℓ/∂ŷ comes from one backward pass through it."""

    sparse_grad = False

    def __init__(self, chain: Chain, errs0: list[torch.Tensor] | None, target, loss, whole: bool):
        super().__init__(chain, target, loss, whole)
        self.v = chain.stack("v", chain.state_shapes(), zero=errs0 is None)
        if errs0 is None:  # the FF state: zero errors, the FF pass is the first forward
            self.s = [t.out for t in chain.tapes[:-1]]
        else:
            self.v.assign(errs0, whole)
            self.s = [None] * (self.L - 1)
        self.err, self.dirty = self.v, errs0 is not None and self.L > 1

    def moved(self, start: int) -> None:
        self.dirty = True

    def forward(self) -> None:
        if not self.dirty:
            return
        chain, eps, L = self.chain, self.v.views, self.L
        s = chain.tapes[0].out + eps[0]
        for k in range(1, L):
            self.s[k - 1] = s
            out = chain.forward(k, s).out
            if k < L - 1:
                s = out + eps[k]
        self.dirty = False
        self._output_changed()

    def grad(self, out: Stack) -> int:
        chain, eps, L = self.chain, self.v.views, self.L
        parts: list[torch.Tensor | None] = [None] * (L - 1)
        d = self.out_grad()
        for k in range(L - 1, 0, -1):
            d = chain.vjp(k, d)  # (∂ŷ/∂s_k)ᵀ ∂ℓ/∂ŷ
            if self.whole:
                parts[k - 1] = eps[k - 1] + d
            else:
                torch.add(eps[k - 1], d, out=out.views[k - 1])
        if self.whole:
            out.assign(parts, True)
        return 0

    def states(self) -> list[torch.Tensor]:
        return list(self.s)


@register_learner("epc")
class EPC(PCLearner):
    """Error-based PC. The variables are the errors ε_1..ε_{L-1}; states are rebuilt by the
    perturbed forward pass s_i = f_i(s_{i-1}) + ε_i, so the output signal reaches every layer
    in one backward pass. ``iters`` SGD steps of size ``state_lr`` (η_e) on
    E(ε) = ½Σ‖ε_i‖² + ℓ(ŷ(ε), y), starting from the errors of the ``init`` states (zero for
    the FF state). Then the shared local weight update.

    ``rescale=True`` is the reference code's energy-scale rule: the weight loss is also divided
    by min(1, η_e·T), undoing the small-error scale (matters with SGD, not with Adam).
    ``safeguard=True`` (default, ``armijo`` 0.99) is the backtracking line search of
    :mod:`fastpc.learners.descent`: it keeps η·κ·T small, where κ is the curvature along the
    step, so the update stays aligned with BP even when training grows the deep Jacobian
    (fixed-step ePC diverges on a deep MLP after enough training). ``safeguard=False`` is plain
    fixed-step ePC. ``fast`` and ``compile``: see :class:`~fastpc.learners.pc.PCLearner`.
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
        rescale: bool = False,
        safeguard: bool = True,
        armijo: float = 0.99,
        fast: bool | str = "auto",
        compile: bool = False,
    ):
        super().__init__(net, loss, optimizer, init, init_options, iters=iters, state_lr=state_lr,
                         momentum=momentum, safeguard=safeguard, armijo=armijo, fast=fast, compile=compile)
        self.rescale = bool(rescale)

    def options(self):
        return {**super().options(), "rescale": self.rescale}

    def _problem(self, chain, states0, target, from_ff, whole):
        errs0 = None
        if not from_ff and states0:  # the errors of the initial states
            errs0 = [states0[0] - chain.tapes[0].out]
            errs0 += [s - chain.forward(k, p).out for k, (p, s) in enumerate(zip(states0[:-1], states0[1:]), 1)]
        return _EPCRelaxation(chain, errs0, target, self.loss, whole)

    def _weight_scale(self, B):
        scale = 1.0 / B
        if self.rescale:
            scale /= min(1.0, self.state_lr * self.iters) if self.iters > 0 else 1.0
        return scale
