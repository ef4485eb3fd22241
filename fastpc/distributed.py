"""Data-parallel training on torch.distributed, launched by torchrun (issue 14).

``torchrun --nproc_per_node N -m fastpc train CONFIG`` starts N copies of ``fastpc train``; each
reads its place from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``) and
:func:`process_group` joins them (gloo on the CPU, nccl on CUDA). This module holds the few
collectives training needs, all of torch.distributed; it launches nothing and carries no
communication of its own. Outside a process group every function here is the identity or a
constant (``rank() == 0``, ``world_size() == 1``, ``is_main()``), so single-process code runs
the same numbers as before.

How a step stays the 1-process step on the global batch (every rank holds a replica of the net):

- data: every rank draws the same seeded order and takes its slice of each global batch
  (:func:`part`; ``BatchLoader.shard``);
- inference: the line search's decisions (Armijo test, step size, ``tol``) read batch-summed
  energies, directional derivatives and gradient norms; :func:`batch_total` sums them over the
  ranks (the hook :func:`fastpc.learners.descent.batch_total` calls it), so every rank takes the
  global batch's decision;
- weights: :func:`average_gradients`, called by the one update path
  (``Learner._apply_update``), makes every rank's ``p.grad`` the global batch's mean gradient.

:func:`local` switches the reductions off inside it (a computation one rank runs alone, e.g.
the energy trace on a fixed batch).

``fastpc train`` under torchrun (:func:`fastpc.train.fit`): the group is joined for the run and
left after it (also on error); a batch size the processes cannot split is refused before that;
rank 0 alone writes the run folder (lock, config, checkpoints with every rank's RNG state,
metrics, plots) and shows progress; every rank reads the checkpoint on resume; the step's loss,
energy and accuracy are the global batch's (one all_reduce of four numbers per step), so every
rank stops as diverged on the same step; evaluation splits each batch over the ranks and adds
the sums. A refusal on any rank (a UserError inside :func:`together`) ends every rank with the
same one-line error. The compiled step is not used (``learner.compile`` auto is off).

Not the 1-process numbers (as in plain DDP): batch norm normalises with each rank's part of the
batch in training (no SyncBatchNorm; the running statistics evaluated and saved are rank 0's);
initializers that learn from the batches (``previous``, ``class_average``, ``memory``,
``amortized``) learn from each rank's part; ep's ``random`` estimator draws its signs per rank;
traces (``infer(trace=True)``) and ``learner.grads()`` are the rank's own part.
"""

from __future__ import annotations

import contextlib
import datetime
import gc
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn

from .errors import UserError
from .runtime import by_device_and_dtype

__all__ = ["rank", "world_size", "local_rank", "local_world_size", "is_main", "launched", "active", "reducing",
           "local", "process_group", "check_batch_size", "part", "batch_total", "average_gradients",
           "sum_floats", "together", "from_main", "broadcast_module", "gather_objects"]

T = TypeVar("T")
TIMEOUT = datetime.timedelta(minutes=30)  # a collective that waits longer than this fails
_local_depth = 0  # > 0 inside local(): no reductions
_collective_device: torch.device | None = None  # where collectives put their tensors (cuda for nccl)


def _env_int(name: str, default: int) -> int:
    try:
        return int(os.environ.get(name) or default)
    except ValueError:
        return default


def launched() -> bool:
    """Whether torchrun started this process as one of more than one (``WORLD_SIZE`` > 1)."""
    return _env_int("WORLD_SIZE", 1) > 1


def active() -> bool:
    """Whether a torch.distributed process group of more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def reducing() -> bool:
    """Whether batch statistics and gradients are summed over the ranks now: a process group is
    running and we are not inside :func:`local`."""
    return _local_depth == 0 and active()


def rank() -> int:
    """This process's global rank: the process group's, else torchrun's ``RANK``, else 0."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return _env_int("RANK", 0)


def world_size() -> int:
    """The number of processes: the process group's, else torchrun's ``WORLD_SIZE``, else 1."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return max(1, _env_int("WORLD_SIZE", 1))


def local_rank() -> int:
    """This process's rank on its node (torchrun's ``LOCAL_RANK``), 0 when not distributed."""
    return _env_int("LOCAL_RANK", 0)


def local_world_size() -> int:
    """Processes on this node (torchrun's ``LOCAL_WORLD_SIZE``), 1 when not distributed."""
    return max(1, _env_int("LOCAL_WORLD_SIZE", 1))


def is_main() -> bool:
    """True on rank 0 and whenever training is not distributed: the process that writes the
    run folder, logs and plots and shows progress bars."""
    return rank() == 0


@contextlib.contextmanager
def local() -> Iterator[None]:
    """Inside: no reductions (:func:`batch_total`, :func:`average_gradients` are the identity),
    for work one rank does alone or every rank does on the same data."""
    global _local_depth
    _local_depth += 1
    try:
        yield
    finally:
        _local_depth -= 1


def check_batch_size(batch_size: int, key: str = "data.batch_size") -> None:
    """UserError unless ``batch_size`` splits evenly over the processes torchrun started (read
    from the environment: call it before :func:`process_group`, so every rank fails alike)."""
    n = world_size()
    if n > 1 and batch_size % n:
        raise UserError(f"{key}={batch_size} is not divisible by the {n} processes torchrun started "
                        f"(WORLD_SIZE={n}); choose a multiple of {n}, e.g. {key}={max(n, batch_size // n * n)}")


@contextlib.contextmanager
def process_group(device: torch.device) -> Iterator[bool]:
    """Join torchrun's processes for the block when it started more than one (yields whether
    it did): backend nccl for a CUDA ``device`` (this rank's GPU made current), gloo otherwise;
    the group is destroyed after, also on error. Nothing happens outside torchrun or when a
    group is already running (its owner destroys it)."""
    global _collective_device
    if not launched() or dist.is_initialized():
        yield active()
        return
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=TIMEOUT)
    _collective_device = device if cuda else torch.device("cpu")
    ok = False
    try:
        yield True
        ok = True
    finally:
        if ok:  # every rank here: leave together (a rank gone early can abort a peer's shutdown)
            dist.barrier()
        _collective_device = None
        dist.destroy_process_group()
        gc.collect()  # the group's threads end now, not during interpreter shutdown


