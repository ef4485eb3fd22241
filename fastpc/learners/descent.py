"""Gradient descent on an inference energy: the one loop every PC learner's inference runs.

A learner describes its energy as a :class:`Relaxation` over variables stored back to back in
one flat buffer (a :class:`Stack`: states for sPC, errors for ePC); :func:`minimize` runs
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

__all__ = ["Stack", "Relaxation", "Descent", "Workspace", "Minimized", "minimize", "batch_total", "BRANCH_ON_CPU"]

BRANCH_ON_CPU = True  # False: the sync-free torch.where line search on the CPU too (tests use it)


class Stack:
    """Tensors of the given shapes back to back in one flat buffer: ``views[i]`` is tensor i
    (contiguous), ``offsets[i]`` where it starts in ``flat``; a whole-set operation is one op."""

    def __init__(self, shapes: Sequence[torch.Size], like: torch.Tensor, zero: bool = False):
        self.shapes = [torch.Size(s) for s in shapes]
        sizes = [math.prod(s) for s in self.shapes]
        self.offsets = [0]
        for n in sizes:
            self.offsets.append(self.offsets[-1] + n)
        self.flat = (like.new_zeros if zero else like.new_empty)(self.offsets[-1])
        self.views = [t.view(s) for t, s in zip(self.flat.split_with_sizes(sizes), self.shapes)]

    @classmethod
    def of(cls, tensors: Sequence[torch.Tensor], like: torch.Tensor, whole: bool = False) -> "Stack":
        """A new stack holding copies of ``tensors`` (dtype and device of ``like``)."""
        stack = cls([t.shape for t in tensors], like)
        stack.assign(list(tensors), whole)
        return stack

    def index(self, offset: int) -> int:
        """The tensor holding ``flat[offset]`` (``len(views)`` for the end of the buffer)."""
        i = len(self.views)
        while self.offsets[i] > offset:
            i -= 1
        return i

    def like(self, zero: bool = False) -> "Stack":
        return Stack(self.shapes, self.flat, zero)

    def assign(self, parts: Sequence[torch.Tensor | None], whole: bool = False) -> None:
        """``views[i] = parts[i]`` (None: zero). ``whole``: one copy of the concatenation, for
        code torch.compile traces (per-view writes become a chain of scatters over the buffer
        that inductor fuses into one very slow kernel)."""
        if not self.views:
            return
        if whole:
            self.flat.copy_(torch.cat([self.flat.new_zeros(v.numel()) if p is None else p.reshape(-1)
                                       for v, p in zip(self.views, parts)]))
            return
        for v, p in zip(self.views, parts):
            if p is None:
                v.zero_()
            else:
                v.copy_(p)


class Relaxation(abc.ABC):
    """An inference energy E over the variables ``v`` as :func:`minimize` sees it. ``whole``:
    write stacks whole (code torch.compile traces; see :meth:`Stack.assign`)."""

    v: Stack
    whole: bool = False
    sparse_grad: bool = True  # grad may return start > 0 (False: it writes the whole buffer)

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
        """Write ∇_v E at the last forward into ``out.flat[start:]`` and return ``start``: the
        gradient before it is exactly zero (and ``out`` must already hold zeros there)."""

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
    """Buffers kept from one inference to the next (a fresh large CPU buffer costs a page fault
    per page on first touch, every step). ``busy`` while :func:`minimize` runs: an inference
    nested in its callback (and its relaxation) must make its own."""

    def __init__(self):
        self._bufs: dict[str, torch.Tensor] = {}
        self._stacks: dict[str, Stack] = {}
        self.busy = False

    def get(self, name: str, like: torch.Tensor) -> torch.Tensor:
        """An uninitialised buffer shaped like ``like``, the same object while that fits."""
        b = self._bufs.get(name)
        if b is None or b.shape != like.shape or b.dtype != like.dtype or b.device != like.device:
            b = self._bufs[name] = torch.empty_like(like)
        return b

    def stack(self, name: str, shapes: Sequence[torch.Size], like: torch.Tensor, zero: bool = False) -> Stack:
        """An uninitialised (``zero``: zeroed) stack of these shapes (dtype and device of
        ``like``), the same object while that fits (its views made once)."""
        st = self._stacks.get(name)
        if st is None or st.shapes != list(shapes) or st.flat.dtype != like.dtype or st.flat.device != like.device:
            st = self._stacks[name] = Stack(shapes, like)
        if zero:
            st.flat.zero_()
        return st


class _Adam:
    """Adam on the states (β = 0.9, 0.999, ε = 1e-8), over a tail of the flat buffers."""

    def __init__(self, m: torch.Tensor, sq: torch.Tensor):
        self.m, self.sq, self.t = m.zero_(), sq.zero_(), 0

    def direction(self, g: torch.Tensor, lo: int) -> torch.Tensor:
        b1, b2 = 0.9, 0.999
        self.t += 1
        m, sq = _tail(self.m, lo), _tail(self.sq, lo)
        m.lerp_(g, 1 - b1)
        sq.mul_(b2).addcmul_(g, g, value=1 - b2)
        c1, c2 = 1 - b1 ** self.t, 1 - b2 ** self.t
        den = (sq / c2).sqrt_().add_(1e-8)
        return (m / den).mul_(1.0 / c1)


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
    the scratch buffers come from (default: new ones).
    ``opts.tol`` needs host syncs and so does not combine with ``sync_free``. The problem is
    left forwarded at the final (accepted) variables."""
    if sync_free and opts.tol is not None:
        raise ValueError("a tolerance (tol) stops on a value: it cannot run sync-free (compiled)")
    if workspace is not None and workspace.busy:
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


