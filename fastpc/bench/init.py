"""``fastpc bench init``: better state initialisation (PAPERS.md §3, Pinchetti et al. 2026).

Discriminative part: an MLP of 5 linear layers on Fashion-MNIST trained with sPC from each
state initializer (zeros, normal, forward, previous, class_average with label-grouped
batches) at T ∈ {1, 2, 4, 8, 16} inference steps, several seeds; the test accuracy and test
loss of the feedforward prediction against the cost of a training step in sequential matrix
multiplications (SMM: ``Learner.smm``, 2T for sPC), with BP (2L − 1 SMM) as the line to
reach. It tests the paper's claim that class_average reaches forward init's accuracy with
≥ 5× fewer SMM and says confirmed or refuted, with the numbers.

Generative part (``--part generative``): :func:`fastpc.bench.init_generative.run_part`.

Writes ``init.md``, ``init.json`` and ``init.png`` under ``--out``; a run of one part keeps
the other part's earlier section (each records its own command). ``--quick`` is a smoke run.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

import fastpc as fpc

from .suite import begin, machine

__all__ = ["VARIANTS", "Variant", "CellResult", "add_arguments", "run", "train_cell", "summarize", "claim",
           "discriminative"]


@dataclass(frozen=True)
class Variant:
    """One line of the plot: a state initializer, its inference step λ and the batch order."""

    init: str
    state_lr: float
    grouped: bool  # label-grouped batches (--grouped classes per batch) instead of shuffled ones


# λ from a sweep over {0.03, 0.1, 0.3} at T = 4 on a validation split (benchmarks/README.md)
VARIANTS: dict[str, Variant] = {
    "zeros": Variant("zeros", 0.3, False),
    "normal": Variant("normal", 0.1, False),
    "forward": Variant("forward", 0.1, False),
    "previous": Variant("previous", 0.1, False),
    "class_average": Variant("class_average", 0.3, True),
    "class_average/shuffled": Variant("class_average", 0.3, False),
    "forward/grouped": Variant("forward", 0.1, True),
}
# the claim's comparisons: (forward-init variant, class_average variant)
PAIRS = (("forward", "class_average"), ("forward", "class_average/shuffled"), ("forward/grouped", "class_average"))
PARTS = ("discriminative", "generative", "all")


@dataclass
class CellResult:
    """One (variant, T, seed) training run; variant "bp" is backprop (T = 0)."""

    variant: str
    iters: int
    seed: int
    state_lr: float | None  # inference step λ (None: bp)
    smm: int  # sequential matrix multiplications per training step (Learner.smm)
    steps: int
    test_acc: float
    test_loss: float
    train_loss: float  # mean FF loss over the last epoch
    seconds: float  # training time (no evaluation)


def _data(args: argparse.Namespace):
    """Fashion-MNIST loaders (read once per run) with the training subset and test subset applied."""
    from fastpc.data import BatchLoader, make_loaders

    loaders = make_loaders("fashion-mnist", batch_size=args.batch_size, seed=0, root=args.data_root,
                           eval_batch_size=1000)
    tr, test = loaders.train, loaders.test
    if args.train_subset:
        keep = torch.randperm(len(tr.y), generator=torch.Generator().manual_seed(1234))[: args.train_subset]
        tr = BatchLoader(tr.x[keep], tr.y[keep], args.batch_size, 0)
    if args.test_subset:
        test = BatchLoader(test.x[: args.test_subset], test.y[: args.test_subset], 1000, 0, shuffle=False)
    return loaders._replace(train=tr, test=test)


def _loaders(args: argparse.Namespace, data, seed: int, grouped: int | None):
    """``data`` with a training order seeded by ``seed``: shuffled, or label-grouped with at
    most ``grouped`` classes per batch."""
    from fastpc.data import BatchLoader

    train = BatchLoader(data.train.x, data.train.y, args.batch_size, seed, shuffle=True,
                        grouped=grouped is not None, classes_per_batch=grouped or 1)
    return data._replace(train=train)


@torch.no_grad()
def evaluate(net: fpc.PCNet, loader) -> tuple[float, float]:
    """(test accuracy %, mean CE loss) of the feedforward prediction (test time is the FF pass)."""
    correct, total, n = 0, 0.0, 0
    for x, y in loader:
        out = net(x.flatten(1))
        correct += (out.argmax(1) == y).sum().item()
        total += torch.nn.functional.cross_entropy(out, y, reduction="sum").item()
        n += y.numel()
    return 100.0 * correct / max(n, 1), total / max(n, 1)


def train_cell(args: argparse.Namespace, variant: str, iters: int, seed: int, loaders) -> CellResult:
    """Train one cell from ``seed`` (same initial weights for every variant and T of a seed)."""
    torch.manual_seed(seed)
    in_dim = math.prod(loaders.info.in_shape)
    net = fpc.mlp([in_dim] + [args.width] * (args.depth - 1) + [loaders.info.num_classes], act=args.act,
                  init="orthogonal")
    if args.optimizer == "sgd":
        opt = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=0.9)
    else:
        opt = torch.optim.AdamW(net.parameters(), lr=args.lr)
    if variant == "bp":
        learner = fpc.make_learner("bp", net, loss="ce", optimizer=opt)
    else:
        v = VARIANTS[variant]
        options = {"momentum": args.avg_momentum} if v.init == "class_average" else {}
        learner = fpc.make_learner("spc", net, loss="ce", optimizer=opt, iters=iters,
                                   state_lr=args.state_lr or v.state_lr, init=v.init, init_options=options)
    steps, seconds, smm = 0, 0.0, 0
    lam = None if variant == "bp" else learner.state_lr
    for epoch in range(args.epochs):
        loaders.train.set_epoch(epoch)
        total, n = 0.0, 0
        for x, y in loaders.train:
            t0 = time.perf_counter()
            res = learner.step(x.flatten(1), y)
            seconds += time.perf_counter() - t0
            steps += 1
            smm = res.smm
            total, n = total + float(res.loss) * y.numel(), n + y.numel()
    acc, loss = evaluate(net, loaders.test)
    return CellResult(variant, iters, seed, lam, smm, steps, acc, loss, total / max(n, 1), seconds)


def summarize(cells: list[CellResult]) -> list[dict[str, Any]]:
    """One row per (variant, T): mean and half-range over seeds of test accuracy and loss."""
    rows = []
    order = [*VARIANTS, "bp"]
    for var, iters in sorted({(c.variant, c.iters) for c in cells},
                             key=lambda k: (order.index(k[0]) if k[0] in order else 99, k[1])):
        cs = [c for c in cells if c.variant == var and c.iters == iters]
        accs, losses = [c.test_acc for c in cs], [c.test_loss for c in cs]
        rows.append({"variant": var, "iters": iters, "state_lr": cs[0].state_lr, "smm": cs[0].smm, "seeds": len(cs),
                     "acc_mean": sum(accs) / len(accs), "acc_spread": (max(accs) - min(accs)) / 2,
                     "loss_mean": sum(losses) / len(losses), "loss_spread": (max(losses) - min(losses)) / 2,
                     "seconds": sum(c.seconds for c in cs) / len(cs)})
    return rows


def claim(rows: list[dict[str, Any]], depth: int, forward: str = "forward", average: str = "class_average",
          factor: float = 5.0) -> dict[str, Any]:
    """The paper's claim on these rows: the SMM the ``forward`` variant needs to reach its best
    mean accuracy over the T grid, the fewest SMM at which the ``average`` variant's mean
    accuracy reaches it, their ratio, and confirmed (ratio ≥ ``factor``) or refuted.
    ``ratio_with_ff`` also counts forward init's FF pass (L − 1 SMM) that the paper's 2T
    leaves out."""
    fw = [r for r in rows if r["variant"] == forward]
    avg = [r for r in rows if r["variant"] == average]
    if not fw or not avg:
        return {"pair": [forward, average], "verdict": f"not tested (needs {forward} and {average} rows)"}
    best = max(fw, key=lambda r: (r["acc_mean"], -r["smm"]))
    reach = sorted((r for r in avg if r["acc_mean"] >= best["acc_mean"]), key=lambda r: r["smm"])
    out: dict[str, Any] = {"pair": [forward, average], "factor": factor, "forward_best_acc": best["acc_mean"], "forward_iters": best["iters"],
                           "forward_smm": best["smm"], "forward_smm_with_ff": best["smm"] + depth - 1,
                           "avg_best_acc": max(r["acc_mean"] for r in avg)}
    if not reach:
        out.update(avg_iters=None, avg_smm=None, ratio=None, ratio_with_ff=None,
                   verdict=f"refuted: {average} never reaches {forward}'s best accuracy "
                           f"({best['acc_mean']:.2f} %) within T ≤ {max(r['iters'] for r in avg)}")
        return out
    r = reach[0]
    ratio = best["smm"] / r["smm"]
    out.update(avg_iters=r["iters"], avg_smm=r["smm"], ratio=ratio,
               ratio_with_ff=(best["smm"] + depth - 1) / r["smm"])
    word = "confirmed" if ratio >= factor else "refuted"
    out["verdict"] = (f"{word}: {average} reaches {forward}'s best accuracy {best['acc_mean']:.2f} % "
                      f"(T = {best['iters']}, {best['smm']} SMM) at T = {r['iters']} ({r['smm']} SMM, "
                      f"{r['acc_mean']:.2f} %): {ratio:.1f}× fewer SMM (needed ≥ {factor:g}×)")
    return out


def _table(rows: list[dict[str, Any]]) -> str:
    lines = ["| init (batches) | λ | T | SMM / step | test acc % (mean ± half-range) | test loss | s / cell |",
             "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        t = "—" if r["variant"] == "bp" else str(r["iters"])
        lines.append(f"| {r['variant']} | {r['state_lr'] or '—'} | {t} | {r['smm']} | {r['acc_mean']:.2f} ± {r['acc_spread']:.2f} | "
                     f"{r['loss_mean']:.4f} ± {r['loss_spread']:.4f} | {r['seconds']:.1f} |")
    return "\n".join(lines)


def _plot(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    bp = [r for r in rows if r["variant"] == "bp"]
    for var in VARIANTS:
        rs = sorted((r for r in rows if r["variant"] == var), key=lambda r: r["smm"])
        if not rs:
            continue
        for ax, key in zip(axes, ("acc", "loss")):
            ax.errorbar([r["smm"] for r in rs], [r[f"{key}_mean"] for r in rs], yerr=[r[f"{key}_spread"] for r in rs],
                        marker="o", capsize=3, ls="--" if "/" in var else "-", label=f"PC {var}")
    for ax, key, name in zip(axes, ("acc", "loss"), ("test accuracy (%)", "test loss (CE)")):
        if bp:
            ax.axhline(bp[0][f"{key}_mean"], color="k", ls="--", lw=1)
            ax.plot([bp[0]["smm"]], [bp[0][f"{key}_mean"]], "k*", ms=12, label=f"BP ({bp[0]['smm']} SMM)")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("SMM per training step (sPC: 2T)")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.suptitle("State initialisation: test metrics vs cost (Fashion-MNIST, 5-layer MLP)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _log(msg: str) -> None:
    print(msg, flush=True)


def discriminative(args: argparse.Namespace, log=_log) -> tuple[str, dict[str, Any]]:
    """Run the discriminative part: (markdown section, JSON dict); writes ``init.png``."""
    cells: list[CellResult] = []
    data = _data(args)
    for seed in args.seeds:
        plain, grouped = _loaders(args, data, seed, None), _loaders(args, data, seed, args.grouped)
        for var in args.variants:
            for iters in args.iters:
                c = train_cell(args, var, iters, seed, grouped if VARIANTS[var].grouped else plain)
                cells.append(c)
                log(f"  seed {seed} {var:>22} T={iters:>2} ({c.smm:>2} SMM): test {c.test_acc:6.2f} % "
                    f"loss {c.test_loss:.4f}  {c.seconds:5.1f} s")
        c = train_cell(args, "bp", 0, seed, plain)
        cells.append(c)
        log(f"  seed {seed} {'bp':>22} ({c.smm} SMM): test {c.test_acc:6.2f} % loss {c.test_loss:.4f}")
    rows = summarize(cells)
    verdicts = [claim(rows, args.depth, fw, avg) for fw, avg in PAIRS]
    table = _table(rows)
    print(table)
    for v in verdicts:
        print(v["verdict"])
    out = Path(args.out)
    _plot(rows, out / "init.png")
    sub = f"{args.train_subset} random training examples" if args.train_subset else "all 60,000 training examples"
    md = [
        "## Discriminative: initializers against the SMM budget", "",
        f"Command: `{args.command}`", "",
        f"Fashion-MNIST ({sub}; {args.test_subset or 10000} test examples), MLP of "
        f"{args.depth} linear layers, width {args.width}, {args.act}, orthogonal init, CE loss; sPC with SGD "
        f"inference (step λ per row); {'AdamW' if args.optimizer == 'adamw' else 'SGD (momentum 0.9)'} "
        f"lr {args.lr}, batch {args.batch_size}, {args.epochs} epoch(s), "
        f"seeds {args.seeds}; the same initial weights for every row of a seed. class_average: momentum "
        f"{args.avg_momentum}. Batches: shuffled, or label-grouped (`/grouped`, and `class_average` itself, the "
        f"paper's stream-aligned order) with at most {args.grouped} class(es) per batch (`data.grouped`). "
        "Test metrics: the feedforward prediction after training (test time is the FF pass for every init).", "",
        "SMM per training step (`Learner.smm`): sPC 2T, BP 2L − 1 (PAPERS.md §0); the FF pass of forward "
        "init (L − 1 SMM) is not counted, as in the paper.", "",
        table, "",
        "**Claim** (class_average reaches forward init's accuracy with ≥ 5× fewer SMM; target: the forward "
        "variant's best mean accuracy over T):", "",
    ]
    for v in verdicts:
        extra = "" if v.get("ratio_with_ff") is None else \
            f" (counting forward init's FF pass, {v['forward_smm_with_ff']} SMM: {v['ratio_with_ff']:.1f}×)"
        md.append(f"- {v['pair'][1]} vs {v['pair'][0]}: {v['verdict']}{extra}.")
    md += ["", "![init](init.png)", ""]
    return "\n".join(md), {"command": args.command, "cells": [asdict(c) for c in cells], "rows": rows,
                            "claims": verdicts, "plot": "init.png"}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--part", choices=PARTS, default="discriminative",
                        help="discriminative (initializers vs SMM), generative (reconstruction vs iterations), all")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS),
                        help="initializers (and batch order) to train; bp always runs")
    parser.add_argument("--iters", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="T values")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--depth", type=int, default=5, help="linear layers")
    parser.add_argument("--act", default="gelu")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw",
                        help="weight optimizer of every cell (sgd: momentum 0.9)")
    parser.add_argument("--lr", type=float, default=1e-3, help="weight learning rate (every cell)")
    parser.add_argument("--state-lr", type=float, default=None, help="sPC inference step λ for every variant "
                        "(default: each variant's tuned λ)")
    parser.add_argument("--avg-momentum", type=float, default=0.9, help="class_average momentum")
    parser.add_argument("--grouped", type=int, default=1, help="classes per label-grouped batch")
    parser.add_argument("--train-subset", type=int, default=20000, help="train on N random training examples "
                        "(0: all 60,000)")
    parser.add_argument("--test-subset", type=int, default=None, help="test on the first N test examples")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--quick", action="store_true", help="smoke run: width 32, T 1 2, 1 seed, 1,024 examples")
    parser.add_argument("--out", default="benchmarks/results", help="output folder")


def _apply_quick(args: argparse.Namespace) -> None:
    args.iters, args.seeds, args.epochs, args.width = [1, 2], [0], 1, min(args.width, 32)
    args.train_subset, args.test_subset = min(args.train_subset or 1024, 1024), args.test_subset or 1000


def _merge(out: Path, parts: dict[str, tuple[str, dict[str, Any]]]) -> dict[str, Any]:
    """init.json with the parts run now replacing their earlier results (others kept)."""
    path = out / "init.json"
    old: dict[str, Any] = {}
    if path.is_file():
        try:
            old = json.loads(path.read_text())
        except ValueError:
            old = {}
    result = {"suite": "init", "parts": dict(old.get("parts", {})) if isinstance(old, dict) else {}}
    for name, (md, data) in parts.items():
        result["parts"][name] = {**data, "markdown": md}
    return result


def run(args: argparse.Namespace) -> int:
    if args.quick:
        _apply_quick(args)
    out, args.command = begin(args, "init")
    started = time.time()
    parts: dict[str, tuple[str, dict[str, Any]]] = {}
    stamp = {"date": _dt.datetime.now().isoformat(timespec="seconds"), "machine": machine()}
    if args.part in ("discriminative", "all"):
        md, data = discriminative(args)
        parts["discriminative"] = (md, {**data, **stamp, "wall_s": time.time() - started,
                                        "settings": _settings(args)})
    if args.part in ("generative", "all"):
        t0 = time.time()
        try:
            generative = importlib.import_module("fastpc.bench.init_generative")
        except ModuleNotFoundError as e:
            if e.name != "fastpc.bench.init_generative":
                raise
            print("fastpc bench init: the generative part (fastpc.bench.init_generative) is not available")
            return 2
        md, data = generative.run_part(args)
        parts["generative"] = (md, {**data, **stamp, "wall_s": time.time() - t0})
    result = _merge(out, parts)
    (out / "init.json").write_text(json.dumps(result, indent=2, default=str) + "\n")
    md = ["# State initialisation (PAPERS.md §3)", "",
          f"Machine: {machine()}; threads {args.threads}. Each part below records the command that made it.", ""]
    md += [result["parts"][p]["markdown"] for p in ("discriminative", "generative") if p in result["parts"]]
    (out / "init.md").write_text("\n".join(md))
    print(f"wrote {out / 'init.md'} and {out / 'init.json'} ({(time.time() - started) / 60:.1f} min)")
    return 0


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if k not in ("func", "argv", "command")}
