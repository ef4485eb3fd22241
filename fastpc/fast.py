"""The fast path: sPC and ePC on MLP-shaped PCNets with analytic vector-Jacobian products.

A PCNet qualifies when every block is ``[Flatten] Linear [activation]`` (an ``nn.Sequential``
or a bare ``nn.Linear``) with an elementwise activation fastpc knows (relu, gelu, tanh, sigmoid,
silu, leaky_relu, identity). For such a net the learners run inference and the local weight
update here instead of through generic autograd:

- every VJP is written out: ``Wᵀ(g ⊙ f'(a))`` with ATen's own activation backward kernels
  (the ones autograd would call), fused into one ``addmm`` with the error term where possible;
- no autograd graph is built (everything runs under ``no_grad``) and no weight gradient is
  computed inside inference;
- few and cheap elementwise ops: on small tensors GELU and its backward run ATen's own
  kernels with oneDNN switched off for the call (oneDNN's set-up costs ~10–20 µs a call), the
  softmax / log-softmax of a few-class output runs over the transposed view (ATen's row kernel
  is ~3× slower for rows shorter than a SIMD vector), the one-hot targets are made once per batch, the line
  search's softmax is exp of the log-softmax its energy already computed, and ∂ℓ/∂ŷ at the
  final output is reused by the weight update, whose ±1/B factor goes into the product;
- the clamped input's prediction μ_1 = f_1(x) and all pre-activations come from the one
  feedforward pass, and are reused;
- **activity tracking** (sPC): each state carries a version; a prediction, an error or a VJP
  is recomputed only when its inputs changed. From the feedforward state only the top layers
  move in the first steps (the signal travels one layer per step), so the work those layers
  would do on exact zeros is skipped, and so is the weight-gradient product of any block whose
  error is still exactly zero (its gradient is a zero tensor, as autograd would give). The
  numbers are those of the generic path: skipped work is work on exact zeros.

The generic autograd path (``fastpc.learners.base.descend``) stays the reference; the tests
check the two agree in float64 (states, energy trace, weight gradients, weights after steps).
``safeguard=True`` (the backtracking line search of ``descend``: one step size for the batch,
any ``armijo``) is covered too, with the same accept/reject decisions, step sizes, momentum
restarts and trace: the variables then live back to back in one flat buffer (each layer a
contiguous view), so the line search's energy, slope, restore and update are one op each over
all layers, and on the CPU an accepted step restores nothing. sPC then recomputes every layer
each step (a rejected step moves every layer back; no activity tracking).
Options the fast path does not cover (Adam on states, incremental iPC, any other block) fall
back to the generic path.

Every matrix product adds its FLOPs (2·m·k·n) to :attr:`Run.flops`, the analytic count the
speed benchmark reports; elementwise work is not counted.

**The compiled step** (learner option ``compile=True``; config ``learner.compile``): the FF
pass, inference and the local weight gradients of a training step, i.e. :func:`_step_core` over
these same functions, traced by ``torch.compile`` into one graph (no graph breaks; the line
search selects with ``torch.where`` instead of branching on the host, and writes its stacked
buffers whole, since per-view writes become scatter chains inductor turns into a very slow
kernel). Inductor fuses the elementwise work between the matrix products and the Python
overhead goes. Measured on a 2-core CPU: 10-35 % less time per step than the eager fast path
on 4×128 and 20×128 GELU MLPs (``benchmarks/results/speed.md``); compiling takes ~15-25 s
(4×128) to ~70-160 s (20-layer ePC with the line search) with a cold inductor cache. Same
numbers as the eager path in float64 (tested). Only the first batch's size is compiled; if
compiling fails the learner warns once and stays eager.
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from . import energy as E
from .init import ForwardInit
from .nets import PCNet

__all__ = ["MLPPlan", "Run", "FastPath", "plan_mlp", "feedforward", "spc_relax", "epc_relax", "local_grads",
           "compiled_step", "compile_unavailable"]

Act = Callable[[torch.Tensor], torch.Tensor]
# grad ⊙ f'(a) given (grad, a, f(a)), with the kernels autograd itself uses
ActGrad = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
_aten = torch.ops.aten


def _act_pair(m: nn.Module, plain: bool = False) -> tuple[Act, ActGrad] | None:
    """(forward, backward) of a supported elementwise activation module, else None.
    ``plain``: no oneDNN switching (for code torch.compile traces)."""
    t = type(m)
    if t is nn.ReLU:
        return F.relu, lambda g, a, o: _aten.threshold_backward(g, o, 0)
    if t is nn.GELU:
        ap = m.approximate
        if plain:
            return (lambda a: F.gelu(a, approximate=ap)), (lambda g, a, o: _aten.gelu_backward(g, a, approximate=ap))
        return (
            _native_if_small(lambda a: F.gelu(a, approximate=ap), _NATIVE_FWD_MAX),
            _native_if_small(lambda g, a, o: _aten.gelu_backward(g, a, approximate=ap), _NATIVE_BWD_MAX),
        )
    if t is nn.Tanh:
        return torch.tanh, lambda g, a, o: _aten.tanh_backward(g, o)
    if t is nn.Sigmoid:
        return torch.sigmoid, lambda g, a, o: _aten.sigmoid_backward(g, o)
    if t is nn.SiLU:
        return F.silu, lambda g, a, o: _aten.silu_backward(g, a)
    if t is nn.LeakyReLU:
        s = m.negative_slope
        return (lambda a: F.leaky_relu(a, s)), (lambda g, a, o: _aten.leaky_relu_backward(g, a, s, False))
    return None


# oneDNN's gelu primitives cost ~10 (forward) / ~20 µs (backward) to set up per call: on a small
# tensor ATen's own kernels are faster, on a large one oneDNN's (crossovers measured on a 1-thread
# AVX-512 CPU: ~16k elements forward, ~32k backward). Float64 never uses oneDNN.
_NATIVE_FWD_MAX, _NATIVE_BWD_MAX = 16384, 32768


def _native_if_small(fn, limit: int):
    """``fn`` with oneDNN switched off for the call when its first argument has ≤ ``limit``
    elements (restored after; left alone when oneDNN is already off)."""

    def call(*args):
        if args[0].numel() > limit or not torch._C._get_mkldnn_enabled():
            return fn(*args)
        torch._C._set_mkldnn_enabled(False)
        try:
            return fn(*args)
        finally:
            torch._C._set_mkldnn_enabled(True)

    return call


_NARROW = 16  # an output layer with at most this many outputs computes its product transposed


@dataclass(frozen=True)
class _Layer:
    weight: nn.Parameter  # (out, in)
    bias: nn.Parameter | None
    act: Act | None  # None: identity
    act_grad: ActGrad | None
    transposed: bool = False  # compute (W sᵀ + b)ᵀ: set for an output layer with few outputs

    def pre(self, s: torch.Tensor, run: "Run", wt: torch.Tensor) -> torch.Tensor:
        """a = s Wᵀ + b (``wt`` = Wᵀ, a view made once per batch). The output layer of a
        classifier (``transposed``) computes (W sᵀ + b)ᵀ instead and returns that transposed
        view: a GEMM with 10 output columns runs ~2.5x slower in MKL than with 10 rows."""
        run.count(s.shape[0], wt.shape[0], wt.shape[1])
        if self.transposed:
            if self.bias is None:
                return torch.mm(self.weight, s.t()).t()
            return torch.addmm(self.bias.unsqueeze(1), self.weight, s.t()).t()
        if self.bias is None:
            return torch.mm(s, wt)
        return torch.addmm(self.bias, s, wt)

    def out(self, a: torch.Tensor) -> torch.Tensor:
        return a if self.act is None else self.act(a)

    def delta(self, g: torch.Tensor, a: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """g ⊙ f'(a)."""
        return g if self.act_grad is None else self.act_grad(g, a, o)


