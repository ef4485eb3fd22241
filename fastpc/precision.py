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
  :func:`bf16_ops`: :class:`CastOps` for a block with analytic ops, the products (Linear,
  Conv2d) on a bfloat16 copy of the block's weights, refreshed from the float32 ones whenever
  those change, and the rest of the block (activations, pooling) on its float32 analytic ops;
  :class:`AutocastOps` for any other block (and for ``fast=False``), the autograd ops
  (:class:`~fastpc.blocks.AutogradOps`) of the block recorded under autocast, so that each VJP
  and weight gradient is autograd's backward of the bf16 forward. Both multiply bf16 operands
  with float32 accumulation;
- every plain forward of the net (bp's forward and backward, the feedforward pass of
  :class:`~fastpc.learners.base.Learner`): :func:`forward_in`.

The compiled step is fp32 only: with bf16 ``uses_compiled_step`` is False and the step runs
eagerly. Test-time evaluation (``fastpc.train.evaluate``, ``net(x)``) runs in float32.

Inference moves the states by amounts far below bf16's 8 significant bits: rounding a block's
input to bf16 hides them from the energy, and a line search with an Armijo constant near 1
(epc's default 0.99) then rejects every step. :class:`CastOps` computes each product as
lin(x) = lin(x_ref) + lin_nobias(x − x_ref), exactly the same function up to bf16 rounding,
with the deviation formed in float32 and only then rounded to bf16: it keeps 8 bits of the
move, not of x. x_ref is the input of the first forward after the weights were refreshed (a
step's feedforward pass) or the input's shape changed. The deviation's own rounding (2^-8 of
it, and of its product) grows with it: a long inference (tens of steps) can stall the 0.99
line search again (benchmarks/README.md, bench precision). The autocast ops round the whole
input: :class:`~fastpc.learners.pc.PCLearner` warns when a block runs on them with armijo >= 0.9.
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


_PRODUCTS = (nn.Linear, nn.Conv2d)


def _modules(block: nn.Module) -> list[nn.Module]:
    """The modules of a block as :func:`~fastpc.blocks.block_ops` walks them (Identity dropped)."""
    mods = list(block) if type(block) is nn.Sequential else [block]
    return [m for m in mods if type(m) is not nn.Identity]


def _without_bias(m: nn.Module) -> nn.Module:
    """A module of ``m``'s kind and shape without bias whose weight IS ``m.weight``."""
    if type(m) is nn.Linear:
        twin = nn.Linear(m.in_features, m.out_features, bias=False, device="meta")
    else:
        twin = nn.Conv2d(m.in_channels, m.out_channels, m.kernel_size, m.stride, m.padding, m.dilation,
                         m.groups, bias=False, padding_mode=m.padding_mode, device="meta")
    twin.weight = m.weight
    return twin


class _Product:
    """One Linear or Conv2d of a :class:`CastOps` block, linear in its input x, computed as
    lin(x) = lin(x_ref) + lin_nobias(x − x_ref) with bf16 operands: the reference product
    (the first forward after a reset, exactly the plain bf16 product) is kept in float32, the
    deviation is formed in float32 and only then rounded to bf16, so it keeps 8 bits of
    itself, not of x. The reference resets with the weights (:meth:`reset`) and when x's
    shape, dtype or device changes; x at the reset is kept (a copy)."""

    def __init__(self, m32: nn.Module, m16: nn.Module):
        self.pairs = [(p, q) for p, q in zip(m32.parameters(), m16.parameters())]
        self.full, self.dev = block_ops(m16), block_ops(_without_bias(m16))
        self.reset()

    def reset(self) -> None:
        self.ref: torch.Tensor | None = None
        self.ref_tape: Tape | None = None
        self.ref_out: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple]:
        ref = self.ref
        if ref is None or ref.shape != x.shape or ref.dtype != x.dtype or ref.device != x.device:
            tape = self.full.forward(x.to(torch.bfloat16))
            self.ref, self.ref_tape, self.ref_out = x.clone(), tape, tape.out.to(x.dtype)
            return self.ref_out, (tape, None)
        dev = self.dev.forward((x - ref).to(torch.bfloat16))
        return torch.add(self.ref_out, dev.out), (self.ref_tape, dev)

    def backward(self, saved: tuple, g: torch.Tensor, need_input: bool, scale: Scale | None) -> torch.Tensor | None:
        """The VJP through the bf16 weight; the weight gradient g·(x_ref + d)ᵀ, the reference's
        product plus the deviation's (lin is linear in x), each added into the float32 .grad."""
        ref_tape, dev = saved
        h = g.to(torch.bfloat16)
        gx = self.full.backward(ref_tape, h, need_input, None if scale is None else 1.0)
        if scale is not None:
            self._collect(scale)
            if dev is not None:
                self.dev.backward(dev, h, False, 1.0)
                self._collect(scale)
        return None if gx is None else gx.to(g.dtype)

    def _collect(self, scale: Scale) -> None:
        """p.grad += scale · (the bf16 copy's gradient, as float32); the copy's .grad cleared."""
        for p, q in self.pairs:
            if q.grad is not None:
                grad = q.grad.to(p.dtype)
                q.grad = None
                if isinstance(scale, torch.Tensor) or scale != 1.0:
                    grad.mul_(scale)
                if p.grad is None:
                    p.grad = grad
                else:
                    p.grad.add_(grad)


