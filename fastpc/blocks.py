"""Block operations: what inference and the local weight update need from one PC block f_i.

For a batch input s (shape (B, ...)) and an output cotangent g (shaped like f(s)):

- ``forward(s) -> Tape``: f(s), with what the VJPs need (inputs, pool indices);
- ``preact(tape)`` and ``act``: the pre-activation a and the activation σ, f(s) = σ(a);
- ``vjp(tape, g)``: ∂⟨g, f(s)⟩/∂s;
- ``weight_grads(tape, g, scale)``: adds scale · ∂⟨g, f(s)⟩/∂θ into each parameter's ``.grad``,
  as ``f(s).backward(scale · g)`` would;
- ``vjp_and_weight_grads(tape, g, scale)``: both, in one pass; ``vjp_into(tape, g, out, acc,
  alpha)``: out = acc + alpha · vjp(tape, g), one ``addmm`` for a dense block;
- ``flops(s_shape)``: the multiply-add FLOPs of each (2·m·k·n a GEMM), or None when unknown.

:func:`block_ops` picks the implementation: :class:`AnalyticOps` when the block is a
``Sequential`` (or a single module) of Flatten(start_dim=1), Linear, Conv2d (zero padding given
as numbers), MaxPool2d, AvgPool2d, AdaptiveAvgPool2d, Identity and the activations ReLU, GELU,
Tanh, Sigmoid, SiLU, LeakyReLU (exact types: a subclass may change ``forward``). Each backward
is the ATen kernel autograd itself would call (``convolution_backward`` with an output mask,
``max_pool2d_with_indices_backward``, ``threshold_backward``, ...), with no autograd graph.
Any other block (a residual ``BasicBlock``, batch norm, dropout, a user module) gets
:class:`AutogradOps`, which computes the same quantities with ``torch.autograd.grad``. A Linear
with at most 16 outputs that ends its block (a classifier head) computes its product
transposed, (W sᵀ + b)ᵀ, and hands out that transposed view.

Batch norm: a block in train mode updates its running statistics on every forward; callers
wrap inference and the local weight update in :func:`fastpc.nets.frozen_batchnorm_stats`.
The pre-activation split (EP's mod-PGD) is :func:`preactivation_split` (:mod:`fastpc.block_split`);
the ops of a block without one (a head ending in Linear, a ``BasicBlock``) take the identity as
``act``. The tensors of a :class:`Tape` are read-only (the fallback's autograd graph saves them).
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, final

import torch
import torch.nn.functional as F
from torch import nn

from .block_split import ACTIVATIONS, preactivation_split

__all__ = ["ACTIVATIONS", "Tape", "BlockFlops", "BlockOps", "AnalyticOps", "AutogradOps",
           "block_ops", "preactivation_split"]

_aten = torch.ops.aten
Scale = float | torch.Tensor

@dataclass(frozen=True, slots=True)
class Tape:
    """One forward pass of a block: ``out`` = f(s), ``pre`` its pre-activation (``out`` itself
    when the block has no split) and ``saved``, what the VJPs need (private to the ops)."""

    s: torch.Tensor
    out: torch.Tensor
    pre: torch.Tensor
    saved: tuple = ()


@dataclass(frozen=True, slots=True)
class BlockFlops:
    """Multiply-add FLOPs (2 per multiply-add) of one call on a batch; elementwise work and
    bias sums are not counted."""

    forward: int
    vjp: int
    weight_grad: int


def _accumulate(p: torch.Tensor, grad: torch.Tensor, scale: Scale, fresh: bool = True) -> None:
    """p.grad += scale · grad (= when None); ``fresh``: ``grad`` is new, may become ``p.grad``."""
    if p.grad is None:
        if not isinstance(scale, torch.Tensor) and scale == 1.0:
            p.grad = grad if fresh else grad.clone()
        else:
            p.grad = grad.mul_(scale) if fresh else grad.mul(scale)
    elif isinstance(scale, torch.Tensor):
        p.grad.add_(grad * scale)
    else:
        p.grad.add_(grad, alpha=scale)


class BlockOps(abc.ABC):
    """The operations inference needs from one block (see the module docstring). ``block`` is
    the module, ``act`` its final activation σ (``nn.Identity()`` when it has no split)."""

    def __init__(self, block: nn.Module, act: nn.Module):
        self.block, self.act = block, act

    @abc.abstractmethod
    def forward(self, s: torch.Tensor) -> Tape:
        """Run the block on s (B, ...), keeping what the VJPs need."""

    @abc.abstractmethod
    def backward(self, tape: Tape, g: torch.Tensor, input_grad: bool, scale: Scale | None) -> torch.Tensor | None:
        """One backward pass: adds scale · ∂⟨g, f(s)⟩/∂θ into ``θ.grad`` (every parameter that
        requires grad) unless ``scale`` is None; returns ∂⟨g, f(s)⟩/∂s if ``input_grad``."""

    @abc.abstractmethod
    def flops(self, s_shape: torch.Size | tuple[int, ...]) -> BlockFlops | None:
        """FLOPs of forward, vjp and weight_grads on an input of this shape; None if unknown."""

    def preact(self, tape: Tape) -> torch.Tensor:
        """The pre-activation a, with ``tape.out == act(a)``."""
        return tape.pre

    def vjp(self, tape: Tape, g: torch.Tensor) -> torch.Tensor:
        """∂⟨g, f(s)⟩/∂s, shaped like s."""
        return self.backward(tape, g, True, None)

    def vjp_into(self, tape: Tape, g: torch.Tensor, out: torch.Tensor, acc: torch.Tensor | None = None,
                 alpha: float = 1.0) -> torch.Tensor:
        """``out = acc + alpha · vjp(tape, g)`` (``acc=None``: zero); returns ``out``."""
        v = self.vjp(tape, g)
        return torch.mul(v, alpha, out=out) if acc is None else torch.add(acc, v, alpha=alpha, out=out)

    def weight_grads(self, tape: Tape, g: torch.Tensor, scale: Scale = 1.0) -> None:
        """Add scale · ∂⟨g, f(s)⟩/∂θ into ``θ.grad``, as ``f(s).backward(scale · g)`` would."""
        self.backward(tape, g, False, scale)

    def vjp_and_weight_grads(self, tape: Tape, g: torch.Tensor, scale: Scale = 1.0) -> torch.Tensor:
        """``weight_grads(tape, g, scale)`` and return ``vjp(tape, g)`` (unscaled), in one pass."""
        return self.backward(tape, g, True, scale)


# ---- analytic ops: one module of a Sequential each ------------------------------------------

Act = Callable[[torch.Tensor], torch.Tensor]
ActGrad = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (g, a, σ(a)) -> g ⊙ σ'(a)
# oneDNN's gelu primitives cost ~10 (forward) / ~20 µs (backward) to set up per call, so small
# tensors run ATen's own kernels (oneDNN off for the call); float64 never uses oneDNN.
_NATIVE_FWD_MAX, _NATIVE_BWD_MAX = 16384, 32768


def _native_if_small(fn: Callable, limit: int) -> Callable:
    def call(*args):
        if args[0].numel() > limit or not torch._C._get_mkldnn_enabled():
            return fn(*args)
        torch._C._set_mkldnn_enabled(False)
        try:
            return fn(*args)
        finally:
            torch._C._set_mkldnn_enabled(True)

    return call


def _activation(m: nn.Module, plain: bool) -> tuple[Act, ActGrad] | None:
    """(σ, backward) with the kernels autograd uses, for a supported activation, else None."""
    t = type(m)
    if t is nn.ReLU:
        return F.relu, lambda g, a, o: _aten.threshold_backward(g, o, 0)
    if t is nn.GELU:
        ap = m.approximate
        fwd = lambda a: F.gelu(a, approximate=ap)  # noqa: E731
        bwd = lambda g, a, o: _aten.gelu_backward(g, a, approximate=ap)  # noqa: E731
        if plain:
            return fwd, bwd
        return _native_if_small(fwd, _NATIVE_FWD_MAX), _native_if_small(bwd, _NATIVE_BWD_MAX)
    if t is nn.Tanh:
        return torch.tanh, lambda g, a, o: _aten.tanh_backward(g, o)
    if t is nn.Sigmoid:
        return torch.sigmoid, lambda g, a, o: _aten.sigmoid_backward(g, o)
    if t is nn.SiLU:
        return F.silu, lambda g, a, o: _aten.silu_backward(g, a)
    if t is nn.LeakyReLU:
        slope = m.negative_slope
        return (lambda a: F.leaky_relu(a, slope)), (lambda g, a, o: _aten.leaky_relu_backward(g, a, slope, False))
    return None


class _Op(abc.ABC):
    """One module's forward (output, aux) and backward: returns the input's cotangent when
    ``need_input``, and adds scale · its weight gradients when ``scale`` is not None."""

    has_params = False

    @abc.abstractmethod
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, Any]: ...

    @abc.abstractmethod
    def backward(self, g, x, y, aux, need_input: bool, scale: Scale | None) -> torch.Tensor | None: ...

    def flops(self, shape: torch.Size) -> tuple[torch.Size, int]:
        """(output shape, FLOPs of one forward, vjp or weight grad)."""
        return self.forward(torch.empty(shape, device="meta"))[0].shape, 0


@final
class _Activation(_Op):
    def __init__(self, fn: Act, grad: ActGrad):
        self.fn, self.grad = fn, grad

    def forward(self, x):
        return self.fn(x), None

    def backward(self, g, x, y, aux, need_input, scale):
        return self.grad(g, x, y) if need_input else None


@final
class _Flatten(_Op):
    def __init__(self, m: nn.Flatten):
        self.end_dim = m.end_dim

    def forward(self, x):
        return x.flatten(1, self.end_dim), None

    def backward(self, g, x, y, aux, need_input, scale):
        return g.reshape(x.shape) if need_input else None


_NARROW = 16  # a head this narrow computes (W xᵀ + b)ᵀ: a GEMM with 10 output columns is slow


@final
class _Linear(_Op):
    has_params = True

    def __init__(self, m: nn.Linear):
        self.m, self.w, self.b = m, m.weight, m.bias
        self.transposed = False  # set by block_ops for a narrow Linear that ends its block

    def forward(self, x):
        w, b = self.w, self.b
        if x.dim() != 2:
            return F.linear(x, w, b), None
        if self.transposed:  # (W xᵀ + b)ᵀ, a transposed (B, out) view
            return (torch.mm(w, x.t()) if b is None else torch.addmm(b.unsqueeze(1), w, x.t())).t(), None
        return (torch.mm(x, w.t()) if b is None else torch.addmm(b, x, w.t())), None  # F.linear's GEMM

    def backward(self, g, x, y, aux, need_input, scale):
        w, b = self.w, self.b
        flat = g.dim() == 2
        if scale is not None:
            g2, x2 = (g, x) if flat else (g.reshape(-1, g.shape[-1]), x.reshape(-1, x.shape[-1]))  # (M, out), (M, in)
            if w.requires_grad:
                if isinstance(scale, torch.Tensor):
                    _accumulate(w, torch.mm(g2.t(), x2), scale)
                elif w.grad is None:  # beta=0: w only gives the shape, its values are ignored
                    w.grad = torch.addmm(w, g2.t(), x2, beta=0, alpha=scale)
                else:
                    w.grad.addmm_(g2.t(), x2, alpha=scale)
            if b is not None and b.requires_grad:
                _accumulate(b, g2.sum(0), scale)
        return None if not need_input else torch.mm(g, w) if flat else torch.matmul(g, w)

    def flops(self, shape):
        m = math.prod(shape[:-1])
        return torch.Size((*shape[:-1], self.m.out_features)), 2 * m * self.m.in_features * self.m.out_features


@final
class _Conv2d(_Op):
    has_params = True

    def __init__(self, m: nn.Conv2d):
        self.m, self.w, self.b = m, m.weight, m.bias
        self.args = (list(m.stride), list(m.padding), list(m.dilation), False, [0, 0], m.groups)

    def forward(self, x):
        m = self.m
        return F.conv2d(x, self.w, self.b, m.stride, m.padding, m.dilation, m.groups), None

    def backward(self, g, x, y, aux, need_input, scale):
        w, b = self.w, self.b
        mask = [need_input, scale is not None and w.requires_grad,
                scale is not None and b is not None and b.requires_grad]
        if not any(mask):
            return None
        bias_sizes = None if b is None else [b.shape[0]]
        gx, gw, gb = _aten.convolution_backward(g, x, w, bias_sizes, *self.args, mask)
        if mask[1]:
            _accumulate(w, gw, scale)
        if mask[2]:
            _accumulate(b, gb, scale)
        return gx

    def flops(self, shape):
        m = self.m
        (kh, kw), (sh, sw), (ph, pw), (dh, dw) = m.kernel_size, m.stride, m.padding, m.dilation
        h = (shape[2] + 2 * ph - dh * (kh - 1) - 1) // sh + 1
        w = (shape[3] + 2 * pw - dw * (kw - 1) - 1) // sw + 1
        macs = shape[0] * m.out_channels * h * w * (m.in_channels // m.groups) * kh * kw
        return torch.Size((shape[0], m.out_channels, h, w)), 2 * macs


@final
class _MaxPool2d(_Op):
    def __init__(self, m: nn.MaxPool2d):
        self.args = (m.kernel_size, m.stride, m.padding, m.dilation, m.ceil_mode)  # ints or pairs

    def forward(self, x):
        return _aten.max_pool2d_with_indices(x, *self.args)  # (output, indices)

    def backward(self, g, x, y, aux, need_input, scale):
        return _aten.max_pool2d_with_indices_backward(g, x, *self.args, aux) if need_input else None


@final
class _AvgPool2d(_Op):
    def __init__(self, m: nn.AvgPool2d):
        self.args = (m.kernel_size, m.stride, m.padding, m.ceil_mode, m.count_include_pad, m.divisor_override)

    def forward(self, x):
        return _aten.avg_pool2d(x, *self.args), None

    def backward(self, g, x, y, aux, need_input, scale):
        return _aten.avg_pool2d_backward(g, x, *self.args) if need_input else None


@final
class _AdaptiveAvgPool2d(_Op):
    def __init__(self, m: nn.AdaptiveAvgPool2d):
        self.size = m.output_size

    def forward(self, x):
        return F.adaptive_avg_pool2d(x, self.size), None

    def backward(self, g, x, y, aux, need_input, scale):
        return _aten._adaptive_avg_pool2d_backward(g, x) if need_input else None


def _op(m: nn.Module, plain: bool) -> _Op | None:
    """The analytic op of one module, None when it has none (the block then falls back)."""
    t = type(m)
    if t is nn.Flatten:
        return _Flatten(m) if m.start_dim == 1 else None
    if t is nn.Linear:
        return _Linear(m)
    if t is nn.Conv2d:
        ok = m.padding_mode == "zeros" and not isinstance(m.padding, str)
        return _Conv2d(m) if ok else None
    if t is nn.MaxPool2d:
        return None if m.return_indices else _MaxPool2d(m)
    if t is nn.AvgPool2d:
        return _AvgPool2d(m)
    if t is nn.AdaptiveAvgPool2d:
        return _AdaptiveAvgPool2d(m)
    pair = _activation(m, plain)
    return None if pair is None else _Activation(*pair)


def _no_grad(fn: Callable) -> Callable:
    """``fn`` under ``torch.no_grad``, entered only when grad mode is on (inference runs without)."""

    def call(*args):
        if not torch.is_grad_enabled():
            return fn(*args)
        with torch.no_grad():
            return fn(*args)

    return call


@final
class AnalyticOps(BlockOps):
    """Block ops written out with ATen's forward and backward kernels, no autograd graph;
    made by :func:`block_ops` (``plain=True``: traceable by ``torch.compile`` in one graph).
    They hold the block's parameter tensors as they were when made: make new ops after
    replacing a parameter object (updating one in place is fine)."""

    def __init__(self, block: nn.Module, ops: list[_Op], act: nn.Module | None):
        super().__init__(block, nn.Identity() if act is None else act)
        self._ops = tuple(ops)
        # the pre-activation is the last op's input when the block ends in a real activation
        self._pre_index = -2 if act is not None and type(act) is not nn.Identity else -1
        self._first_param = next((k for k, op in enumerate(self._ops) if op.has_params), None)
        # [Flatten] Linear [activation], an MLP block: written out without the loop over ops
        kinds, ops = [type(op) for op in ops], self._ops
        f = kinds[:1] == [_Flatten]
        dense = kinds[f:f + 1] == [_Linear] and kinds[f + 1:] in ([], [_Activation])
        self._dense = (ops[0].end_dim if f else None, ops[f], ops[-1] if kinds[-1] is _Activation else None) \
            if dense else None

    @property
    def linear_pre(self) -> bool:
        """Whether ``tape.pre`` is a Linear's output on the input ([Flatten] Linear [activation]):
        a NaN or inf in an input row makes that row of ``pre`` non-finite (inf·0 is NaN)."""
        return self._dense is not None

    @_no_grad
    def forward(self, s: torch.Tensor) -> Tape:
        if self._dense is not None:
            end, lin, act = self._dense
            x = s if end is None else s.flatten(1, end)
            a = lin.forward(x)[0]
            return Tape(s, a if act is None else act.fn(a), a, (x,))
        xs, aux = [s], []
        for op in self._ops:
            y, a = op.forward(xs[-1])
            xs.append(y)
            aux.append(a)
        return Tape(s, xs[-1], xs[self._pre_index], (tuple(xs), tuple(aux)))

    @_no_grad
    def backward(self, tape: Tape, g: torch.Tensor, input_grad: bool, scale: Scale | None) -> torch.Tensor | None:
        if self._dense is not None:
            end, lin, act = self._dense
            h = g if act is None else act.grad(g, tape.pre, tape.out)
            gx = lin.backward(h, tape.saved[0], None, None, input_grad, scale)
            return gx if gx is None or end is None else gx.reshape(tape.s.shape)
        # back through the ops; without input_grad, stop at the first weighted op
        if input_grad:
            stop = 0
        elif self._first_param is None:
            return None
        else:
            stop = self._first_param
        xs, aux = tape.saved
        for k in range(len(self._ops) - 1, stop - 1, -1):
            g = self._ops[k].backward(g, xs[k], xs[k + 1], aux[k], input_grad or k > stop, scale)
        return g

    @_no_grad
    def vjp_into(self, tape: Tape, g: torch.Tensor, out: torch.Tensor, acc: torch.Tensor | None = None,
                 alpha: float = 1.0) -> torch.Tensor:
        if self._dense is None or self._dense[0] is not None:
            return super().vjp_into(tape, g, out, acc, alpha)
        _, lin, act = self._dense
        h = g if act is None else act.grad(g, tape.pre, tape.out)
        # acc None: beta=0, out only gives the shape (its values are ignored)
        return torch.addmm(out if acc is None else acc, h, lin.w, beta=0 if acc is None else 1, alpha=alpha, out=out)

    def flops(self, s_shape: torch.Size | tuple[int, ...]) -> BlockFlops:
        shape, total, first = torch.Size(s_shape), 0, 0
        for k, op in enumerate(self._ops):
            shape, f = op.flops(shape)
            total += f
            if k == self._first_param:
                first = f
        # weight grads stop at the first weighted op, whose input VJP they skip
        return BlockFlops(forward=total, vjp=total, weight_grad=2 * total - first)


# ---- the fallback ----------------------------------------------------------------------------


@final
class AutogradOps(BlockOps):
    """Block ops through ``torch.autograd`` for any differentiable block: ``forward`` records
    the graph (under ``enable_grad``, so it also works inside ``no_grad``; not inside
    ``inference_mode``) and each VJP replays it (``retain_graph``). Not traced without graph
    breaks by ``torch.compile``. The block's own train/eval mode applies (batch norm: see the
    module docstring)."""

    def __init__(self, block: nn.Module):
        try:
            self._pre, act = preactivation_split(block)
            self._split = True
        except ValueError:
            self._pre, act, self._split = block, nn.Identity(), False
        super().__init__(block, act)

    def forward(self, s: torch.Tensor) -> Tape:
        leaf = s.detach().requires_grad_(s.is_floating_point() or s.is_complex())
        with torch.enable_grad():
            pre = self._pre(leaf)
            out = self.act(pre) if self._split else pre
        return Tape(s, out.detach(), pre.detach(), (leaf, out))

    def backward(self, tape: Tape, g: torch.Tensor, input_grad: bool, scale: Scale | None) -> torch.Tensor | None:
        leaf, out = tape.saved
        params = [] if scale is None else [p for p in self.block.parameters() if p.requires_grad]
        inputs = ([leaf] if input_grad and leaf.requires_grad else []) + params
        grads = [None] * len(inputs)
        if inputs and out.requires_grad:
            grads = torch.autograd.grad(out, inputs, g, retain_graph=True, allow_unused=True)
        for p, gp in zip(params, grads[len(inputs) - len(params):]):
            if gp is not None:
                _accumulate(p, gp, scale, fresh=False)
        if not input_grad:
            return None
        gx = grads[0] if len(inputs) > len(params) else None
        return torch.zeros_like(tape.s) if gx is None else gx

    def flops(self, s_shape: torch.Size | tuple[int, ...]) -> None:
        return None


def block_ops(block: nn.Module, plain: bool = False) -> BlockOps:
    """The ops of one block: :class:`AnalyticOps` when every module of the (Sequential) block
    has an analytic op, else :class:`AutogradOps`. ``plain``: no host-side branching or oneDNN
    switching in the analytic ops (for code ``torch.compile`` traces)."""
    mods = list(block) if type(block) is nn.Sequential else [block]
    ops: list[_Op] = []
    for m in mods:
        if type(m) is nn.Identity:
            continue
        op = _op(m, plain)
        if op is None:
            return AutogradOps(block)
        ops.append(op)
    if ops and isinstance(ops[-1], _Linear) and ops[-1].m.out_features <= _NARROW:
        ops[-1].transposed = True
    act = mods[-1] if mods and type(mods[-1]) in ACTIVATIONS else None
    return AnalyticOps(block, ops, act)