@dataclass(frozen=True)
class MLPPlan:
    """The layers of a qualifying PCNet, f_i(s) = act_i(s W_iᵀ + b_i)."""

    layers: tuple[_Layer, ...]
    block_ids: tuple[int, ...]  # to notice a net whose blocks were swapped out

    @property
    def depth(self) -> int:
        return len(self.layers)


def _parse_block(block: nn.Module, first: bool, plain: bool = False) -> _Layer | None:
    mods = list(block) if isinstance(block, nn.Sequential) else [block]
    if mods and isinstance(mods[0], nn.Flatten):
        if not first or mods[0].start_dim != 1 or mods[0].end_dim != -1:
            return None
        mods = mods[1:]
    if not mods or type(mods[0]) is not nn.Linear:
        return None
    lin, rest = mods[0], mods[1:]
    act: tuple[Act, ActGrad] | None = None
    for m in rest:
        if type(m) is nn.Identity:
            continue
        if act is not None:
            return None
        act = _act_pair(m, plain)
        if act is None:
            return None
    return _Layer(lin.weight, lin.bias, None if act is None else act[0], None if act is None else act[1])


def plan_mlp(net: PCNet, plain: bool = False) -> MLPPlan | None:
    """The fast-path plan of ``net``, or None when a block is not [Flatten] Linear [act].
    ``plain``: activations without oneDNN switching (the plan :func:`compiled_step` traces)."""
    layers = []
    for i, block in enumerate(net.blocks):
        layer = _parse_block(block, first=i == 0, plain=plain)
        if layer is None:
            return None
        layers.append(layer)
    if len(layers) < 2:
        return None
    if layers[-1].weight.shape[0] <= _NARROW:
        layers[-1] = dataclasses.replace(layers[-1], transposed=True)
    return MLPPlan(tuple(layers), tuple(id(b) for b in net.blocks))


@dataclass
class Run:
    """One batch through the fast path: the feedforward pass and what inference leaves for
    the weight update. Lists are indexed by layer i = 0..L (index 0 is the input)."""

    plan: MLPPlan
    x: torch.Tensor  # the batch as given (identity-checked by the learner)
    s: list[torch.Tensor]  # s_0 = flattened x, s_1..s_{L-1}; s[L] unused
    a: list[torch.Tensor | None]  # pre-activations a_1..a_L (a[0] None)
    o: list[torch.Tensor | None]  # f_i(s_{i-1}) = act(a_i): predictions μ_i; o[L] = ŷ
    eps: list[torch.Tensor | None] = field(default_factory=list)  # ε_1..ε_{L-1}; None = exactly 0
    wt: list[torch.Tensor] = field(default_factory=list)  # W_iᵀ views, index i-1
    flops: int = 0
    equilibrium: object = None  # the Equilibrium these buffers belong to
    target: torch.Tensor | None = None  # one-hot labels (set by the relax)
    dout: torch.Tensor | None = None  # ∂ℓ/∂ŷ at the final output o[L], when the relax has it

    def count(self, m: int, k: int, n: int) -> None:
        self.flops += 2 * m * k * n


@torch.no_grad()
def feedforward(plan: MLPPlan, x: torch.Tensor) -> Run:
    """The FF pass, keeping pre-activations; returns a Run (states are s[1:L], output o[L])."""
    L = plan.depth
    s0 = x.flatten(1) if x.dim() > 2 else x  # (B, D)
    run = Run(plan, x, [s0] + [None] * L, [None] * (L + 1), [None] * (L + 1))
    run.wt = [layer.weight.t() for layer in plan.layers]
    prev = s0
    for i, layer in enumerate(plan.layers, start=1):
        a = layer.pre(prev, run, run.wt[i - 1])
        o = layer.out(a)
        run.a[i], run.o[i] = a, o
        if i < L:
            run.s[i] = o
        prev = o
    return run


Callback = Callable[[int, list[torch.Tensor]], "bool | None"]



