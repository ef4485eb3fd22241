"""State initializers (PAPERS.md §3) behind a registry.

An initializer turns the feedforward state of a batch into the states inference starts from.
It may keep memory across batches (``observe`` is called with the converged states after
each inference) and that memory is part of ``state_dict`` so checkpoints carry it. Label-aware
initializers receive ``y``; at test time fastpc always predicts with the FF pass.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from ._registry import registrar

__all__ = ["StateInit", "register_init", "make_init", "list_inits"]


class StateInit:
    """Base class: ``__call__(ff_states, x, y) -> states`` (new tensors, no grad)."""

    name: str = ""

    def __call__(
        self, ff_states: Sequence[torch.Tensor], x: torch.Tensor, y: torch.Tensor | None
    ) -> list[torch.Tensor]:
        raise NotImplementedError

    def observe(self, x: torch.Tensor, y: torch.Tensor | None, states: Sequence[torch.Tensor]) -> None:
        """Called with the converged states after inference; stateless initializers ignore it."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        del state


_REGISTRY: dict[str, Callable[..., StateInit]] = {}


def register_init(name: str) -> Callable[[type[StateInit]], type[StateInit]]:
    """Class decorator: ``@register_init("forward")``."""
    return registrar(_REGISTRY, "state initializer", name)


def list_inits() -> list[str]:
    return sorted(_REGISTRY)


def make_init(name: str | StateInit, **options: Any) -> StateInit:
    """Initializer by name (or pass an instance through)."""
    if isinstance(name, StateInit):
        return name
    if name not in _REGISTRY:
        raise ValueError(f"unknown state init {name!r}; expected one of {list_inits()}")
    return _REGISTRY[name](**options)


@register_init("forward")
class ForwardInit(StateInit):
    """s_i = f_i(s_{i-1}): the FF state, where every hidden error is 0."""

    def __call__(self, ff_states, x, y):
        return [s.detach().clone() for s in ff_states]


@register_init("zeros")
class ZerosInit(StateInit):
    """s_i = 0."""

    def __call__(self, ff_states, x, y):
        return [torch.zeros_like(s) for s in ff_states]


@register_init("normal")
class NormalInit(StateInit):
    """s_i ~ N(mean, std²), drawn from torch's global generator (seeded runs reproduce)."""

    def __init__(self, mean: float = 0.0, std: float = 1.0):
        if std < 0:
            raise ValueError(f"normal init needs std >= 0, got {std}")
        self.mean, self.std = float(mean), float(std)

    def __call__(self, ff_states, x, y):
        return [torch.randn_like(s) * self.std + self.mean for s in ff_states]
