"""``fastpc bench precision``: bf16 mixed precision (``train.precision: bf16``, issue 14)
against fp32 on the quickstart setting.

The 4-layer MLP 784-128-128-128-10 (GELU, orthogonal init) on Fashion-MNIST, batch 128, AdamW
lr 2e-3 with a per-step cosine schedule, trained with bp, spc and epc (the quickstart's
learner settings) in fp32 and in bf16 from the same seeds (same initial weights, same batch
order); ``epc-armijo0.5`` is epc with its line search at Armijo constant 0.5 instead of 0.99,
``epc-nosg`` epc without the line search, ``epc-T20`` and ``epc-T40`` epc with 20 and 40
inference steps (see the README section).
Test accuracy of the feedforward prediction after the last epoch, evaluated in float32 (as
``fastpc train`` does) and under bf16 autocast; the issue asks that bf16 be within 0.5 pp of fp32.
Step time: interleaved rounds of fp32 and bf16 steps on one batch per learner (median), so
that load from other processes hits both alike. The CPU's bf16 support (avx512_bf16, AMX) is
recorded with the results.

Writes ``precision.md`` and ``precision.json`` under ``--out`` (default ``benchmarks/results``)
with the command. ``--quick``: a smoke run (1,024 training examples, one seed).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import statistics
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

import fastpc as fpc

from ..precision import autocast
from ..runtime import flush_denormals
from .suite import begin, fmnist, machine, train_epoch

__all__ = ["VARIANTS", "Cell", "add_arguments", "cpu_bf16_support", "run", "train_cell"]

# the quickstart's learners (fastpc/presets/quickstart.yaml; spc as fmnist-mlp-spc)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "bp": ("bp", {}),
    "spc": ("spc", {"iters": 5, "state_lr": 0.1}),
    "epc": ("epc", {"iters": 5, "state_lr": 0.1}),
    "epc-armijo0.5": ("epc", {"iters": 5, "state_lr": 0.1, "armijo": 0.5}),
    "epc-nosg": ("epc", {"iters": 5, "state_lr": 0.1, "safeguard": False}),
    # longer inference at the default line search: the deviation CastOps rounds to bf16 grows with T
    "epc-T20": ("epc", {"iters": 20, "state_lr": 0.1}),
    "epc-T40": ("epc", {"iters": 40, "state_lr": 0.1}),
}
NO_CONV = ("epc-nosg", "epc-T20", "epc-T40")  # left out of the conv step-time table (T× an epc step)
PRECISIONS = ("fp32", "bf16")


@dataclass
class Cell:
    variant: str
    precision: str
    seed: int
    steps: int
    train_s: float
    acc: float  # test accuracy (%), float32 evaluation
    acc_bf16_eval: float  # the same net evaluated under bf16 autocast
    diverged: bool


def cpu_bf16_support() -> dict[str, Any]:
    """The CPU's bf16 instructions (from /proc/cpuinfo flags) and torch's CPU capability."""
    flags: set[str] = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
                break
    except OSError:
        pass
    wanted = ("avx512f", "avx512_bf16", "amx_bf16", "amx_tile", "avx_vnni")
    return {"flags": {f: f in flags for f in wanted}, "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "mkldnn": torch.backends.mkldnn.is_available(), "read": bool(flags)}


def _net(seed: int) -> fpc.PCNet:
    torch.manual_seed(seed)
    return fpc.mlp([784, 128, 128, 128, 10], act="gelu", init="orthogonal")


def _learner(variant: str, precision: str, net: fpc.PCNet, lr: float) -> fpc.Learner:
    name, options = VARIANTS[variant]
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    return fpc.make_learner(name, net, loss="ce", optimizer=opt, precision=precision, **options)


@torch.no_grad()
def _accuracy(net: fpc.PCNet, loader, precision: str) -> float:
    correct = total = 0
    for x, y in loader:
        with autocast(precision, x.device):
            out = net(x)
        correct += (out.float().argmax(1) == y).sum().item()
        total += y.numel()
    return 100.0 * correct / max(total, 1)


def train_cell(variant: str, precision: str, seed: int, loaders, epochs: int, lr: float, log=print) -> Cell:
    """Train one cell from ``seed``'s initial weights, in ``loaders``' seeded batch order."""
    net = _net(seed)
    with warnings.catch_warnings():  # a bf16 warning (autocast blocks with armijo >= 0.9) is measured, not shown
        warnings.simplefilter("ignore", RuntimeWarning)
        learner = _learner(variant, precision, net, lr)
    total = epochs * len(loaders.train)
    sched = torch.optim.lr_scheduler.LambdaLR(learner.optimizer, lambda t: 0.5 * (1 + math.cos(math.pi * t / total)))
    steps, spent, diverged = 0, 0.0, False
    for epoch in range(epochs):
        seconds, n, diverged = train_epoch(learner, loaders.train, epoch, sched.step)
        steps, spent = steps + n, spent + seconds
        if diverged:
            break
    cell = Cell(variant, precision, seed, steps, spent, _accuracy(net, loaders.test, "fp32"),
                _accuracy(net, loaders.test, "bf16"), diverged)
    log(f"  {variant:>8} {precision} seed {seed}: test {cell.acc:6.2f} % (bf16 eval {cell.acc_bf16_eval:6.2f})  "
        f"{spent:6.1f} s train" + ("  DIVERGED" if diverged else ""))
    return cell


def step_times(variant: str, make_net, x: torch.Tensor, y: torch.Tensor, lr: float, rounds: int,
               steps: int) -> dict[str, float]:
    """Median ms per training step of fp32 and bf16 on the net ``make_net()``, in interleaved
    rounds on the batch (x, y)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        learners = {p: _learner(variant, p, make_net(), lr) for p in PRECISIONS}
    for lrn in learners.values():
        for _ in range(3):
            lrn.step(x, y)
    times: dict[str, list[float]] = {p: [] for p in PRECISIONS}
    for _ in range(rounds):
        for p, lrn in learners.items():
            t0 = time.perf_counter()
            for _ in range(steps):
                lrn.step(x, y)
            times[p].append(1e3 * (time.perf_counter() - t0) / steps)
    return {p: statistics.median(t) for p, t in times.items()}