_BRANCH_ON_CPU = True  # False: the sync-free torch.where path everywhere (tests cover it on CPU)


class _Stack:
    """Per-layer (B, w_i) tensors (i = 1..K) back to back in one flat buffer: every layer is a
    contiguous view (``views[i]``; index 0 unused) and a whole-set operation is one op."""

    def __init__(self, B: int, widths: Sequence[int], like: torch.Tensor):
        self.B, self.widths = B, list(widths)
        self.flat = like.new_empty(B * sum(widths))
        self.views: list[torch.Tensor] = [None]  # type: ignore[list-item]
        off = 0
        for w in widths:
            self.views.append(self.flat[off:off + B * w].view(B, w))
            off += B * w

    def like(self) -> "_Stack":
        return _Stack(self.B, self.widths, self.flat)


class _Model:
    """What the line search needs from a learner's energy over the stacked variables ``v``.

    ``whole``: write a stack with one copy of the concatenated layers instead of one ``out=``
    per layer view (set for code torch.compile traces: functionalised, per-view writes become
    a chain of scatters over the whole buffer that inductor fuses into one very slow kernel)."""

    whole: bool = False

    def _write(self, out: _Stack, parts: list[torch.Tensor]) -> None:
        """``out.views[i] = parts[i-1]`` for every layer when ``whole`` (else already done)."""
        if self.whole:
            out.flat.copy_(torch.cat([t.reshape(-1) for t in parts]))

    v: _Stack  # the variables (ε for ePC, s for sPC)
    err: _Stack  # hidden errors at the last forward
    eps: list[torch.Tensor]  # err.views
    target: torch.Tensor
    loss: str
    _lsm: torch.Tensor | None = None  # log-softmax of the output at the last forward (ce)
    _cost: torch.Tensor | None = None  # ℓ at the last forward

    def cost(self, y: torch.Tensor) -> torch.Tensor:
        """ℓ(ŷ, y) summed over the batch at the last forward (keeps the log-softmax for
        :meth:`out_grad`)."""
        if self._cost is None:
            if self.loss == "ce":
                self._lsm = E.log_softmax(self.output())
                self._cost = E.ce_cost(self._lsm, self.target)
            else:
                self._cost = E.output_cost(self.output(), self.target, self.loss)
        return self._cost

    def parts(self, y: torch.Tensor) -> torch.Tensor:
        """Per-layer energies (L,) at the last forward."""
        hidden = [torch.dot(e.view(-1), e.view(-1)) for e in self.eps[1:]]
        return torch.stack([*hidden, self.cost(y) * 2.0]).mul_(0.5)

    def out_grad(self) -> torch.Tensor:
        """∂ℓ/∂ŷ at the last forward; softmax = exp(log-softmax) when :meth:`cost` ran."""
        if self.loss == "ce" and self._lsm is not None:
            return self._lsm.exp().sub_(self.target)
        return E.output_cost_grad(self.output(), self.target, self.loss)

    def forward(self) -> None:
        """Predictions, errors and output at the current v."""
        raise NotImplementedError

    def grad(self, out: _Stack) -> None:
        """∇_v E at the last forward into ``out``."""
        raise NotImplementedError

    def output(self) -> torch.Tensor:
        raise NotImplementedError

    def states(self) -> list[torch.Tensor]:
        raise NotImplementedError


def _batch_energy(model: _Model, y: torch.Tensor, loss: str) -> torch.Tensor:
    """E = Σ_b ℓ_b + ½‖ε‖² over the batch (0-d)."""
    return torch.dot(model.err.flat, model.err.flat).mul_(0.5).add_(model.cost(y))


def _perturbed_forward(run: Run, eps: Sequence[torch.Tensor | None]) -> None:
    """ePC's forward pass s_1 = μ_1 + ε_1, s_i = f_i(s_{i-1}) + ε_i (μ_1 = f_1(x) cached from
    the FF pass), storing pre-activations, outputs and states in ``run``."""
    layers, L = run.plan.layers, run.plan.depth
    s_prev = run.o[1] + eps[1]
    run.s[1] = s_prev
    for i in range(2, L + 1):
        a = layers[i - 1].pre(s_prev, run, run.wt[i - 1])
        o = layers[i - 1].out(a)
        run.a[i], run.o[i] = a, o
        if i < L:
            s_prev = o + eps[i]
            run.s[i] = s_prev


class _EPCModel(_Model):
    """ePC: v = ε, s_i = f_i(s_{i-1}) + ε_i."""

    def __init__(self, run: Run, v: _Stack, target: torch.Tensor, loss: str):
        self.run, self.v, self.err, self.eps, self.target, self.loss = run, v, v, v.views, target, loss

    def forward(self) -> None:
        self._lsm = self._cost = None
        _perturbed_forward(self.run, self.eps)

    def grad(self, out) -> None:
        # ∇_{ε_i}E = ε_i + ∂ŷ/∂s_iᵀ ∂ℓ/∂ŷ: one backward through the perturbed forward pass
        run, layers, L = self.run, self.run.plan.layers, self.run.plan.depth
        d = layers[L - 1].delta(self.out_grad(), run.a[L], run.o[L])
        parts: list[torch.Tensor] = [None] * (L - 1)  # type: ignore[list-item]
        for i in range(L - 1, 0, -1):
            w = layers[i].weight
            run.count(d.shape[0], d.shape[1], w.shape[1])
            ds = torch.mm(d, w)
            if self.whole:
                parts[i - 1] = self.eps[i] + ds
            else:
                torch.add(self.eps[i], ds, out=out.views[i])
            if i > 1:
                d = layers[i - 1].delta(ds, run.a[i], run.o[i])
        self._write(out, parts)

    def output(self) -> torch.Tensor:
        return self.run.o[self.run.plan.depth]

    def states(self) -> list[torch.Tensor]:
        return [self.run.s[i] for i in range(1, self.run.plan.depth)]


