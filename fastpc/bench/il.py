"""``fastpc bench il``: the inference-learning improvements of Alonso, Krichmar and Neftci
(PAPERS.md §4), measured here on Fashion-MNIST.

- **schedule**: sequential (SeqIL) vs simultaneous inference at T = 1…5 on an MLP with 4 hidden
  layers, both with Adam, against BP with Adam: test accuracy and loss vs T and vs training
  time, and, on one batch at a fresh init, which layers' updates the output error reached
  (cosine with the BP gradient per block).
- **optimizers**: SeqIL-MQ, SeqIL-SGD, SeqIL-Adam (the issue's "IL-Adam", with the same
  sequential inference so that only the optimizer differs), BP-Adam and BP-SGD, on an MLP and
  on the paper's small conv net (:func:`conv_net`): test accuracy per epoch, optimizer state in
  bytes, seconds per epoch, several seeds.

Writes ``il.md``, ``il.json`` and ``il.png`` under ``--out`` (default ``benchmarks/results``),
with the command. ``--quick``: a smoke run (tiny subsets, one seed, one epoch).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

import fastpc as fpc
from fastpc import diagnostics as D
from fastpc import energy as E
from fastpc.optim import MQ

from .suite import begin, fmnist, machine, train_epoch

__all__ = [
    "OPTIMIZER_VARIANTS",
    "SCHEDULE_T",
    "Cell",
    "Variant",
    "add_arguments",
    "conv_net",
    "make_optimizer",
    "run",
    "state_bytes",
    "train_cell",
]


def conv_net(in_channels: int = 1, num_classes: int = 10, image_size: int = 28, width_mult: float = 1.0,
             act: str = "relu") -> fpc.PCNet:
    """The paper's small conv net as a PCNet of four blocks: conv 5×5/2 64, conv 5×5/2 128,
    conv 3×3/2 256 (each + ``act``), then Flatten + FC → ``num_classes``. On 32×32 inputs the
    convs run unpadded (32 → 14 → 5 → 2, FC 1024 → 10); a smaller image is zero-padded in the
    first conv to the same geometry (28×28: padding 2), so the head is FC 1024 → 10 there too.
    ``width_mult`` scales the channels. Kaiming-uniform weights, zero biases."""
    chans = [max(1, round(c * width_mult)) for c in (64, 128, 256)]
    pad = max(0, (32 - image_size + 1) // 2)
    size, c, blocks = image_size, in_channels, []
    for (k, p), out in zip(((5, pad), (5, 0), (3, 0)), chans):
        size = (size + 2 * p - k) // 2 + 1
        if size < 1:
            raise ValueError(f"image_size {image_size} is too small for conv_net (needs >= 11)")
        blocks.append(nn.Sequential(nn.Conv2d(c, out, k, stride=2, padding=p), fpc.nets.make_act(act)))
        c = out
    blocks.append(nn.Sequential(nn.Flatten(), nn.Linear(c * size * size, num_classes)))
    net = fpc.PCNet(blocks)
    for m in net.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.kaiming_uniform_(m.weight, nonlinearity="relu")
            nn.init.zeros_(m.bias)
    return net


@dataclass(frozen=True)
class Variant:
    """A learner with fixed options and its weight optimizer (``optim``: sgd, adam or mq);
    ``extra``: trained only when named in ``--only``."""

    label: str
    learner: str
    optim: str
    lr: float
    options: dict[str, Any] = field(default_factory=dict)
    extra: bool = False


SCHEDULE_T = (1, 2, 3, 4, 5)
# the paper's SeqIL: T = 3 sweeps; MLP γ = 0.05 with the soft target β = 100, conv γ = 0.04 with CE
# against the hard label (the authors' code)
SEQ = {"schedule": "sequential", "iters": 3, "state_lr": 0.05, "beta": 100.0}
SEQ_CONV = {"schedule": "sequential", "iters": 3, "state_lr": 0.04}
# learning rates for 2 epochs on a Fashion-MNIST subset, adapted from the paper's CIFAR-10 ones
# (PAPERS.md §4) by a 3-5 point search each (benchmarks/README.md, "fastpc bench il")
OPTIMIZER_VARIANTS: dict[str, tuple[Variant, ...]] = {
    "mlp": (Variant("SeqIL-MQ", "spc", "mq", 3e-4, SEQ), Variant("SeqIL-SGD", "spc", "sgd", 1.0, SEQ),
            Variant("SeqIL-Adam", "spc", "adam", 3e-3, SEQ), Variant("BP-Adam", "bp", "adam", 3e-3),
            Variant("BP-SGD", "bp", "sgd", 0.03)),
    "conv": (Variant("SeqIL-MQ", "spc", "mq", 1e-3, SEQ_CONV), Variant("SeqIL-SGD", "spc", "sgd", 0.1, SEQ_CONV),
             Variant("SeqIL-Adam", "spc", "adam", 1e-3, SEQ_CONV), Variant("BP-Adam", "bp", "adam", 1e-3),
             Variant("BP-SGD", "bp", "sgd", 0.1), Variant("BP-MQ", "bp", "mq", 1e-3, extra=True)),
}


def make_optimizer(name: str, net: nn.Module, lr: float, arch: str) -> torch.optim.Optimizer:
    """sgd, adam or mq (ρ cap 0.9999 for the MLP, 0.999 for the conv net, as the paper)."""
    if name == "mq":
        return MQ(net, lr=lr, rho_max=0.9999 if arch == "mlp" else 0.999)
    if name == "adam":
        return torch.optim.Adam(net.parameters(), lr=lr)
    if name == "sgd":
        return torch.optim.SGD(net.parameters(), lr=lr)
    raise ValueError(f"unknown optimizer {name!r}; expected sgd, adam or mq")


def state_bytes(opt: torch.optim.Optimizer) -> int:
    """Bytes of the tensors in the optimizer's state (0 for plain SGD)."""
    return sum(v.numel() * v.element_size() for st in opt.state.values() for v in st.values()
               if isinstance(v, torch.Tensor))


