"""``fastpc bench ddp``: data-parallel ``fastpc train`` through torchrun against one process
(issue 14).

The quickstart run (Fashion-MNIST, MLP 784-128-128-128-10, GELU, batch 128, AdamW 2e-3 cosine,
one epoch) for each learner and dtype, trained by ``fastpc train`` in one process and by
``python -m torch.distributed.run --nproc_per_node N --standalone -m fastpc train`` in N
processes (gloo on the CPU, nccl on CUDA), from the same seed: same initial weights, same global
batches. Recorded per cell: test accuracy, training seconds per epoch, and the largest weight
difference from the 1-process run (relative to the largest weight). The N-process step is the
1-process step up to rounding (the batch sums are added in another order: tests/test_distributed.py
checks a few steps to 1e-12 in float64), but training amplifies rounding over an epoch; the row
"1 (1 thread)" is the same 1-process run on one thread instead of ``--threads`` (its products
summed in another order too): the size a harmless rounding difference grows to, to read the
N-process gap against.

The 1-process run gets ``--threads`` torch threads; each of the N processes gets
``threads // N`` (at least 1), so both use the same cores. Writes ``ddp.md`` and ``ddp.json``
under ``--out`` (default ``benchmarks/results``) with the command. ``--quick``: bp only,
float64, a smoke run.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from .suite import begin, machine

__all__ = ["add_arguments", "run", "train_run"]


def train_run(processes: int, sets: list[str], timeout: float) -> dict[str, Any]:
    """One ``fastpc train`` (through torchrun when ``processes`` > 1): its summary, final weights
    and wall time; a failure raises RuntimeError with the last lines of its stderr."""
    head = [sys.executable, "-m", "fastpc"] if processes == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "--standalone",
         "-m", "fastpc"]
    t0 = time.perf_counter()
    proc = subprocess.run([*head, "train", "--set", *sets], capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"fastpc train on {processes} process(es) failed (status {proc.returncode}): "
                           f"{proc.stderr[-6000:]}")
    out = Path(next(s.split("=", 1)[1] for s in sets if s.startswith("train.out=")))
    summary = json.loads((out / "summary.json").read_text())
    net = torch.load(out / "checkpoints/last.pt", map_location="cpu", weights_only=False)["learner"]["net"]
    return {"summary": summary, "net": net, "wall_s": wall}


def _gap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    """max |a − b| over every weight, relative to max |a|."""
    diff = max((a[k].double() - b[k].double()).abs().max().item() for k in a)
    scale = max(a[k].double().abs().max().item() for k in a)
    return diff / scale


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--learners", nargs="+", default=["bp", "spc", "epc"])
    parser.add_argument("--dtypes", nargs="+", default=["float64", "float32"], choices=["float32", "float64"])
    parser.add_argument("--processes", type=int, nargs="+", default=[2], help="process counts besides 1")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=2, help="cores for each run (split among its processes)")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--set", nargs="+", default=[], dest="extra", metavar="KEY=VALUE",
                        help="more config overrides for every run")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds per run")
    parser.add_argument("--quick", action="store_true", help="smoke run: bp, float64")
    parser.add_argument("--out", default="benchmarks/results")


def run(args: argparse.Namespace) -> int:
    if args.quick:
        args.learners, args.dtypes = ["bp"], ["float64"]
    out, command = begin(args, "ddp")
    started = time.time()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fastpc-ddp-") as tmp:
        for learner in args.learners:
            for dtype in args.dtypes:
                base = [f"learner.name={learner}", f"train.dtype={dtype}", f"train.epochs={args.epochs}",
                        "train.progress=false", "data.download=false", *args.extra]
                if args.data_root:
                    base.append(f"data.root={args.data_root}")
                first, single = None, {}  # single: the 1-process runs by thread count
                cells = [(1, args.threads)] + [(1, 1)] * (args.threads > 1) + \
                    [(n, max(1, args.threads // n)) for n in args.processes]
                for n, threads in cells:
                    sets = [*base, f"train.threads={threads}", f"train.out={Path(tmp) / f'{learner}-{dtype}-{n}-{threads}'}"]
                    res = train_run(n, sets, args.timeout)
                    first = first or res
                    same = single.get(threads) if n > 1 else None
                    if n == 1:
                        single.setdefault(threads, res)
                    s = res["summary"]
                    rows.append({"learner": learner, "dtype": dtype, "processes": n, "threads_each": threads,
                                 "reference": n == 1 and res is not first,
                                 "test_acc": s["test_acc"], "epoch_seconds": s["epoch_seconds"],
                                 "wall_s": res["wall_s"], "weight_gap": _gap(first["net"], res["net"]),
                                 "gap_same_threads": None if same is None else _gap(same["net"], res["net"]),
                                 "device": s.get("device")})
                    r = rows[-1]
                    print(f"{learner} {dtype} {n} process(es) x {threads} thread(s): test acc {r['test_acc']:.2f}%, "
                          f"{r['epoch_seconds'][-1]:.1f} s/epoch, weight gap {r['weight_gap']:.2e}", flush=True)
    table = _table(rows)
    print(table)
    wall = time.time() - started
    date = _dt.datetime.now().isoformat(timespec="seconds")
    gpu = "CUDA: " + torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU (CPU only, gloo)"
    result = {"suite": "ddp", "command": command, "date": date, "machine": machine(), "accelerator": gpu,
              "wall_s": wall, "settings": {k: v for k, v in vars(args).items() if k not in ("func", "argv")},
              "rows": rows}
    (out / "ddp.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    md = ["# Data parallel through torchrun vs one process (issue 14)", "",
          f"Command: `{command}`  ", f"Date: {date}  ", f"Machine: {machine()}; {gpu}  ",
          f"Wall time {wall / 60:.1f} min", "",
          "`fastpc train` (the quickstart: Fashion-MNIST, MLP 784-128-128-128-10, batch 128, AdamW 2e-3 cosine, "
          f"{args.epochs} epoch(s), seed 0{'; ' + ' '.join(args.extra) if args.extra else ''}) in one process and "
          "through `torchrun --nproc_per_node N` (each of the N processes takes its part of every batch of 128). "
          f"Every run uses {args.threads} core(s): the N processes {args.threads} // N threads each.", "",
          table, "",
          "Weight gap: max |w − w_1| / max |w_1| over the final weights, w_1 the first row's (1 process, "
          f"{args.threads} thread(s)). Each N-process step is the 1-process step up to the order of the batch "
          "sums (tests/test_distributed.py: 1e-12 in float64 after three steps); over an epoch training "
          "amplifies that rounding, and the '1 (1 thread)' row, the same 1-process run with its products "
          "summed in another order by one thread, shows how far a harmless rounding difference grows: the "
          "N-process gap is to be read against it. The last column compares each N-process run with the "
          "1-process run whose products run on as many threads as each of its processes (the same kernels): "
          "what is left is the reduction order alone. Seconds: training only (no evaluation); on a CPU the N "
          "processes share the same cores as the 1-process run, so the time shows the cost of the collectives "
          "(one all_reduce of the gradients per step, one of two scalars per inference step under the line "
          "search, one of the step's metrics), not a speed-up.", ""]
    (out / "ddp.md").write_text("\n".join(md))
    print(f"wrote {out / 'ddp.md'} and {out / 'ddp.json'}")
    return 0


def _table(rows: list[dict[str, Any]]) -> str:
    def num(x: float | None) -> str:
        return "—" if x is None else f"{x:.1e}"

    lines = ["| learner | dtype | processes | threads each | test acc (%) | s / epoch | weight gap vs the first row "
             "| weight gap vs 1 process on as many threads |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        first = r["processes"] == 1 and not r["reference"]
        procs = f"1 ({r['threads_each']} thread)" if r["reference"] else r["processes"]
        lines.append(f"| {r['learner']} | {r['dtype']} | {procs} | {r['threads_each']} | {r['test_acc']:.2f} | "
                     f"{r['epoch_seconds'][-1]:.1f} | {num(None if first else r['weight_gap'])} | "
                     f"{num(r.get('gap_same_threads'))} |")
    return "\n".join(lines)
