"""``fastpc bench ep``: equilibrium propagation for PCNs (PAPERS.md §5), measured on a CPU.

VGG-5 (conv → max-pool → ReLU blocks, torch's default Kaiming-uniform init: bound 1/√fan_in; the
ReLU-gain bound √6/√fan_in of ``init="kaiming_uniform"`` makes the MSE loss explode at lr 0.04)
at ``--width-mult`` on a subset of
Fashion-MNIST, MSE loss, SGD with Nesterov momentum 0.9, weight decay 3e-4 and a per-step cosine
schedule (the paper's recipe, sized down for the CPU). All cells run in one process.

- main: centered / positive / random / clamp EP (β, K = ``--beta``, ``--iters``) and bp, over
  ``--seeds``: test accuracy after the budget, seconds per epoch (median step time × steps) ÷ bp;
- beta: centered EP over ``--betas`` (first seed); iters: centered EP over ``--ks``;
- sync: synchronous mod-PGD (every layer at once) trained like the others, and the energy F over
  ``--trace-iters`` iterations of synchronous vs even/odd sweeps on one batch at initialisation;
- flops: the multiply-add FLOPs of one centered step (the learner's own count of its block
  calls, with the layers the nudge has not reached skipped) against bp's (forward, input VJPs of
  blocks 2..L and weight gradients, the same per-call accounting), and time ÷ FLOP of each.

Writes ``ep.md``, ``ep.json`` and ``ep.png`` (β sweep, K sweep, synchronous vs asynchronous F)
under ``--out``. ``--quick`` is a smoke run (tiny width and subset, one seed, short sweeps).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path
from typing import Any

import torch

import fastpc as fpc

from ..runtime import flush_denormals
from .suite import begin, fmnist

__all__ = ["METHODS", "add_arguments", "claims", "run", "train_cell"]

METHODS = {
    "centered": ("ep", {"estimator": "centered"}),
    "positive": ("ep", {"estimator": "positive"}),
    "random": ("ep", {"estimator": "random"}),
    "clamp": ("ep", {"estimator": "clamp"}),
    "bp": ("bp", {}),
}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--width-mult", type=float, default=0.125, help="VGG-5 channel multiplier (paper: 1)")
    parser.add_argument("--train-subset", type=int, default=4096, help="first N training examples")
    parser.add_argument("--test-subset", type=int, default=None, help="first N test examples (default: all)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=0.04, help="SGD lr (paper, MSE: 0.04)")
    parser.add_argument("--weight-decay", type=float, default=3e-4)
    parser.add_argument("--beta", type=float, default=0.02)
    parser.add_argument("--iters", type=int, default=5, help="K (paper, VGG-5: 5)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--betas", type=float, nargs="*", default=[0.0002, 0.002, 0.02, 0.1])
    parser.add_argument("--ks", type=int, nargs="*", default=[1, 2, 4, 5, 8])
    parser.add_argument("--trace-iters", type=int, default=40)
    parser.add_argument("--no-sync", action="store_true", help="skip the synchronous cell")
    parser.add_argument("--timing-rounds", type=int, default=15, help="interleaved timing rounds (median)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--quick", action="store_true", help="smoke run: width 1/16, 256 examples, 1 seed")
    parser.add_argument("--out", default="benchmarks/results")


def _quick(args: argparse.Namespace) -> None:
    args.width_mult, args.train_subset, args.test_subset = 0.0625, 256, 500
    args.epochs, args.seeds, args.betas, args.ks, args.trace_iters = 1, [0], [0.002, 0.1], [1, 2], 8
    args.timing_rounds = 3


def _loaders(args, seed: int):
    return fmnist(args, seed, args.train_subset, args.test_subset)


def _net(args, seed: int):
    torch.manual_seed(seed)
    return fpc.vgg("vgg5", in_channels=1, num_classes=10, image_size=28, width_mult=args.width_mult,
                   act="relu", init="default")


@torch.no_grad()
def _accuracy(net, loader) -> float:
    correct = total = 0
    for x, y in loader:
        correct += (net(x).argmax(1) == y).sum().item()
        total += y.numel()
    return 100.0 * correct / max(total, 1)


def train_cell(args, loaders, label: str, learner_name: str, options: dict[str, Any], seed: int,
               log=print) -> dict[str, Any]:
    """Train one cell; a non-finite or exploding loss stops it as diverged."""
    net = _net(args, seed)
    opt = torch.optim.SGD(net.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=args.weight_decay)
    opts = dict(options)
    if learner_name == "ep":
        opts = {"beta": args.beta, "iters": args.iters, **opts}
    learner = fpc.make_learner(learner_name, net, loss="mse", optimizer=opt, **opts)
    torch.manual_seed(1000 + seed)  # the random estimator's signs
    per_epoch = len(loaders.train)
    total_steps, step, times, losses, diverged = per_epoch * args.epochs, 0, [], [], None
    flops = None
    for epoch in range(args.epochs):
        loaders.train.set_epoch(epoch)
        for x, y in loaders.train:
            for g in opt.param_groups:
                g["lr"] = args.lr * 0.5 * (1 + math.cos(math.pi * step / total_steps))
            t0 = time.perf_counter()
            res = learner.step(x, y)
            times.append(time.perf_counter() - t0)
            step += 1
            loss = float(res.loss)
            if not math.isfinite(loss) or loss > 1e3 or learner.skipped_updates:
                diverged = step
                break
            losses.append(loss)
            flops = getattr(learner, "last_flops", None)
        if diverged:
            break
    acc = _accuracy(net, loaders.test)
    med = statistics.median(times) if times else float("nan")
    cell = {"label": label, "learner": learner_name, "options": opts, "seed": seed, "steps": step,
            "test_acc": acc, "train_loss": statistics.fmean(losses[-per_epoch:]) if losses else float("nan"),
            "step_median_s": med, "sec_per_epoch": med * per_epoch, "diverged_at": diverged,
            "step_flops": flops}
    log(f"  {label:>14} seed {seed}: test {acc:6.2f} %  {cell['sec_per_epoch']:7.2f} s/epoch"
        + (f"  DIVERGED at step {diverged}" if diverged else ""))
    return cell


def _bp_flops(net, x) -> int:
    """bp's multiply-add FLOPs for one step on x, in the block ops' per-call accounting."""
    from fastpc.learners.chain import Chain, NetOps

    netops = NetOps(net.blocks, "auto")
    chain = Chain(netops, x)
    with torch.no_grad():
        chain.feedforward()
    calls = [1, 1, 1] * len(netops.ops)
    calls[1] = 0  # no input gradient for the first block
    return netops.flops(calls, chain.in_shapes())


def _interleaved_times(args, loaders, methods: list[str], ks: list[int], rounds: int) -> dict[str, float]:
    """Median seconds per step of each method (and of centered EP at each K, "K=k"), the steps
    interleaved round by round on one batch (lr 0), so that load from other processes hits
    every one alike."""
    x, y = next(iter(loaders.train))
    learners = {}
    cells = {m: METHODS[m] for m in methods}
    cells.update({f"K={k}": ("ep", {"iters": k}) for k in ks if k != args.iters})
    for m, (name, opts) in cells.items():
        net = _net(args, 0)
        opts = {"beta": args.beta, "iters": args.iters, **opts} if name == "ep" else opts
        learners[m] = fpc.make_learner(name, net, loss="mse", optimizer=torch.optim.SGD(net.parameters(), lr=0.0),
                                       **opts)
        learners[m].step(x, y)  # warm-up
    times: dict[str, list[float]] = {m: [] for m in learners}
    for _ in range(rounds):
        for m, learner in learners.items():
            t0 = time.perf_counter()
            learner.step(x, y)
            times[m].append(time.perf_counter() - t0)
    return {m: statistics.median(t) for m, t in times.items()}


def _sync_traces(args, loaders) -> dict[str, list[float]]:
    """F over ``trace_iters`` iterations, synchronous vs even/odd, at initialisation (seed 0)."""
    net = _net(args, 0)
    x, y = next(iter(loaders.train))
    out = {}
    for label, sync in (("even/odd", False), ("synchronous", True)):
        eq = fpc.make_learner("ep", net, loss="mse", beta=args.beta, iters=args.trace_iters,
                              synchronous=sync).infer(x, y, trace=True)
        out[label] = [float(v) for v in eq.trace]
    return out


def _mean_row(cells: list[dict[str, Any]], step: float, bp_step: float | None, per_epoch: int) -> dict[str, Any]:
    """Accuracy over seeds; seconds per epoch from the interleaved median step time."""
    accs = [c["test_acc"] for c in cells]
    return {"label": cells[0]["label"], "accs": accs, "acc_mean": statistics.fmean(accs),
            "acc_spread": (max(accs) - min(accs)) / 2, "sec_per_epoch": step * per_epoch,
            "train_sec_per_epoch": statistics.fmean(c["sec_per_epoch"] for c in cells),
            "ratio_to_bp": step / bp_step if bp_step else None, "diverged": sum(bool(c["diverged_at"]) for c in cells)}


def claims(res: dict[str, Any]) -> list[tuple[str, str, str]]:
    """(claim, verdict, numbers) for the paper's claims, from the measured results."""
    rows = {r["label"]: r for r in res["main"]}
    out = []
    if "centered" in rows and "bp" in rows:
        d = rows["centered"]["acc_mean"] - rows["bp"]["acc_mean"]
        noise = max(rows["centered"]["acc_spread"], rows["bp"]["acc_spread"])
        out.append(("centered EP within 0.5 pp of BP", "confirmed" if abs(d) <= 0.5 else "refuted",
                    f"Δ = {d:+.2f} pp (seed half-range up to {noise:.2f} pp)"))
        r = rows["centered"]["ratio_to_bp"]
        out.append((f"cost ≤ 6× BP per epoch at K = {res['settings']['iters']}",
                    "confirmed" if r is not None and r <= 6 else "refuted", f"{r:.2f}× bp"))
    for key, name, cond in (("beta", "0.0002 ≤ β ≤ 0.1", lambda v: 0.0002 <= v <= 0.1),
                            ("iters", "K ≥ 4", lambda v: v >= 4)):
        sweep = [c for c in res[key] if cond(c["value"])]
        if len(sweep) >= 2:
            accs = [c["test_acc"] for c in sweep]
            spread = max(accs) - min(accs)
            noise = 2 * max((r["acc_spread"] for r in res["main"]), default=0.0)
            verdict = "confirmed" if spread <= max(1.0, noise) else "refuted"
            out.append((f"results barely change for {name}", verdict,
                        (f"accuracy {min(accs):.2f}–{max(accs):.2f} % (range {spread:.2f} pp; "
                        f"threshold max(1 pp, 2 × seed half-range) = {max(1.0, noise):.2f} pp)")))
    if res.get("sync"):
        s = res["sync"]
        tr = res["sync_trace"]
        grew = tr["synchronous"][-1] / min(tr["synchronous"])
        steady = tr["even/odd"][-1] / min(tr["even/odd"])
        # the equilibration diverges: F ends an order of magnitude above its minimum
        div = bool(s["diverged_at"]) or (grew > 10 and steady < 1.01)
        main = {r["label"]: r["acc_mean"] for r in res["main"]}
        trained = (f"training at K = {res['settings']['iters']}: diverged at step {s['diverged_at']}"
                   if s["diverged_at"] else f"training at K = {res['settings']['iters']} did not blow up: "
                   f"{s['test_acc']:.2f} % vs {main.get('centered', float('nan')):.2f} % even/odd")
        out.append(("synchronous updates diverge", "confirmed" if div else "refuted",
                    (f"F after {len(tr['synchronous']) - 1} iterations at init: ×{grew:.3g} its minimum "
                    f"(synchronous) vs ×{steady:.3g} (even/odd); {trained}")))
    return out


