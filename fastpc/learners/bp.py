"""Backprop on the same PCNet: the ground truth every PC learner is judged against."""

from __future__ import annotations

import torch

from .. import energy as E
from . import register_learner
from .base import Equilibrium, Learner


@register_learner("bp")
class BP(Learner):
    """Exact backprop of the batch-mean loss. ``infer`` returns the FF state (where the PC
    energy equals the output cost)."""

    def __init__(self, net, loss="ce", optimizer=None, init="forward"):
        super().__init__(net, loss=loss, optimizer=optimizer, init=init)

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

    def _backward(self, x, y) -> torch.Tensor:
        with torch.enable_grad():
            out = self.net(x)
            loss = E.output_cost(out, y, self.loss) / y.shape[0]
            loss.backward()
        return out.detach()

    def grads(self, x, y):
        self.net.zero_grad(set_to_none=True)
        self._backward(x, y)
        named = {n: p.grad.detach().clone() for n, p in self.net.named_parameters() if p.grad is not None}
        self.net.zero_grad(set_to_none=True)
        return named

    def step(self, x, y):
        if self.optimizer is None:
            raise ValueError("step() needs an optimizer: pass optimizer=... to make_learner")
        self.optimizer.zero_grad(set_to_none=True)
        out = self._backward(x, y)
        self.optimizer.step()
        cost = E.output_cost(out, y, self.loss)
        return self._step_result(cost, out, Equilibrium(states=[], output=out, energy=cost, iters=0))
