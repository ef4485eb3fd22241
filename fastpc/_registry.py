"""What the learner and state-initializer registries share: the class-registration decorator
and the check of the options a registered class is made with."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any


def registrar(table: dict[str, Any], what: str, name: str) -> Callable[[type], type]:
    """Class decorator: set ``cls.name = name`` and store ``cls`` in ``table`` (a name may be
    registered once; ``what`` names the kind in the error)."""

    def deco(cls: type) -> type:
        if name in table:
            raise ValueError(f"{what} {name!r} is already registered")
        cls.name = name
        table[name] = cls
        return cls

    return deco


def options_of(cls: type, skip: tuple[str, ...] = ("self",)) -> dict[str, Any]:
    """The keyword options ``cls.__init__`` accepts (with their defaults), ``skip`` left out."""
    params = inspect.signature(cls.__init__).parameters
    return {k: p.default for k, p in params.items() if k not in skip}


def check_options(what: str, name: str, cls: type, options: dict[str, Any], skip: tuple[str, ...] = ("self",)) -> None:
    """``ValueError`` naming the options ``cls`` (registered as ``what`` ``name``) does not accept."""
    valid = list(options_of(cls, skip))
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(f"{what} {name!r} has no option(s) {unknown}; valid options: {valid}")
