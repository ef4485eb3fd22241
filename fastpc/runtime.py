"""How a process runs on the CPU: thread count and denormal flushing (issue 15).

- :func:`pick_threads`: ``"auto"`` uses every core this process may run on when the machine is
  quiet, and leaves the cores other work already keeps busy (the 1-minute load average) to it.
  torch's intra-op threads spin while they wait for each other; two processes that each spin on
  every core of a small machine slow each other down by far more than 2× (a run measured 105 s
  per epoch instead of 1.8 s beside another job at 2 threads on 2 cores).
- :func:`flush_denormals`: subnormal floats (from GELU and softmax tails, tiny errors) make
  CPU matrix products and activations 10–100× slower; flushing them to zero changes a result
  by less than the smallest normal float (1.2e-38 in fp32).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Sequence

import torch

__all__ = ["available_cores", "pick_threads", "flush_denormals", "by_device_and_dtype", "read_pair", "constant"]


def available_cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


def pick_threads(spec: int | str | None, load: float | None = None) -> int | None:
    """Threads for ``torch.set_num_threads``: a number as given, None for torch's default, or
    ``"auto"``: the available cores minus those the 1-minute load average says are busy
    (rounded), at least 1. ``load`` overrides the measured load (tests)."""
    if spec is None:
        return None
    if spec != "auto":
        if isinstance(spec, bool) or not isinstance(spec, int) or spec < 1:
            raise ValueError(f"threads must be an integer >= 1, 'auto' or None, got {spec!r}")
        return spec
    cores = available_cores()
    if load is None:
        try:
            load = os.getloadavg()[0]
        except (OSError, AttributeError):
            return cores
    if not math.isfinite(load) or load < 0:
        return cores
    return max(1, min(cores, cores - round(load)))


@contextlib.contextmanager
def flush_denormals(enabled: bool = True) -> Iterator[bool]:
    """Flush subnormal floats to zero on the CPU inside the block (where the CPU supports it;
    yields whether it is on); the previous mode is restored after."""
    if not enabled:
        yield False
        return
    before = _flushing()
    on = torch.set_flush_denormal(True)
    try:
        yield on
    finally:
        if on and not before:
            torch.set_flush_denormal(False)


def _flushing() -> bool:
    """Whether the CPU flushes denormals now (a subnormal survives a multiplication by 1 otherwise)."""
    tiny = torch.tensor([torch.finfo(torch.float32).tiny / 4], dtype=torch.float32)
    return bool((tiny * 1.0).item() == 0.0)


def by_device_and_dtype(tensors: Sequence[torch.Tensor]) -> dict[tuple[torch.device, torch.dtype], list[torch.Tensor]]:
    """``tensors`` grouped by (device, dtype), groups in first-seen order (the usual case, all
    alike, without a dictionary lookup per tensor)."""
    first = tensors[0]
    if all(t.device == first.device and t.dtype == first.dtype for t in tensors):
        return {(first.device, first.dtype): list(tensors)}
    groups: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.device, t.dtype), []).append(t)
    return groups


def read_pair(pair: Sequence[torch.Tensor]) -> tuple:
    """Two 0-d tensors as Python numbers: two reads on the CPU (cheaper than stacking them),
    one device sync elsewhere."""
    a, b = pair
    if a.device.type == "cpu":
        return a.item(), b.item()
    return tuple(torch.stack([a, b]).tolist())


_CONSTANTS: dict[tuple, torch.Tensor] = {}


def constant(values: tuple[float, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The 1-D tensor ``values`` in ``dtype`` on ``device``, made once per kind and shared:
    callers only read it."""
    key = (values, dtype, device)
    t = _CONSTANTS.get(key)
    if t is None:
        t = _CONSTANTS[key] = torch.tensor(values, dtype=dtype, device=device)
    return t
