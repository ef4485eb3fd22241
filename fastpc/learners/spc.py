"""sPC: state-based predictive coding, a.k.a. inference learning (PAPERS.md §1), and iPC."""

from __future__ import annotations

from .. import energy as E
from .. import fast as _fast
from ..init import ForwardInit
from ..nets import frozen_batchnorm_stats
from . import register_learner
from .base import Learner, _check, descend


@register_learner("spc")
class SPC(_fast.FastPath, Learner):
    """State-based PC. Inference: ``iters`` steps of gradient descent on E w.r.t. the hidden
    states s_1..s_{L-1} (step ``state_lr`` = λ, optional ``momentum``, or Adam with
    ``state_optimizer="adam"``), from the states ``init`` gives (FF state by default). Then the
    local weight update. ``incremental=True`` is iPC: a weight step after every inference step.
    ``safeguard=True`` backtracks any step that does not decrease a sample's energy by
    ``armijo`` × its predicted decrease (``armijo=0``: any step that raises it).
    ``fast`` ("auto", True, False): the analytic fast path of :mod:`fastpc.fast` for MLP nets
    with SGD/momentum state updates, safeguard included (not Adam or incremental); same numbers.
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
        super().__init__(net, loss=loss, optimizer=optimizer, init=init, init_options=init_options)
        _check(state_optimizer in ("sgd", "adam"), f"state_optimizer must be 'sgd' or 'adam', got {state_optimizer!r}")
        _check(not (safeguard and state_optimizer == "adam"), "safeguard works with state_optimizer='sgd' only")
        self._set_inference_options(iters, state_lr, momentum, safeguard, armijo)
        self.state_optimizer, self.incremental = state_optimizer, bool(incremental)
        self._init_fast(fast, compile)

    def _fast_conflict(self):
        if self.state_optimizer != "sgd":
            return f"state_optimizer={self.state_optimizer!r} is not covered by the fast path"
        if self.incremental:
            return "incremental=True (iPC) is not covered by the fast path"
        return None

    def options(self):
        return {
            **super().options(),
            "iters": self.iters,
            "state_lr": self.state_lr,
            "momentum": self.momentum,
            "state_optimizer": self.state_optimizer,
            "incremental": self.incremental,
            "safeguard": self.safeguard,
            "armijo": self.armijo,
        }

    def _energy_fn(self, x, y):
        blocks = self.blocks
        mu1 = blocks[0](x).detach() if len(blocks) > 1 else None  # the clamped input's prediction

        def energy_fn(states):
            preds = [mu1] + [b(s) for b, s in zip(blocks[1:-1], states[:-1])]
            out = blocks[-1](states[-1] if states else x)
            errs = E.errors(states, preds)
            return E.energy_per_sample(errs, out, y, self.loss), errs, out

        return energy_fn

    def _relax(self, x, y, ff_states, out, trace, callback=None):
        states0 = self.init(ff_states, x, y)
        if not states0:  # a single block: nothing to infer
            return self._equilibrium(x, y, [], 0, [] if trace else None)
        run = self._fast_run
        if run is not None and run.x is x:
            states, traces, iters, final = _fast.spc_relax(
                run, [s.detach() for s in states0], y, self.loss, self.iters, self.state_lr,
                momentum=self.momentum, trace=trace, callback=callback,
                from_ff=type(self.init) is ForwardInit,
                safeguard=self.safeguard, armijo=self.armijo,
            )
            return self._fast_equilibrium(run, states, traces, iters, final)
        with frozen_batchnorm_stats(self.net):
            states, traces, iters = descend(
                states0,
                self._energy_fn(x, y),
                y,
                self.loss,
                self.iters,
                self.state_lr,
                momentum=self.momentum,
                optimizer=self.state_optimizer,
                safeguard=self.safeguard, armijo=self.armijo,
                trace=trace,
                after_step=None if callback is None else (lambda t, vs: callback(t, [v.detach() for v in vs])),
            )
        return self._equilibrium(x, y, states, iters, traces)

    def step(self, x, y):
        if not self.incremental:
            return super().step(x, y)
        self._check_optimizer()
        ff_states, out = self._feedforward(x)
        y = self._check_target(y, out)

        def weight_step(t, states):
            self.optimizer.zero_grad(set_to_none=True)
            self._weight_grads(x, y, _States(states))
            self._apply_update()

        eq = self._relax(x, y, ff_states, out, False, callback=weight_step)
        self.init.observe(x, y, eq.states)
        return self._step_result(self._output_cost(out, y), out, eq)


class _States:
    """The minimal equilibrium view ``_weight_grads`` reads (iPC updates mid-inference)."""

    def __init__(self, states):
        self.states = [s.detach() for s in states]
