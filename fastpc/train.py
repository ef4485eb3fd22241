"""Training: build everything from a :class:`Config`, run the loop, keep a run folder.

Run folder layout::

    runs/<name>/
      config.yaml          the resolved config (what `--resume` and `fastpc eval` read)
      metrics.csv          one row per epoch: losses, accuracies, energy, seconds
      energy_trace.json    per epoch: energy over inference iterations on a fixed test batch
      summary.json         test_acc, epoch_seconds, learner, config, status, ...
      checkpoints/last.pt  learner (net + optimizer + init) + RNG + history, written atomically
      plots/curves.png     loss / accuracy per epoch
      plots/energy.png     energy over inference iterations

``fit(cfg)`` is the whole loop; read it top to bottom.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from . import energy as E
from . import plots
from .config import Config, config_to_dict, load_config, save_config
from .errors import UserError
from .learners import Learner, make_learner
from .nets import PCNet, frozen_batchnorm_stats, mlp, resnet, vgg

__all__ = ["fit", "evaluate", "evaluate_run", "report", "build_net", "build_optimizer",
           "build_learner", "resolve_compile", "lr_factor", "save_checkpoint", "load_checkpoint", "Diverged"]

CHECKPOINT = Path("checkpoints") / "last.pt"
CHECKPOINT_FORMAT = "fastpc-checkpoint-1"
METRIC_FIELDS = ["epoch", "step", "lr", "train_loss", "train_acc", "train_energy", "val_loss", "val_acc",
                 "test_loss", "test_acc", "seconds", "eval_seconds"]
TRACE_BATCH = 256


class Diverged(UserError):
    """Training produced a non-finite or exploding loss/energy."""


# ---- files --------------------------------------------------------------------------------------
def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: Path, text: str) -> None:
    """Write a text file via a temporary file + rename: readers see the old or the new file."""
    _atomic_write(Path(path), lambda f: f.write(text.encode()))


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """``torch.save`` atomically (temporary file + rename)."""
    _atomic_write(Path(path), lambda f: torch.save(state, f))


def load_checkpoint(path: Path) -> dict[str, Any]:
    """Load a fastpc checkpoint safely (``weights_only=True``: tensors and plain containers only)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle with code, not a torch file, ...
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"checkpoint {path} is unreadable or unsafe ({msg[:200]}); "
                        "expected a checkpoint written by fastpc train") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise UserError(f"{path} is not a fastpc checkpoint (format {CHECKPOINT_FORMAT})")
    return state


def _restore(learner: Learner, state: dict[str, Any], path: Path, cfg: Config) -> None:
    try:
        learner.load_state_dict(state["learner"])
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        first = " ".join(str(e).split())[:300]
        m = cfg.model
        raise UserError(f"checkpoint {path} does not fit the configured model (model.arch={m.arch}, "
                        f"learner.name={cfg.learner.name}): {first}") from None


def _write_metrics(path: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=METRIC_FIELDS, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r[k]) for k in METRIC_FIELDS})
    atomic_write_text(path, buf.getvalue())


def read_metrics(path: Path) -> list[dict[str, Any]]:
    with open(path, newline="") as f:
        return [{k: (float(v) if v not in ("", None) else None) for k, v in r.items()} for r in csv.DictReader(f)]


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


# ---- building blocks ----------------------------------------------------------------------------
def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"train.device={name} but CUDA is not available; use train.device=cpu or auto")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("train.device=mps but MPS is not available; use train.device=cpu or auto")
    return torch.device(name)


def build_net(cfg: Config, num_classes: int, in_shape: tuple[int, int, int]) -> PCNet:
    """The PCNet of ``cfg.model``, with input/output sizes from the dataset."""
    m = cfg.model
    c, h, w = in_shape
    try:
        if m.arch == "mlp":
            hidden = list(m.widths) if m.widths is not None else [m.width] * (m.depth - 1)
            return mlp([c * h * w, *hidden, num_classes], act=m.act, init=m.init)
        if m.arch == "vgg":
            return vgg(m.name, in_channels=c, num_classes=num_classes, image_size=h,
                       width_mult=m.width_mult, act=m.act, init=m.init)
        return resnet(m.name or "resnet18", in_channels=c, num_classes=num_classes, image_size=h,
                      width_mult=m.width_mult)
    except (ValueError, TypeError) as e:
        raise UserError(f"model: {e}") from None


