"""The PCX side of ``fastpc bench speed``, seen from fastpc: a client for the worker process.

The worker is ``fastpc/bench/pcx_speed.py --serve``, run by another interpreter (a virtual
environment with PCX; it imports neither fastpc nor torch). The client writes the batches fastpc
trains on to an .npz, starts the worker on them and asks it for timed passes; every request
and reply is one line (JSON replies). :class:`LineWorker` is that protocol on its own, shared
with the baseline worker (``fastpc/bench/baseline_client.py``).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["PCX_SCRIPT", "LineWorker", "PCXWorker", "one_core", "start_pcx"]

PCX_SCRIPT = Path(__file__).resolve().with_name("pcx_speed.py")  # standalone: run by the PCX interpreter


def one_core(threads: int) -> Callable[[], None] | None:
    """With one thread, a ``preexec_fn`` pinning a worker to the core this process runs on (the
    suite pins itself to the same one), so both sides have the same resources; else None."""
    if threads != 1 or not hasattr(os, "sched_setaffinity"):
        return None
    core = min(os.sched_getaffinity(0))
    return lambda: os.sched_setaffinity(0, {core})


class LineWorker:
    """A worker process that trains on the suite's batches and answers every request line with
    one JSON line: the batches go to an .npz (x (N, B, D) float32, y (N, B) int64), ``command``
    gets its path and returns the worker's argv; the worker's first line (``ready``) is awaited,
    and ``quit`` ends it with a summary line."""

    what = "worker"  # in error messages

    def __init__(self, command: Callable[[str], list[str]], batches, env: dict[str, str] | None = None,
                 preexec_fn: Callable[[], None] | None = None):
        self.tmp = tempfile.TemporaryDirectory()
        path = Path(self.tmp.name) / "batches.npz"
        np.savez(path, x=np.stack([b[0].flatten(1).numpy() for b in batches]),
                 y=np.stack([b[1].numpy() for b in batches]))
        self.batches = len(batches)
        try:
            self.proc = subprocess.Popen(command(str(path)), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                         stderr=subprocess.PIPE, text=True, env=env, preexec_fn=preexec_fn)
            self.ready = self._reply()
        except BaseException:
            self.stop()
            raise

    def _reply(self) -> dict[str, Any]:
        line = self.proc.stdout.readline()
        if not line:
            tail = self.proc.stderr.read().strip().splitlines()[-3:]
            raise RuntimeError(f"{self.what} exited ({self.proc.wait()}): {' | '.join(tail)}")
        return json.loads(line)

    def ask(self, request: str) -> dict[str, Any]:
        """Send one request line; the worker's JSON reply."""
        self.proc.stdin.write(request + "\n")
        self.proc.stdin.flush()
        return self._reply()

    def quit(self) -> dict[str, Any]:
        """Stop the worker; its summary (its last line)."""
        self.proc.stdin.write("quit\n")
        self.proc.stdin.flush()
        res = json.loads(self.proc.stdout.read().strip().splitlines()[-1])
        self.proc.wait()
        self.tmp.cleanup()
        return res

    def stop(self) -> None:
        """End the worker at once (after a failure) and remove its batches."""
        proc = getattr(self, "proc", None)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()
        self.tmp.cleanup()


class PCXWorker(LineWorker):
    """The PCX side as a long-lived process (``fastpc/bench/pcx_speed.py --serve``): it compiles
    once, then times one pass over the same batches whenever asked, so its repeats interleave
    with fastpc's and both sides see the same machine conditions."""

    what = "PCX worker"

    def __init__(self, args, widths, batches):
        env = dict(os.environ)
        if args.threads == 1:  # the same resources as the torch side: one thread on one core
            env["XLA_FLAGS"] = "--xla_cpu_multi_thread_eigen=false --xla_force_host_platform_device_count=1"
        super().__init__(lambda data: [args.pcx_python, str(PCX_SCRIPT), "--data", data,
                                       "--widths", ",".join(map(str, widths)),
                                       "--iters", "5", "--state-lr", "0.1", "--serve"],
                         batches, env=env, preexec_fn=one_core(args.threads))
        # self.ready: {"ready": True, "compile_s": ...} once compiled

    def time_pass(self, start: int = 0, count: int | None = None) -> float:
        """Seconds per step over batches ``start`` .. ``start + count`` (default: all)."""
        return float(self.ask("time" if count is None else f"time {start} {count}")["step_s"])

    def close(self) -> dict[str, Any]:
        """Stop the worker; its summary (per-pass seconds, versions, compile time)."""
        res = self.quit()
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
