"""Gradient descent on an inference energy: the one loop every PC learner's inference runs.

A learner describes its energy as a :class:`Relaxation` over variables stored back to back in
one flat buffer, or as separate tensors in the compiled step (a :class:`Stack`: states for
sPC, errors for ePC); :func:`minimize` runs
``iters`` steps of plain SGD, momentum or Adam on it, with the safeguard line search, traces
and callbacks. The relaxation may declare that every variable before some offset of the stack
has an exactly zero gradient (sPC from the feedforward state: the signal has not reached the
lower layers yet); the loop then leaves that part of the buffers alone, which changes no number.

The safeguard (``Descent.safeguard``) is a backtracking line search on the batch energy E with
one step size η for the whole batch (so every sample's variables move by the same η and the
weight update keeps BP's weighting of the samples). A step is accepted when it decreases E by
at least ``armijo`` × the decrease its gradient predicts, E_new ≤ E_old − armijo·η⟨g, u⟩ (the
Armijo condition; ``armijo=0``: E must not rise). A rejected step is undone and η shrunk to fit
the curvature κ along it, measured by the quadratic through E_old, its slope and E_new: 90 % of
the largest step that quadratic accepts, η·κ = 2(1 − armijo), at most its minimiser η·κ = 1
(clipped to [η·1e-6, η/2]); a rejected step restarts the momentum. The step then stays in
force for the rest of the batch. With ``armijo`` near 1 every step is far below 1/κ: after T
steps η·κ·T ≲ 2T(1 − armijo), the regime in which one ePC update is η·T × the BP gradient
(PAPERS.md §2) even where the deep Jacobian has grown large. The last step must pass the same
test. On the CPU the accept/reject test branches on the host (an accepted step restores
nothing); elsewhere, and for code ``torch.compile`` traces (``sync_free``), it selects with
``torch.where`` and never synchronises.

Only the first ``armijo_steps`` steps answer to ``armijo``: after them the test asks only that
E not rise, and a step that achieved at least 3/4 of the decrease its gradient predicted
(η·κ ≤ ½ on a quadratic) is doubled for the next one. So a long inference converges as fast as a
well-chosen fixed step (η·κ settles between ½ and 2: the quadratic's minimiser after a
rejection, doubled while the steps stay safe) instead of crawling at η·κ ≈ 2(1 − armijo), while a
short one (T ≤ ``armijo_steps``, the regime of the depth table) runs exactly as before.

``tol``: inference stops when the gradient norm has fallen to ``tol`` × its value at the first
step (‖∇_v E‖ ≤ tol·‖∇_v E⁰‖), ``iters`` being the cap; the steps run are reported. With
``trace`` the loop also returns ‖∇_v E‖ before every step and at the end, the distance to
equilibrium. On an energy that is not smooth at its minimum (ReLU units at their kink)
‖∇E‖ need not fall below tol; ``iters`` then decides.

Data parallel (:mod:`fastpc.distributed`): each rank holds a part of the batch, and every
decision above reads a batch sum (E, ⟨g, u⟩, ‖g‖²). :func:`batch_total` sums those scalars over
the ranks (the identity when not distributed), so every rank accepts, rejects, resizes and stops
exactly as one process on the whole batch would (one all_reduce of two scalars per step; one
more for ‖g‖ when ``tol`` or ``trace`` reads it). Traces stay the rank's own part.
"""

from __future__ import annotations

import abc
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch

from .. import distributed

__all__ = ["Stack", "Relaxation", "Descent", "Workspace", "Minimized", "minimize", "batch_total", "dot",
           "BRANCH_ON_CPU"]

BRANCH_ON_CPU = True  # False: the sync-free torch.where line search on the CPU too (tests use it)


