"""``fastpc bench depth``: the depth result of the ePC paper (PAPERS.md §1–2), measured here.

MLPs of depth 4, 8, 12 and 20 (width 128, GELU, orthogonal init) on Fashion-MNIST, trained with
bp, spc and epc (each with the tuned settings in :data:`VARIANTS`), several seeds, all cells in
one process so that seconds per epoch are comparable. Writes ``depth.md`` + ``depth.json`` and
the depth-20 diagnostics (energy heatmap spc | epc, alignment with BP, iterations to the
linear equilibrium versus depth) as PNGs under ``--out`` (default ``benchmarks/results``).

``--regime paper`` runs the ePC paper's own MLP setting instead (PAPERS.md §2: batch 64, Adam
lr 1e-4, 5 epochs, sPC at T = 256, fixed-step ePC at T ∈ {64, 256} × η_e ∈ {0.1, 0.3}, beside
our line-searched epc at T = 5) and writes ``depth-paper.md`` / ``.json``; ``--epochs`` and
``--train-subset`` shrink it for a CPU.

``--quick`` is a smoke run: depths 2 and 4, a 1,024-example train subset,
one seed, one epoch, small diagnostics.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

import fastpc as fpc

from ..runtime import flush_denormals
from .suite import begin, fmnist, machine

__all__ = ["VARIANTS", "Variant", "CellResult", "add_arguments", "run", "train_cell", "summarize"]


@dataclass(frozen=True)
class Variant:
    """One column of the table: a learner with fixed options (tuned at depth 20, see benchmarks/README.md)."""

    label: str
    learner: str
    options: dict[str, Any] = field(default_factory=dict)
    note: str = ""


# Tuned settings (the search is in benchmarks/README.md, "How the depth settings were tuned").
VARIANTS: dict[str, Variant] = {
    "bp": Variant("bp", "bp", {}, "autograd of the batch-mean loss"),
    "spc": Variant("spc", "spc", {"iters": 5, "state_lr": 0.1, "momentum": 0.0},
                   "state-based PC, T = 5"),
    "epc": Variant("epc", "epc", {"iters": 5, "state_lr": 0.1},
                   "error-based PC, T = 5, η_e = 0.1 with the default line search (armijo 0.99, "
                   "one step for the batch): small η_e·κ·T, update ≈ η·T × the BP gradient"),
    "epc-eq": Variant("epc-eq", "epc", {"iters": 20, "state_lr": 0.1, "armijo": 0.0},
                      "ePC run towards the equilibrium: T = 20, η_e = 0.1, line search that only "
                      "forbids the energy to rise (armijo 0)"),
    "epc-fixed": Variant("epc-fixed", "epc", {"iters": 5, "state_lr": 0.001, "safeguard": False},
                         "plain fixed-step ePC, η_e = 0.001, T = 5 (no line search)"),
}
for _T in (64, 256):  # the ePC paper's MLP grid (PAPERS.md §2): fixed step, no line search
    for _lr in (0.1, 0.3):
        VARIANTS[f"epc-T{_T}-{_lr}"] = Variant(f"epc-T{_T}-{_lr}", "epc",
                                               {"iters": _T, "state_lr": _lr, "safeguard": False},
                                               f"the ePC paper's regime: fixed-step ePC, T = {_T}, η_e = {_lr}")
VARIANTS["spc-T256"] = Variant("spc-T256", "spc", {"iters": 256, "state_lr": 0.1},
                               "the ePC paper's regime for sPC: T = 256, λ = 0.1")
DEFAULT_VARIANTS = ("bp", "spc", "epc")
PAPER_VARIANTS = ("bp", "spc-T256", "epc-T64-0.1", "epc-T64-0.3", "epc-T256-0.1", "epc-T256-0.3", "epc")
# the ePC paper's MLP training settings (PAPERS.md §2); --regime paper applies them where not given
PAPER_SETTINGS = {"batch_size": 64, "lr": 1e-4, "epochs": 5}
OURS_SETTINGS = {"batch_size": 128, "lr": 3e-4, "epochs": 3}

DIVERGED_LOSS = 1e3  # a CE loss above this (chance is ln 10 ≈ 2.3) stops the cell as diverged


@dataclass
class CellResult:
    """One (variant, depth, seed) training run."""

    variant: str
    learner: str
    depth: int
    seed: int
    epochs: int
    steps: int
    test_acc: float
    train_loss: float  # mean FF loss over the last epoch (nan if diverged)
    sec_per_epoch: float  # training time only (no evaluation, no data loading)
    diverged: bool
    diverged_at: int | None  # step at which the loss became non-finite


def _build(variant: Variant, depth: int, width: int, in_dim: int, num_classes: int, seed: int,
           lr: float):
    torch.manual_seed(seed)
    net = fpc.mlp([in_dim] + [width] * (depth - 1) + [num_classes], act="gelu", init="orthogonal")
    opt = torch.optim.AdamW(net.parameters(), lr=lr, weight_decay=0.0)
    learner = fpc.make_learner(variant.learner, net, loss="ce", optimizer=opt, **variant.options)
    return net, learner


@torch.no_grad()
def evaluate(net: torch.nn.Module, loader) -> float:
    """Test accuracy (%) of the feedforward prediction."""
    correct = total = 0
    for x, y in loader:
        correct += (net(x).argmax(1) == y).sum().item()
        total += y.numel()
    return 100.0 * correct / max(total, 1)


def train_cell(variant: Variant, depth: int, seed: int, loaders, epochs: int, width: int = 128,
               lr: float = 3e-4, max_steps: int | None = None, log=None) -> CellResult:
    """Train one cell; stops early (marked diverged) when the loss becomes non-finite."""
    info = loaders.info
    in_dim = math.prod(info.in_shape)
    net, learner = _build(variant, depth, width, in_dim, info.num_classes, seed, lr)
    steps, train_time, diverged_at, last_loss = 0, 0.0, None, float("nan")
    for epoch in range(epochs):
        loaders.train.set_epoch(epoch)
        total, n = 0.0, 0
        it = iter(loaders.train)
        while True:
            try:
                x, y = next(it)
            except StopIteration:
                break
            t0 = time.perf_counter()
            res = learner.step(x, y)
            train_time += time.perf_counter() - t0
            steps += 1
            loss = float(res.loss)
            if not math.isfinite(loss) or loss > DIVERGED_LOSS:
                diverged_at = steps
                break
            total, n = total + loss * y.shape[0], n + y.shape[0]
            if max_steps is not None and steps >= max_steps:
                break
        last_loss = total / n if n else float("nan")
        if diverged_at is not None or (max_steps is not None and steps >= max_steps):
            break
    done_epochs = max(steps / max(len(loaders.train), 1), 1e-9)
    acc = evaluate(net, loaders.test)
    cell = CellResult(variant.label, variant.learner, depth, seed, epochs, steps, acc,
                      last_loss if diverged_at is None else float("nan"),
                      train_time / done_epochs, diverged_at is not None, diverged_at)
    if log is not None:
        log(f"  {variant.label:>9} depth {depth:>2} seed {seed}: test {acc:6.2f} %  "
            f"{cell.sec_per_epoch:7.2f} s/epoch  loss {cell.train_loss:.4f}"
            + (f"  DIVERGED at step {diverged_at}" if diverged_at else ""))
    return cell


def summarize(cells: list[CellResult]) -> list[dict[str, Any]]:
    """One row per (depth, variant): accuracy mean and half-range over seeds, s/epoch, × bp."""
    rows = []
    keys = sorted({(c.depth, c.variant) for c in cells}, key=lambda k: (k[0], list(VARIANTS).index(k[1]) if k[1] in VARIANTS else 99))
    for depth, var in keys:
        cs = [c for c in cells if c.depth == depth and c.variant == var]
        accs = [c.test_acc for c in cs]
        secs = [c.sec_per_epoch for c in cs]
        bp = [c.sec_per_epoch for c in cells if c.depth == depth and c.variant == "bp"]
        sec = sum(secs) / len(secs)
        rows.append({
            "depth": depth, "variant": var, "seeds": len(cs),
            "acc_mean": sum(accs) / len(accs), "acc_spread": (max(accs) - min(accs)) / 2,
            "accs": accs, "sec_per_epoch": sec,
            "ratio_to_bp": sec / (sum(bp) / len(bp)) if bp else None,
            "diverged": sum(c.diverged for c in cs),
        })
    return rows


def _table(rows: list[dict[str, Any]]) -> str:
    lines = ["| depth | learner | test acc % (mean ± half-range) | seeds | s / epoch | × bp | Δ vs bp (pp) |",
             "|---:|---|---:|---:|---:|---:|---:|"]
    bp_acc = {r["depth"]: r["acc_mean"] for r in rows if r["variant"] == "bp"}
    for r in rows:
        ratio = "" if r["ratio_to_bp"] is None else f"{r['ratio_to_bp']:.2f}"
        delta = "" if r["depth"] not in bp_acc or r["variant"] == "bp" else f"{r['acc_mean'] - bp_acc[r['depth']]:+.2f}"
        div = f" ({r['diverged']} diverged)" if r["diverged"] else ""
        lines.append(f"| {r['depth']} | {r['variant']} | {r['acc_mean']:.2f} ± {r['acc_spread']:.2f}{div} | "
                     f"{r['seeds']} | {r['sec_per_epoch']:.2f} | {ratio} | {delta} |")
    return "\n".join(lines)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 8, 12, 20], help="MLP depths (Linear layers)")
    parser.add_argument("--regime", choices=["ours", "paper"], default="ours",
                        help="ours: T = 5 with the line search (depth.md); paper: the ePC paper's MLP grid "
                             "(batch 64, Adam 1e-4, 5 epochs, T 64/256; depth-paper.md)")
    parser.add_argument("--learners", nargs="+", default=None, choices=list(VARIANTS),
                        help="variants to train (default: bp spc epc; paper regime: "
                             + " ".join(PAPER_VARIANTS) + ")")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--epochs", type=int, default=None, help="default 3 (paper regime: 5)")
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=None, help="default 128 (paper regime: 64)")
    parser.add_argument("--lr", type=float, default=None,
                        help="AdamW learning rate, all learners (default 3e-4; paper regime: 1e-4)")
    parser.add_argument("--train-subset", type=int, default=None, help="use the first N training examples")
    parser.add_argument("--max-steps", type=int, default=None, help="stop each cell after N weight steps")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1 avoids oversubscription on shared cores)")
    parser.add_argument("--diag-depth", type=int, default=None, help="depth of the diagnostic plots (default: max depth)")
    parser.add_argument("--no-diagnostics", action="store_true", help="skip the diagnostic plots")
    parser.add_argument("--quick", action="store_true", help="smoke run: depths 2 4, 1 seed, 1 epoch, 1,024 examples")
    parser.add_argument("--out", default="benchmarks/results", help="output folder")


def _apply_regime(args: argparse.Namespace) -> None:
    paper = args.regime == "paper"
    for k, v in (PAPER_SETTINGS if paper else OURS_SETTINGS).items():
        if getattr(args, k) is None:
            setattr(args, k, v)
    if args.learners is None:
        args.learners = list(PAPER_VARIANTS if paper else DEFAULT_VARIANTS)
    if paper:
        args.no_diagnostics = True  # the diagnostics belong to our regime's table


def _apply_quick(args: argparse.Namespace) -> None:
    args.depths, args.seeds, args.epochs = [2, 4], [0], 1
    args.train_subset = args.train_subset or 1024
    args.width = min(args.width, 64)


def run(args: argparse.Namespace) -> int:
    _apply_regime(args)
    if args.quick:
        _apply_quick(args)
    with flush_denormals():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    out, command = begin(args, "depth")
    started = time.time()

    def log(msg: str) -> None:
        print(msg, flush=True)

    cells: list[CellResult] = []
    for seed in args.seeds:
        loaders = fmnist(args, seed, args.train_subset)
        for depth in args.depths:
            for name in args.learners:
                cells.append(train_cell(VARIANTS[name], depth, seed, loaders, args.epochs, args.width,
                                        args.lr, args.max_steps, log))
    rows = summarize(cells)
    table = _table(rows)
    print(table)

    diag_md, pngs = "", []
    if not args.no_diagnostics:
        from . import _depth_diag
        diag_md, pngs = _depth_diag.write(out, args, loaders, VARIANTS, rows)

    wall = time.time() - started
    date = _dt.datetime.now().isoformat(timespec="seconds")
    result = {
        "suite": "depth", "command": command, "date": date, "machine": machine(), "wall_s": wall,
        "settings": {k: v for k, v in vars(args).items() if k not in ("func", "argv")},
        "variants": {k: asdict(VARIANTS[k]) for k in args.learners},
        "cells": [asdict(c) for c in cells], "rows": rows, "plots": [p.name for p in pngs],
    }
    stem = "depth-paper" if args.regime == "paper" else "depth"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    md = [
        "# Depth sweep: bp vs spc vs epc (PAPERS.md §1–2)"
        + (", the ePC paper's regime" if args.regime == "paper" else ""), "",
        f"Command: `{command}`  ", f"Date: {date}  ", f"Machine: {machine()}  ",
        f"Threads: {args.threads}; wall time {wall / 60:.1f} min", "",
        f"Fashion-MNIST, MLP width {args.width}, GELU, orthogonal init (ReLU gain), CE, AdamW lr {args.lr}, "
        f"batch {args.batch_size}, {args.epochs} epoch(s), seeds {args.seeds}"
        + (f", first {args.train_subset} training examples" if args.train_subset else "")
        + (f", at most {args.max_steps} steps per cell" if args.max_steps else "") + ".", "",
        "Learner settings:", "",
    ]
    md += [f"- `{k}`: {VARIANTS[k].learner} {VARIANTS[k].options or ''} — {VARIANTS[k].note}" for k in args.learners]
    md += ["", table, "",
           "Accuracy: test set, feedforward prediction, after the last epoch; ± is half the range over "
           "seeds. s / epoch: training steps only (no evaluation), single process, all cells in this run.", ""]
    if diag_md:
        md += [diag_md, ""]
    md += ["How these settings were tuned: benchmarks/README.md (\"How the depth settings were tuned\").", ""]
    (out / f"{stem}.md").write_text("\n".join(md))
    print(f"wrote {out / (stem + '.md')} and {out / (stem + '.json')}" + (f" and {len(pngs)} PNGs" if pngs else ""))
    return 0