@torch.no_grad()
def evaluate(net: nn.Module, loader) -> tuple[float, float]:
    """(test accuracy %, mean CE loss) of the feedforward prediction."""
    correct = total = 0
    loss = 0.0
    for x, y in loader:
        out = net(x)
        correct += (out.argmax(1) == y).sum().item()
        loss += float(E.output_cost(out, y, "ce"))
        total += y.numel()
    return 100.0 * correct / max(total, 1), loss / max(total, 1)


@dataclass
class Cell:
    """One training run: per-epoch test accuracy / loss and cumulative training seconds."""

    part: str
    arch: str
    label: str
    seed: int
    T: int | None
    accs: list[float]
    losses: list[float]
    train_s: list[float]
    state_bytes: int
    diverged: bool = False

    @property
    def best_acc(self) -> float:
        return max(self.accs) if self.accs else float("nan")

    @property
    def sec_per_epoch(self) -> float:
        return self.train_s[-1] / len(self.train_s) if self.train_s else float("nan")


def make_net(arch: str, info, width: int, width_mult: float) -> fpc.PCNet:
    """``conv``: :func:`conv_net`; ``mlp``: 3 hidden layers of ``width``; ``mlp4``: 4 (GELU, orthogonal)."""
    if arch == "conv":
        c, h, _ = info.in_shape
        return conv_net(c, info.num_classes, h, width_mult)
    hidden = 4 if arch == "mlp4" else 3
    return fpc.mlp([math.prod(info.in_shape)] + [width] * hidden + [info.num_classes], act="gelu", init="orthogonal")


def train_cell(part: str, arch: str, v: Variant, seed: int, loaders, epochs: int, width: int,
               width_mult: float, T: int | None = None, log=print) -> Cell:
    """Train ``v`` on ``arch`` (mlp: 3 hidden layers, mlp4: 4, conv) for ``epochs``."""
    torch.manual_seed(seed)
    net = make_net(arch, loaders.info, width, width_mult)
    opt = make_optimizer(v.optim, net, v.lr, "conv" if arch == "conv" else "mlp")
    opts = dict(v.options, **({"iters": T} if T is not None else {}))
    learner = fpc.make_learner(v.learner, net, loss="ce", optimizer=opt, **opts)
    cell = Cell(part, arch, v.label, seed, T, [], [], [], 0)
    spent = 0.0
    for epoch in range(epochs):
        seconds, _, cell.diverged = train_epoch(learner, loaders.train, epoch)
        spent += seconds
        acc, test_loss = evaluate(net, loaders.test)
        cell.accs.append(acc)
        cell.losses.append(test_loss)
        cell.train_s.append(spent)
        if cell.diverged:
            break
    cell.state_bytes = state_bytes(opt)
    log(f"  {part:>9} {arch:>4} {v.label:>14}{'' if T is None else f' T={T}'} seed {seed}: "
        f"test {cell.accs[-1]:6.2f} % (best {cell.best_acc:6.2f})  loss {cell.losses[-1]:.4f}  "
        f"{cell.sec_per_epoch:6.2f} s/epoch  state {cell.state_bytes} B" + ("  DIVERGED" if cell.diverged else ""))
    return cell