def conv_step_times(args: argparse.Namespace) -> dict[str, dict[str, float]]:
    """Step times of the learners on VGG-5 (``--conv-width-mult``) at CIFAR-10's size, batch 64,
    on seeded random images: where the products, not the per-call overhead, take the time."""
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(64, 3, 32, 32, generator=g), torch.randint(0, 10, (64,), generator=g)

    def make_net() -> fpc.PCNet:
        torch.manual_seed(0)
        return fpc.vgg("vgg5", in_channels=3, num_classes=10, image_size=32, width_mult=args.conv_width_mult)

    rounds, steps = max(1, args.timing_rounds // 2), max(1, args.timing_steps // 5)
    return {v: step_times(v, make_net, x, y, 1e-3, rounds, steps) for v in args.learners if v not in NO_CONV}


def _mean_half_range(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (max(values) - min(values)) / 2


def summarize(cells: list[Cell], timing: dict[str, dict[str, float]], variants: list[str]) -> list[dict[str, Any]]:
    rows = []
    for v in variants:
        acc = {p: [c.acc for c in cells if c.variant == v and c.precision == p] for p in PRECISIONS}
        ev16 = [c.acc_bf16_eval for c in cells if c.variant == v and c.precision == "bf16"]
        (m32, h32), (m16, h16) = _mean_half_range(acc["fp32"]), _mean_half_range(acc["bf16"])
        t = timing[v]
        rows.append({"variant": v, "seeds": len(acc["fp32"]), "fp32_acc": m32, "fp32_half_range": h32,
                     "bf16_acc": m16, "bf16_half_range": h16, "bf16_acc_bf16_eval": statistics.fmean(ev16),
                     "delta_pp": m16 - m32, "within_0_5pp": abs(m16 - m32) <= 0.5,
                     "fp32_ms_per_step": t["fp32"], "bf16_ms_per_step": t["bf16"],
                     "diverged": any(c.diverged for c in cells if c.variant == v)})
    return rows


def _table(rows: list[dict[str, Any]]) -> str:
    lines = ["| learner | seeds | fp32 test acc % | bf16 test acc % | Δ (bf16 − fp32) pp | within 0.5 pp | "
             "bf16 acc, bf16 eval % | fp32 ms/step | bf16 ms/step | bf16 / fp32 time |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t32, t16 = r["fp32_ms_per_step"], r["bf16_ms_per_step"]
        lines.append(f"| {r['variant']} | {r['seeds']} | {r['fp32_acc']:.2f} ± {r['fp32_half_range']:.2f} | "
                     f"{r['bf16_acc']:.2f} ± {r['bf16_half_range']:.2f} | {r['delta_pp']:+.2f} | "
                     f"{'yes' if r['within_0_5pp'] else 'no'} | {r['bf16_acc_bf16_eval']:.2f} | "
                     f"{t32:.2f} | {t16:.2f} | {t16 / t32:.2f}× |")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--learners", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=2e-3, help="AdamW peak lr, cosine per step (the quickstart's)")
    parser.add_argument("--train-subset", type=int, default=None, help="first N training examples (default: all)")
    parser.add_argument("--timing-rounds", type=int, default=5, help="interleaved fp32/bf16 timing rounds")
    parser.add_argument("--timing-steps", type=int, default=20, help="steps per timing round")
    parser.add_argument("--conv-width-mult", type=float, default=0.5,
                        help="VGG-5 channel multiplier of the conv step-time table (0: skip it)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1 avoids oversubscription on shared cores)")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--quick", action="store_true", help="smoke run: 1,024 examples, one seed, 2 timing rounds")
    parser.add_argument("--out", default="benchmarks/results")


def run(args: argparse.Namespace) -> int:
    if args.quick:
        args.train_subset, args.seeds, args.timing_rounds, args.timing_steps = args.train_subset or 1024, [0], 2, 3
        args.conv_width_mult = min(args.conv_width_mult, 0.0625)
    with flush_denormals():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    out, command = begin(args, "precision")
    started = time.time()
    support = cpu_bf16_support()
    print(f"CPU bf16 support: {support}", flush=True)
    cells: list[Cell] = []
    loaders = None
    for seed in args.seeds:
        loaders = fmnist(args, seed, args.train_subset)
        for v in args.learners:
            for p in PRECISIONS:
                cells.append(train_cell(v, p, seed, loaders, args.epochs, args.lr))
    x, y = next(iter(loaders.train))
    timing = {v: step_times(v, lambda: _net(0), x, y, args.lr, args.timing_rounds, args.timing_steps)
              for v in args.learners}
    conv = conv_step_times(args) if args.conv_width_mult > 0 else {}
    rows = summarize(cells, timing, args.learners)
    table = _table(rows)
    print(table)
    wall = time.time() - started
    date = _dt.datetime.now().isoformat(timespec="seconds")
    flags = ", ".join(f"{k} {'yes' if on else 'no'}" for k, on in support["flags"].items())
    result = {"suite": "precision", "command": command, "date": date, "machine": machine(), "wall_s": wall,
              "cpu_bf16_support": support, "settings": {k: v for k, v in vars(args).items() if k not in ("func", "argv")},
              "variants": {k: {"learner": VARIANTS[k][0], "options": VARIANTS[k][1]} for k in args.learners},
              "cells": [asdict(c) for c in cells], "rows": rows, "conv_ms_per_step": conv}
    (out / "precision.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    md = ["# bf16 mixed precision vs fp32 (issue 14)", "",
          f"Command: `{command}`  ", f"Date: {date}  ", f"Machine: {machine()}  ",
          f"CPU bf16 support: {flags if support['read'] else 'unknown (no /proc/cpuinfo)'}; "
          f"torch CPU capability {support['cpu_capability']}  ",
          f"Threads: {args.threads}; wall time {wall / 60:.1f} min", "",
          f"Fashion-MNIST, MLP 784-128-128-128-10 (GELU, orthogonal init), CE, AdamW lr {args.lr} cosine per step, "
          f"batch {args.batch_size}, {args.epochs} epoch(s), seeds {args.seeds}"
          + (f", first {args.train_subset} training examples" if args.train_subset else "")
          + "; fp32 and bf16 cells start from the same weights and see the same batches.", "",
          "Learner settings:", ""]
    md += [f"- `{k}`: {VARIANTS[k][0]} {VARIANTS[k][1] or ''}" for k in args.learners]
    md += ["", table, "",
           "Accuracy: test set, feedforward prediction after the last epoch, evaluated in float32 (as "
           "`fastpc train` does); the 'bf16 eval' column evaluates the bf16-trained net under bf16 autocast. "
           "± is half the range over seeds. Step time: median of interleaved rounds of "
           f"{args.timing_steps} fp32 and bf16 steps on one batch (shared CPU: other processes add noise "
           "to both alike). Both run eagerly on the analytic block ops (bf16: fastpc.precision.CastOps, the "
           "products on a bf16 copy of each block's weights with each input split into a reference and a "
           "deviation, activations in float32; bp: torch.autocast around autograd).", ""]
    if conv:
        md += [f"Step time on VGG-5 (width × {args.conv_width_mult}) at 32×32, batch 64, seeded random images "
               "(the same interleaved timing, fewer steps): where the convolutions, not the per-call casts, "
               "take the time.", "", "| learner | fp32 ms/step | bf16 ms/step | bf16 / fp32 time |", "|---|---|---|---|"]
        md += [f"| {v} | {t['fp32']:.1f} | {t['bf16']:.1f} | {t['bf16'] / t['fp32']:.2f}× |" for v, t in conv.items()]
        md.append("")
    (out / "precision.md").write_text("\n".join(md))
    print(f"wrote {out / 'precision.md'} and {out / 'precision.json'}")
    return 0