@final
class CastOps(BlockOps):
    """The analytic ops of ``block`` with its products (Linear, Conv2d: forward, VJP, weight
    gradient) on a bfloat16 copy of its weights, refreshed whenever a float32 parameter changed
    (its version, storage or ``requires_grad``) since the last call, and every other op
    (activations, pooling, flatten) on the block's own float32 ops. Each product's input is
    split into a reference and a deviation (:class:`_Product`): small moves of the input change
    the output by what float32 would, up to bf16 rounding of the move (plain bf16 rounds the
    input to 8 bits and loses moves below 2^-8 of it). The first forward after a weight refresh
    or a shape change (a step's feedforward pass) is the reference: it gives exactly the plain
    bf16 product. A later batch under unchanged weights keeps the old reference: correct to the
    bf16 bound of |x_ref| + |x − x_ref|, without the gain. The VJP and weight gradients come
    back float32 (the weight gradient is scaled in float32 and added into ``.grad``); FLOPs are
    the block's (the deviation's extra weight-gradient product is not counted)."""

    def __init__(self, block: nn.Module):
        self._params = list(block.parameters())
        self._copy = copy.deepcopy(block).to(torch.bfloat16)
        self._seen: tuple | None = None
        self._f32 = block_ops(block)
        super().__init__(block, self._f32.act)
        units: list[Any] = []
        free: list[nn.Module] = []
        for m, m16 in zip(_modules(block), _modules(self._copy)):
            if type(m) in _PRODUCTS:
                if free:
                    units.append(block_ops(nn.Sequential(*free)))
                units.append(_Product(m, m16))
                free = []
            else:
                free.append(m)
        if free:
            units.append(block_ops(nn.Sequential(*free)))
        self._units = tuple(units)
        self._first = next((k for k, u in enumerate(units) if isinstance(u, _Product)), None)

    def _sync(self) -> None:
        """Refresh the bf16 weights from the block's when those changed (the references reset)."""
        seen = tuple((p._version, p.data_ptr(), p.requires_grad) for p in self._params)
        if seen == self._seen:
            return
        with torch.no_grad():
            for p, q in zip(self._params, self._copy.parameters()):
                if q.device != p.device:
                    self._copy.to(p.device)  # the ops hold the parameter objects: moved in place
                q.copy_(p)
                q.requires_grad_(p.requires_grad)
        for u in self._units:
            if isinstance(u, _Product):
                u.reset()
        self._seen = seen

    def forward(self, s: torch.Tensor) -> Tape:
        self._sync()
        x, pre, saved = s, s, []
        with torch.no_grad():
            for u in self._units:
                if isinstance(u, _Product):
                    x, rec = u.forward(x)
                    pre = x
                else:
                    rec = u.forward(x)
                    x, pre = rec.out, rec.pre
                saved.append(rec)
        return Tape(s, x, pre, tuple(saved))

    def backward(self, tape: Tape, g: torch.Tensor, input_grad: bool, scale: Scale | None) -> torch.Tensor | None:
        # back through the units; without input_grad, stop at the first product
        stop = 0 if input_grad else self._first
        if stop is None:
            return None
        with torch.no_grad():
            for k in range(len(self._units) - 1, stop - 1, -1):
                u, need = self._units[k], input_grad or k > stop
                if isinstance(u, _Product):
                    g = u.backward(tape.saved[k], g, need, scale)
                else:
                    g = u.backward(tape.saved[k], g, True, None)
        return g if input_grad else None

    def flops(self, s_shape: torch.Size | tuple[int, ...]) -> BlockFlops | None:
        return self._f32.flops(s_shape)