def reach(loaders, width: int, Ts, state_lr: float) -> list[dict[str, Any]]:
    """Cosine of each block's PC update with the BP gradient, fresh 4-hidden-layer MLP, one
    batch of 256 training images, for each schedule and T (nan: the update is exactly zero)."""
    x, y = loaders.train.x[:256], loaders.train.y[:256]
    torch.manual_seed(0)
    net = make_net("mlp4", loaders.info, width, 1.0)
    rows = []
    for sched in ("simultaneous", "sequential"):
        for T in Ts:
            a = D.alignment(fpc.make_learner("spc", net, iters=T, state_lr=state_lr, schedule=sched), x, y)
            cos = [float(c) if float(r) > 0 else float("nan") for c, r in zip(a.cosine, a.norm_ratio)]
            rows.append({"schedule": sched, "T": T, "cos": cos,
                         "reached": sum(1 for c in cos[:-1] if math.isfinite(c))})
    return rows


def summarize(cells: list[Cell]) -> list[dict[str, Any]]:
    """Mean and half-range over seeds per (part, arch, label, T)."""
    keys = list(dict.fromkeys((c.part, c.arch, c.label, c.T) for c in cells))
    rows = []
    for part, arch, label, T in keys:
        cs = [c for c in cells if (c.part, c.arch, c.label, c.T) == (part, arch, label, T)]
        best = [c.best_acc for c in cs]
        final = [c.accs[-1] for c in cs]
        rows.append({"part": part, "arch": arch, "label": label, "T": T, "seeds": len(cs),
                     "best_acc": sum(best) / len(best), "best_spread": (max(best) - min(best)) / 2,
                     "final_acc": sum(final) / len(final), "test_loss": sum(c.losses[-1] for c in cs) / len(cs),
                     "sec_per_epoch": sum(c.sec_per_epoch for c in cs) / len(cs),
                     "state_bytes": cs[0].state_bytes, "diverged": sum(c.diverged for c in cs),
                     "acc_curve": [sum(c.accs[e] for c in cs) / len(cs) for e in range(min(len(c.accs) for c in cs))]})
    return rows


