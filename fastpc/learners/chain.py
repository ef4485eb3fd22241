"""A net's block operations for one batch: :class:`NetOps`, the ops of each block made once
per net, and :class:`Chain`, one batch on them (the input, each block's latest tape, a count of
the calls). What every PC learner's relaxation runs on (:mod:`fastpc.learners.pc`)."""

from __future__ import annotations

import torch
from torch.nn.modules.batchnorm import _BatchNorm

from ..blocks import AnalyticOps, AutogradOps, BlockOps, Tape, block_ops
from ..precision import AutocastOps, bf16_ops
from .descent import Stack, Workspace

__all__ = ["NetOps", "Chain"]


class NetOps:
    """The block ops of a net: ``fast`` False gives :class:`~fastpc.blocks.AutogradOps` for
    every block, else :func:`~fastpc.blocks.block_ops` (``plain``: for torch.compile);
    ``precision`` bf16: :func:`~fastpc.precision.bf16_ops` of every block."""

    def __init__(self, blocks, fast: bool | str, plain: bool = False, precision: str = "fp32"):
        self.ops: tuple[BlockOps, ...] = tuple(
            bf16_ops(b, fast) if precision == "bf16" else AutogradOps(b) if fast is False else block_ops(b, plain)
            for b in blocks)
        self.block_ids = tuple(id(b) for b in blocks)
        self.analytic = all(isinstance(o, AnalyticOps) for o in self.ops)
        # pure analytic ops whose first block is dense: the door reads that block's Linear
        # output instead of x (smaller; a bad x changes no state on the way, no batch norm)
        self.linear_first = self.analytic and bool(self.ops) and self.ops[0].linear_pre
        self.block_params = [list(b.parameters()) for b in blocks]
        self.params = [p for ps in self.block_params for p in ps]
        self.has_batchnorm = any(isinstance(m, _BatchNorm) for b in blocks for m in b.modules())
        self._flops: dict[tuple, list | None] = {}

    def fallbacks(self) -> list[str]:
        """'block i (Type)' for every block on the autograd fallback."""
        return [f"block {i} ({type(o.block).__name__})" for i, o in enumerate(self.ops)
                if isinstance(o, (AutogradOps, AutocastOps))]

    def flops(self, calls: list[int], in_shapes: list[torch.Size]) -> int | None:
        """Multiply-add FLOPs of ``calls`` (forward, vjp, weight grads per block) on blocks with
        these input shapes; None when a block cannot count them."""
        key = tuple(in_shapes)
        per = self._flops.get(key, ())
        if per == ():
            per = [o.flops(s) for o, s in zip(self.ops, in_shapes)]
            per = self._flops[key] = None if any(f is None for f in per) else per
        if per is None:
            return None
        return sum(calls[3 * k] * f.forward + calls[3 * k + 1] * f.vjp + calls[3 * k + 2] * f.weight_grad
                   for k, f in enumerate(per))


class Chain:
    """One batch on a net's ops: block k maps s_k to f_k(s_k) (s_0 = x); ``tapes[k]`` is its
    latest forward; ``calls`` counts forward / vjp / weight-grad calls per block."""

    __slots__ = ("netops", "ops", "x", "tapes", "calls", "workspace", "like")

    def __init__(self, netops: NetOps, x: torch.Tensor | None, workspace: Workspace | None = None,
                 like: torch.Tensor | None = None):
        """``x=None``: a free input (generative mode); ``like`` gives the stacks' dtype and device."""
        self.netops, self.ops, self.x, self.workspace = netops, netops.ops, x, workspace
        self.like = x if like is None else like
        self.tapes: list[Tape] = [None] * len(self.ops)  # type: ignore[list-item]
        self.calls = [0] * (3 * len(self.ops))

    def forward(self, k: int, s: torch.Tensor) -> Tape:
        self.calls[3 * k] += 1
        tape = self.tapes[k] = self.ops[k].forward(s)
        return tape

    def vjp(self, k: int, g: torch.Tensor) -> torch.Tensor:
        self.calls[3 * k + 1] += 1
        return self.ops[k].vjp(self.tapes[k], g)

    def vjp_into(self, k: int, g: torch.Tensor, out: torch.Tensor, acc: torch.Tensor | None, alpha: float) -> None:
        self.calls[3 * k + 1] += 1
        self.ops[k].vjp_into(self.tapes[k], g, out, acc, alpha)

    def weight_grads(self, k: int, g: torch.Tensor, scale: float) -> None:
        self.calls[3 * k + 2] += 1
        self.ops[k].weight_grads(self.tapes[k], g, scale)

    def zero_weight_grads(self, k: int) -> None:
        """Block k's gradient where its error is exactly zero: zeros (autograd's), no product."""
        for p in self.netops.block_params[k]:
            if p.requires_grad and p.grad is None:
                p.grad = torch.zeros_like(p)

    def feedforward(self, s: torch.Tensor | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The FF pass from s_0 = ``s`` (default x): ([s_1, ..., s_{L-1}], output), every tape recorded."""
        s = self.x if s is None else s
        for k in range(len(self.ops)):
            s = self.forward(k, s).out
        return [t.out for t in self.tapes[:-1]], s

    def in_shapes(self) -> list[torch.Size]:
        return [t.s.shape for t in self.tapes]

    def stack(self, name: str, shapes: list[torch.Size], zero: bool = False, per_tensor: bool = False) -> Stack:
        """A stack for a relaxation's variables or errors: the workspace's unless it is busy
        (``per_tensor``: a new per-tensor one, see :class:`~fastpc.learners.descent.Stack`)."""
        ws = self.workspace
        if per_tensor or ws is None or ws.busy:
            return Stack(shapes, self.like, zero, per_tensor)
        return ws.stack(name, shapes, self.like, zero)

    def state_shapes(self) -> list[torch.Size]:
        """Shapes of s_1 .. s_{L-1} (after the FF pass)."""
        return [t.out.shape for t in self.tapes[:-1]]
