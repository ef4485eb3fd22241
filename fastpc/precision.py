"""Mixed precision: a learner's ``precision`` option (``train.precision`` in a config).

``"fp32"`` (the default) runs everything in the net's dtype, exactly as without the option.
``"bf16"`` runs the block forwards as ``torch.autocast(device_type, dtype=torch.bfloat16)``
does (CPU and CUDA): the matmuls and convolutions of the forward pass, and the products
inference and the weight update take from them, the pre-activation, the input VJP and the
weight gradient, run with bfloat16 operands. States, errors, energies, the line search, the
gradients stored in ``p.grad`` and the weights stay float32: every block result is cast back
to the net's dtype where it becomes a state, an error or a gradient.

Where it is applied, once for every learner:

- the block ops of the learners that run on a chain of block operations (spc, epc, ep),
  :func:`bf16_ops`: :class:`CastOps` for a block with analytic ops, the analytic ops
  (:func:`~fastpc.blocks.block_ops`) of a bfloat16 copy of the block, its weights refreshed
  from the float32 ones whenever those change, the input cast to bf16 and every result cast
  back; :class:`AutocastOps` for any other block (and for ``fast=False``), the autograd ops
  (:class:`~fastpc.blocks.AutogradOps`) of the block recorded under autocast, so that each VJP
  and weight gradient is autograd's backward of the bf16 forward. Both give the products
  autocast gives: bf16 operands, float32 accumulation, a bf16 result;
- every plain forward of the net (bp's forward and backward, the feedforward pass of
  :class:`~fastpc.learners.base.Learner`): :func:`forward_in`.

The compiled step is fp32 only: with bf16 ``uses_compiled_step`` is False and the step runs
eagerly. Test-time evaluation (``fastpc.train.evaluate``, ``net(x)``) runs in float32.
bf16 rounds each block's input to 8 significant bits: inference steps smaller than that do not
change the energy, so a line search with an Armijo constant near 1 (epc's default 0.99)
rejects them all (:class:`~fastpc.learners.pc.PCLearner` warns; benchmarks/README.md).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable
from typing import Any, final

import torch
from torch import nn

from .blocks import AnalyticOps, AutogradOps, BlockFlops, BlockOps, Scale, Tape, block_ops

__all__ = ["PRECISIONS", "check_precision", "autocast", "forward_in", "bf16_ops", "CastOps", "AutocastOps"]

PRECISIONS = ("fp32", "bf16")
"""The values of a learner's ``precision`` option."""


def check_precision(precision: Any, dtype: torch.dtype | None = None) -> str:
    """``precision`` if it is one of :data:`PRECISIONS` and fits a net of ``dtype``, else a
    one-line ``ValueError``: bf16 autocasts a float32 net's products (not float64's)."""
    if not isinstance(precision, str) or precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(map(repr, PRECISIONS))}, got {precision!r}")
    if precision == "bf16" and dtype is not None and dtype != torch.float32:
        raise ValueError(f"precision 'bf16' autocasts the products of a float32 net; this net is {dtype} "
                         "(use precision 'fp32', or a float32 net)")
    return precision


def autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """The context the block forwards of ``precision`` run in: ``torch.autocast`` to bfloat16
    on ``device``'s type for bf16, nothing for fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=torch.bfloat16)


def _cast(result: Any, dtype: torch.dtype) -> Any:
    """Every floating tensor in ``result`` (a tensor, or lists/tuples of them) as ``dtype``."""
    if isinstance(result, torch.Tensor):
        return result.to(dtype) if result.is_floating_point() else result
    if isinstance(result, (list, tuple)):
        return type(result)(_cast(r, dtype) for r in result)
    return result


def forward_in(precision: str, fn: Callable[[torch.Tensor], Any], x: torch.Tensor) -> Any:
    """``fn(x)`` (a forward pass of blocks) in ``precision``: for bf16 under :func:`autocast`
    with every tensor it returns cast back to ``x``'s dtype (differentiably: autograd's
    backward then runs the products in bf16 and hands float32 gradients to the weights); for
    fp32 ``fn(x)`` itself."""
    if precision == "fp32":
        return fn(x)
    with autocast(precision, x.device):
        result = fn(x)
    return _cast(result, x.dtype)


@final
class AutocastOps(BlockOps):
    """The ops of one block in bf16: :class:`~fastpc.blocks.AutogradOps` with the forward
    recorded under :func:`autocast`, so the VJP and weight gradients are autograd's backward
    of the bf16 products. ``out`` and ``pre`` of the tape, the VJP and the gradients added
    into ``p.grad`` come back in the input's dtype. FLOPs: those of the block's analytic ops
    where it has them (the same products), else None."""

    def __init__(self, block: nn.Module):
        self._inner = AutogradOps(block)
        super().__init__(block, self._inner.act)
        analytic = block_ops(block)
        self._count = analytic if isinstance(analytic, AnalyticOps) else None

    def forward(self, s: torch.Tensor) -> Tape:
        with autocast("bf16", s.device):
            tape = self._inner.forward(s)
        return Tape(s, tape.out.to(s.dtype), tape.pre.to(s.dtype), (tape,))

    def backward(self, tape: Tape, g: torch.Tensor, input_grad: bool, scale: Scale | None) -> torch.Tensor | None:
        inner = tape.saved[0]
        gx = self._inner.backward(inner, g.to(inner.out.dtype), input_grad, scale)
        return None if gx is None else gx.to(tape.s.dtype)

    def flops(self, s_shape: torch.Size | tuple[int, ...]) -> BlockFlops | None:
        return None if self._count is None else self._count.flops(s_shape)


def bf16_ops(block: nn.Module, fast: bool | str = "auto") -> BlockOps:
    """The bf16 ops of one block: :class:`CastOps` when it has analytic ops (unless ``fast`` is
    False), else :class:`AutocastOps`."""
    if fast is not False and isinstance(block_ops(block), AnalyticOps):
        return CastOps(block)
    return AutocastOps(block)


@final
class CastOps(BlockOps):
    """The analytic ops of a bfloat16 copy of ``block``: the input is cast to bf16, the tape's
    ``out`` and ``pre`` and the VJP back to the input's dtype, and the weight gradients (bf16
    products) are added, scaled in float32, into the float32 parameters' ``.grad``. The copy's
    weights follow the block's: they are copied again when a parameter changed (its version,
    storage or ``requires_grad``) since the last call."""

    def __init__(self, block: nn.Module):
        self._params = list(block.parameters())
        self._copy = copy.deepcopy(block).to(torch.bfloat16)
        self._copy_params = list(self._copy.parameters())
        self._seen: tuple | None = None
        self._ops = block_ops(self._copy)
        super().__init__(block, self._ops.act)

    def _sync(self) -> None:
        """Refresh the bf16 weights from the block's when those changed."""
        seen = tuple((p._version, p.data_ptr(), p.requires_grad) for p in self._params)
        if seen == self._seen:
            return
        with torch.no_grad():
            for p, q in zip(self._params, self._copy_params):
                if q.device != p.device:
                    self._copy.to(p.device)  # the ops hold the parameter objects: moved in place
                q.copy_(p)
                q.requires_grad_(p.requires_grad)
        self._seen = seen

    def forward(self, s: torch.Tensor) -> Tape:
        self._sync()
        tape = self._ops.forward(s.to(torch.bfloat16))
        out = tape.out.to(s.dtype)
        return Tape(s, out, out if tape.pre is tape.out else tape.pre.to(s.dtype), (tape,))

    def backward(self, tape: Tape, g: torch.Tensor, input_grad: bool, scale: Scale | None) -> torch.Tensor | None:
        gx = self._ops.backward(tape.saved[0], g.to(torch.bfloat16), input_grad, None if scale is None else 1.0)
        if scale is not None:
            for p, q in zip(self._params, self._copy_params):
                if q.grad is not None:  # p.grad += scale · (the bf16 product, as float32)
                    grad = q.grad.to(p.dtype)
                    q.grad = None
                    if isinstance(scale, torch.Tensor) or scale != 1.0:
                        grad.mul_(scale)
                    if p.grad is None:
                        p.grad = grad
                    else:
                        p.grad.add_(grad)
        return None if gx is None else gx.to(tape.s.dtype)

    def flops(self, s_shape: torch.Size | tuple[int, ...]) -> BlockFlops | None:
        return self._ops.flops(s_shape)
