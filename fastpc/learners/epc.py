"""ePC: error-based predictive coding (PAPERS.md §2)."""

from __future__ import annotations

import torch

from .. import energy as E
from .. import fast as _fast
from ..init import ForwardInit
from ..nets import frozen_batchnorm_stats
from . import register_learner
from .base import Learner, descend


@register_learner("epc")
class EPC(_fast.FastPath, Learner):
    """Error-based PC. The variables are the errors ε_1..ε_{L-1}; states are rebuilt by the
    perturbed forward pass s_i = f_i(s_{i-1}) + ε_i, so the output signal reaches every layer
    in one backward pass. ``iters`` SGD steps of size ``state_lr`` (η_e) on
    E(ε) = ½Σ‖ε_i‖² + ℓ(ŷ(ε), y), starting from the errors of the ``init`` states (zero for
    the FF state). Then the shared local weight update.

    ``rescale=True`` is the reference code's energy-scale rule: the weight loss is also divided
    by min(1, η_e·T), undoing the small-error scale (matters with SGD, not with Adam).
    ``safeguard=True`` is a per-sample backtracking line search (see
    :func:`fastpc.learners.base.descend`): a step must decrease the sample's energy by at least
    ``armijo`` × the decrease its gradient predicts, else it is undone and shrunk to the
    curvature along it. ``armijo=0``: the energy must not rise. The default (on, 0.99) keeps
    η·κ·T small, where κ is the curvature along the step: the update then stays aligned with
    BP even when training grows the deep Jacobian (fixed-step ePC with η_e = 0.01–0.1 diverges
    on a 20-layer MLP within ~150 steps, with η_e = 0.001 after ~1200). ``safeguard=False``
    is plain fixed-step ePC.
    ``fast`` ("auto", True, False): the analytic fast path of :mod:`fastpc.fast` for MLP nets
    (safeguard included); same numbers.
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
        super().__init__(net, loss=loss, optimizer=optimizer, init=init, init_options=init_options)
        self._set_inference_options(iters, state_lr, momentum, safeguard, armijo)
        self.rescale = bool(rescale)
        self._init_fast(fast, compile)

    def options(self):
        return {
            **super().options(),
            "iters": self.iters,
            "state_lr": self.state_lr,
            "momentum": self.momentum,
            "rescale": self.rescale,
            "safeguard": self.safeguard,
            "armijo": self.armijo,
        }

    def _states_from_errors(self, x, mu1, errs):
        """s_1 = f_1(x) + ε_1, s_i = f_i(s_{i-1}) + ε_i; returns (states, output)."""
        states = [mu1 + errs[0]]
        for block, eps in zip(self.blocks[1:-1], errs[1:]):
            states.append(block(states[-1]) + eps)
        return states, self.blocks[-1](states[-1])

    def _relax(self, x, y, ff_states, out, trace, callback=None):
        states0 = self.init(ff_states, x, y)
        if not states0:
            return self._equilibrium(x, y, [], 0, [] if trace else None)
        mu1 = ff_states[0].detach()  # f_1(x): the clamped input's prediction
        errs0 = None  # the FF state's errors are exactly zero
        if type(self.init) is not ForwardInit:
            with frozen_batchnorm_stats(self.net), torch.no_grad():  # errors of the initial states
                errs0 = [states0[0] - mu1] + [
                    s - b(p) for b, p, s in zip(self.blocks[1:-1], states0[:-1], states0[1:])
                ]
        run = self._fast_run
        if run is not None and run.x is x:
            states, traces, iters, final = _fast.epc_relax(
                run, errs0, y, self.loss, self.iters, self.state_lr,
                momentum=self.momentum, trace=trace, callback=callback,
                safeguard=self.safeguard, armijo=self.armijo,
            )
            return self._fast_equilibrium(run, states, traces, iters, final)
        if errs0 is None:
            errs0 = [torch.zeros_like(s) for s in states0]

        def energy_fn(errs):
            _, o = self._states_from_errors(x, mu1, errs)
            return E.energy_per_sample(errs, o, y, self.loss), errs, o

        def after_step(t, errs):
            with torch.no_grad():
                return callback(t, self._states_from_errors(x, mu1, errs)[0])

        with frozen_batchnorm_stats(self.net):
            errs, traces, iters = descend(
                errs0, energy_fn, y, self.loss, self.iters, self.state_lr,
                momentum=self.momentum, safeguard=self.safeguard, armijo=self.armijo, trace=trace,
                after_step=None if callback is None else after_step,
            )
            with torch.no_grad():
                states, _ = self._states_from_errors(x, mu1, errs)
        return self._equilibrium(x, y, states, iters, traces)

    def _weight_scale(self, B):
        scale = 1.0 / B
        if self.rescale:
            scale /= min(1.0, self.state_lr * self.iters) if self.iters > 0 else 1.0
        return scale
