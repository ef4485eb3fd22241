"""ePC: error-based predictive coding (PAPERS.md §2)."""

from __future__ import annotations

import torch

from .descent import Stack
from .chain import Chain
from .pc import ChainRelaxation, PCLearner
from .registry import register_learner


class _EPCRelaxation(ChainRelaxation):
    """ePC's energy over the errors v = (ε_1, ..., ε_{L-1}): the states are rebuilt by the
    perturbed forward pass s_1 = f_1(x) + ε_1, s_i = f_i(s_{i-1}) + ε_i (f_1(x) from the FF
    pass), and ∇_{ε_i}E = ε_i + (∂ŷ/∂s_i)ᵀ ∂ℓ/∂ŷ comes from one backward pass through it.

    Generative mode (``chain.x`` None): v = (s_0, ε_1, ..., ε_{L-1}): the latent s_0 is a free
    variable beside the errors, the perturbed forward pass starts from it (s_1 = f_1(s_0) + ε_1),
    and the same backward pass continues through block 1: ∇_{s_0}E = prior·s_0 + (∂ŷ/∂s_0)ᵀ ∂ℓ/∂ŷ.
    ``latent``: s_0 to start from (the errors start at ``errs0``, or 0)."""

    sparse_grad = False

    def __init__(self, chain: Chain, errs0: list[torch.Tensor] | None, target, loss, whole: bool,
                 latent: torch.Tensor | None = None, prior: float = 0.0):
        super().__init__(chain, target, loss, whole)
        self.g = g = int(chain.x is None)
        self.v = chain.stack("v", [chain.tapes[0].s.shape] * g + chain.state_shapes(), errs0 is None, whole)
        if errs0 is None:  # the FF state: zero errors, the FF pass is the first forward
            self.s = [t.out for t in chain.tapes[:-1]]
        else:
            self.v.assign([latent] * g + errs0)
            self.s = [None] * (self.L - 1)
        self.err, self.dirty = (self.v.sub(1) if g else self.v), errs0 is not None and self.L > 1 - g
        if g:
            self.latent, self.prior = self.v.views[0], prior
            if errs0 is None:
                self.latent.copy_(latent)

    def moved(self, start: int) -> None:
        self.dirty = True

    def forward(self) -> None:
        if not self.dirty:
            return
        chain, eps, L = self.chain, self.err.views, self.L
        out = chain.forward(0, self.latent).out if self.g else chain.tapes[0].out
        for k in range(1, L):
            s = self.s[k - 1] = out + eps[k - 1]
            out = chain.forward(k, s).out
        self.dirty = False
        self._output_changed()

    def grad(self, out: Stack) -> int:
        chain, eps, L, g = self.chain, self.err.views, self.L, self.g
        parts: list[torch.Tensor | None] = [None] * (L - 1 + g)
        d = self.out_grad()
        for k in range(L - 1, 0, -1):
            d = chain.vjp(k, d)  # (∂ŷ/∂s_k)ᵀ ∂ℓ/∂ŷ
            if self.whole:
                parts[k - 1 + g] = eps[k - 1] + d
            else:
                torch.add(eps[k - 1], d, out=out.views[k - 1 + g])
        if g:  # the latent: prior·s_0 + J_1ᵀ d
            if self.whole:
                parts[0] = self.latent * self.prior + chain.vjp(0, d)
            else:
                chain.vjp_into(0, d, out.views[0], self.latent * self.prior, 1.0)
        if self.whole:
            out.put(parts)
        return 0

    def states(self) -> list[torch.Tensor]:
        return [self.latent.clone(), *self.s] if self.g else list(self.s)


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
    fixed-step ePC. The Armijo constant governs the first ``armijo_steps``
    steps (20); later steps need only not raise E and grow while safe, so a long inference
    converges at the rate of a good fixed step. ``tol``: stop once ‖∇E‖ ≤ tol·‖∇E at the first
    step‖ (``iters`` is the cap; ``infer(...).iters`` tells how many ran).
    ``fast`` and ``compile``: see :class:`~fastpc.learners.pc.PCLearner`.
    Generative mode (``step(None, images)``): the latent s_0 joins the errors as a free variable
    (the perturbed forward pass starts from it), with the prior ½·``prior``·‖s_0‖² (as spc's).
    """

    generative = True

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
        tol: float | None = None,
        armijo_steps: int = 20,
        prior: float = 1.0,
        precision: str = "fp32",
    ):
        super().__init__(net, loss, optimizer, init, init_options, iters=iters, state_lr=state_lr,
                         momentum=momentum, safeguard=safeguard, armijo=armijo, fast=fast, compile=compile,
                         tol=tol, armijo_steps=armijo_steps, prior=prior, precision=precision)
        self.rescale = bool(rescale)

    def options(self):
        return {**super().options(), "rescale": self.rescale}

    def _problem(self, chain, states0, target, from_ff, whole):
        errs0 = None
        if not from_ff and states0:  # the errors of the initial states
            errs0 = [states0[0] - chain.tapes[0].out]
            errs0 += [s - chain.forward(k, p).out for k, (p, s) in enumerate(zip(states0[:-1], states0[1:]), 1)]
        latent = states0[0] if chain.x is None else None  # generative: hidden states from FF of s_0
        return _EPCRelaxation(chain, errs0, target, self.loss, whole, latent, self.prior)

    def smm(self, iters):
        """2(L − 1) per inference step: the perturbed forward pass re-runs blocks 2..L one after
        another (f_1(x) is fixed) and the backward pass that gives every ∇_ε E is L − 1
        products in sequence. (In generative mode block 1 re-runs too: 2L per step, not counted
        apart here.)"""
        return 2 * (len(self.net.blocks) - 1) * int(iters)

    def _weight_scale(self, B):
        scale = 1.0 / B
        if self.rescale:
            scale /= min(1.0, self.state_lr * self.iters) if self.iters > 0 else 1.0
        return scale