class Stack:
    """Tensors of the given shapes: ``views[i]`` is tensor i, ``offsets[i]`` where it starts
    in the variables taken as one vector. Either back to back in one flat buffer ``flat`` (the
    eager loop: an operation on the variables from an offset on is one op on ``flat``'s tail)
    or, ``per_tensor``, separate tensors (``flat`` None; code torch.compile traces: there a
    write into a slice of one buffer becomes a scatter over all of it, while one op per tensor
    costs nothing and leaves the tensors before the offset untouched)."""

    def __init__(self, shapes: Sequence[torch.Size], like: torch.Tensor, zero: bool = False,
                 per_tensor: bool = False):
        self.shapes = [torch.Size(s) for s in shapes]
        sizes = [math.prod(s) for s in self.shapes]
        self.offsets = [0]
        for n in sizes:
            self.offsets.append(self.offsets[-1] + n)
        new = like.new_zeros if zero else like.new_empty
        self.proto = like  # dtype and device
        if per_tensor:
            self.flat: torch.Tensor | None = None
            self.views = [new(s) for s in self.shapes]
            self._pieces: list[torch.Tensor] | None = None
        else:
            self.flat = new(self.offsets[-1])
            self._pieces = list(self.flat.split_with_sizes(sizes))
            self._tails: dict[int, list[torch.Tensor]] = {}
            self.views = [t.view(s) for t, s in zip(self._pieces, self.shapes)]

    def pieces(self) -> list[torch.Tensor]:
        """The tensors as 1-D views (flat: made once with the stack)."""
        return self._pieces if self._pieces is not None else [v.reshape(-1) for v in self.views]

    @classmethod
    def of(cls, tensors: Sequence[torch.Tensor], like: torch.Tensor, per_tensor: bool = False) -> "Stack":
        """A new stack holding copies of ``tensors`` (dtype and device of ``like``)."""
        stack = cls([t.shape for t in tensors], like, per_tensor=per_tensor)
        stack.assign(list(tensors))
        return stack

    def index(self, offset: int) -> int:
        """The tensor holding ``flat[offset]`` (``len(views)`` for the end of the buffer)."""
        i = len(self.views)
        while self.offsets[i] > offset:
            i -= 1
        return i

    def like(self, zero: bool = False) -> "Stack":
        return Stack(self.shapes, self.proto, zero, self.flat is None)

    def tail(self, offset: int) -> list[torch.Tensor]:
        """The variables from ``offset`` on, to operate on in place: ``[flat[offset:]]``, or per
        tensor the tensors from the one starting at ``offset`` (a tensor's start)."""
        if self.flat is not None:
            tail = self._tails.get(offset)
            if tail is None:  # a view made once per offset (a slice costs a dispatcher call)
                tail = self._tails[offset] = [self.flat if offset == 0 else self.flat[offset:]]
            return tail
        return self.views[self.index(offset):]

    def sub(self, first: int) -> Stack:
        """The stack of the tensors from ``first`` on, sharing their memory (per tensor: the
        tensors it holds now; :meth:`put` on either stack is not seen by the other)."""
        sub, base = object.__new__(Stack), self.offsets[first]
        sub.shapes, sub.views, sub.proto = self.shapes[first:], self.views[first:], self.proto
        sub.flat = None if self.flat is None else self.flat[base:]
        sub._pieces = None if self._pieces is None else self._pieces[first:]
        sub._tails = {}
        sub.offsets = [o - base for o in self.offsets[first:]]
        return sub

    def assign(self, parts: Sequence[torch.Tensor | None]) -> None:
        """``views[i] = parts[i]``, copied (None: zero)."""
        for v, p in zip(self.views, parts):
            if p is None:
                v.zero_()
            else:
                v.copy_(p)

    def put(self, parts: Sequence[torch.Tensor | None]) -> None:
        """``views[i] = parts[i]`` where a part is given (None: unchanged); per tensor the part
        itself becomes the tensor (no copy: the caller hands over new tensors)."""
        for i, p in enumerate(parts):
            if p is None:
                continue
            if self.flat is None:
                self.views[i] = p
            else:
                self.views[i].copy_(p)


