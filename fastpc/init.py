"""State initializers (PAPERS.md §3) behind a registry.

An initializer turns the feedforward state of a batch into the states inference starts from.
It is an ``nn.Module``: what it remembers across batches lives in buffers (or submodules), so
it travels with ``Learner.to(...)`` and in ``state_dict`` (checkpoints carry it). It sees the
labels ``y`` (label-aware initializers) and, through :meth:`StateInit.observe`, the converged
states after every training step (memory initializers). Its options come from
``make_learner(..., init_options={...})`` or YAML ``learner.init_options``. At test time fastpc
always predicts with the FF pass.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from ._registry import check_options, options_of, registrar

__all__ = ["StateInit", "register_init", "make_init", "list_inits", "init_options", "check_init_options"]


class StateInit(nn.Module, abc.ABC):
    """Base class of every state initializer.

    ``init(ff_states, x, y) -> states``: new tensors (no grad) shaped like ``ff_states``, the
    feedforward states s_1..s_{L-1} of the batch. ``observe(x, y, states)`` is called with the
    converged states after each training step; stateless initializers ignore it.
    """

    name: str = ""

    @abc.abstractmethod
    def forward(
        self, ff_states: Sequence[torch.Tensor], x: torch.Tensor | None, y: torch.Tensor | None
    ) -> list[torch.Tensor]:
        """The states inference starts from."""

    def observe(self, x: torch.Tensor | None, y: torch.Tensor | None, states: Sequence[torch.Tensor]) -> None:
        """Called with the converged states after each training step (default: nothing)."""
        del x, y, states

    def options(self) -> dict[str, Any]:
        """The options this initializer was made with (saved with checkpoints)."""
        return {}


_REGISTRY: dict[str, Callable[..., StateInit]] = {}


def register_init(name: str) -> Callable[[type[StateInit]], type[StateInit]]:
    """Class decorator: ``@register_init("forward")``."""
    return registrar(_REGISTRY, "state initializer", name)


def list_inits() -> list[str]:
    return sorted(_REGISTRY)


def init_options(name: str) -> list[str]:
    """The options initializer ``name`` accepts."""
    return list(options_of(_init_class(name)))


def _init_class(name: str) -> Callable[..., StateInit]:
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"unknown state init {name!r}; expected one of {list_inits()}")
    return _REGISTRY[name]


def check_init_options(name: str, options: dict[str, Any]) -> None:
    """``ValueError`` unless initializer ``name`` exists and accepts every key of ``options``."""
    check_options("state init", name, _init_class(name), options)


def make_init(name: str | StateInit, **options: Any) -> StateInit:
    """Initializer by name with its options (or an instance passed through, without options)."""
    if isinstance(name, StateInit):
        if options:
            raise ValueError("init_options apply to an initializer given by name, not to an instance")
        return name
    check_init_options(name, options)
    return _REGISTRY[name](**options)


@register_init("forward")
class ForwardInit(StateInit):
    """s_i = f_i(s_{i-1}): the FF state, where every hidden error is 0."""

    def forward(self, ff_states, x, y):
        return [s.detach().clone() for s in ff_states]


@register_init("zeros")
class ZerosInit(StateInit):
    """s_i = 0."""

    def forward(self, ff_states, x, y):
        return [torch.zeros_like(s) for s in ff_states]


@register_init("normal")
class NormalInit(StateInit):
    """s_i ~ N(mean, std²), drawn from torch's global generator (seeded runs reproduce)."""

    def __init__(self, mean: float = 0.0, std: float = 1.0):
        super().__init__()
        if not (float(std) >= 0 and float(std) < float("inf")) or float(mean) != float(mean):
            raise ValueError(f"normal init needs a finite mean and a finite std >= 0, got mean={mean}, std={std}")
        self.mean, self.std = float(mean), float(std)

    def options(self):
        return {"mean": self.mean, "std": self.std}

    def forward(self, ff_states, x, y):
        return [torch.randn_like(s) * self.std + self.mean for s in ff_states]