def _device_for(t: torch.Tensor | None = None) -> torch.device:
    if t is not None and (_collective_device is None or t.device == _collective_device):
        return t.device
    return _collective_device or torch.device("cpu")


def part(n: int, rank_: int | None = None, world: int | None = None) -> slice:
    """Rank ``rank_``'s slice of a global batch of ``n`` examples split over ``world`` ranks
    (default: this process's): consecutive parts as ``torch.tensor_split`` cuts them (sizes
    differ by at most one; all of ``range(n)`` when not distributed)."""
    w = world_size() if world is None else world
    r = rank() if rank_ is None else rank_
    if w == 1:
        return slice(0, n)
    q, m = divmod(n, w)
    lo = r * q + min(r, m)
    return slice(lo, lo + q + (r < m))


def batch_total(*scalars: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The 0-d tensors ``scalars`` (sums over this rank's part of the batch) summed over the
    ranks, in one all_reduce; themselves when not :func:`reducing`."""
    if not reducing():
        return scalars
    like = scalars[0]
    buf = torch.stack([s.to(like.dtype) for s in scalars]).to(_device_for(like))
    dist.all_reduce(buf)
    return tuple(buf.to(like.device).unbind())


def average_gradients(grads: Sequence[torch.Tensor], batch: int) -> None:
    """Make ``grads`` (this rank's batch-mean gradients over its ``batch`` examples) the mean
    over the global batch, in place: Σ_r B_r·g_r / Σ_r B_r, one flattened all_reduce per dtype
    and device (exactly the mean of the shards' means when the shards are equal). A NaN or inf
    on any rank reaches every rank, so a finiteness check after this agrees everywhere."""
    if not reducing() or not grads:
        return
    groups = by_device_and_dtype(grads)
    for (device, dtype), gs in sorted(groups.items(), key=lambda kv: (str(kv[0][0]), str(kv[0][1]))):
        flat = torch.cat([g.reshape(-1) for g in gs] + [torch.ones(1, dtype=dtype, device=device)])
        flat.mul_(float(batch))  # (Σ_{i∈r} g_i ..., B_r)
        flat = flat.to(_device_for(flat))
        dist.all_reduce(flat)
        flat = flat.to(device)
        flat[:-1].div_(flat[-1])
        offset = 0
        for g in gs:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()


def sum_floats(values: Sequence[float]) -> list[float]:
    """Python numbers summed over the ranks (float64, one all_reduce); as given when not
    :func:`reducing`."""
    if not reducing():
        return list(values)
    buf = torch.tensor(list(values), dtype=torch.float64, device=_device_for())
    dist.all_reduce(buf)
    return buf.tolist()


def gather_objects(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (picklable objects; ``[obj]`` when not distributed)."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


@contextlib.contextmanager
def together() -> Iterator[None]:
    """A block every rank enters; a :class:`~fastpc.errors.UserError` raised inside it on any
    rank is raised on every rank after it (the lowest failing rank's message), so bad input ends
    every process with the same one-line error instead of leaving some waiting in a collective.
    Other exceptions pass through unchanged (torchrun stops the other processes)."""
    if not active():
        yield
        return
    error: UserError | None = None
    try:
        yield
    except UserError as e:
        error = e
    messages = gather_objects(None if error is None else str(error))
    if error is not None:
        raise error
    first = next((m for m in messages if m is not None), None)
    if first is not None:
        raise UserError(first)


def from_main(make: Callable[[], T]) -> T:
    """``make()`` run on rank 0 and its result handed to every rank (``make()`` when not
    distributed)."""
    if not active():
        return make()
    box = [make() if is_main() else None]
    dist.broadcast_object_list(box, src=0, device=_device_for())
    return box[0]


@torch.no_grad()
def broadcast_module(module: nn.Module, buffers_only: bool = False) -> None:
    """Rank 0's parameters (unless ``buffers_only``) and buffers copied to every rank (what DDP
    does when it wraps a module, and for buffers before each forward)."""
    if not active():
        return
    tensors = [] if buffers_only else list(module.parameters())
    tensors += [b for b in module.buffers() if b is not None]
    for t in tensors:
        if t.device == _device_for(t):
            dist.broadcast(t.data, src=0)
        else:
            tmp = t.data.to(_device_for(t))
            dist.broadcast(tmp, src=0)
            t.data.copy_(tmp)