class Relaxation(abc.ABC):
    """An inference energy E over the variables ``v`` as :func:`minimize` sees it. ``whole``:
    code torch.compile traces (the compiled step): its stacks are ``per_tensor`` (see
    :class:`Stack`) and it writes them with :meth:`Stack.put`."""

    v: Stack
    whole: bool = False
    sparse_grad: bool = True  # grad may return start > 0 (False: it writes the whole buffer)
    grad_scratch: Stack | None = None
    """A flat stack of ``v``'s shapes that :meth:`grad` may take as ``out``, writing ∇E over what
    it holds (its own errors: no copy into a separate buffer); its contents are valid until the
    next :meth:`forward`, which rewrites them. The loop uses it when nothing reads the gradient
    after the variables move (no line search, trace or tol, not sync-free)."""

    @abc.abstractmethod
    def forward(self) -> None:
        """Bring predictions, errors and output up to date with ``v`` (cheap when they are)."""

    @abc.abstractmethod
    def moved(self, start: int) -> None:
        """``v.flat[start:]`` changed (``forward`` has work to do)."""

    @abc.abstractmethod
    def energy(self) -> torch.Tensor:
        """E at the last forward, summed over the batch (0-d)."""

    @abc.abstractmethod
    def parts(self) -> torch.Tensor:
        """Per-layer energies at the last forward, shape (L,), summing to E."""

    @abc.abstractmethod
    def grad(self, out: Stack) -> int:
        """Write ∇_v E at the last forward into ``out`` from offset ``start`` on and return
        ``start``: the gradient before it is exactly zero (and ``out`` must already hold zeros
        there where the loop reads it: the line search's restore)."""

    @abc.abstractmethod
    def states(self) -> list[torch.Tensor]:
        """The hidden states at the last forward (what callbacks see)."""


@dataclass(frozen=True)
class Descent:
    """At most iters steps of size ``lr`` (``state_lr``); ``optimizer`` "sgd" (with
    ``momentum``) or "adam"; ``safeguard``: the line search with ``armijo`` for its first
    ``armijo_steps`` steps; ``tol``: stop once ‖∇E‖ ≤ tol·‖∇E at the first step‖ (see the module
    docstring)."""

    iters: int
    lr: float
    momentum: float = 0.0
    optimizer: str = "sgd"
    safeguard: bool = False
    armijo: float = 0.0
    tol: float | None = None
    armijo_steps: int = 20

    def __post_init__(self):
        if self.optimizer not in ("sgd", "adam"):
            raise ValueError(f"state_optimizer must be 'sgd' or 'adam', got {self.optimizer!r}")
        if self.safeguard and self.optimizer == "adam":
            raise ValueError("safeguard works with state_optimizer='sgd' only")
        if self.tol is not None and not (isinstance(self.tol, (int, float)) and 0 <= self.tol < 1):
            raise ValueError(f"tol must be a number in [0, 1) or None, got {self.tol!r}")
        if not (isinstance(self.armijo_steps, int) and self.armijo_steps >= 0):
            raise ValueError(f"armijo_steps must be an integer >= 0, got {self.armijo_steps!r}")


class Minimized(NamedTuple):
    """What :func:`minimize` hands back: per-layer energies before every step (``trace``), the
    steps run, and ‖∇_v E‖ before every step and at the end (``trace``)."""

    traces: list[torch.Tensor] | None
    iters: int
    grad_norms: list[torch.Tensor] | None


AfterStep = Callable[[int], "bool | None"]