class _SPCModel(_Model):
    """sPC: v = s, ε_i = s_i − f_i(s_{i-1}); every layer recomputed each step (a rejected
    step moves every layer back)."""

    def __init__(self, run: Run, v: _Stack, target: torch.Tensor, loss: str):
        self.run, self.v, self.s, self.target, self.loss = run, v, v.views, target, loss
        self.err = v.like()
        self.eps = self.err.views

    def forward(self) -> None:
        run, s, eps, layers, L = self.run, self.s, self.eps, self.run.plan.layers, self.run.plan.depth
        self._lsm = self._cost = None
        for i in range(2, L + 1):
            a = layers[i - 1].pre(s[i - 1], run, run.wt[i - 1])
            run.a[i], run.o[i] = a, layers[i - 1].out(a)
        if self.whole:
            self._write(self.err, [s[i] - run.o[i] for i in range(1, L)])
        else:
            for i in range(1, L):
                torch.sub(s[i], run.o[i], out=eps[i])

    def grad(self, out) -> None:
        # ∇_{s_i} E = ε_i − J_{i+1}ᵀ ε_{i+1}; the top hidden layer gets +J_Lᵀ ∂ℓ/∂ŷ instead
        run, eps, layers, L = self.run, self.eps, self.run.plan.layers, self.run.plan.depth
        parts: list[torch.Tensor] = [None] * (L - 1)  # type: ignore[list-item]
        for i in range(L - 1, 0, -1):
            lay = layers[i]
            if i == L - 1:
                h = lay.delta(self.out_grad(), run.a[L], run.o[L])
                sign = 1.0
            else:
                h, sign = lay.delta(eps[i + 1], run.a[i + 1], run.o[i + 1]), -1.0
            run.count(h.shape[0], h.shape[1], lay.weight.shape[1])
            if self.whole:
                parts[i - 1] = torch.addmm(eps[i], h, lay.weight, alpha=sign)
            else:
                torch.addmm(eps[i], h, lay.weight, alpha=sign, out=out.views[i])
        self._write(out, parts)

    def output(self) -> torch.Tensor:
        return self.run.o[self.run.plan.depth]

    def states(self) -> list[torch.Tensor]:
        return list(self.s[1:])


def _line_search(
    model: _Model,
    y: torch.Tensor,
    loss: str,
    iters: int,
    lr: float,
    momentum: float,
    armijo: float,
    trace: bool,
    callback: Callback | None,
    fwd_valid: bool,
    sync_free: bool = False,
) -> tuple[list[torch.Tensor] | None, int]:
    """``descend``'s safeguarded loop: a backtracking line search on the batch energy with one
    step size (same Armijo test, restores, quadratic step fit, momentum restart and trace) on
    ``model.v``; leaves the model's buffers at the final (accepted) variables."""
    v = model.v.flat
    prev_v, g, g_prev = model.v.like(), model.v.like(), model.v.like()
    vel = torch.zeros_like(v) if momentum > 0 else None
    step = torch.tensor(lr, dtype=v.dtype, device=v.device)
    tol = 8 * torch.finfo(v.dtype).eps
    tiny = torch.finfo(v.dtype).tiny
    fit = min(1.0, 1.8 * (1 - armijo))
    # on the CPU a sync is free: branch on the test (no restore when the step is accepted);
    # elsewhere select with torch.where, as descend does, and never sync
    branch = _BRANCH_ON_CPU and v.device.type == "cpu" and not sync_free
    traces: list[torch.Tensor] | None = [] if trace else None
    prev_e = prev_parts = pred = None
    t_run = 0
    for t in range(iters):
        if not fwd_valid:
            model.forward()
        e = _batch_energy(model, y, loss)
        parts = model.parts(y) if traces is not None else None
        model.grad(g)
        if prev_e is not None:
            rose = e > prev_e - armijo * step * pred + tol * prev_e.abs()
            if not branch or bool(rose):
                if branch:
                    v.copy_(prev_v.flat)
                    g.flat.copy_(g_prev.flat)
                    if vel is not None:  # a rejected step restarts the momentum
                        vel.zero_()
                else:
                    torch.where(rose, prev_v.flat, v, out=v)
                    torch.where(rose, g_prev.flat, g.flat, out=g.flat)
                    if vel is not None:
                        vel.mul_((~rose).to(v.dtype))
                # quadratic φ(a) = E_old − a·pred + ½κa² through E_new at a = step
                curv = (2 * (e - prev_e + step * pred) / step.pow(2)).clamp_min(tiny)
                shrunk = torch.minimum(torch.maximum(fit * pred / curv, step * 1e-6), step * 0.5)
                step = torch.where(rose, shrunk, step)
                e = torch.where(rose, prev_e, e)
                if parts is not None:
                    parts = torch.where(rose, prev_parts, parts)
        prev_v.flat.copy_(v)
        prev_e, prev_parts = e, parts
        if traces is not None:
            traces.append(parts)
        if vel is not None:
            vel.mul_(momentum).add_(g.flat)
            u = vel
        else:
            u = g.flat
        pred = torch.dot(g.flat, u)
        v.addcmul_(u, step, value=-1.0)
        g, g_prev = g_prev, g
        fwd_valid = False
        t_run = t + 1
        if callback is not None:
            model.forward()
            fwd_valid = True
            if callback(t + 1, model.states()) is True:
                break
    if prev_e is not None:  # the last step must pass the same test
        if not fwd_valid:
            model.forward()
        rose = _batch_energy(model, y, loss) > prev_e - armijo * step * pred + tol * prev_e.abs()
        if not branch or bool(rose):
            torch.where(rose, prev_v.flat, v, out=v)
            model.forward()
    elif not fwd_valid:
        model.forward()
    model.run.dout = model.out_grad()
    return traces, t_run