def build_optimizer(cfg: Config, net: PCNet) -> torch.optim.Optimizer:
    o = cfg.optim
    if o.name == "sgd":
        return torch.optim.SGD(net.parameters(), lr=o.lr, momentum=o.momentum, nesterov=o.nesterov,
                               weight_decay=o.weight_decay)
    cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
    try:  # one fused kernel per step (~3x less optimizer time than foreach on a small net's CPU step)
        return cls(net.parameters(), lr=o.lr, weight_decay=o.weight_decay, fused=True)
    except (RuntimeError, TypeError, ValueError):  # a device or dtype without the fused kernel
        return cls(net.parameters(), lr=o.lr, weight_decay=o.weight_decay)


COMPILE_AUTO_STEPS = 40_000  # learner.compile=auto: CPU runs at least this long compile their step


def resolve_compile(setting: bool | str, steps: int, device: torch.device) -> bool:
    """``learner.compile``: true/false as given; auto is true for a CPU run of at least
    ``COMPILE_AUTO_STEPS`` training steps when torch.compile can build kernels here (measured
    on a 2-core CPU: the compiled step takes 10-35 % less time; compiling costs 15-160 s, paid back
    after roughly 15-35 thousand steps). Off on CUDA, where it was not measured."""
    if setting != "auto":
        return bool(setting)
    from .fast import compile_unavailable

    return device.type == "cpu" and steps >= COMPILE_AUTO_STEPS and compile_unavailable(device) is None


def build_learner(cfg: Config, net: PCNet, optimizer: torch.optim.Optimizer | None, steps: int = 0) -> Learner:
    """The configured learner; ``steps`` (planned training steps) decides ``learner.compile: auto``."""
    options = cfg.learner.options()
    if "compile" in options:
        device = next(net.parameters()).device
        options["compile"] = resolve_compile(options["compile"], steps, device)
    try:
        return make_learner(cfg.learner.name, net, optimizer=optimizer, **options)
    except (ValueError, TypeError) as e:
        raise UserError(f"learner: {e}") from None


def lr_factor(cfg: Config, step: int, total: int) -> float:
    """Multiplier of ``optim.lr`` at 0-based ``step`` of ``total`` (per-step schedule)."""
    o = cfg.optim
    if o.schedule == "none":
        return 1.0
    warm = int(o.warmup * total) if o.schedule == "warmup_cosine" else 0
    if step < warm:
        return (step + 1) / warm
    progress = (step - warm) / max(1, total - warm)
    return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@torch.no_grad()
def evaluate(net: PCNet, loader, loss: str, dtype: torch.dtype = torch.float32) -> tuple[float, float]:
    """Feedforward prediction over a loader -> (mean loss, accuracy in %)."""
    was_training = net.training
    net.eval()
    total, correct, n = 0.0, 0, 0
    for x, y in loader:
        out = net(x.to(dtype))
        total += E.output_cost(out, y, loss).item()
        correct += (out.argmax(1) == y).sum().item()
        n += y.shape[0]
    net.train(was_training)
    return total / max(n, 1), 100.0 * correct / max(n, 1)


def energy_trace(learner: Learner, x: torch.Tensor, y: torch.Tensor) -> dict[str, list]:
    """Traced inference on a fixed batch: energy per example before every iteration and at the end."""
    with frozen_batchnorm_stats(learner.net):
        eq = learner.infer(x, y, trace=True)
    B = y.shape[0]
    total = eq.trace if eq.trace is not None else eq.energy[None]
    layers = eq.layer_trace if eq.layer_trace is not None else total[:, None]
    return {"total": (total / B).tolist(), "layers": (layers / B).tolist()}


def _default_out(cfg: Config) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = Path("runs") / f"{stamp}-{cfg.learner.name}-{cfg.model.name or cfg.model.arch}"
    out, k = base, 1
    while out.exists():
        out, k = Path(f"{base}-{k}"), k + 1
    return out


