"""The numeric tests pass under other CPU kernel families than this machine's own.

CI runs on whichever x86-64 machine the change was made on (AMD EPYC, Intel Xeon with
AVX-512): a comparison that holds bit for bit on one only by luck fails on the next. So the
numeric test files run again here, in a child pytest, with ATen's vectorised kernels forced to
another family (``ATEN_CPU_CAPABILITY``) and MKL's BLAS to another code branch
(``MKL_CBWR``): a test that passes only with one instruction set fails on this machine.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

NUMERIC = ["test_theory.py", "test_fastpath.py", "test_compile.py", "test_learners.py",
           "test_diagnostics.py", "test_nets.py", "test_blocks.py", "test_energy.py", "test_init.py", "test_door.py",
           "test_convergence.py", "test_ep.py", "test_seqil.py", "test_generative.py", "test_optim.py"]
FAMILY_ENV = "FASTPC_TEST_KERNEL_FAMILY"  # set in the child: it does not recurse


def _families() -> list[str]:
    """ATen families this CPU can run other than the one it picks by itself."""
    own = torch.backends.cpu.get_cpu_capability().lower()
    fams = ["default"]
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        fams.append("avx2")
    return [f for f in fams if f != own]


# the BLAS branch paired with each ATen family: the generic one with the scalar kernels
MKL_BRANCH = {"default": "COMPATIBLE", "avx2": "AVX2"}


@pytest.mark.skipif(os.environ.get(FAMILY_ENV) is not None, reason="already the child run")
@pytest.mark.parametrize("family", _families())
def test_numeric_tests_pass_under_another_kernel_family(family):
    here = Path(__file__).parent
    env = dict(os.environ, ATEN_CPU_CAPABILITY=family, MKL_CBWR=MKL_BRANCH[family], **{FAMILY_ENV: family})
    # inductor writes its (default) cache folder into os.environ once this process compiled:
    # the child must not inherit it, or it shares the AVX-512 kernels' cache (see
    # fastpc.learners.compiled: torch leaves the vector ISA out of its cache key)
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    env["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(default_cache_dir(), f"aten-{family}")
    child = subprocess.run(
        [sys.executable, "-c", "import torch, sys; print(torch.backends.cpu.get_cpu_capability())"],
        env=env, capture_output=True, text=True, timeout=120)
    assert child.stdout.strip().lower() == family, child.stdout + child.stderr  # the family took
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *NUMERIC],
        cwd=here, env=env, capture_output=True, text=True, timeout=900)
    tail = "\n".join(proc.stdout.strip().splitlines()[-25:])
    assert proc.returncode == 0, f"numeric tests under ATEN_CPU_CAPABILITY={family}:\n{tail}"