@torch.no_grad()
def spc_relax(
    run: Run,
    states0: Sequence[torch.Tensor],
    y: torch.Tensor,
    loss: str,
    iters: int,
    lr: float,
    momentum: float = 0.0,
    trace: bool = False,
    callback: Callback | None = None,
    from_ff: bool = False,
    safeguard: bool = False,
    armijo: float = 0.0,
    sync_free: bool = False,
) -> tuple[list[torch.Tensor], list[torch.Tensor] | None, int, torch.Tensor]:
    """sPC inference (SGD on the states, optional momentum, optional ``safeguard`` line search
    with ``armijo``), same maths as ``descend``.

    ``from_ff``: ``states0`` equal the feedforward states in ``run`` (forward init), so
    predictions and zero errors are known and only moving layers are recomputed.
    ``sync_free``: the line search selects with ``torch.where`` instead of branching on the
    host (what :func:`compiled_step` traces).
    Returns (states, per-layer trace list or None, iterations run, final parts (L,)), and
    leaves the final a, o, eps in ``run`` for :func:`local_grads`.
    """
    layers, L = run.plan.layers, run.plan.depth
    target = run.target = E.dense_target(y, run.o[L])
    if safeguard:
        v = _Stack(run.s[0].shape[0], [t.shape[1] for t in states0], run.s[0])
        model = _SPCModel(run, v, target, loss)
        model.whole = sync_free
        if sync_free:
            model._write(v, list(states0))
        else:
            for view, t in zip(v.views[1:], states0):
                view.copy_(t)
        if from_ff:  # predictions are the FF ones, errors exactly zero
            model.err.flat.zero_()
        traces, t_run = _line_search(
            model, y, loss, iters, lr, momentum, armijo, trace, callback, fwd_valid=from_ff,
            sync_free=sync_free,
        )
        run.s[1:L] = v.views[1:]
        run.eps = [None] + model.eps[1:]
        return v.views[1:], traces, t_run, model.parts(y)
    s = [run.s[0]] + [t for t in states0]  # s_1..s_{L-1} are updated in place (callers own them)
    # versions: vs[i] bumps whenever s_i moves; o_from[i] = vs[i-1] when o_i was computed;
    # eps_from[i] = (vs[i], version of o_i) when eps_i was computed
    vs = [0] * L
    o_ver = [0] * (L + 1)
    if from_ff:
        o_from = [0] * (L + 1)
        eps: list[torch.Tensor | None] = [None] * L
        eps_from = [(0, 0)] * L
    else:
        o_from = [0, 0] + [-1] * (L - 1)  # o_1 = f_1(x) is always valid
        eps = [None] * L
        eps_from = [(-1, -1)] * L
    delta_from = -1  # o_ver[L] when ∂ℓ/∂ŷ was computed
    delta = None
    vel: list[torch.Tensor | None] = [None] * L
    traces: list[torch.Tensor] | None = [] if trace else None

    def refresh() -> None:
        nonlocal delta, delta_from
        for i in range(2, L + 1):
            if o_from[i] != vs[i - 1]:
                a = layers[i - 1].pre(s[i - 1], run, run.wt[i - 1])
                run.a[i], run.o[i] = a, layers[i - 1].out(a)
                o_from[i], o_ver[i] = vs[i - 1], o_ver[i] + 1
        for i in range(1, L):
            if eps_from[i] != (vs[i], o_ver[i]):
                eps[i] = s[i] - run.o[i]
                eps_from[i] = (vs[i], o_ver[i])
        if delta_from != o_ver[L]:
            delta, delta_from = E.output_cost_grad(run.o[L], target, loss), o_ver[L]

    def parts() -> torch.Tensor:  # an exactly-zero error (None) contributes ½·0 = 0
        return E.layer_energies(eps[1:], run.o[L], target, loss)

    t_run = 0
    for t in range(iters):
        refresh()
        if traces is not None:
            traces.append(parts())
        # ∇_{s_i} E = ε_i − J_{i+1}ᵀ ε_{i+1}; the top hidden layer gets +J_Lᵀ ∂ℓ/∂ŷ instead
        grads: list[torch.Tensor | None] = [None] * L
        for i in range(L - 1, 0, -1):
            lay = layers[i]
            if i == L - 1:
                h, sign = lay.delta(delta, run.a[L], run.o[L]), 1.0
            elif eps[i + 1] is not None:
                h, sign = lay.delta(eps[i + 1], run.a[i + 1], run.o[i + 1]), -1.0
            else:
                h = None
            if h is not None:
                run.count(h.shape[0], h.shape[1], lay.weight.shape[1])
                if eps[i] is None:  # beta=0: s_i only gives the shape, its values are ignored
                    grads[i] = torch.addmm(s[i], h, lay.weight, beta=0, alpha=sign)
                else:
                    grads[i] = torch.addmm(eps[i], h, lay.weight, alpha=sign)
            elif eps[i] is not None:
                grads[i] = eps[i]
        if momentum > 0:
            for i in range(1, L):
                g = grads[i]
                if g is None and vel[i] is None:
                    continue
                if vel[i] is None:
                    vel[i] = g.clone()
                else:
                    vel[i].mul_(momentum)
                    if g is not None:
                        vel[i].add_(g)
                grads[i] = vel[i]
        moving = [i for i in range(1, L) if grads[i] is not None]
        if moving:
            torch._foreach_add_([s[i] for i in moving], [grads[i] for i in moving], alpha=-lr)
            for i in moving:
                vs[i] += 1
        t_run = t + 1
        if callback is not None and callback(t + 1, [s[i] for i in range(1, L)]) is True:
            break
    refresh()
    final = parts()
    run.s[1:L] = s[1:L]
    run.eps = eps
    run.dout = delta
    return s[1:L], traces, t_run, final


