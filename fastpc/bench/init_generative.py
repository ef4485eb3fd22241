"""The generative half of ``fastpc bench init`` (PAPERS.md §3): how many inference iterations a
generative PCN needs to reconstruct held-out images from each latent initializer.

Per initializer (zeros, normal, memory, amortized) and seed: a generative sPC net (latent 32 →
128 → 256 → 784, GELU, orthogonal init) trains on Fashion-MNIST for ``steps`` batches of 64
(T = 20 inference steps of λ = 0.05 under the safeguard line search, which shrinks the step
where the generator's curvature has outgrown it; prior weight 1, AdamW 1e-3), the initializer learning
alongside (memory: written with the converged latents; amortized: its recognition net trained
by its delta rule). Then, on held-out test images, inference runs ``eval_iters`` iterations from
the initializer's latent, recording at every iteration

- the reconstruction error ½‖ŷ − y‖² per image, ŷ the output the states predict (the energy's
  output term; what ``fastpc train`` reports in generative mode), and
- the latent's own reconstruction ½‖g(s_0) − y‖², g the generator's FF pass from s_0.

The fixed error to reach is what zeros attains after the training budget (T = 20 iterations);
each initializer's iterations to reach it are reported. For amortized, its autoencoder
consistency ‖f_l(g_l(s)) − s‖ per layer (:meth:`fastpc.init_latent.AmortizedInit.consistency`)
on the converged states of a held-out batch, over training.

``run_part(args)`` serves ``fastpc bench init --part generative``; ``args.quick`` shrinks it to
a smoke run. Settings can be overridden with ``gen_<name>`` attributes on ``args``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import torch

import fastpc as fpc
from fastpc import plots

__all__ = ["INITS", "SETTINGS", "QUICK", "settings", "train_and_measure", "run_part"]

INITS = ("zeros", "normal", "memory", "amortized")
SETTINGS: dict[str, Any] = {"latent": 32, "widths": [128, 256], "act": "gelu", "iters": 20, "state_lr": 0.05,
                            "safeguard": True, "prior": 1.0, "lr": 1e-3, "batch_size": 64, "steps": 300, "eval_iters": 100,
                            "test": 1000, "record_every": 50, "memory_capacity": 1024, "memory_beta": 20.0,
                            "amortized_lr": 1e-3}
QUICK: dict[str, Any] = {"steps": 40, "eval_iters": 30, "test": 200, "record_every": 20}
MARKS = (0, 1, 2, 5, 10, 20, 50, 100)  # iterations shown in the table


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """The part's settings: :data:`SETTINGS`, :data:`QUICK` with ``args.quick``, then any
    ``args.gen_<name>``."""
    s = {**SETTINGS, **(QUICK if getattr(args, "quick", False) else {})}
    for k in s:
        if getattr(args, f"gen_{k}", None) is not None:
            s[k] = getattr(args, f"gen_{k}")
    return s


def _init_options(init: str, s: dict[str, Any]) -> dict[str, Any]:
    if init == "memory":
        return {"capacity": s["memory_capacity"], "beta": s["memory_beta"]}
    return {"lr": s["amortized_lr"]} if init == "amortized" else {}


def train_and_measure(init: str, seed: int, loaders, s: dict[str, Any]) -> dict[str, Any]:
    """Train one generator with ``init`` alongside, then trace inference on the test images."""
    torch.manual_seed(seed)
    pixels = loaders.train.x[0].numel()
    net = fpc.mlp([s["latent"], *s["widths"], pixels], act=s["act"])
    learner = fpc.make_learner("spc", net, loss="mse", iters=s["iters"], state_lr=s["state_lr"], prior=s["prior"],
                               safeguard=s["safeguard"], init=init, init_options=_init_options(init, s),
                               optimizer=torch.optim.AdamW(net.parameters(), lr=s["lr"]))
    test = loaders.test.x[: s["test"]].flatten(1)
    probe = test[:256]
    consistency, t0, step = [], time.perf_counter(), 0
    while step < s["steps"]:
        for x, _ in loaders.train:
            learner.step(None, x.flatten(1))
            step += 1
            if init == "amortized" and step % s["record_every"] == 0:
                c = learner.init.consistency(net, learner.infer(None, probe).states)
                consistency.append({"step": step, "per_layer": c.tolist()})
            if step == s["steps"]:
                break
    seconds = time.perf_counter() - t0
    learner.iters = s["eval_iters"]
    latent_err: list[float] = []

    def record(t: int, states: list[torch.Tensor]) -> None:
        latent_err.append(0.5 * float((net(states[0]) - test).pow(2).sum()) / test.shape[0])

    with torch.no_grad():
        eq = learner.infer(None, test, trace=True, callback=record)
    recon = (eq.layer_trace[:, -1] / test.shape[0]).tolist()  # the output term ℓ per image, t = 0..T
    return {"init": init, "seed": seed, "recon": recon, "latent_recon": [recon[0], *latent_err],
            "train_seconds": seconds, "consistency": consistency}


def _mean(curves: list[list[float]]) -> list[float]:
    return [sum(c[t] for c in curves) / len(curves) for t in range(len(curves[0]))]


def _reach(curve: list[float], target: float) -> int | None:
    return next((t for t, v in enumerate(curve) if v <= target), None)


def run_part(args: argparse.Namespace) -> tuple[str, dict[str, Any]]:
    """Run the generative part; returns (its markdown section, a json-able dict) and writes
    ``init_generative.png`` under ``args.out``."""
    from fastpc.data import make_loaders

    s = settings(args)
    seeds = list(getattr(args, "seeds", [0]))
    inits = list(getattr(args, "gen_inits", None) or INITS)
    out = Path(getattr(args, "out", "benchmarks/results"))
    out.mkdir(parents=True, exist_ok=True)
    runs = []
    for seed in seeds:
        loaders = make_loaders("fashion-mnist", batch_size=s["batch_size"], seed=seed,
                               root=getattr(args, "data_root", None), eval_batch_size=1000)
        for init in inits:
            r = train_and_measure(init, seed, loaders, s)
            print(f"generative {init} seed {seed}: recon t=0 {r['recon'][0]:.1f}, t={s['iters']} "
                  f"{r['recon'][s['iters']]:.1f}, t={s['eval_iters']} {r['recon'][-1]:.1f} "
                  f"({r['train_seconds']:.0f}s training)", flush=True)
            runs.append(r)
    rows = {}
    for init in inits:
        mine = [r for r in runs if r["init"] == init]
        rows[init] = {"recon": _mean([r["recon"] for r in mine]), "latent_recon": _mean([r["latent_recon"] for r in mine]),
                      "spread": [max(r["recon"][t] for r in mine) - min(r["recon"][t] for r in mine)
                                 for t in range(len(mine[0]["recon"]))]}
    base = "zeros" if "zeros" in rows else inits[0]
    t_fix = min(s["iters"], s["eval_iters"])
    target, latent_target = rows[base]["recon"][t_fix], rows[base]["latent_recon"][t_fix]
    own = {(r["init"], r["seed"]): r for r in runs}
    for init, row in rows.items():
        row["iters_to_target"] = _reach(row["recon"], target)
        row["iters_to_latent_target"] = _reach(row["latent_recon"], latent_target)
        # per seed, against that seed's own baseline
        row["iters_to_target_per_seed"] = [_reach(own[init, sd]["recon"], own[base, sd]["recon"][t_fix])
                                           for sd in seeds]
    cons = [r["consistency"] for r in runs if r["init"] == "amortized" and r["consistency"]]
    consistency = [{"step": c0["step"], "per_layer": _mean([c[k]["per_layer"] for c in cons])}
                   for k, c0 in enumerate(cons[0])] if cons else []
    result = {"settings": s, "seeds": seeds, "inits": inits, "target": target, "latent_target": latent_target,
              "target_from": f"{base} at T={s['iters']}",
              "rows": rows, "consistency": consistency, "runs": runs, "plot": "init_generative.png",
              "command": getattr(args, "command", None)}
    plots.plot_init_generative(result, out / "init_generative.png")
    return _markdown(result), result


def _markdown(r: dict[str, Any]) -> str:
    s, rows = r["settings"], r["rows"]
    marks = [t for t in MARKS if t <= s["eval_iters"]]
    md = ["## Generative: reconstruction against inference iterations", ""]
    if r.get("command"):
        md += [f"Command: `{r['command']}`", ""]
    md += [f"Generative sPC {s['latent']}-{'-'.join(map(str, s['widths']))}-784 ({s['act']}) on Fashion-MNIST, "
           f"trained {s['steps']} batches of {s['batch_size']} with each initializer (T = {s['iters']}, "
           f"λ = {s['state_lr']}{' with the safeguard line search' if s['safeguard'] else ''}, prior {s['prior']}, "
           f"AdamW {s['lr']}), seeds {r['seeds']}; tested on "
           f"{s['test']} held-out images. Reconstruction error ½‖ŷ − y‖² per image (standardised pixels; "
           f"predicting 0 scores 392) after t inference iterations, mean over seeds:", "",
           "| init | " + " | ".join(f"t={t}" for t in marks) + f" | iters to ≤ {r['target']:.1f} (per seed) | "
           f"½‖g(s_0) − y‖² at t=0 / {s['eval_iters']} | iters to ½‖g(s_0) − y‖² ≤ {r['latent_target']:.1f} |",
           "|---|" + "---:|" * (len(marks) + 3)]

    def reach(t: int | None) -> str:
        return f"> {s['eval_iters']}" if t is None else str(t)

    for init, row in rows.items():
        md.append(f"| {init} | " + " | ".join(f"{row['recon'][t]:.1f}" for t in marks)
                  + f" | {reach(row['iters_to_target'])} ({', '.join(map(reach, row['iters_to_target_per_seed']))})"
                  f" | {row['latent_recon'][0]:.1f} / {row['latent_recon'][-1]:.1f}"
                  f" | {reach(row['iters_to_latent_target'])} |")
    md += ["", f"The fixed errors are what {r['target_from']} reaches (its training budget), on the mean curves; "
           f"per seed: against that seed's own {r['target_from']}. ŷ is the output the inferred states predict; "
           "g(s_0) is the generator's FF pass from the inferred latent alone. Each initializer trains its own "
           "generator, so a curve shows the pair (generator, initializer) a run with that init ends with.", ""]
    if r["consistency"]:
        L = len(r["consistency"][0]["per_layer"])
        md += ["Amortized init, autoencoder consistency ‖f_l(g_l(s_{l−1})) − s_{l−1}‖ (batch mean) on the converged "
               "states of 256 held-out images, over training:", "",
               "| step | " + " | ".join(f"layer {l}" for l in range(1, L + 1)) + " |", "|---:|" + "---:|" * L]
        md += [f"| {c['step']} | " + " | ".join(f"{v:.3f}" for v in c["per_layer"]) + " |" for c in r["consistency"]]
        md.append("")
    md += [f"![init_generative]({r['plot']})", ""]
    return "\n".join(md)