def _plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    seed = res["settings"]["seeds"][0]  # the sweeps ran with the first seed: bp's of that seed
    bp = [c["test_acc"] for c in res["cells"] if c["label"] == "bp" and c["seed"] == seed]
    for ax, key, xlabel, logx in ((axes[0], "beta", "β", True), (axes[1], "iters", "K (iterations)", False)):
        cells = sorted(res[key], key=lambda c: c["value"])
        ax.plot([c["value"] for c in cells], [c["test_acc"] for c in cells], "o-", label="centered EP")
        if bp:
            ax.axhline(bp[0], color="k", ls="--", lw=1, label="bp")
        ax.set_xscale("log" if logx else "linear")
        if logx:  # a ±1 pp window: the sweep's spread at its own scale
            mid = (max(c["test_acc"] for c in cells) + min(c["test_acc"] for c in cells)) / 2
            ax.set_ylim(mid - 1.5, mid + 1.5)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("test accuracy %")
        ax.legend()
    ax = axes[2]
    for label, tr in res.get("sync_trace", {}).items():
        ax.semilogy([abs(v) for v in tr], label=label)
    ax.set_xlabel("iteration")
    ax.set_ylabel("F (batch sum)")
    ax.set_title("mod-PGD at initialisation")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    if args.quick:
        _quick(args)
    with flush_denormals():
        return _run(args)