@torch.no_grad()
def epc_relax(
    run: Run,
    errs0: Sequence[torch.Tensor] | None,
    y: torch.Tensor,
    loss: str,
    iters: int,
    lr: float,
    momentum: float = 0.0,
    trace: bool = False,
    callback: Callback | None = None,
    safeguard: bool = False,
    armijo: float = 0.0,
    sync_free: bool = False,
) -> tuple[list[torch.Tensor], list[torch.Tensor] | None, int, torch.Tensor]:
    """ePC inference: SGD on the errors ε, states rebuilt by s_i = f_i(s_{i-1}) + ε_i
    (optional momentum, optional ``safeguard`` line search with ``armijo``, as ``descend``).

    ``errs0=None`` means ε = 0 (forward init): the first forward is the FF pass in ``run``.
    ``sync_free`` as in :func:`spc_relax`.
    Returns (states, per-layer trace list or None, iterations run, final parts (L,)) and leaves
    the final a, o, s, eps in ``run`` for :func:`local_grads`.
    """
    layers, L = run.plan.layers, run.plan.depth
    target = run.target = E.dense_target(y, run.o[L])
    if safeguard:
        v = _Stack(run.s[0].shape[0], [run.s[i].shape[1] for i in range(1, L)], run.s[0])
        if errs0 is None:
            v.flat.zero_()
        else:
            for view, e in zip(v.views[1:], errs0):
                view.copy_(e)
        model = _EPCModel(run, v, target, loss)
        model.whole = sync_free
        traces, t_run = _line_search(
            model, y, loss, iters, lr, momentum, armijo, trace, callback, fwd_valid=errs0 is None,
            sync_free=sync_free,
        )
        run.eps = [None] + v.views[1:]
        return model.states(), traces, t_run, model.parts(y)
    if errs0 is None:
        eps = [None] + [torch.zeros_like(run.s[i]) for i in range(1, L)]
        fwd_valid = True
    else:
        eps = [None] + [e.clone() for e in errs0]
        fwd_valid = False
    vel: list[torch.Tensor] | None = None
    traces: list[torch.Tensor] | None = [] if trace else None

    def forward() -> None:
        _perturbed_forward(run, eps)

    def parts() -> torch.Tensor:
        return E.layer_energies(eps[1:], run.o[L], target, loss)

    t_run = 0
    for t in range(iters):
        if not fwd_valid:
            forward()
        if traces is not None:
            traces.append(parts())
        # backward through the perturbed forward pass: ∇_{ε_i}E = ε_i + ∂ŷ/∂s_iᵀ ∂ℓ/∂ŷ
        d = layers[L - 1].delta(E.output_cost_grad(run.o[L], target, loss), run.a[L], run.o[L])
        ds: list[torch.Tensor] = [None] * L  # type: ignore[list-item]
        for i in range(L - 1, 0, -1):
            w = layers[i].weight
            run.count(d.shape[0], d.shape[1], w.shape[1])
            ds[i] = torch.mm(d, w)
            if i > 1:
                d = layers[i - 1].delta(ds[i], run.a[i], run.o[i])
        grads = torch._foreach_add(eps[1:], ds[1:])
        if momentum > 0:
            if vel is None:
                vel = [g.clone() for g in grads]
            else:
                torch._foreach_mul_(vel, momentum)
                torch._foreach_add_(vel, grads)
            grads = vel
        torch._foreach_add_(eps[1:], grads, alpha=-lr)
        fwd_valid = False
        t_run = t + 1
        if callback is not None:
            forward()
            fwd_valid = True
            if callback(t + 1, [run.s[i] for i in range(1, L)]) is True:
                break
    if not fwd_valid:
        forward()
    run.eps = eps
    return [run.s[i] for i in range(1, L)], traces, t_run, parts()


@torch.no_grad()
def local_grads(run: Run, y: torch.Tensor, loss: str, scale: float, collect: bool = False) -> list | None:
    """Accumulate scale × ∇_θ E_local into ``p.grad`` (PAPERS.md §0), from the buffers the
    relax left: ∇_{W_i} = −(ε_i ⊙ f_i'(a_i))ᵀ s_{i-1}, ∇_{W_L} = (∂ℓ/∂ŷ ⊙ f_L'(a_L))ᵀ s_{L-1}
    (the factor ±scale goes into the product). A block whose error is exactly zero gets a zero
    gradient without a product.

    ``collect=True`` leaves ``p.grad`` alone and returns the gradients instead, one per weight
    and bias of the plan in order (None for a parameter that does not require grad)."""
    layers, L = run.plan.layers, run.plan.depth
    collected: list[torch.Tensor | None] = []
    for i in range(1, L + 1):
        lay = layers[i - 1]
        if i == L:
            g = run.dout
            if g is None:
                target = run.target if run.target is not None else E.dense_target(y, run.o[L])
                g = E.output_cost_grad(run.o[L], target, loss)
            alpha = scale
        else:
            g, alpha = run.eps[i], -scale
        h = None if g is None else lay.delta(g, run.a[i], run.o[i])
        for p, kind in ((lay.weight, "w"), (lay.bias, "b")):
            if p is None:
                continue
            if not p.requires_grad:
                if collect:
                    collected.append(None)
                continue
            acc = None if collect else p.grad
            if h is None:
                grad = torch.zeros_like(p) if acc is None else acc
            elif kind == "w":
                run.count(h.shape[1], h.shape[0], run.s[i - 1].shape[1])
                if acc is None:  # beta=0: p only gives the shape, its values are ignored
                    grad = torch.addmm(p, h.t(), run.s[i - 1], beta=0, alpha=alpha)
                else:
                    grad = acc.addmm_(h.t(), run.s[i - 1], alpha=alpha)
            elif acc is None:
                grad = h.sum(0).mul_(alpha)
            else:
                grad = acc.add_(h.sum(0), alpha=alpha)
            if collect:
                collected.append(grad)
            elif acc is None:
                p.grad = grad
    return collected if collect else None