def claims(rows: list[dict[str, Any]], reach_rows: list[dict[str, Any]], tol_pp: float) -> list[str]:
    """The paper's claims, each confirmed or refuted from the measured rows."""
    out = []
    seq1 = [r for r in reach_rows if r["schedule"] == "sequential" and r["T"] == 1]
    sim1 = [r for r in reach_rows if r["schedule"] == "simultaneous" and r["T"] == 1]
    if seq1 and sim1:
        hidden = len(seq1[0]["cos"]) - 1
        ok = seq1[0]["reached"] == hidden and all(c > 0 for c in seq1[0]["cos"])
        out.append(f"- Sequential inference reaches every layer in one sweep: **{'confirmed' if ok else 'refuted'}** "
                   f"(T = 1: sequential updates {seq1[0]['reached']} of {hidden} hidden blocks, cosine with BP "
                   f"{', '.join(f'{c:.2f}' for c in seq1[0]['cos'])}; simultaneous {sim1[0]['reached']} of {hidden}).")
    sched = {(r["label"], r["T"]): r for r in rows if r["part"] == "schedule"}
    bp, s3 = sched.get(("BP-Adam", None)), sched.get(("sequential", 3))
    if bp and s3:
        d = s3["best_acc"] - bp["best_acc"]
        out.append(f"- Sequential inference matches BP at T = 3 (within {tol_pp} pp): "
                   f"**{'confirmed' if abs(d) <= tol_pp else 'refuted'}** (SeqIL-Adam {s3['best_acc']:.2f} % vs "
                   f"BP-Adam {bp['best_acc']:.2f} %, Δ {d:+.2f} pp).")
    for arch in ("mlp", "conv"):
        opt = {r["label"]: r for r in rows if r["part"] == "optimizers" and r["arch"] == arch}
        if not all(k in opt for k in ("SeqIL-MQ", "SeqIL-SGD", "SeqIL-Adam")):
            continue
        sgd, mq, adam = (opt[k]["best_acc"] for k in ("SeqIL-SGD", "SeqIL-MQ", "SeqIL-Adam"))
        if adam - sgd <= 0:
            out.append(f"- {arch}: MQ closes most of the SGD→Adam gap: **not testable** (SeqIL-Adam {adam:.2f} % "
                       f"≤ SeqIL-SGD {sgd:.2f} %: no gap; MQ {mq:.2f} %).")
            continue
        frac = (mq - sgd) / (adam - sgd)
        out.append(f"- {arch}: MQ closes most (> 50 %) of the SGD→Adam gap: **{'confirmed' if frac > 0.5 else 'refuted'}** "
                   f"(SGD {sgd:.2f} %, MQ {mq:.2f} %, Adam {adam:.2f} %: {100 * frac:.0f} % of the gap; state "
                   f"{opt['SeqIL-MQ']['state_bytes']} B vs {opt['SeqIL-Adam']['state_bytes']} B).")
    return out


