"""The PCX side of ``fastpc bench speed``, seen from fastpc: a client for the worker process.

The worker is ``fastpc/bench/pcx_speed.py --serve``, run by another interpreter (a virtual
environment with PCX; it imports neither fastpc nor torch). The client writes the batches fastpc
trains on to an .npz, starts the worker on them and asks it for timed passes; every request
and reply is one line (JSON replies).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["PCX_SCRIPT", "PCXWorker", "start_pcx"]

PCX_SCRIPT = Path(__file__).resolve().with_name("pcx_speed.py")  # standalone: run by the PCX interpreter


class PCXWorker:
    """The PCX side as a long-lived process (``fastpc/bench/pcx_speed.py --serve``): it compiles
    once, then times one pass over the same batches whenever asked, so its repeats interleave
    with fastpc's and both sides see the same machine conditions."""

    def __init__(self, args, widths, batches):
        self.tmp = tempfile.TemporaryDirectory()
        path = Path(self.tmp.name) / "batches.npz"
        np.savez(path, x=np.stack([b[0].flatten(1).numpy() for b in batches]),
                 y=np.stack([b[1].numpy() for b in batches]))
        cmd = [args.pcx_python, str(PCX_SCRIPT), "--data", str(path), "--widths", ",".join(map(str, widths)),
               "--iters", "5", "--state-lr", "0.1", "--serve"]
        env = dict(os.environ)
        pin = None
        if args.threads == 1:  # the same resources as the torch side: one thread on one core
            env["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false --xla_force_host_platform_device_count=1"
            if hasattr(os, "sched_setaffinity"):
                core = min(os.sched_getaffinity(0))
                pin = lambda: os.sched_setaffinity(0, {core})  # noqa: E731
        self.batches = len(batches)
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, env=env, preexec_fn=pin)
        self.ready = self._reply()  # {"ready": True, "compile_s": ...} once compiled

    def _reply(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            tail = self.proc.stderr.read().strip().splitlines()[-3:]
            raise RuntimeError(f"PCX worker exited ({self.proc.wait()}): {' | '.join(tail)}")
        return json.loads(line)

    def time_pass(self, start: int = 0, count: int | None = None) -> float:
        """Seconds per step over batches ``start`` .. ``start + count`` (default: all)."""
        self.proc.stdin.write("time\n" if count is None else f"time {start} {count}\n")
        self.proc.stdin.flush()
        return float(self._reply()["step_s"])

    def close(self) -> dict[str, Any]:
        """Stop the worker; its summary (per-pass seconds, versions, compile time)."""
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        res = json.loads(self.proc.stdout.read().strip().splitlines()[-1])
        self.proc.wait()
        self.tmp.cleanup()
        res["step_s"] = statistics.median(res["per_step_s"])
        return res


def start_pcx(args, widths, batches) -> tuple[PCXWorker | None, dict[str, Any] | None]:
    """A PCX worker, or why there is none (None, None without --pcx-python)."""
    if not args.pcx_python or "pcx" in args.skip_set:
        return None, None
    try:
        return PCXWorker(args, widths, batches), None
    except (OSError, RuntimeError, ValueError) as e:
        print(f"  PCX run failed: {e}", file=sys.stderr)
        return None, {"error": str(e)}