# ---- the compiled step ------------------------------------------------------------------
def compile_unavailable(device: torch.device | str = "cpu") -> str | None:
    """Why torch.compile cannot build kernels for ``device`` here (None: it can): TorchDynamo
    must support this Python, and the CPU backend needs a C++ compiler."""
    import shutil

    try:
        import torch._dynamo  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the Python build
        return f"torch.compile is not available ({type(e).__name__}: {e})"
    if not torch._dynamo.is_dynamo_supported():
        return "torch.compile does not support this Python version"
    if torch.device(device).type == "cpu":
        import os

        names = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++", "clang++"]
        if not any(shutil.which(n) for n in names):
            return "torch.compile on the CPU needs a C++ compiler (g++ or clang++) on PATH"
    return None


def _step_core(plan: MLPPlan, kind: str, loss: str, opts: tuple, scale_fn: Callable[[int], float],
               x: torch.Tensor, y: torch.Tensor):
    """One training step's work up to the optimizer, from the forward-initialised state: the FF
    pass, inference (``kind`` spc or epc) and the local weight gradients. What
    :func:`compiled_step` compiles; the same functions as the eager fast path."""
    iters, lr, momentum, safeguard, armijo = opts
    run = feedforward(plan, x)
    L = plan.depth
    out = run.o[L]  # the FF output: the relax replaces run.o[L], never writes into it
    if kind == "spc":
        states0 = [run.s[i].clone() for i in range(1, L)]
        states, _, _, final = spc_relax(run, states0, y, loss, iters, lr, momentum=momentum, from_ff=True,
                                        safeguard=safeguard, armijo=armijo, sync_free=True)
    else:
        states, _, _, final = epc_relax(run, None, y, loss, iters, lr, momentum=momentum,
                                        safeguard=safeguard, armijo=armijo, sync_free=True)
    cost = E.output_cost(out, run.target, loss)  # the dense targets the relax made
    grads = local_grads(run, y, loss, scale_fn(y.shape[0]), collect=True)
    return out, cost, list(states), run.o[L], final, grads, run.flops


def compiled_step(plan: MLPPlan, kind: str, loss: str, opts: tuple, scale_fn: Callable[[int], float]):
    """``torch.compile`` of :func:`_step_core` for one plan and set of options (one graph, no
    breaks; a new batch shape compiles again). Build ``plan`` with ``plain=True``. On the CPU
    the graph's launcher is generated C++ too (inductor's ``cpp_wrapper``: 2-5 % less time
    per step than its Python launcher on a 4×128 MLP)."""

    def step(x: torch.Tensor, y: torch.Tensor):
        return _step_core(plan, kind, loss, opts, scale_fn, x, y)

    inductor = None
    if plan.layers[0].weight.device.type == "cpu":
        inductor = {"cpp_wrapper": True}
        _separate_inductor_cache_per_isa()
    return torch.compile(step, dynamic=False, fullgraph=True, options=inductor)


_USER_INDUCTOR_CACHE = "TORCHINDUCTOR_CACHE_DIR" in os.environ


def _separate_inductor_cache_per_isa() -> None:
    """Give each ATen CPU kernel family (``ATEN_CPU_CAPABILITY``) its own inductor cache.

    Inductor picks its vector ISA from ``ATEN_CPU_CAPABILITY`` but (torch 2.13) leaves it out
    of its cache key: a step compiled under AVX-512 and loaded from the cache under ``avx2``
    returned a loss 6 % off the eager one, and one compiled under ``avx2`` failed to load under
    ``default``. A cache folder the user chose is left alone."""
    capability = os.environ.get("ATEN_CPU_CAPABILITY")
    if _USER_INDUCTOR_CACHE or not capability:
        return
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(default_cache_dir(), f"aten-{capability}")


