"""A finished (or interrupted) run folder: evaluate its checkpoint, report its results.

    evaluate_run("runs/x")   # {"test_acc": ..., "epoch": ...}: the checkpoint on val/test, writes nothing
    report("runs/x")         # redraw the plots, write diagnostics, return a text table
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from . import plots
from .build import build_learner, build_net_for, data_record, make_run_loaders, resolve_device, restore_learner
from .config import Config, config_to_dict
from .errors import UserError
from .rundir import CHECKPOINT, RunLock, load_checkpoint, remove_temporaries, writing
from .runfiles import (check_run_config, format_test, history_fields, read_json, read_metrics, run_config,
                       write_results)
from .train import evaluate, reconstruction_error

__all__ = ["evaluate_run", "report"]


def _load_run(run_dir: Path, checkpoint: str | Path | None, overrides: list[str] | None):
    """Rebuild a run's config, learner (with its checkpoint) and data loaders."""
    cfg = run_config(run_dir, overrides)
    path = Path(checkpoint) if checkpoint is not None else run_dir / CHECKPOINT
    ckpt = load_checkpoint(path)
    if path == run_dir / CHECKPOINT:
        check_run_config(run_dir, ckpt, path)
    device, dtype = resolve_device(cfg.train.device), getattr(torch, cfg.train.dtype)
    loaders = make_run_loaders(cfg, device)
    net = build_net_for(cfg, loaders.info, device, dtype)
    learner = build_learner(cfg, net, None)
    restore_learner(learner, ckpt, path, cfg)
    return cfg, learner, loaders, path, int(ckpt["epoch"]), dtype


def evaluate_run(run_dir: str | Path, checkpoint: str | Path | None = None,
                 overrides: list[str] | None = None) -> dict[str, Any]:
    """Rebuild a run's model, load its checkpoint and evaluate on val/test. Writes nothing.
    Losses and accuracies of a split without examples are None. A generative run reports the
    reconstruction error after inference (``*_recon_error``; no accuracy)."""
    run_dir = Path(run_dir)
    cfg, learner, loaders, path, epoch, dtype = _load_run(run_dir, checkpoint, overrides)
    out = {"run_dir": str(run_dir), "checkpoint": str(path), "epoch": epoch, "data": data_record(loaders)}
    if cfg.model.mode == "generative":
        for split, loader in (("val", loaders.val), ("test", loaders.test)):
            if loader is not None:
                out[f"{split}_recon_error"] = reconstruction_error(learner, loader, dtype)
        return out
    if loaders.val is not None:
        out["val_loss"], out["val_acc"] = evaluate(learner.net, loaders.val, cfg.learner.loss, dtype)
    out["test_loss"], out["test_acc"] = evaluate(learner.net, loaders.test, cfg.learner.loss, dtype)
    return out


def _complete_results(run_dir: Path, cfg: Config, ckpt: dict[str, Any], rows: list | None,
                      summary: dict | None) -> bool:
    """Write the result files a kill after a checkpoint left behind it (``report``, nobody
    training); True if there was anything to write. A metrics.csv shorter than summary.json
    says is damaged, not behind."""
    history = ckpt["history"]
    done = len(rows or [])
    if len(history["metrics"]) <= done:
        return False
    said = summary.get("epochs_completed") if summary else None
    if isinstance(said, int) and said > done:
        raise UserError(f"{run_dir / 'metrics.csv'} is damaged: it holds {done} epoch(s) but summary.json "
                        f"says {said}; it is written by fastpc train, one row per epoch")
    epochs = len(history["metrics"])
    base = summary or {"run_dir": str(run_dir), "learner": cfg.learner.name, "config": config_to_dict(cfg)}
    status = "completed" if epochs >= cfg.train.epochs else "interrupted"
    write_results(run_dir, history, {**base, **history_fields(history), "status": status}, plot=False)
    return True


def report(run_dir: str | Path, diagnostics: bool = True) -> str:
    """Redraw a run's plots from its files and return a plain-text summary table.

    A run interrupted after a checkpoint first gets the result files that checkpoint's history
    holds (when no process is training it). With ``diagnostics`` also write
    ``run_dir/diagnostics/`` from the last checkpoint on a test batch: per-layer energy heatmaps
    (spc | epc), alignment of the update with BP per block, iterations to the linear equilibrium
    versus depth (MLPs), and ``diagnostics.md``. Damaged result files are refused, and nothing
    is redrawn from them."""
    run_dir = Path(run_dir)
    cfg = run_config(run_dir)
    ckpt = load_checkpoint(run_dir / CHECKPOINT) if (run_dir / CHECKPOINT).is_file() else None
    if ckpt is not None:
        check_run_config(run_dir, ckpt, run_dir / CHECKPOINT)
    metrics_path = run_dir / "metrics.csv"
    rows = read_metrics(metrics_path) if metrics_path.is_file() else None
    summary = read_json(run_dir / "summary.json", dict)
    traces = read_json(run_dir / "energy_trace.json", list)
    with writing(run_dir):
        lock = RunLock(run_dir)
        if ckpt is not None and lock.try_acquire():
            with lock:
                remove_temporaries(run_dir)
                if _complete_results(run_dir, cfg, ckpt, rows, summary):
                    rows = read_metrics(metrics_path)
                    summary = read_json(run_dir / "summary.json", dict)
                    traces = read_json(run_dir / "energy_trace.json", list)
        if rows is None:
            raise UserError(f"run {run_dir} has no metrics.csv yet (no epoch finished)")
        summary = summary or {}
        written = plots.write_run_plots(run_dir, rows, traces or [])
        if diagnostics and ckpt is not None and cfg.model.mode != "generative":  # they need class targets
            from .diagnostics import write_run_diagnostics

            cfg, learner, loaders, _, _, dtype = _load_run(run_dir, None, None)
            x, y = next(iter(loaders.test), None) or next(iter(loaders.train))
            x, y = x[:64].to(dtype), y[:64]
            written += write_run_diagnostics(run_dir, learner, x, y, depth_sweep=cfg.model.arch == "mlp")
    cols = ["epoch", "train_loss", "train_acc", "train_energy", "val_acc", "test_loss", "test_acc", "seconds"]
    lines = [f"run {run_dir}  learner {summary.get('learner')}  status {summary.get('status')}",
             "  ".join(f"{c:>12}" for c in cols)]
    for r in rows:
        lines.append("  ".join(f"{'-' if r.get(c) is None else format(r[c], '.4g'):>12}" for c in cols))
    seconds = [round(s, 1) for s in summary.get("epoch_seconds", []) if isinstance(s, (int, float))]
    lines.append(f"{format_test(cfg.model.mode == 'generative', rows[-1]['test_loss'], rows[-1]['test_acc'])}  "
                 f"training seconds per epoch {seconds}")
    data = summary.get("data")
    if isinstance(data, dict):
        lines.append(f"data: {data.get('name')} from {data.get('path')}")
    lines += [f"plot: {p}" for p in written]
    return "\n".join(lines)