def _check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> None:
    if resume:
        if not (run_dir / CHECKPOINT).is_file():
            raise UserError(f"cannot resume {run_dir}: no checkpoint {run_dir / CHECKPOINT}")
    elif run_dir.exists() and (not run_dir.is_dir() or any(run_dir.iterdir())) and not overwrite:
        raise UserError(f"run folder {run_dir} already exists; pass --resume {run_dir} to continue it, "
                        "--overwrite to replace it, or choose another train.out")


# ---- the loop -----------------------------------------------------------------------------------
def fit(cfg: Config, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Train ``cfg`` into its run folder (``cfg.train.out``) and return the summary.

    ``resume=True`` continues the run in ``cfg.train.out`` from ``checkpoints/last.pt`` and ends
    with exactly the weights of an uninterrupted run. Nothing is written before the data, the
    model and (when resuming) the checkpoint have loaded, so bad input damages nothing.
    """
    from .data import make_loaders

    t = cfg.train
    run_dir = Path(t.out) if t.out is not None else _default_out(cfg)
    _check_run_dir(run_dir, resume, overwrite)
    device, dtype = resolve_device(t.device), getattr(torch, t.dtype)
    if t.threads is not None:
        torch.set_num_threads(t.threads)
    seed_everything(t.seed)

    d = cfg.data
    train_loader, val_loader, test_loader, info = make_loaders(
        d.name, batch_size=d.batch_size, seed=t.seed, val_split=d.val_split, root=d.root,
        download=d.download, device=device, augment=d.augment, eval_batch_size=d.eval_batch_size)
    net = build_net(cfg, info.num_classes, info.in_shape).to(device=device, dtype=dtype)
    optimizer = build_optimizer(cfg, net)
    steps_per_epoch = len(train_loader)
    total_steps = t.epochs * steps_per_epoch
    learner = build_learner(cfg, net, optimizer, steps=total_steps)
    history: dict[str, list] = {"metrics": [], "energy": []}
    start_epoch = 0

    if resume:
        ckpt = load_checkpoint(run_dir / CHECKPOINT)
        _restore(learner, ckpt, run_dir / CHECKPOINT, cfg)
        start_epoch, history = int(ckpt["epoch"]), ckpt["history"]
        if start_epoch >= t.epochs:
            raise UserError(f"run {run_dir} already completed {start_epoch} epoch(s) of train.epochs={t.epochs}; "
                            f"raise it, e.g. --set train.epochs={start_epoch + 1}")
        torch.set_rng_state(ckpt["rng"]["torch"])
        if device.type == "cuda" and ckpt["rng"].get("cuda"):
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
    elif run_dir.exists():
        shutil.rmtree(run_dir) if run_dir.is_dir() else run_dir.unlink()  # --overwrite, inputs are valid
    save_config(cfg, run_dir / "config.yaml")

    def checkpoint(epoch: int) -> None:
        rng = {"torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else []}
        save_checkpoint(run_dir / CHECKPOINT, {
            "format": CHECKPOINT_FORMAT, "epoch": epoch, "step": epoch * steps_per_epoch,
            "learner": learner.state_dict(), "config": config_to_dict(cfg), "history": history, "rng": rng})

    if not resume:
        checkpoint(0)  # a good checkpoint exists even if the first epoch diverges
    trace_x = test_loader.x[:TRACE_BATCH].to(dtype)
    trace_y = test_loader.y[:TRACE_BATCH]
    summary = _summary(cfg, run_dir, learner, net, device, history, status="running")

    try:
        for epoch in range(start_epoch, t.epochs):
            # -- train one epoch
            net.train()
            train_loader.set_epoch(epoch)
            loss_sum = energy_sum = 0.0
            correct = seen = 0
            bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{t.epochs}", disable=not t.progress,
                       dynamic_ncols=True, mininterval=0.5, leave=True)
            t0 = time.perf_counter()
            for i, (x, y) in enumerate(bar):
                step = epoch * steps_per_epoch + i
                lr = cfg.optim.lr * lr_factor(cfg, step, total_steps)
                for g in optimizer.param_groups:
                    g["lr"] = lr
                res = learner.step(x.to(dtype), y)
                loss, energy = res.loss.item(), res.energy.item()
                if not (math.isfinite(loss) and math.isfinite(energy) and energy <= t.max_energy):
                    bar.close()
                    summary.update(status="diverged", diverged_at={"epoch": epoch + 1, "step": i + 1})
                    _write_json(run_dir / "summary.json", summary)
                    good = history["metrics"][-1]["epoch"] if history["metrics"] else 0
                    raise Diverged(
                        f"training diverged at epoch {epoch + 1}, step {i + 1} (loss {loss:.4g}, energy per "
                        f"example {energy:.4g}, limit train.max_energy={t.max_energy:g}); try a smaller "
                        f"learner.state_lr (now {cfg.learner.state_lr:g}) or optim.lr (now {cfg.optim.lr:g}); "
                        f"last good checkpoint: {run_dir / CHECKPOINT} (epoch {good})")
                B = y.shape[0]
                loss_sum, energy_sum, seen = loss_sum + loss * B, energy_sum + energy * B, seen + B
                correct += (res.output.argmax(1) == y).sum().item()
                if i % 10 == 0 or i == steps_per_epoch - 1:
                    bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{100 * correct / seen:.2f}",
                                    energy=f"{energy:.4g}", refresh=False)
            seconds = time.perf_counter() - t0
            bar.close()

            # -- evaluate, trace, record
            t1 = time.perf_counter()
            val_loss, val_acc = evaluate(net, val_loader, cfg.learner.loss, dtype) if val_loader else (None, None)
            test_loss, test_acc = evaluate(net, test_loader, cfg.learner.loss, dtype)
            history["energy"].append({"epoch": epoch + 1, **energy_trace(learner, trace_x, trace_y)})
            history["metrics"].append({
                "epoch": epoch + 1, "step": (epoch + 1) * steps_per_epoch, "lr": lr,
                "train_loss": loss_sum / seen, "train_acc": 100 * correct / seen, "train_energy": energy_sum / seen,
                "val_loss": val_loss, "val_acc": val_acc, "test_loss": test_loss, "test_acc": test_acc,
                "seconds": seconds, "eval_seconds": time.perf_counter() - t1})
            last = epoch + 1 == t.epochs
            if last or (t.checkpoint_every and (epoch + 1) % t.checkpoint_every == 0):
                checkpoint(epoch + 1)
            _write_metrics(run_dir / "metrics.csv", history["metrics"])
            _write_json(run_dir / "energy_trace.json", history["energy"])
            summary = _summary(cfg, run_dir, learner, net, device, history, status="completed" if last else "running")
            _write_json(run_dir / "summary.json", summary)
            if t.progress:
                tqdm.write(f"epoch {epoch + 1}: test_acc {test_acc:.2f}% test_loss {test_loss:.4f} "
                           f"({seconds:.1f}s training)")

    except KeyboardInterrupt as e:
        e.run_dir = run_dir  # type: ignore[attr-defined]  # the CLI names it in its message
        raise
    plots.write_run_plots(run_dir, history["metrics"], history["energy"])
    return summary


def _summary(cfg, run_dir, learner, net, device, history, status) -> dict[str, Any]:
    rows = history["metrics"]
    lastrow = rows[-1] if rows else {}
    return {
        "status": status,
        "run_dir": str(run_dir),
        "epochs_completed": len(rows),
        "test_acc": lastrow.get("test_acc"),
        "test_loss": lastrow.get("test_loss"),
        "val_acc": lastrow.get("val_acc"),
        "train_acc": lastrow.get("train_acc"),
        "train_energy": lastrow.get("train_energy"),
        "epoch_seconds": [r["seconds"] for r in rows],
        "train_seconds": sum(r["seconds"] for r in rows),
        "learner": cfg.learner.name,
        "learner_options": learner.options(),
        "compiled_step": bool(getattr(learner, "uses_compiled_step", False)),
        "compile_failed": getattr(learner, "compile_failed", None),
        "params": sum(p.numel() for p in net.parameters()),
        "device": str(device),
        "torch": torch.__version__,
        "config": config_to_dict(cfg),
    }


# ---- after training ------------------------------------------------------------------------------
def _run_config(run_dir: Path, overrides: list[str] | None = None) -> Config:
    if not run_dir.is_dir():
        raise UserError(f"run folder {run_dir} not found")
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir} is not a fastpc run folder (no config.yaml)")
    return load_config(run_dir / "config.yaml", overrides)


def _load_run(run_dir: Path, checkpoint: str | Path | None, overrides: list[str] | None):
    """Rebuild a run's config, learner (with its checkpoint) and data loaders."""
    from .data import make_loaders

    cfg = _run_config(run_dir, overrides)
    path = Path(checkpoint) if checkpoint is not None else run_dir / CHECKPOINT
    ckpt = load_checkpoint(path)
    device, dtype = resolve_device(cfg.train.device), getattr(torch, cfg.train.dtype)
    d = cfg.data
    loaders = make_loaders(
        d.name, batch_size=d.batch_size, seed=cfg.train.seed, val_split=d.val_split, root=d.root,
        download=d.download, device=device, augment=d.augment, eval_batch_size=d.eval_batch_size)
    net = build_net(cfg, loaders.info.num_classes, loaders.info.in_shape).to(device=device, dtype=dtype)
    learner = build_learner(cfg, net, None)
    _restore(learner, ckpt, path, cfg)
    return cfg, learner, loaders, path, int(ckpt["epoch"]), dtype


def evaluate_run(run_dir: str | Path, checkpoint: str | Path | None = None,
                 overrides: list[str] | None = None) -> dict[str, Any]:
    """Rebuild a run's model, load its checkpoint and evaluate on val/test. Writes nothing."""
    run_dir = Path(run_dir)
    cfg, learner, loaders, path, epoch, dtype = _load_run(run_dir, checkpoint, overrides)
    out = {"run_dir": str(run_dir), "checkpoint": str(path), "epoch": epoch}
    if loaders.val is not None:
        out["val_loss"], out["val_acc"] = evaluate(learner.net, loaders.val, cfg.learner.loss, dtype)
    out["test_loss"], out["test_acc"] = evaluate(learner.net, loaders.test, cfg.learner.loss, dtype)
    return out


def report(run_dir: str | Path, diagnostics: bool = True) -> str:
    """Redraw a run's plots from its files and return a plain-text summary table.

    With ``diagnostics`` also write ``run_dir/diagnostics/`` from the last checkpoint on a test
    batch: per-layer energy heatmaps (spc | epc), alignment of the update with BP per block,
    iterations to the linear equilibrium versus depth (MLPs), and ``diagnostics.md``."""
    run_dir = Path(run_dir)
    _run_config(run_dir)
    if not (run_dir / "metrics.csv").is_file():
        raise UserError(f"run {run_dir} has no metrics.csv yet (no epoch finished)")
    try:
        rows = read_metrics(run_dir / "metrics.csv")
        summary = json.loads((run_dir / "summary.json").read_text())
        trace_path = run_dir / "energy_trace.json"
        traces = json.loads(trace_path.read_text()) if trace_path.is_file() else []
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"run {run_dir} has damaged result files ({e})") from None
    written = plots.write_run_plots(run_dir, rows, traces)
    if diagnostics and (run_dir / CHECKPOINT).is_file():
        from .diagnostics import write_run_diagnostics

        cfg, learner, loaders, _, _, dtype = _load_run(run_dir, None, None)
        x, y = next(iter(loaders.test))
        x, y = x[:64].to(dtype), y[:64]
        written += write_run_diagnostics(run_dir, learner, x, y, depth_sweep=cfg.model.arch == "mlp")
    cols = ["epoch", "train_loss", "train_acc", "train_energy", "val_acc", "test_loss", "test_acc", "seconds"]
    lines = [f"run {run_dir}  learner {summary.get('learner')}  status {summary.get('status')}",
             "  ".join(f"{c:>12}" for c in cols)]
    for r in rows:
        lines.append("  ".join(f"{'-' if r.get(c) is None else format(r[c], '.4g'):>12}" for c in cols))
    lines.append(f"test_acc {summary.get('test_acc')}  training seconds per epoch "
                 f"{[round(s, 1) for s in summary.get('epoch_seconds', [])]}")
    lines += [f"plot: {p}" for p in written]
    return "\n".join(lines)
