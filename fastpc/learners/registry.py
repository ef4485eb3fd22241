"""The learner registry: ``@register_learner("epc")``, ``make_learner(name, net, **options)``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .._registry import check_options, options_of, registrar
from ..nets import PCNet
from .base import Learner

__all__ = ["register_learner", "make_learner", "list_learners", "learner_class", "learner_options"]

_REGISTRY: dict[str, type[Learner]] = {}
_NOT_OPTIONS = ("self", "net")


def register_learner(name: str) -> Callable[[type[Learner]], type[Learner]]:
    """Class decorator: ``@register_learner("epc")``."""
    return registrar(_REGISTRY, "learner", name)


def list_learners() -> list[str]:
    """Names of the registered learners."""
    return list(_REGISTRY)


def learner_class(name: str) -> type[Learner]:
    if name not in _REGISTRY:
        raise ValueError(f"unknown learner {name!r}; expected one of {list_learners()}")
    return _REGISTRY[name]


def learner_options(name: str) -> dict[str, Any]:
    """The keyword options (with defaults) a learner accepts besides ``net``."""
    return options_of(learner_class(name), skip=_NOT_OPTIONS)


def make_learner(name: str, net: PCNet, **options: Any) -> Learner:
    """Create a registered learner on ``net``; unknown options raise a clear ``ValueError``."""
    cls = learner_class(name)
    check_options("learner", name, cls, options, skip=_NOT_OPTIONS)
    return cls(net, **options)