class Workspace:
    """Stacks kept from one inference to the next (a fresh large CPU buffer costs a page fault
    per page on first touch, every step). ``busy`` while :func:`minimize` runs: an inference
    nested in its callback (and its relaxation) must make its own."""

    def __init__(self):
        self._stacks: dict[str, Stack] = {}
        self.busy = False

    def stack(self, name: str, shapes: Sequence[torch.Size], like: torch.Tensor, zero: bool = False) -> Stack:
        """An uninitialised (``zero``: zeroed) flat stack of these shapes (dtype and device of
        ``like``), the same object while that fits (its views made once)."""
        st = self._stacks.get(name)
        if st is None or st.shapes != list(shapes) or st.flat.dtype != like.dtype or st.flat.device != like.device:
            st = self._stacks[name] = Stack(shapes, like)
        if zero:
            st.flat.zero_()
        return st


class _Adam:
    """Adam on the states (β = 0.9, 0.999, ε = 1e-8), over the tails of its stacks."""

    def __init__(self, m: Stack, sq: Stack):
        self.m, self.sq, self.t = m, sq, 0

    def direction(self, g: list[torch.Tensor], lo: int) -> list[torch.Tensor]:
        b1, b2 = 0.9, 0.999
        self.t += 1
        c1, c2 = 1 - b1 ** self.t, 1 - b2 ** self.t
        u = []
        for m, sq, gi in zip(self.m.tail(lo), self.sq.tail(lo), g):
            m.lerp_(gi, 1 - b1)
            sq.mul_(b2).addcmul_(gi, gi, value=1 - b2)
            den = (sq / c2).sqrt_().add_(1e-8)
            u.append((m / den).mul_(1.0 / c1))
        return u


def minimize(
    problem: Relaxation,
    opts: Descent,
    trace: bool = False,
    after_step: AfterStep | None = None,
    sync_free: bool = False,
    workspace: Workspace | None = None,
) -> Minimized:
    """Run at most ``opts.iters`` descent steps on ``problem`` (in place on ``problem.v``).

    ``after_step(t)`` runs after step t (1-based) with the problem forwarded at the new
    variables; returning True stops. ``sync_free``: never branch on a tensor's value (the
    line search selects with ``torch.where``; what torch.compile traces). ``workspace``: where
    the scratch buffers come from (default: new ones; a per-tensor ``problem.v`` makes its own).
    ``opts.tol`` needs host syncs and so does not combine with ``sync_free``. The problem is
    left forwarded at the final (accepted) variables."""
    if sync_free and opts.tol is not None:
        raise ValueError("a tolerance (tol) stops on a value: it cannot run sync-free (compiled)")
    if workspace is not None and (workspace.busy or problem.v.flat is None):
        workspace = None
    if workspace is None:
        return _minimize(problem, opts, trace, after_step, sync_free, None)
    workspace.busy = True
    try:
        return _minimize(problem, opts, trace, after_step, sync_free, workspace)
    finally:
        workspace.busy = False