def _plot(rows, reach_rows, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(1, 4, figsize=(19, 4))
    sched = [r for r in rows if r["part"] == "schedule"]
    bp = next((r for r in sched if r["label"] == "BP-Adam"), None)
    for name, mark in (("sequential", "-o"), ("simultaneous", "-s")):
        rs = sorted((r for r in sched if r["label"] == name), key=lambda r: r["T"])
        ax[0].plot([r["T"] for r in rs], [r["best_acc"] for r in rs], mark, label=name)
        ax[1].plot([r["sec_per_epoch"] for r in rs], [r["best_acc"] for r in rs], mark, label=name)
        for r in rs:
            ax[1].annotate(f"T={r['T']}", (r["sec_per_epoch"], r["best_acc"]), fontsize=7)
    if bp is not None:
        for a in ax[:2]:
            a.axhline(bp["best_acc"], color="k", ls="--", lw=1, label="BP-Adam")
        ax[1].plot([bp["sec_per_epoch"]], [bp["best_acc"]], "k*")
    ax[0].set(xlabel="T (sweeps / steps)", ylabel="test accuracy %", title="MLP 4 hidden, Adam")
    ax[1].set(xlabel="training s / epoch", ylabel="test accuracy %", title="accuracy vs time")
    for k, arch in ((2, "mlp"), (3, "conv")):
        for r in (r for r in rows if r["part"] == "optimizers" and r["arch"] == arch):
            ax[k].plot(range(1, len(r["acc_curve"]) + 1), r["acc_curve"], "-o", label=r["label"])
        ax[k].set(xlabel="epoch", ylabel="test accuracy %", title=f"optimizers, {arch}")
    for a in ax:
        a.legend(fontsize=7)
        a.grid(alpha=0.3)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--parts", nargs="+", default=["schedule", "optimizers"], choices=["schedule", "optimizers"])
    parser.add_argument("--archs", nargs="+", default=["mlp", "conv"], choices=["mlp", "conv"],
                        help="nets of the optimizer comparison")
    parser.add_argument("--T", type=int, nargs="+", default=list(SCHEDULE_T), help="sweeps / steps of the schedule part")
    parser.add_argument("--schedule-lr", type=float, default=1e-3, help="Adam lr of the schedule part (all)")
    parser.add_argument("--state-lr", type=float, default=0.1, help="γ of the schedule part (both schedules)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds of the optimizer part")
    parser.add_argument("--schedule-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=2, help="epochs of the optimizer part")
    parser.add_argument("--schedule-epochs", type=int, default=1)
    parser.add_argument("--width", type=int, default=128, help="MLP width")
    parser.add_argument("--width-mult", type=float, default=1.0, help="conv net channel multiplier")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--train-subset", type=int, default=20000, help="first N training images (MLP)")
    parser.add_argument("--conv-train-subset", type=int, default=8000, help="first N training images (conv net)")
    parser.add_argument("--test-subset", type=int, default=None, help="first N test images (default all)")
    parser.add_argument("--only", nargs="+", default=None, metavar="LABEL",
                        help="train only these learners of the optimizer part (e.g. SeqIL-MQ)")
    parser.add_argument("--lr", nargs="+", default=[], metavar="ARCH:LABEL=LR",
                        help="override a learning rate of the optimizer part, e.g. conv:SeqIL-MQ=1e-3")
    parser.add_argument("--tol-pp", type=float, default=1.0, help="'matches BP' margin, accuracy points")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny subsets and nets, 1 seed, 1 epoch")
    parser.add_argument("--out", default="benchmarks/results", help="output folder")


def _apply_quick(args: argparse.Namespace) -> None:
    args.T, args.seeds, args.schedule_seeds, args.epochs, args.schedule_epochs = [1, 3], [0], [0], 1, 1
    args.width, args.width_mult = min(args.width, 32), min(args.width_mult, 0.125)
    args.train_subset, args.conv_train_subset, args.test_subset = 256, 128, 256


def _variants(overrides: list[str]) -> dict[str, tuple[Variant, ...]]:
    """:data:`OPTIMIZER_VARIANTS` with the ``ARCH:LABEL=LR`` overrides applied."""
    lrs = {}
    for item in overrides:
        key, sep, value = item.partition("=")
        arch, _, label = key.partition(":")
        names = [v.label for v in OPTIMIZER_VARIANTS.get(arch, ())]
        if not sep or label not in names:
            raise ValueError(f"--lr takes ARCH:LABEL=LR with ARCH in {list(OPTIMIZER_VARIANTS)} and LABEL one of "
                             f"{names or [v.label for v in OPTIMIZER_VARIANTS['mlp']]}, got {item!r}")
        lrs[(arch, label)] = float(value)
    return {a: tuple(Variant(v.label, v.learner, v.optim, lrs.get((a, v.label), v.lr), v.options, v.extra)
                     for v in vs)
            for a, vs in OPTIMIZER_VARIANTS.items()}


def _loaders(args, seed: int, n_train: int):
    return fmnist(args, seed, n_train, args.test_subset)


def _table(rows, part: str) -> str:
    rs = [r for r in rows if r["part"] == part]
    if part == "schedule":
        lines = ["| learner | T | best test acc % (mean ± half-range) | final test loss | s / epoch |",
                 "|---|---:|---:|---:|---:|"]
        lines += [f"| {r['label']} | {'' if r['T'] is None else r['T']} | {r['best_acc']:.2f} ± {r['best_spread']:.2f} | "
                  f"{r['test_loss']:.4f} | "
                  f"{r['sec_per_epoch']:.2f} |" for r in rs]
    else:
        lines = ["| net | learner | best test acc % (mean ± half-range) | acc per epoch | optimizer state B | "
                 "s / epoch |", "|---|---|---:|---|---:|---:|"]
        lines += [f"| {r['arch']} | {r['label']} | {r['best_acc']:.2f} ± {r['best_spread']:.2f}"
                  f"{' (' + str(r['diverged']) + ' diverged)' if r['diverged'] else ''} | "
                  f"{', '.join(f'{a:.1f}' for a in r['acc_curve'])} | {r['state_bytes']} | {r['sec_per_epoch']:.2f} |"
                  for r in rs]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    if args.quick:
        _apply_quick(args)
    out, command = begin(args, "il")
    started = time.time()
    cells: list[Cell] = []
    reach_rows: list[dict[str, Any]] = []
    if "schedule" in args.parts:
        for seed in args.schedule_seeds:
            ld = _loaders(args, seed, args.train_subset)
            if seed == args.schedule_seeds[0]:
                reach_rows = reach(ld, args.width, args.T, args.state_lr)
            cells.append(train_cell("schedule", "mlp4", Variant("BP-Adam", "bp", "adam", args.schedule_lr), seed, ld,
                                    args.schedule_epochs, args.width, 1.0))
            for T in args.T:
                for sched in ("simultaneous", "sequential"):
                    v = Variant(sched, "spc", "adam", args.schedule_lr, {"schedule": sched, "state_lr": args.state_lr})
                    cells.append(train_cell("schedule", "mlp4", v, seed, ld, args.schedule_epochs, args.width, 1.0, T))
    variants = _variants(args.lr)
    if "optimizers" in args.parts:
        for arch in args.archs:
            for seed in args.seeds:
                ld = _loaders(args, seed, args.train_subset if arch == "mlp" else args.conv_train_subset)
                for v in (v for v in variants[arch] if (not v.extra if args.only is None else v.label in args.only)):
                    cells.append(train_cell("optimizers", arch, v, seed, ld, args.epochs, args.width, args.width_mult))
    rows = summarize(cells)
    verdicts = claims(rows, reach_rows, args.tol_pp)
    tables = {p: _table(rows, p) for p in args.parts}
    for p in args.parts:
        print(tables[p])
    print("\n".join(verdicts))
    _plot(rows, reach_rows, out / "il.png")
    wall = time.time() - started
    date = _dt.datetime.now().isoformat(timespec="seconds")
    result = {"suite": "il", "command": command, "date": date, "machine": machine(), "wall_s": wall,
              "settings": {k: v for k, v in vars(args).items() if k not in ("func", "argv")},
              "variants": {a: [asdict(v) for v in vs] for a, vs in variants.items()},
              "reach": reach_rows, "cells": [asdict(c) for c in cells], "rows": rows, "claims": verdicts}
    (out / "il.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    md = ["# Inference learning: SeqIL, soft clamp, MQ (PAPERS.md §4)", "",
          f"Command: `{command}`  ", f"Date: {date}  ", f"Machine: {machine()}; threads {args.threads}; wall time {wall / 60:.1f} min", "",
          "## Claims", "", *verdicts, ""]
    if "schedule" in args.parts:
        md += ["## Sequential vs simultaneous (MLP 784-" + "-".join([str(args.width)] * 4) + "-10, GELU, Adam "
               f"lr {args.schedule_lr}, γ = {args.state_lr}, hard target, {args.schedule_epochs} epoch(s) on the "
               f"first {args.train_subset} training images, seeds {args.schedule_seeds})", "",
               "Sequential: top-down sweeps, step γ/(1+t); simultaneous: fastpc's spc, constant step γ.", "",
               tables["schedule"], "",
               "Cosine of each block's update with the BP gradient (fresh init, one batch of 256; blank: the "
               "update is exactly zero, the output error has not reached that block):", "",
               "| schedule | T | blocks 1..L | hidden blocks reached |", "|---|---:|---|---:|"]
        md += [f"| {r['schedule']} | {r['T']} | {' '.join('—' if not math.isfinite(c) else f'{c:.2f}' for c in r['cos'])}"
               f" | {r['reached']} |" for r in reach_rows]
        md.append("")
    if "optimizers" in args.parts:
        md += [f"## Optimizers ({args.epochs} epoch(s), seeds {args.seeds}; MLP 784-"
               + "-".join([str(args.width)] * 3) + f"-10 on {args.train_subset} images, conv net (width × "
               f"{args.width_mult}) on {args.conv_train_subset}; batch {args.batch_size})", "",
               "SeqIL: T = 3 sweeps; MLP γ = 0.05 with the soft target β = 100, conv net γ = 0.04 with the "
               "hard label (the paper's). Learning rates:", "",
               *[f"- {a}: " + ", ".join(f"{v.label} {v.lr:g}" for v in vs) for a, vs in variants.items()],
               "", tables["optimizers"], "",
               "Best test acc: the best epoch, mean over seeds (the paper's metric). Optimizer state: bytes of "
               "the tensors the optimizer keeps (SGD none; MQ one scalar per matrix; Adam two per weight).", ""]
    md += ["![il](il.png)", "", "Test set: " + (f"first {args.test_subset} images" if args.test_subset else
                                                "all 10,000 images") + "; feedforward prediction.", ""]
    (out / "il.md").write_text("\n".join(md))
    print(f"wrote {out / 'il.md'}, {out / 'il.json'} and {out / 'il.png'}")
    return 0
