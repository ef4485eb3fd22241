"""The baseline side of ``fastpc bench speed --baseline DIR``, seen from the suite: another fastpc
checkout (e.g. ``git archive REV | tar -x -C DIR``) timed in the same run, interleaved.

The worker is ``fastpc/bench/baseline_speed.py --serve``, started with this interpreter and
PYTHONPATH=DIR, so it trains with DIR's fastpc on the batches the suite trains on (the same .npz
protocol as the PCX worker, :class:`~fastpc.bench.pcx_client.LineWorker`). In every MLP section
it times bp, spc and epc chunk by chunk between the suite's own cases and PCX; a failure prints
one warning line and the suite goes on without it.
"""

from __future__ import annotations

import os
import statistics
import sys
from pathlib import Path
from typing import Any

from .baseline_speed import ALGOS, git_commit
from .pcx_client import LineWorker, one_core
from .speed_report import EpochRow

__all__ = ["BASELINE_SCRIPT", "ALGOS", "BaselineWorker", "BaselineRun", "resolve_baseline"]

BASELINE_SCRIPT = Path(__file__).resolve().with_name("baseline_speed.py")  # standalone: imports DIR's fastpc


def resolve_baseline(args) -> str | None:
    """Check ``args.baseline`` (a folder holding a fastpc package) and fill in
    ``args.baseline_label`` (default: the short commit when DIR is a git checkout, else the folder's
    name); one line saying what is wrong, or None (also without --baseline)."""
    if not args.baseline:
        return None
    root = Path(args.baseline).expanduser().resolve()
    if not (root / "fastpc" / "__init__.py").is_file():
        return f"--baseline {args.baseline}: no fastpc package there (no {root / 'fastpc' / '__init__.py'})"
    args.baseline = str(root)
    if not args.baseline_label:
        commit = git_commit(root)
        args.baseline_label = commit[:7] if commit else root.name
    return None


class BaselineWorker(LineWorker):
    """The baseline checkout in a worker process: a copy of each learner (bp, spc, epc) on the
    suite's MLP, each warmed up with one step; :meth:`time_chunk` times a range of batches."""

    what = "baseline worker"

    def __init__(self, root: str, widths: list[int], batches, *, seed: int = 0, threads: int = 1,
                 flush_denormal: bool = True, algos: tuple[str, ...] = ALGOS):
        env = dict(os.environ, PYTHONPATH=str(root))
        super().__init__(lambda data: [sys.executable, str(BASELINE_SCRIPT), "--root", str(root), "--data", data,
                                       "--widths", ",".join(map(str, widths)), "--algos", ",".join(algos),
                                       "--seed", str(seed), "--threads", str(threads), "--serve",
                                       *([] if flush_denormal else ["--no-flush-denormal"])],
                         batches, env=env, preexec_fn=one_core(threads))
        # self.ready: {"ready": True, "fastpc_version": ..., "commit": ..., "fastpc_file": ...}

    def time_chunk(self, algo: str, start: int, count: int) -> float:
        """Seconds per step of ``algo`` over batches ``start`` .. ``start + count``, after one
        untimed warm-up step on the first (as the suite's ``Case.time_chunk``)."""
        reply = self.ask(f"time {algo} {start} {count}")
        if "error" in reply:
            raise RuntimeError(f"{self.what}: {reply['error']}")
        return float(reply["step_s"])

    def close(self) -> dict[str, Any]:
        """Stop the worker; its summary (root, version, commit, per-algorithm chunk times)."""
        return self.quit()


class BaselineRun:
    """The baseline in one MLP section: chunk times summed per repeat like the suite's own cases
    (median over repeats), then its table rows and ratios. After a failure (starting or later)
    it holds the error and does nothing more."""

    def __init__(self, args, widths: list[int], batches, root: str | None = None, label: str | None = None,
                 kind: str = "baseline"):
        """``root``/``label``: the checkout and its name (default: ``--baseline`` and its label);
        ``kind``: "baseline", or "worker" for the current engine run the same way (a like-for-like
        reference: a worker process holds three learners, the suite's process many more)."""
        self.label: str = args.baseline_label if label is None else label
        self.kind = kind
        self.worker: BaselineWorker | None = None
        self.error: str | None = None
        self.times: dict[str, list[float]] = {a: [] for a in ALGOS}  # per repeat, seconds per step
        self._spent = dict.fromkeys(ALGOS, 0.0)
        try:
            self.worker = BaselineWorker(args.baseline if root is None else root, widths, batches, seed=args.seed,
                                         threads=args.threads, flush_denormal=args.flush_denormal)
        except (OSError, RuntimeError, ValueError) as e:
            self._fail(e)

    def _fail(self, e: Exception) -> None:
        self.error = f"{type(e).__name__}: {e}" if isinstance(e, KeyError) else str(e)
        print(f"  {self.kind} {self.label} failed: {self.error}; going on without it", file=sys.stderr)
        if self.worker is not None:
            self.worker.stop()
            self.worker = None

    def chunk(self, start: int, count: int) -> None:
        """Time every algorithm on batches ``start`` .. ``start + count``, one after the other."""
        if self.worker is None:
            return
        try:
            for a in ALGOS:
                self._spent[a] += self.worker.time_chunk(a, start, count) * count
        except (OSError, RuntimeError, ValueError, KeyError) as e:
            self._fail(e)

    def end_repeat(self, n_batches: int) -> str:
        """Close a repeat over ``n_batches``; its times as a note for the suite's progress line."""
        if self.worker is None:
            return ""
        for a in ALGOS:
            self.times[a].append(self._spent[a] / n_batches)
            self._spent[a] = 0.0
        return ", " + ", ".join(f"{a} ({self.kind}) {self.times[a][-1] * 1e3:.2f} ms" for a in ALGOS)

    def results(self, current: dict[str, float], steps_per_epoch: int, n_batches: int,
                pcx_step_s: float | None, epc_flop_ratio: float) -> tuple[list[EpochRow], dict[str, Any]]:
        """Stop the worker; its rows "ALGO (baseline LABEL)" (÷ bp: the current bp's step) and the
        section's ``baseline`` entry: medians, baseline spc ÷ PCX, baseline epc ÷ bp (and ÷ the
        FLOP ratio), current ÷ baseline step time per algorithm (``current``: the section's
        median step times by label)."""
        out: dict[str, Any] = {"label": self.label}
        if self.worker is not None:
            try:
                out["worker"] = self.worker.close()
            except (OSError, RuntimeError, ValueError, IndexError) as e:
                self._fail(e)
            self.worker = None
        if self.error is not None or not self.times["bp"]:
            out["error"] = self.error or "no repeat timed"
            return [], out
        b = {a: statistics.median(ts) for a, ts in self.times.items()}
        rows = [EpochRow(algo=f"{a} ({self.kind} {self.label})", step_s=b[a], epoch_s=b[a] * steps_per_epoch,
                         steps_per_s=1 / b[a], ratio_to_bp=b[a] / current["bp"], fast_path=None,
                         flops_per_step=None, gflops=None, timed_batches=n_batches) for a in ALGOS]
        out.update(step_s=b, per_repeat_s=self.times)
        if pcx_step_s:
            out["spc_over_pcx"] = b["spc"] / pcx_step_s
        out["epc_over_bp"] = b["epc"] / b["bp"]
        out["epc_over_bp_vs_flops"] = out["epc_over_bp"] / epc_flop_ratio
        out["current_over_baseline"] = {a: current[a] / b[a] for a in ALGOS}
        return rows, out
