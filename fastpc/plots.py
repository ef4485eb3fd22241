"""Matplotlib figures (Agg backend, PNG files). One function per figure; each takes plain data
(lists of dicts / floats, as stored in a run folder) and a path, and returns the path written.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
from matplotlib.ticker import MaxNLocator  # noqa: E402

__all__ = ["plot_curves", "plot_energy", "write_run_plots"]


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    try:
        fig.savefig(tmp, dpi=120, bbox_inches="tight")
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)  # a full disk leaves the old figure and no partial one
        raise
    finally:
        plt.close(fig)
    return path


def plot_curves(rows: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Loss and accuracy per epoch (train / val / test), from metrics.csv rows."""
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = [r["epoch"] for r in rows]
    for split, style in (("train", "-o"), ("val", "--s"), ("test", "-^")):
        for ax, metric in ((ax_loss, "loss"), (ax_acc, "acc")):
            vals = [r.get(f"{split}_{metric}") for r in rows]
            if any(v is not None for v in vals):
                ax.plot(epochs, [float("nan") if v is None else v for v in vals], style, label=split, ms=4)
    ax_loss.set(xlabel="epoch", ylabel="loss (feedforward)", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole numbers
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:  # generative runs have no accuracy
            ax.legend()
    return _save(fig, path)


def plot_energy(traces: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Energy per example over inference iterations on a fixed batch: total energy after each
    epoch (left), the per-layer energies after the last epoch (middle) and, where the learner
    traced it, ‖∇E‖ over the inference variables after each epoch: the distance to
    equilibrium (right)."""
    has_grad = any("grad_norm" in tr for tr in traces)
    fig, axes = plt.subplots(1, 3 if has_grad else 2, figsize=(15 if has_grad else 10, 4))
    ax_tot, ax_lay = axes[0], axes[1]
    if has_grad:
        ax_g = axes[2]
        for k, tr in enumerate(traces):
            if "grad_norm" in tr:
                ax_g.semilogy(range(len(tr["grad_norm"])), [max(v, 1e-300) for v in tr["grad_norm"]], "-",
                              color=plt.get_cmap("viridis")(k / max(1, len(traces) - 1)), label=f"epoch {tr['epoch']}")
        ax_g.set(xlabel="inference iteration", ylabel="‖∇E‖ (batch)", title="distance to equilibrium")
        ax_g.grid(alpha=0.3)
        ax_g.legend(fontsize=7)
    cmap = plt.get_cmap("viridis")
    for k, tr in enumerate(traces):
        total = tr["total"]
        ax_tot.plot(range(len(total)), total, "-o", ms=3, color=cmap(k / max(1, len(traces) - 1)),
                    label=f"epoch {tr['epoch']}")
    if traces:
        layers = traces[-1]["layers"]  # (T+1, L)
        n_layers = len(layers[0]) if layers else 0
        for j in range(n_layers):
            prior = bool(traces[-1].get("prior_first"))  # generative mode: ½·prior·‖s_0‖² first
            name = ("output cost" if j == n_layers - 1 else "latent prior" if prior and j == 0
                    else f"layer {j + (0 if prior else 1)} ½‖ε‖²")
            ax_lay.plot(range(len(layers)), [row[j] for row in layers], "-o", ms=3, label=name)
        ax_lay.set_title(f"per layer, epoch {traces[-1]['epoch']}")
    # total energy: linear axis (its range is usually within one decade, where a log axis
    # shows no tick labels); per-layer energies span many decades, with exact zeros: symlog
    ax_lay.set_yscale("symlog", linthresh=1e-6)
    for ax in (ax_tot, ax_lay):
        ax.set(xlabel="inference iteration", ylabel="energy per example")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    ax_tot.set_title("total energy")
    return _save(fig, path)


def write_run_plots(run_dir: str | Path, rows: Sequence[dict[str, Any]],
                    traces: Sequence[dict[str, Any]]) -> list[Path]:
    """The standard plots of a run folder: plots/curves.png and plots/energy.png."""
    plots = Path(run_dir) / "plots"
    out = []
    if rows:
        out.append(plot_curves(rows, plots / "curves.png"))
    if traces:
        out.append(plot_energy(traces, plots / "energy.png"))
    return out


def plot_images(rows: dict[str, Any], path: str | Path) -> Path:
    """Image rows, one per entry of ``rows`` (name → array (n, C, H, W), C = 1 grey or 3 RGB),
    n images side by side (generative mode: data / reconstructions, samples)."""
    import numpy as np
    n = max(len(v) for v in rows.values())
    fig, axes = plt.subplots(len(rows), n, figsize=(0.9 * n, 1.0 * len(rows) + 0.2), squeeze=False)
    for r, (name, imgs) in enumerate(rows.items()):
        for c in range(n):
            ax = axes[r][c]
            ax.axis("off")
            if c < len(imgs):
                img = np.asarray(imgs[c], dtype=float)
                img = img[0] if img.shape[0] == 1 else img.transpose(1, 2, 0).clip(0, 1)
                ax.imshow(img, cmap="gray" if img.ndim == 2 else None)
        axes[r][0].set_title(name, fontsize=8, loc="left")
    return _save(fig, path)


def plot_init_generative(result: dict[str, Any], path: str | Path) -> Path:
    """``fastpc bench init --part generative``: reconstruction error of the states' prediction
    and of the latent alone against inference iterations, one line per initializer (mean over
    seeds, the fixed error dashed), and the amortized init's consistency per layer over training."""
    panels = 3 if result["consistency"] else 2
    fig, axes = plt.subplots(1, panels, figsize=(4.6 * panels, 3.8), constrained_layout=True)
    for key, ax, title in (("recon", axes[0], "½‖ŷ − y‖²: states' prediction"),
                           ("latent_recon", axes[1], "½‖g(s_0) − y‖²: latent alone")):
        for init, row in result["rows"].items():
            ax.plot(range(len(row[key])), row[key], label=init)
        ax.set(xlabel="inference iteration", ylabel="per image (test)", title=title, yscale="log")
        ax.grid(alpha=0.3)
    axes[0].axhline(result["target"], color="grey", ls="--", lw=0.8, label=f"fixed error ({result['target_from']})")
    axes[0].legend(fontsize=7)
    if result["consistency"]:
        steps = [c["step"] for c in result["consistency"]]
        for layer in range(len(result["consistency"][0]["per_layer"])):
            axes[2].plot(steps, [c["per_layer"][layer] for c in result["consistency"]], marker="o", ms=3,
                         label=f"layer {layer + 1}")
        axes[2].set(xlabel="training step", ylabel="‖f_l(g_l(s)) − s‖", title="amortized: consistency", yscale="log")
        axes[2].grid(alpha=0.3)
        axes[2].legend(fontsize=7)
    return _save(fig, path)


__all__ += ["plot_images", "plot_init_generative"]


# ---- diagnostics (fastpc.diagnostics): signal decay, alignment with BP, iterations vs depth ----
def plot_energy_heatmaps(maps, path, floor: float = 1e-30):
    """Per-layer energy over inference iterations (log10 colour scale), one panel per
    :class:`fastpc.diagnostics.EnergyMap`, side by side. Rows: layers 1 (bottom) .. L (output
    cost, top); columns: iterations 0 .. T. Exact zeros are drawn at ``floor`` (darkest)."""
    import numpy as np
    vals = [np.log10(np.maximum(m.energies.double().numpy() / max(m.batch_size, 1), floor)) for m in maps]
    finite = np.concatenate([v[np.isfinite(v)].ravel() for v in vals])
    vmax = float(finite.max()) if finite.size else 0.0
    vmin = max(float(finite.min()) if finite.size else -30.0, vmax - 30.0)
    fig, axes = plt.subplots(1, len(maps), figsize=(5.2 * len(maps), 4.2), squeeze=False, constrained_layout=True)
    im = None
    for ax, m, v in zip(axes[0], maps, vals):
        im = ax.imshow(v.T, origin="lower", aspect="auto", cmap="magma", vmin=vmin, vmax=vmax,
                       interpolation="nearest")
        lr = m.options.get("state_lr")
        ax.set_title(f"{m.learner}" + (f" (step {lr:g}" if lr is not None else "") +
                     (", safeguard" if m.options.get("safeguard") else "") + (")" if lr is not None else ""))
        ax.set_xlabel("inference iteration t")
        ax.set_ylabel("layer (1 = bottom, L = output cost)")
        L = v.shape[1]
        ticks = sorted({0, L // 4, L // 2, 3 * L // 4, L - 1})
        ax.set_yticks(ticks, [str(t + 1) for t in ticks])
    fig.colorbar(im, ax=axes[0].tolist(), label="log10 energy per sample (½‖ε_k‖², ℓ)")
    return _save(fig, path)


def plot_alignment(aligns, path):
    """Per-block cosine similarity and norm ratio with the BP gradient, one line per
    :class:`fastpc.diagnostics.Alignment`."""
    import numpy as np
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(10, 3.8), constrained_layout=True)
    for a in aligns:
        L = len(a.cosine)
        xs = np.arange(1, L + 1)
        label = a.learner + "".join(f" {k}={a.options[k]}" for k in ("iters", "state_lr") if k in a.options)
        a1.plot(xs, a.cosine.numpy(), marker="o", ms=3, label=label)
        a2.semilogy(xs, np.maximum(a.norm_ratio.numpy(), 1e-30), marker="o", ms=3, label=label)
    a1.set_ylim(-1.05, 1.05)
    a1.axhline(1.0, color="grey", lw=0.5)
    a1.set_xlabel("block (1 = bottom)")
    a1.set_ylabel("cosine with BP gradient")
    a2.set_xlabel("block (1 = bottom)")
    a2.set_ylabel("‖update‖ / ‖BP gradient‖")
    a1.legend(fontsize=7)
    return _save(fig, path)


def plot_iters_vs_depth(result, path):
    """Iterations to the exact linear equilibrium versus depth (log y), one line per learner of
    a :class:`fastpc.diagnostics.DepthIters`; a hollow marker at ``max_iters`` = not reached."""

    fig, ax = plt.subplots(figsize=(5.5, 3.8), constrained_layout=True)
    for name, its in result.iters.items():
        ok = [(d, i) for d, i in zip(result.depths, its) if i is not None]
        miss = [d for d, i in zip(result.depths, its) if i is None]
        lr = result.options.get(name, {}).get("state_lr")
        line, = ax.plot([d for d, _ in ok], [max(i, 1) for _, i in ok], marker="o",
                        label=f"{name}" + (f" (step {lr:g})" if lr is not None else ""))
        if miss:
            ax.plot(miss, [result.max_iters] * len(miss), marker="o", ls="none", mfc="none", color=line.get_color())
    ax.axhline(result.max_iters, color="grey", lw=0.5, ls="--")
    ax.set_yscale("log")
    ax.set_xlabel("depth L (linear MLP, MSE)")
    ax.set_ylabel(f"iterations to ‖s − s*‖ ≤ {result.tol:g}·‖s_FF − s*‖")
    ax.legend()
    return _save(fig, path)


def plot_depth_accuracy(rows, path):
    """Test accuracy (mean, error bar = half-range over seeds) versus depth, one line per
    learner variant; ``rows`` as from :func:`fastpc.bench.depth.summarize`."""

    fig, ax = plt.subplots(figsize=(5.5, 3.8), constrained_layout=True)
    for var in dict.fromkeys(r["variant"] for r in rows):
        rs = sorted((r for r in rows if r["variant"] == var), key=lambda r: r["depth"])
        ax.errorbar([r["depth"] for r in rs], [r["acc_mean"] for r in rs], yerr=[r["acc_spread"] for r in rs],
                    marker="o", capsize=3, label=var)
    ax.set_xlabel("depth (Linear layers)")
    ax.set_ylabel("test accuracy %")
    ax.legend()
    return _save(fig, path)


__all__ += ["plot_energy_heatmaps", "plot_alignment", "plot_iters_vs_depth", "plot_depth_accuracy"]
