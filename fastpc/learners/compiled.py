"""``torch.compile`` of a learner's training step (learner option ``compile=True``).

A learner that can run compiled provides its step core: the feedforward pass, inference and
the local weight gradients of one training step, up to the optimizer, over block ops made with
``plain=True`` (no host-side branching) and the sync-free line search. :func:`compile_step`
traces that core into one graph (no graph breaks); inductor fuses the elementwise work between
the products and the Python overhead goes. The learner applies the gradients through its one
update path and falls back to its eager step if compiling fails (see
:class:`fastpc.learners.pc.PCLearner`).
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable

import torch

__all__ = ["compile_unavailable", "compile_step"]


def compile_unavailable(device: torch.device | str = "cpu") -> str | None:
    """Why torch.compile cannot build kernels for ``device`` here (None: it can): TorchDynamo
    must support this Python, and the CPU backend needs a C++ compiler."""
    try:
        import torch._dynamo  # noqa: F401
    except Exception as e:  # pragma: no cover - depends on the Python build
        return f"torch.compile is not available ({type(e).__name__}: {e})"
    if not torch._dynamo.is_dynamo_supported():
        return "torch.compile does not support this Python version"
    if torch.device(device).type == "cpu":
        names = [os.environ["CXX"]] if os.environ.get("CXX") else ["g++", "c++", "clang++"]
        if not any(shutil.which(n) for n in names):
            return "torch.compile on the CPU needs a C++ compiler (g++ or clang++) on PATH"
    return None


def compile_step(core: Callable, device: torch.device) -> Callable:
    """``torch.compile`` of a step core ``core(x, y)``: one graph, no breaks, static shapes (a
    new batch shape compiles again). On the CPU the graph's launcher is generated C++ too
    (inductor's ``cpp_wrapper``: a few % less time per step than its Python launcher)."""
    options = None
    if device.type == "cpu":
        options = {"cpp_wrapper": True}
        _separate_inductor_cache_per_isa()
    return torch.compile(core, dynamic=False, fullgraph=True, options=options)


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
