"""The pre-activation split of a PC block (EP's mod-PGD), re-exported by :mod:`fastpc.blocks`.

:func:`preactivation_split` returns (the block without its final activation, the activation) for a
``Sequential`` ending in one of :data:`ACTIVATIONS` and raises ``ValueError`` otherwise.
"""

from __future__ import annotations

from torch import nn

__all__ = ["ACTIVATIONS", "preactivation_split"]

ACTIVATIONS: tuple[type[nn.Module], ...] = (nn.ReLU, nn.GELU, nn.Tanh, nn.Sigmoid, nn.SiLU, nn.LeakyReLU,
                                            nn.Identity)
"""The final activations :func:`preactivation_split` accepts (exact types)."""


def preactivation_split(block: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(pre, act) with ``act(pre(s)) == block(s)``: the block without its final activation and
    that activation. ``pre`` shares the block's modules (``block[:-1]``); a bare activation
    module splits as (Identity, block). ``ValueError`` for any other block."""
    if type(block) in ACTIVATIONS:
        return nn.Identity(), block
    if type(block) is nn.Sequential and len(block) > 0 and type(block[-1]) in ACTIVATIONS:
        return block[:-1], block[-1]
    names = ", ".join(t.__name__ for t in ACTIVATIONS)
    raise ValueError(
        f"{type(block).__name__} block has no pre-activation split; expected a Sequential "
        f"ending in one of {names} (or one such module alone)"
    )
