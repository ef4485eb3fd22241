"""Baseline side of ``fastpc bench speed --baseline DIR``: another fastpc checkout, timed by the
current suite's rules in a worker process, so two versions of the engine interleave in one run.

A standalone script: it ships inside the current fastpc but imports only torch, numpy and the
fastpc package under ``--root`` (put first on ``sys.path``; it refuses to run if ``import fastpc``
lands anywhere else). The suite starts it with its own interpreter, PYTHONPATH=DIR:

    PYTHONPATH=DIR python fastpc/bench/baseline_speed.py --root DIR --data batches.npz \\
        --widths 784,128,128,128,10 --serve

It builds ``fastpc.mlp(widths, act="gelu")`` after ``torch.manual_seed(seed)`` and, per
algorithm (bp, spc, epc; eager), a learner on its own copy of the net with AdamW(1e-3) and
T = 5, state lr 0.1, as the suite's own cases; each takes one warm-up step. Then, one line on
stdin each: ``time ALGO START COUNT`` → ``{"step_s": ...}``, seconds per step over those
batches after one untimed warm-up step on the first of them (as the suite's ``Case.time_chunk``);
``quit`` (or the end of stdin) → a summary line: version, commit, per-algorithm chunk times.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ALGOS = ("bp", "spc", "epc")


def git_commit(root: Path) -> str | None:
    """HEAD of ``root`` when ``root`` is the top of a git checkout (not a folder inside one), else None."""
    try:
        top, head = subprocess.run(["git", "-C", str(root), "rev-parse", "--show-toplevel", "HEAD"],
                                   capture_output=True, text=True, timeout=30, check=True).stdout.split()
    except (OSError, ValueError, subprocess.SubprocessError):
        return None
    return head if Path(top).resolve() == root else None


def import_fastpc(root: Path):
    """The fastpc package under ``root`` (SystemExit with one line if it is not there, or if
    ``import fastpc`` finds another one)."""
    if not (root / "fastpc" / "__init__.py").is_file():
        sys.exit(f"baseline_speed: no fastpc package in {root} (no {root / 'fastpc' / '__init__.py'})")
    here = Path(__file__).resolve().parent  # this script's folder (inside the current fastpc) and the
    sys.path[:] = [p for p in sys.path if p and Path(p).resolve() != here]  # working folder: not searched
    sys.path.insert(0, str(root))
    import fastpc

    where = Path(os.path.abspath(fastpc.__file__))  # as found on sys.path (a symlinked package stays under root)
    if root not in where.parents:
        sys.exit(f"baseline_speed: import fastpc gave {where}, not the package under {root}")
    return fastpc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--root", required=True, help="the baseline checkout: a folder holding the fastpc package")
    p.add_argument("--data", required=True, help=".npz with x (N, B, 784) float32 and y (N, B) int64")
    p.add_argument("--widths", required=True, help="comma-separated layer widths, e.g. 784,128,128,128,10")
    p.add_argument("--algos", default=",".join(ALGOS), help="comma list out of bp,spc,epc")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--no-flush-denormal", dest="flush_denormal", action="store_false",
                   help="leave subnormal floats as they are (flushed by default, as the suite does)")
    p.add_argument("--serve", action="store_true", help="answer 'time ALGO START COUNT' lines until 'quit'")
    args = p.parse_args(argv)

    root = Path(args.root).resolve()
    fastpc = import_fastpc(root)
    import numpy as np
    import torch

    torch.set_num_threads(max(1, args.threads))
    if args.flush_denormal:
        torch.set_flush_denormal(True)
    data = np.load(args.data)
    xs, ys = data["x"], data["y"]
    batches = [(torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32)).reshape(x.shape[0], -1),
                torch.from_numpy(np.ascontiguousarray(y, dtype=np.int64))) for x, y in zip(xs, ys)]
    widths = [int(w) for w in args.widths.split(",")]
    if batches[0][0].shape[1] != widths[0]:
        sys.exit(f"baseline_speed: batches have {batches[0][0].shape[1]} inputs, widths start at {widths[0]}")

    torch.manual_seed(args.seed)
    net = fastpc.mlp(widths, act="gelu")
    learners = {}
    for name in args.algos.split(","):
        if name not in ALGOS:
            sys.exit(f"baseline_speed: unknown algorithm {name!r} (one of {', '.join(ALGOS)})")
        copy_ = copy.deepcopy(net)
        try:
            opt = torch.optim.AdamW(copy_.parameters(), lr=1e-3, fused=True)
        except (RuntimeError, TypeError, ValueError):  # no fused kernel here: as the suite falls back
            opt = torch.optim.AdamW(copy_.parameters(), lr=1e-3, foreach=True)
        pc = {} if name == "bp" else {"iters": 5, "state_lr": 0.1}
        learners[name] = fastpc.make_learner(name, copy_, loss="ce", optimizer=opt, **pc)
        learners[name].step(*batches[0])  # warm-up

    def seconds(learner, part) -> float:
        """Seconds for the batches of ``part`` after one untimed step on its first."""
        learner.step(*part[0])
        t0 = time.perf_counter()
        for x, y in part:
            learner.step(x, y)
        return time.perf_counter() - t0

    commit = git_commit(root)
    chunks: dict[str, list[float]] = {name: [] for name in learners}
    print(json.dumps({"ready": True, "fastpc_version": getattr(fastpc, "__version__", None), "commit": commit,
                      "fastpc_file": fastpc.__file__}), flush=True)
    for line in sys.stdin if args.serve else ():
        words = line.split()
        if not words or words[0] != "time":
            break
        try:
            name, start, count = words[1], int(words[2]), int(words[3])
            part = batches[start:start + count]
            step_s = seconds(learners[name], part) / len(part)
        except (IndexError, KeyError, ValueError, ZeroDivisionError):
            print(json.dumps({"error": f"bad request {line.strip()!r} ({len(batches)} batches, "
                                       f"algorithms {', '.join(learners)})"}), flush=True)
            continue
        chunks[name].append(step_s)
        print(json.dumps({"step_s": step_s}), flush=True)
    print(json.dumps({"root": str(root), "fastpc_file": fastpc.__file__,
                      "fastpc_version": getattr(fastpc, "__version__", None), "commit": commit,
                      "torch_version": torch.__version__, "threads": torch.get_num_threads(),
                      "widths": widths, "batches": len(batches), "batch_size": int(batches[0][0].shape[0]),
                      "chunk_step_s": chunks}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