def _run(args: argparse.Namespace) -> int:
    out, command = begin(args, "ep")
    started = time.time()
    settings = {k: getattr(args, k) for k in ("width_mult", "train_subset", "test_subset", "batch_size", "epochs",
                                              "lr", "weight_decay", "beta", "iters", "seeds", "threads")}
    res: dict[str, Any] = {"command": command, "settings": settings, "cells": [], "beta": [], "iters": []}
    print(f"fastpc bench ep: VGG-5 x{args.width_mult} on {args.train_subset} Fashion-MNIST examples, "
          f"{args.epochs} epochs, batch {args.batch_size}", flush=True)
    loaders0 = None
    for seed in args.seeds:
        loaders = _loaders(args, seed)
        loaders0 = loaders0 or loaders
        for m in args.methods:
            name, opts = METHODS[m]
            res["cells"].append(train_cell(args, loaders, m, name, opts, seed))
    res["steps_per_epoch"] = len(loaders0.train)
    res["step_s"] = _interleaved_times(args, loaders0, args.methods, args.ks, args.timing_rounds)
    bp_step = res["step_s"].get("bp")
    res["main"] = [_mean_row([c for c in res["cells"] if c["label"] == m], res["step_s"][m], bp_step,
                             len(loaders0.train)) for m in args.methods]
    seed = args.seeds[0]
    base = {c["label"]: c for c in res["cells"] if c["seed"] == seed}
    for key, values, field in (("beta", args.betas, "beta"), ("iters", args.ks, "iters")):
        for v in values:
            if v == getattr(args, field) and "centered" in base:
                cell = dict(base["centered"])
            else:
                cell = train_cell(args, loaders0, f"centered {field}={v:g}", "ep", {field: v}, seed)
            cell["value"] = v
            res[key].append(cell)
    if not args.no_sync:
        res["sync"] = train_cell(args, loaders0, "synchronous", "ep", {"synchronous": True}, seed)
        res["sync_trace"] = _sync_traces(args, loaders0)
    x, _ = next(iter(loaders0.train))
    if "centered" in base and base["centered"]["step_flops"]:
        ep_f, bp_f = base["centered"]["step_flops"], _bp_flops(_net(args, seed), x)
        ep_t, bp_t = res["step_s"]["centered"], res["step_s"].get("bp")
        res["flops"] = {"centered_step": ep_f, "bp_step": bp_f, "flop_ratio": ep_f / bp_f,
                        "time_ratio": None if bp_t is None else ep_t / bp_t,
                        "time_per_flop_ratio": None if bp_t is None else (ep_t / ep_f) / (bp_t / bp_f)}
    res["claims"] = claims(res)
    res["seconds"] = time.time() - started
    (out / "ep.json").write_text(json.dumps(res, indent=1, default=str))
    _plot(res, out / "ep.png")
    (out / "ep.md").write_text(_markdown(res))
    print(_markdown(res), flush=True)
    return 0


