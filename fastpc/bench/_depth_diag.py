"""Diagnostic pictures of ``fastpc bench depth`` (PAPERS.md §1–2), at the diagnostic depth:

- ``depth_energy_heatmap.png``: per-layer energy over inference iterations, spc | epc, on a
  freshly initialised GELU MLP and one Fashion-MNIST batch (the signal-decay picture);
- ``depth_alignment.png``: per-block cosine / norm ratio of each learner's update with BP;
- ``depth_iters_vs_depth.png``: iterations to the exact equilibrium of linear MLPs (MSE);
- ``depth_accuracy.png``: test accuracy versus depth (from the sweep's rows).
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import torch

import fastpc as fpc
from fastpc import diagnostics as D


def write(out: Path, args: argparse.Namespace, loaders, variants: dict, rows=None) -> tuple[str, list[Path]]:
    """``variants``: the depth suite's learner variants by name."""
    plots = D.plots_module()
    depth = args.diag_depth or max(args.depths)
    x, y = next(iter(loaders.test))
    x, y = x[:64], y[:64]
    torch.manual_seed(0)
    net = fpc.mlp([math.prod(loaders.info.in_shape)] + [args.width] * (depth - 1) + [loaders.info.num_classes])
    T = 2 * depth
    heat = {"spc": {"state_lr": 0.1}, "epc": {"state_lr": 0.05, "safeguard": False}}
    maps = [D.energy_map(fpc.make_learner(n, net, iters=T, **o), x, y) for n, o in heat.items()]
    pngs = [out / "depth_energy_heatmap.png"]
    plots.plot_energy_heatmaps(maps, pngs[-1])
    aligns = [D.alignment(fpc.make_learner(variants[v].learner, net, **variants[v].options), x, y)
              for v in args.learners if variants[v].learner != "bp" and not variants[v].options.get("safeguard")]
    if aligns:
        pngs.append(out / "depth_alignment.png")
        plots.plot_alignment(aligns, pngs[-1])
    depths = [d for d in (2, 4, 8, 12, 16, 20) if d <= max(depth, 4)]
    xs, ys = x[:16].flatten(1)[:, :: (4 if args.quick else 1)], y[:16]
    di = D.iters_vs_depth(depths, xs, ys, width=min(args.width, 32 if args.quick else 128),
                          max_iters=2000 if args.quick else 10000, num_classes=loaders.info.num_classes)
    pngs.append(out / "depth_iters_vs_depth.png")
    plots.plot_iters_vs_depth(di, pngs[-1])
    if rows:
        pngs.append(out / "depth_accuracy.png")
        plots.plot_depth_accuracy(rows, pngs[-1])

    md = [f"## Diagnostics (depth {depth}, width {args.width}, fresh orthogonal init, 64 test images)", ""]
    if rows:
        md += ["![accuracy vs depth](depth_accuracy.png)", ""]
    md += [f"Energy per layer over {T} inference iterations: ![heatmap](depth_energy_heatmap.png)", ""]
    for m in maps:
        arr = D.first_arrival(m.energies)
        e = m.energies / m.batch_size
        md.append(f"- {m.learner} (step {m.options['state_lr']}): first non-zero iteration of layers 1..{depth}: "
                  f"{arr}; layer-1 energy per sample after {T} iterations {float(e[-1, 0]):.3g}; "
                  f"energy {float(e[0].sum()):.4g} → {float(e[-1].sum()):.4g}")
    if aligns:
        md += ["", "Alignment of the weight update with the BP gradient, per block (cosine / norm ratio): "
               "![alignment](depth_alignment.png)", "",
               "| block | " + " | ".join(f"{a.learner} η={a.options.get('state_lr')} T={a.options.get('iters')}" for a in aligns) + " |",
               "|---:|" + "---|" * len(aligns)]
        for i in range(depth):
            md.append(f"| {i + 1} | " + " | ".join(a.cell(i) for a in aligns) + " |")
    md += ["", f"Iterations to the exact equilibrium of linear MLPs (width {di.width}, MSE, 16 images, "
               f"‖s − s*‖ ≤ {di.tol}·‖s_FF − s*‖; None: not within {di.max_iters}): "
               "![iterations vs depth](depth_iters_vs_depth.png)", "",
           "| depth | " + " | ".join(f"{k} (step {di.options[k].get('state_lr')})" for k in di.iters) + " |",
           "|---:|" + "---:|" * len(di.iters)]
    for j, d in enumerate(di.depths):
        md.append(f"| {d} | " + " | ".join(str(di.iters[k][j]) for k in di.iters) + " |")
    return "\n".join(md), pngs