def _grad_norm(gt: torch.Tensor) -> torch.Tensor:
    """‖g‖ over the whole (data-parallel: global) batch."""
    if not distributed.reducing():
        return torch.linalg.vector_norm(gt)
    return batch_total(torch.dot(gt, gt))[0].sqrt()


def _tail(t: torch.Tensor, lo: int) -> torch.Tensor:
    return t if lo == 0 else t[lo:]


def _minimize(problem, opts, trace, after_step, sync_free, workspace):
    v = problem.v
    flat, whole = v.flat, problem.whole

    def stack(name: str, zero: bool = False) -> Stack:
        return v.like(zero) if workspace is None else workspace.stack(name, v.shapes, flat, zero)

    ls = opts.safeguard
    # eager steps read g from its start on only, which grad has just written; a restore of the
    # line search reads g_prev below that, where it must hold zeros
    g = stack("g", ls and problem.sparse_grad and not whole)
    vel = adam = None
    if opts.optimizer == "adam":
        adam = _Adam(*(torch.zeros_like(flat) if workspace is None else workspace.get(n, flat) for n in ("m", "sq")))
    elif opts.momentum > 0:
        vel = torch.zeros_like(flat) if workspace is None else workspace.get("vel", flat).zero_()
    if ls:
        step = torch.tensor(opts.lr, dtype=flat.dtype, device=flat.device)
        prev_v, g_prev = stack("prev_v"), stack("g_prev", problem.sparse_grad and not whole)
        tol, tiny = 8 * torch.finfo(flat.dtype).eps, torch.finfo(flat.dtype).tiny
        branch = BRANCH_ON_CPU and flat.device.type == "cpu" and not sync_free
    traces: list[torch.Tensor] | None = [] if trace else None
    norms: list[torch.Tensor] | None = [] if trace else None
    stop_at = None if opts.tol is None else [opts.tol]  # becomes tol·‖g⁰‖ at the first step
    prev_e = prev_parts = pred = None
    saved = start = flat.numel()  # prev_v holds flat[saved:]; nothing moves before flat[start:]
    t_run, converged = 0, False
    for t in range(opts.iters):
        problem.forward()
        e = problem.energy() if ls else None
        parts = problem.parts() if traces is not None else None
        start = min(start, problem.grad(g))
        lo = 0 if whole else start
        if ls:  # the batch sums the decisions read (pred: of the step taken last)
            e, pred = batch_total(e, pred) if pred is not None else (batch_total(e)[0], None)
        if ls and prev_e is not None:
            e, parts, step = _line_search(problem, opts, t, e, parts, prev_e, prev_parts, pred, step, flat, g,
                                          prev_v, g_prev, vel, saved, lo, tol, tiny, branch)
        if ls:
            _tail(prev_v.flat, lo).copy_(_tail(flat, lo))
            saved, prev_e, prev_parts = lo, e, parts
        gt = _tail(g.flat, lo)
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
            u = _tail(vel, lo).mul_(opts.momentum).add_(gt)
        else:
            u = gt
        if ls:
            pred = torch.dot(gt, u)
            _tail(flat, lo).addcmul_(u, step, value=-1.0)
            g, g_prev = g_prev, g
        else:
            _tail(flat, lo).add_(u, alpha=-opts.lr)
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
        rose = e_last > prev_e - c * step * pred + tol * prev_e.abs()
        if not branch or bool(rose):
            torch.where(rose, _tail(prev_v.flat, saved), _tail(flat, saved), out=_tail(flat, saved))
            problem.moved(start)
    problem.forward()
    if norms is not None:  # the distance to equilibrium where inference ended
        norms.append(_grad_norm(_tail(g.flat, problem.grad(g))))
    return Minimized(traces, t_run, norms)


def _line_search(problem, opts, t, e, parts, prev_e, prev_parts, pred, step, flat, g, prev_v, g_prev, vel, saved,
                 lo, tol, tiny, branch):
    """Test the step taken at iteration t − 1 (the t-th step): undo it when E rose above the
    Armijo bound (restoring the variables and their gradient), shrink η to fit the curvature
    along it; in the late phase (t > armijo_steps) double η after a step that achieved 3/4 of
    its predicted decrease. Returns (E, parts, η) at the accepted point."""
    late = t > opts.armijo_steps
    armijo = 0.0 if late else opts.armijo
    fit = min(1.0, 1.8 * (1 - armijo))
    rose = e > prev_e - armijo * step * pred + tol * prev_e.abs()
    if not branch or bool(rose):
        if branch:
            _tail(flat, saved).copy_(_tail(prev_v.flat, saved))
            _tail(g.flat, lo).copy_(_tail(g_prev.flat, lo))
            if vel is not None:  # a rejected step restarts the momentum
                vel.zero_()
        else:
            torch.where(rose, _tail(prev_v.flat, saved), _tail(flat, saved), out=_tail(flat, saved))
            torch.where(rose, _tail(g_prev.flat, lo), _tail(g.flat, lo), out=_tail(g.flat, lo))
            if vel is not None:
                vel.mul_((~rose).to(flat.dtype))
        # quadratic φ(a) = E_old − a·pred + ½κa² through E_new at a = step
        curv = (2 * (e - prev_e + step * pred) / step.pow(2)).clamp_min(tiny)
        shrunk = torch.minimum(torch.maximum(fit * pred / curv, step * 1e-6), step * 0.5)
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
