"""The class-registration decorator the learner and state-initializer registries share."""

from __future__ import annotations

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