class FastPath:
    """Mixin for a learner with a fast path (sPC, ePC): the ``fast`` option, the plan cache,
    and the routing of the feedforward pass and the weight update.

    ``fast="auto"`` (default) uses the fast path when the net qualifies and the learner's options
    are covered, the generic autograd path otherwise; ``True`` requires it (``ValueError`` when
    it cannot apply); ``False`` always takes the generic path.
    """

    fast: bool | str = "auto"
    compile: bool = False
    last_flops: int | None = None  # matmul FLOPs of the last fast-path step (2·m·k·n each)
    compile_failed: str | None = None  # why the compiled step was given up (then eager)
    _fast_run: Run | None = None
    _fast_plan: MLPPlan | None = None
    _compiled: tuple | None = None  # (key, compiled function, plain plan)
    _compiled_batch: int | None = None  # the batch size the compiled step runs for

    def _init_fast(self, fast: bool | str, compile: bool = False) -> None:
        if fast not in (True, False, "auto"):
            raise ValueError(f"fast must be True, False or 'auto', got {fast!r}")
        if compile not in (True, False):
            raise ValueError(f"compile must be True or False, got {compile!r}")
        self.fast, self.compile = fast, bool(compile)
        if fast is True:
            why = self.fast_unsupported()
            if why is not None:
                raise ValueError(f"fast=True but {why}; use fast='auto' to fall back to the generic path")

    def _fast_conflict(self) -> str | None:
        """Why the learner's options rule the fast path out (None: they don't)."""
        return None

    def fast_unsupported(self) -> str | None:
        """Why the fast path cannot run for this learner and net, or None when it can."""
        why = self._fast_conflict()
        if why is not None:
            return why
        if self._plan() is None:
            return "the net is not a chain of [Flatten] Linear [activation] blocks"
        return None

    @property
    def uses_fast_path(self) -> bool:
        """Whether step / grads / infer take the fast path."""
        return self.fast is not False and self.fast_unsupported() is None

    @property
    def uses_compiled_step(self) -> bool:
        """Whether ``step`` runs the compiled step: ``compile=True``, the fast path applies, the
        states start from the FF pass (``init="forward"``) and compiling has not failed. It runs
        for batches of the first batch's size; others (a last, partial batch) run eagerly."""
        return (self.compile and self.compile_failed is None and type(self.init) is ForwardInit  # type: ignore[attr-defined]
                and self.uses_fast_path)

    def step(self, x, y):
        if self.optimizer is not None and self.uses_compiled_step:  # type: ignore[attr-defined]
            self._check_input(x)  # type: ignore[attr-defined]
            if x[0].numel() != self._plan().layers[0].weight.shape[1]:
                raise ValueError(f"x of shape {tuple(x.shape)} does not fit the net (its first layer takes "
                                 f"{self._plan().layers[0].weight.shape[1]} features per sample)")
            out_like = x.new_empty(x.shape[0], self._plan().layers[-1].weight.shape[0])
            y = self._check_target(y, out_like)  # type: ignore[attr-defined]
            # one compiled graph per batch size costs a compile each: only the first batch's
            # size is compiled, any other (an epoch's last, partial batch) runs eagerly
            if self._compiled_batch is None:
                self._compiled_batch = x.shape[0]
            if x.shape[0] == self._compiled_batch:
                return self._compiled_train_step(x, y)
        return super().step(x, y)  # type: ignore[misc]

    def _grads_cover_optimizer(self, opt, params, grads) -> bool:
        """Whether every parameter ``opt`` updates gets a new gradient from ``grads`` (then
        ``zero_grad`` is redundant: the assignment replaces every old gradient)."""
        key = (id(opt), len(opt.param_groups), sum(len(g["params"]) for g in opt.param_groups))
        if getattr(self, "_cover_key", None) != key:
            fresh = {id(p) for p, g in zip(params, grads) if g is not None}
            self._cover = all(id(p) in fresh for grp in opt.param_groups for p in grp["params"])
            self._cover_key = key
        return self._cover

    def _compiled_train_step(self, x, y):
        """``Learner.step`` with everything up to the optimizer in one compiled graph. If
        compiling or running it fails, the step runs eagerly; when that works, the failure was
        the compiler's: a warning says so and later steps stay eager (``compile_failed``)."""
        from .learners.base import Equilibrium

        opts = (self.iters, self.state_lr, self.momentum, self.safeguard, self.armijo)  # type: ignore[attr-defined]
        key = (self._plan().block_ids, self.loss, opts)  # type: ignore[attr-defined]
        if self._compiled is None or self._compiled[0] != key:
            plan = plan_mlp(self.net, plain=True)  # type: ignore[attr-defined]
            fn = compiled_step(plan, self.name, self.loss, opts, self._weight_scale)  # type: ignore[attr-defined]
            self._compiled = (key, fn, plan)
        _, fn, plan = self._compiled
        try:
            with torch.no_grad():
                out, cost, states, output, final, grads, flops = fn(x, y)
        except Exception as e:  # noqa: BLE001 - decided below by re-running eagerly
            result = super().step(x, y)  # type: ignore[misc]  # raises if the input is at fault
            why = str(e).strip().splitlines()[0] if str(e).strip() else ""
            self.compile_failed = f"{type(e).__name__}: {why}"[:300]
            warnings.warn(f"fastpc: compiling the {self.name} step failed ({self.compile_failed}); "  # type: ignore[attr-defined]
                          "training continues on the eager fast path", RuntimeWarning, stacklevel=3)
            return result
        opt = self.optimizer  # type: ignore[attr-defined]
        params = [p for lay in plan.layers for p in (lay.weight, lay.bias) if p is not None]
        if not self._grads_cover_optimizer(opt, params, grads):
            opt.zero_grad(set_to_none=True)
        for p, g in zip(params, grads):
            if g is not None:
                p.grad = g
        self._apply_update()  # type: ignore[attr-defined]
        self.last_flops = flops
        eq = Equilibrium(states=states, output=output, energy=final.sum(), iters=self.iters)  # type: ignore[attr-defined]
        self.init.observe(x, y, eq.states)  # type: ignore[attr-defined]
        return self._step_result(cost, out, eq)  # type: ignore[attr-defined]

    def _plan(self) -> MLPPlan | None:
        blocks = self.net.blocks  # type: ignore[attr-defined]
        plan = self._fast_plan
        if plan is None or plan.block_ids != tuple(id(b) for b in blocks):
            plan = plan_mlp(self.net)  # type: ignore[attr-defined]
            self._fast_plan = plan
        return plan

    def _feedforward(self, x):
        self._fast_run = None
        if self.uses_fast_path:
            self._check_input(x)  # type: ignore[attr-defined]
            run = self._fitting(x, lambda x: feedforward(self._plan(), x))  # type: ignore[attr-defined]
            self._fast_run = run
            L = run.plan.depth
            return [run.s[i] for i in range(1, L)], run.o[L]
        return super()._feedforward(x)  # type: ignore[misc]

    def _output_cost(self, out, y):
        if self._fast_run is not None and self._fast_run.target is not None:
            return E.output_cost(out, self._fast_run.target, self.loss)  # type: ignore[attr-defined]
        return super()._output_cost(out, y)  # type: ignore[misc]

    def _weight_grads(self, x, y, eq):
        run = self._fast_run
        if run is not None and run.equilibrium is eq:
            local_grads(run, y, self.loss, self._weight_scale(y.shape[0]))  # type: ignore[attr-defined]
            self.last_flops = run.flops
            self._fast_run = None
            return
        super()._weight_grads(x, y, eq)  # type: ignore[misc]

    def _fast_equilibrium(self, run: Run, states, traces, iters, final):
        from .learners.base import Equilibrium

        layer_trace = torch.stack([*traces, final]) if traces is not None else None
        eq = Equilibrium(
            states=list(states),
            output=run.o[run.plan.depth],
            energy=final.sum(),
            iters=iters,
            trace=None if layer_trace is None else layer_trace.sum(1),
            layer_trace=layer_trace,
        )
        run.equilibrium = eq
        return eq