def batch_total(*scalars: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The hook every decision of the loop reads its batch sums through: summed over the
    data-parallel ranks (:func:`fastpc.distributed.batch_total`, one all_reduce), themselves
    when not distributed."""
    return distributed.batch_total(*scalars)


def dot(xs: Sequence[torch.Tensor], ys: Sequence[torch.Tensor]) -> torch.Tensor:
    """⟨x, y⟩ of two variable tails (:meth:`Stack.tail`: one tensor or several, at least one),
    a new 0-d tensor."""
    total = None
    for a, b in zip(xs, ys, strict=True):
        d = torch.dot(a if a.dim() == 1 else a.reshape(-1), b if b.dim() == 1 else b.reshape(-1))
        total = d if total is None else total + d
    return total


def _grad_norm(gt: list[torch.Tensor]) -> torch.Tensor:
    """‖g‖ over the whole (data-parallel: global) batch."""
    if distributed.reducing():
        return batch_total(dot(gt, gt))[0].sqrt()
    if len(gt) == 1:
        return torch.linalg.vector_norm(gt[0])
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in gt]))


def _rose(e: torch.Tensor, prev_e: torch.Tensor, step: torch.Tensor, pred: torch.Tensor, armijo: float,
          tol: float, branch: bool) -> bool | torch.Tensor:
    """Whether E rose above the Armijo bound, E_new > E_old − armijo·η·pred + tol·|E_old|: a 0-d
    bool tensor (sync-free), or with ``branch`` (the CPU's branching path) a bool read on the
    host in Python floats from the four 0-d tensors, four reads instead of seven tensor
    operations (the same comparison: in float64 the same bits; float32 is compared in float64,
    a rounding the slack tol·|E_old| covers)."""
    if not branch:
        return e > prev_e - armijo * step * pred + tol * prev_e.abs()
    old = prev_e.item()
    return e.item() > old - armijo * step.item() * pred.item() + tol * abs(old)


def _select(rose: torch.Tensor, old: list[torch.Tensor], new: list[torch.Tensor]) -> None:
    """new = old where ``rose`` (a 0-d bool), in place, without a host sync."""
    for a, b in zip(old, new):
        torch.where(rose, a, b, out=b)


def _copy(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    for a, b in zip(dst, src):
        a.copy_(b)


def _minimize(problem, opts, trace, after_step, sync_free, workspace):
    v = problem.v
    like = v.proto

    def stack(name: str, zero: bool = False) -> Stack:
        return v.like(zero) if workspace is None else workspace.stack(name, v.shapes, v.flat, zero)

    ls = opts.safeguard
    # steps read g from its start on only, which grad has just written; a restore of the
    # line search reads g_prev below that, where it must hold zeros
    scratch = None if ls or trace or sync_free or opts.tol is not None else problem.grad_scratch
    g = scratch if scratch is not None else stack("g", ls and problem.sparse_grad)
    vel = adam = None
    if opts.optimizer == "adam":
        adam = _Adam(stack("m", True), stack("sq", True))
    elif opts.momentum > 0:
        vel = stack("vel", True)
    if ls:
        step = torch.tensor(opts.lr, dtype=like.dtype, device=like.device)
        prev_v, g_prev = stack("prev_v"), stack("g_prev", problem.sparse_grad)
        tol, tiny = 8 * torch.finfo(like.dtype).eps, torch.finfo(like.dtype).tiny
        branch = BRANCH_ON_CPU and like.device.type == "cpu" and not sync_free
    traces: list[torch.Tensor] | None = [] if trace else None
    norms: list[torch.Tensor] | None = [] if trace else None
    stop_at = None if opts.tol is None else [opts.tol]  # becomes tol·‖g⁰‖ at the first step
    prev_e = prev_parts = pred = None
    saved = start = v.offsets[-1]  # prev_v holds v from saved on; nothing moves before start
    t_run, converged = 0, False
    for t in range(opts.iters):
        problem.forward()
        e = problem.energy() if ls else None
        parts = problem.parts() if traces is not None else None
        lo = start = min(start, problem.grad(g))
        if ls:  # the batch sums the decisions read (pred: of the step taken last)
            e, pred = batch_total(e, pred) if pred is not None else (batch_total(e)[0], None)
        if ls and prev_e is not None:
            e, parts, step = _line_search(problem, opts, t, e, parts, prev_e, prev_parts, pred, step, v, g,
                                          prev_v, g_prev, vel, saved, lo, tol, tiny, branch)
        if ls:
            _copy(prev_v.tail(lo), v.tail(lo))
            saved, prev_e, prev_parts = lo, e, parts
        gt = g.tail(lo)
        if norms is not None or stop_at is not None:
            gn = _grad_norm(gt)
            if norms is not None:
                norms.append(gn)
            if stop_at is not None:
                if t == 0:
                    stop_at = [opts.tol * gn.item()]
                if gn.item() <= stop_at[0]:
                    converged = True
                    if norms is not None:
                        norms.pop()
                    break
        if traces is not None:
            traces.append(parts)
        if adam is not None:
            u = adam.direction(gt, lo)
        elif vel is not None:
            u = vel.tail(lo)
            for ui, gi in zip(u, gt):
                ui.mul_(opts.momentum).add_(gi)
        else:
            u = gt
        if ls:
            pred = dot(gt, u)
            for vi, ui in zip(v.tail(lo), u):
                vi.addcmul_(ui, step, value=-1.0)
            g, g_prev = g_prev, g
        else:
            # sub_, the same numbers as add_(alpha=-lr): torch 2.13's inductor rewrites
            # add(v, mm(a, b), alpha=α) to addmm(v, a, b), dropping α (ePC per tensor met it)
            for vi, ui in zip(v.tail(lo), u):
                vi.sub_(ui, alpha=opts.lr)
        problem.moved(start)
        t_run = t + 1
        if after_step is not None:
            problem.forward()
            if after_step(t + 1) is True:
                break
    if ls and prev_e is not None and not converged:  # the last step must pass the same test
        problem.forward()
        c = opts.armijo if t_run <= opts.armijo_steps else 0.0
        e_last, pred = batch_total(problem.energy(), pred)
        rose = _rose(e_last, prev_e, step, pred, c, tol, branch)
        if rose is not False:  # sync-free (a tensor), or rejected on the host
            if branch:
                _copy(v.tail(saved), prev_v.tail(saved))
            else:
                _select(rose, prev_v.tail(saved), v.tail(saved))
            problem.moved(start)
    problem.forward()
    if norms is not None:  # the distance to equilibrium where inference ended
        norms.append(_grad_norm(g.tail(problem.grad(g))))
    return Minimized(traces, t_run, norms)


def _line_search(problem, opts, t, e, parts, prev_e, prev_parts, pred, step, v, g, prev_v, g_prev, vel, saved,
                 lo, tol, tiny, branch):
    """Test the step taken at iteration t − 1 (the t-th step): undo it when E rose above the
    Armijo bound (restoring the variables and their gradient), shrink η to fit the curvature
    along it; in the late phase (t > armijo_steps) double η after a step that achieved 3/4 of
    its predicted decrease. Returns (E, parts, η) at the accepted point."""
    late = t > opts.armijo_steps
    armijo = 0.0 if late else opts.armijo
    fit = min(1.0, 1.8 * (1 - armijo))
    rose = _rose(e, prev_e, step, pred, armijo, tol, branch)
    if rose is not False:  # sync-free (a tensor), or rejected on the host
        # the velocity is zero before lo: it has moved from lo on only (lo never grows)
        if branch:
            _copy(v.tail(saved), prev_v.tail(saved))
            _copy(g.tail(lo), g_prev.tail(lo))
            if vel is not None:  # a rejected step restarts the momentum
                for w in vel.tail(lo):
                    w.zero_()
        else:
            _select(rose, prev_v.tail(saved), v.tail(saved))
            _select(rose, g_prev.tail(lo), g.tail(lo))
            if vel is not None:
                keep = (~rose).to(v.proto.dtype)
                for w in vel.tail(lo):
                    w.mul_(keep)
        # quadratic φ(a) = E_old − a·pred + ½κa² through E_new at a = step
        curv = (2 * (e - prev_e + step * pred) / step.pow(2)).clamp_min(tiny)
        shrunk = torch.minimum(torch.maximum(fit * pred / curv, step * 1e-6), step * 0.5)
        if branch:  # rejected: the values torch.where(True, ...) would give
            new_step, e, parts = shrunk, prev_e, prev_parts
        else:
            new_step = torch.where(rose, shrunk, step)
            e = torch.where(rose, prev_e, e)
            if parts is not None:
                parts = torch.where(rose, prev_parts, parts)
    else:
        new_step = step
    if late:  # a step that achieved 3/4 of its predicted decrease was safe: try twice as long
        decrease = step * pred  # the one predicted; within rounding of E it tells nothing
        good = ((prev_e - e) >= 0.75 * decrease) & (decrease > tol * prev_e.abs())
        new_step = torch.where(good, new_step * 2, new_step)
    return e, parts, new_step
