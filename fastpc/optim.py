"""Optimizers the papers add, in the ``torch.optim`` style (PAPERS.md §4).

:class:`MQ` ("matrix update equalization", Alonso, Krichmar and Neftci 2024) keeps one scalar
per weight matrix, its bias included, where Adam keeps two buffers per weight. :func:`mq` is
its arithmetic on one matrix; the class only keeps ``param_groups`` and ``state``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from numbers import Real
from typing import Any

import torch
from torch import nn

__all__ = ["MQ", "mq"]

# modules whose weight and bias are one matrix with its bias and so share one v
_MATRIX_MODULES = (nn.Linear, nn.Bilinear, nn.modules.conv._ConvNd)


def mq(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    v: torch.Tensor,
    n: int,
    *,
    lr: float,
    r: float,
    lr_min: float,
    rho_max: float,
    maximize: bool = False,
) -> None:
    """One MQ step on one matrix (its ``params``, e.g. weight and bias, share the scalar ``v``).

    With g = −grad (the ascent direction; g = grad when ``maximize``), in place::

        p ← p + (lr / (v + r) + lr_min) · g        for every p, with the old v
        ρ = min(n / (n + 1), rho_max)
        v ← ρ · v + (1 − ρ) · mean(|[g_1, g_2, ...]|)

    the mean running over every element of the matrix's gradients together. ``grads`` are
    descent gradients (torch's convention: p ← p − step · grad); ``v`` is a 0-d tensor
    updated in place; ``n`` counts the mini-batches seen, this one included (so the first
    step has n = 1 and ρ = 1/2, as in the authors' code, which counts the batch first).
    """
    if n < 1:
        raise ValueError(f"n counts the mini-batches seen, this one included (>= 1), got {n}")
    step = lr / (v + r) + lr_min  # 0-d, uses the old v
    sign = 1.0 if maximize else -1.0
    for p, g in zip(params, grads):
        p.add_(g * step, alpha=sign)
    numel = sum(g.numel() for g in grads)
    mean_abs = torch.stack([g.abs().sum() for g in grads]).sum() / numel
    rho = min(n / (n + 1), rho_max)
    v.mul_(rho).add_(mean_abs.to(v.dtype), alpha=1.0 - rho)


def _check_real(name: str, value: Any, ok: Callable[[float], bool], accepted: str) -> None:
    good = isinstance(value, Real) and not isinstance(value, bool)
    if not (good and math.isfinite(value) and ok(float(value))):
        raise ValueError(f"MQ: {name} must be {accepted}, got {value!r}")


def _check_group(group: dict[str, Any]) -> None:
    _check_real("lr", group["lr"], lambda x: x >= 0, "a finite number >= 0")
    _check_real("r", group["r"], lambda x: x > 0, "a finite number > 0")
    _check_real("lr_min", group["lr_min"], lambda x: x >= 0, "a finite number >= 0")
    _check_real("rho_max", group["rho_max"], lambda x: 0 <= x < 1, "a number in [0, 1)")
    if not isinstance(group["maximize"], bool):
        raise ValueError(f"MQ: maximize must be True or False, got {group['maximize']!r}")


def _module_groups(net: nn.Module) -> list[dict[str, Any]]:
    """One group per Linear/Conv layer (weight and bias together), one per other parameter."""
    groups: list[dict[str, Any]] = []
    seen: set[int] = set()
    for mod_name, mod in net.named_modules():
        own = [(n, p) for n, p in mod.named_parameters(recurse=False) if id(p) not in seen]
        seen.update(id(p) for _, p in own)
        prefix = f"{mod_name}." if mod_name else ""
        if isinstance(mod, _MATRIX_MODULES) and own:
            groups.append({"params": [p for _, p in own], "name": mod_name})
        else:
            groups += [{"params": [p], "name": prefix + n} for n, p in own]
    return groups


class MQ(torch.optim.Optimizer):
    """MQ: SGD whose step per weight matrix is normalised by a running mean of |gradient|.

    ``MQ(net, lr=3e-5)`` with an ``nn.Module`` makes one param group per matrix: a Linear or
    Conv layer's weight and bias form one group and share one v; any other parameter (a
    batch-norm scale or shift, a free tensor) is a group of its own. Each group carries a
    ``"name"`` (the module's or parameter's name in ``net``). ``MQ(params, lr=...)`` with an
    iterable of tensors or param-group dicts, like any torch optimizer, treats each group as
    one matrix: ``MQ(net.parameters(), ...)`` gives the whole net a single v.

    Per group, with the gradient in ``p.grad`` (descent convention) and N the mini-batches
    the group has seen, this one included: p ← p − (lr / (v + r) + lr_min) · grad with the
    old v, then v ← ρ v + (1 − ρ) mean|grad| with ρ = min(N / (N + 1), rho_max); v starts at
    lr. See :func:`mq`. A parameter without ``.grad`` is skipped; a group with no gradient at
    all keeps its v and N.

    Args:
        params: an ``nn.Module``, or an iterable of tensors or of param-group dicts.
        lr: α, the step scale (also v's starting value); >= 0. The paper: 3e-5 (MLP) and
            2.2e-4 (conv net) on CIFAR-10.
        r: keeps the step finite when v is tiny; > 0.
        lr_min: a plain SGD step added to the normalised one; >= 0.
        rho_max: cap on v's averaging factor ρ, in [0, 1). The paper uses 0.9999 for MLPs
            and 0.999 for conv nets; pass the latter yourself (it is not guessed from the net).
        maximize: ascend the objective instead of descending it.

    State: per group, in the state of the group's first parameter, ``v`` (a 0-d tensor in
    the parameter's dtype) and ``step`` (N, an int): one scalar per matrix, nothing per
    weight, so ``state_dict`` holds one tensor per group and round-trips exactly.
    """

    def __init__(
        self,
        params: nn.Module | Iterable[torch.Tensor] | Iterable[dict[str, Any]],
        lr: float = 1e-3,
        r: float = 1e-6,
        lr_min: float = 1e-3,
        rho_max: float = 0.9999,
        maximize: bool = False,
    ):
        defaults = {"lr": lr, "r": r, "lr_min": lr_min, "rho_max": rho_max, "maximize": maximize}
        _check_group(defaults)  # a bad default fails here, even for groups that override it
        if isinstance(params, nn.Module):
            groups: Any = _module_groups(params)
            if not groups:
                raise ValueError(f"MQ: the module {type(params).__name__} has no parameters")
        elif isinstance(params, torch.Tensor) or not isinstance(params, Iterable):
            raise TypeError(
                "MQ: params must be an nn.Module or an iterable of tensors or param-group "
                f"dicts, got {type(params).__name__}"
            )
        else:
            groups = list(params)
            bad = [type(g).__name__ for g in groups if not isinstance(g, (torch.Tensor, dict))]
            if bad:
                raise TypeError(
                    "MQ: params must be an nn.Module or an iterable of tensors or param-group "
                    f"dicts, got an iterable holding {bad[0]}"
                )
        super().__init__(groups, defaults)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """As ``torch.optim.Optimizer.add_param_group``; the group's own hyperparameters are
        checked like the defaults."""
        _check_group({**self.defaults, **param_group})
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One MQ step per param group; returns ``closure()``'s loss when given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if any(g.is_sparse for g in grads):
                raise RuntimeError("MQ does not support sparse gradients")
            state = self.state[group["params"][0]]
            if not state:
                first = group["params"][0]
                state["v"] = torch.tensor(group["lr"], dtype=first.dtype, device=first.device)
                state["step"] = 0
            state["step"] += 1
            mq(params, grads, state["v"], state["step"], lr=group["lr"], r=group["r"],
               lr_min=group["lr_min"], rho_max=group["rho_max"], maximize=group["maximize"])
        return loss

