"""Backprop on the same PCNet: the ground truth every PC learner is judged against."""

from __future__ import annotations

import torch

from .. import energy as E
from ..precision import forward_in
from .base import Equilibrium, Learner
from .registry import register_learner


@register_learner("bp")
class BP(Learner):
    """Exact backprop of the batch-mean loss. ``infer`` returns the FF state (where the PC
    energy equals the output cost). ``precision``: see :mod:`fastpc.precision`; an ambient
    ``torch.autocast`` serves bp's autograd forward and backward as it serves any module's."""

    runs_under_autocast = True

    def __init__(self, net, loss="ce", optimizer=None, init="forward", init_options=None, precision="fp32"):
        super().__init__(net, loss=loss, optimizer=optimizer, init=init, init_options=init_options,
                         precision=precision)

    def smm(self, iters):
        """2L − 1: forward L, backward L − 1 (each weight gradient overlaps the next backward product)."""
        return 2 * len(self.net.blocks) - 1

    def _relax(self, x, y, ff_states, out, trace, callback=None):
        cost = E.output_cost(out, y, self.loss).detach()
        layers = torch.cat([torch.zeros(len(ff_states), dtype=cost.dtype, device=cost.device), cost[None]])
        return Equilibrium(
            states=[s.detach() for s in ff_states],
            output=out.detach(),
            energy=cost,
            iters=0,
            trace=cost[None] if trace else None,
            layer_trace=layers[None] if trace else None,
        )

    def _backward(self, x, y) -> tuple[torch.Tensor, torch.Tensor]:
        """Backprop of the batch-mean loss into ``p.grad``; returns (output, summed cost)."""
        self._check_input(x)
        with torch.enable_grad():
            out = self._fitting(x, lambda x: forward_in(self.precision, self.net, x))
            y = self._check_target(y, out)
            cost = E.output_cost(out, y, self.loss)
            (cost / y.shape[0]).backward()
        return out.detach(), cost.detach()

    def _grads(self, x, y):
        self.net.zero_grad(set_to_none=True)
        self._backward(x, y)
        named = {n: p.grad.detach().clone() for n, p in self.net.named_parameters() if p.grad is not None}
        self.net.zero_grad(set_to_none=True)
        return named

    def _step(self, x, y):
        self._check_optimizer()
        self.optimizer.zero_grad(set_to_none=True)
        out, cost = self._backward(x, y)
        self._apply_update()
        return self._step_result(cost, out, Equilibrium(states=[], output=out, energy=cost, iters=0))