def _markdown(res: dict[str, Any]) -> str:
    s = res["settings"]
    lines = ["# fastpc bench ep: equilibrium propagation on VGG-5 (PAPERS.md §5)", "",
             f"Command: `{res['command']}`", "",
             (f"VGG-5 ×{s['width_mult']} (conv → max-pool → ReLU, torch's default Kaiming-uniform init), Fashion-MNIST first "
             f"{s['train_subset']} training examples, test {'all' if not s['test_subset'] else s['test_subset']}; "
             f"MSE, batch {s['batch_size']}, {s['epochs']} epochs, SGD Nesterov 0.9, lr {s['lr']} cosine, wd "
             f"{s['weight_decay']}; EP: mod-PGD, even/odd sweeps, β = {s['beta']}, K = {s['iters']}; "
             f"{s['threads']} threads; {res['seconds']:.0f} s in all."), "",
             "## Claims", "", "| claim | verdict | numbers |", "|---|---|---|"]
    lines += [f"| {c} | {v} | {n} |" for c, v, n in res["claims"]]
    lines += ["", "## Estimators vs bp", "",
              ("s / epoch: median step time of the interleaved timing rounds × steps per epoch (the "
              "training loop's own median in brackets; other processes share these 2 cores)."), "",
              "| method | test acc % (mean ± half-range) | per seed | s / epoch | × bp | Δ vs bp (pp) |",
              "|---|---:|---|---:|---:|---:|"]
    bp = {r["label"]: r for r in res["main"]}.get("bp")
    for r in res["main"]:
        ratio = "" if r["ratio_to_bp"] is None else f"{r['ratio_to_bp']:.2f}"
        delta = "" if bp is None or r["label"] == "bp" else f"{r['acc_mean'] - bp['acc_mean']:+.2f}"
        div = f" ({r['diverged']} diverged)" if r["diverged"] else ""
        lines.append(f"| {r['label']} | {r['acc_mean']:.2f} ± {r['acc_spread']:.2f}{div} | "
                     f"{', '.join(f'{a:.2f}' for a in r['accs'])} | {r['sec_per_epoch']:.2f} ({r['train_sec_per_epoch']:.2f}) | "
                     f"{ratio} | {delta} |")
    steps, bp_step = res["steps_per_epoch"], res["step_s"].get("bp")
    lines += ["", f"## Centered EP over β (seed {s['seeds'][0]}; the cost does not depend on β)", "",
              "| β | test acc % | diverged |", "|---:|---:|---|"]
    lines += [f"| {c['value']:g} | {c['test_acc']:.2f} | {c['diverged_at'] or ''} |"
              for c in sorted(res["beta"], key=lambda c: c["value"])]
    lines += ["", f"## Centered EP over K (seed {s['seeds'][0]}; s / epoch from the interleaved timing)", "",
              "| K | test acc % | s / epoch | × bp | diverged |", "|---:|---:|---:|---:|---|"]
    for c in sorted(res["iters"], key=lambda c: c["value"]):
        t = res["step_s"].get("centered" if c["value"] == s["iters"] else f"K={c['value']}")
        cost = "|  |  |" if t is None else f"| {t * steps:.2f} | {'' if not bp_step else f'{t / bp_step:.2f}'} |"
        lines.append(f"| {c['value']:g} | {c['test_acc']:.2f} {cost} {c['diverged_at'] or ''} |")
    if res.get("sync"):
        c, tr = res["sync"], res["sync_trace"]
        lines += ["", "## Synchronous mod-PGD", "",
                  (f"Trained: {'diverged at step ' + str(c['diverged_at']) if c['diverged_at'] else 'did not diverge'}, "
                  f"test {c['test_acc']:.2f} %. F on one batch at initialisation (β = {s['beta']}), "
                  "iterations 0, 1, 2, 5, 10, …, last:"), ""]
        for label, t in tr.items():
            idx = sorted({i for i in (0, 1, 2, 5, 10, 20, len(t) - 1) if i < len(t)})
            lines.append(f"- {label}: " + ", ".join(f"{t[i]:.3g}" for i in idx))
    if res.get("flops"):
        f = res["flops"]
        tr = "" if f["time_ratio"] is None else (f"; time per step {f['time_ratio']:.2f}× bp, time ÷ FLOP "
                                                 f"{f['time_per_flop_ratio']:.2f}× bp's")
        lines += ["", "## FLOPs of one step", "",
                  (f"Centered EP (FF pass + two phases of K sweeps, skipping unreached layers, + local gradients): "
                  f"{f['centered_step'] / 1e9:.3f} GFLOP; bp: {f['bp_step'] / 1e9:.3f} GFLOP "
                  f"({f['flop_ratio']:.2f}×){tr}.")]
    return "\n".join(lines) + "\n"
