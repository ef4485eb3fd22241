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
import random
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from . import energy as E
from . import plots
from .config import Config, config_from_dict, config_to_dict, load_config, read_yaml
from .errors import UserError
from .learners import Learner, make_learner
from .nets import PCNet, frozen_batchnorm_stats, mlp, resnet, vgg
from .rundir import (CHECKPOINT, CHECKPOINT_FORMAT, RunLock, RunState, atomic_write_text, check_replaceable,
                     clear_run_dir, inspect_run_dir, load_checkpoint, remove_temporaries, save_checkpoint, save_config,
                     writing)

__all__ = ["fit", "evaluate", "evaluate_run", "report", "build_net", "build_optimizer",
           "build_learner", "resolve_compile", "lr_factor", "save_checkpoint", "load_checkpoint", "Diverged"]

METRIC_FIELDS = ["epoch", "step", "lr", "train_loss", "train_acc", "train_energy", "val_loss", "val_acc",
                 "test_loss", "test_acc", "seconds", "eval_seconds"]
TRACE_BATCH = 256


class Diverged(UserError):
    """Training produced a non-finite or exploding loss/energy."""


# ---- result files -------------------------------------------------------------------------------
def _write_metrics(path: Path, rows: list[dict[str, Any]]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=METRIC_FIELDS, extrasaction="ignore")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r[k]) for k in METRIC_FIELDS})
    atomic_write_text(path, buf.getvalue())


def _metrics_damage(text: str) -> str | None:
    """Why a metrics.csv text is not one fastpc wrote whole, or None."""
    if not text.strip():
        return "it is empty"
    if not text.endswith("\n"):
        return "its last line is cut off"
    reader = csv.DictReader(io.StringIO(text))
    if reader.fieldnames != METRIC_FIELDS:
        return f"its header is {reader.fieldnames}, expected {METRIC_FIELDS}"
    n = 0
    for n, r in enumerate(reader, 1):
        if None in r or any(v is None for v in r.values()):
            return f"row {n} has {len(r) - (None in r)} of {len(METRIC_FIELDS)} columns"
        try:
            values = {k: float(v) for k, v in r.items() if v != ""}
        except ValueError:
            return f"row {n} holds a value that is not a number"
        if values.get("epoch") != n:
            return f"row {n} is epoch {r['epoch']!r}, expected {n}"
    return None if n else "it holds no epoch"


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The rows of a run's metrics.csv; a damaged (empty, truncated, edited) file is a UserError."""
    text = Path(path).read_text()
    why = _metrics_damage(text)
    if why is not None:
        raise UserError(f"{path} is damaged ({why}); it is written by fastpc train, one row per epoch")
    return [{k: (float(v) if v != "" else None) for k, v in r.items()} for r in csv.DictReader(io.StringIO(text))]


def _write_json(path: Path, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")


def _write_results(run_dir: Path, history: dict[str, list], summary: dict[str, Any], plot: bool) -> None:
    """metrics.csv, energy_trace.json, the plots (``plot``), and summary.json last: a summary
    that says ``completed`` means every other file is complete."""
    _write_metrics(run_dir / "metrics.csv", history["metrics"])
    _write_json(run_dir / "energy_trace.json", history["energy"])
    if plot:
        plots.write_run_plots(run_dir, history["metrics"], history["energy"])
    _write_json(run_dir / "summary.json", summary)


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


@contextmanager
def _allocating(what: str):
    """An allocator failure (e.g. ``model.width=1e9``) becomes a UserError naming the knobs."""
    try:
        yield
    except (MemoryError, RuntimeError) as e:
        if not (isinstance(e, MemoryError) or "alloc" in str(e).lower() or "out of memory" in str(e).lower()):
            raise
        first = " ".join(str(e).split())[:200] or type(e).__name__
        raise UserError(f"{what}: not enough memory ({first}); use a smaller model.width, model.widths, "
                        "model.depth or model.width_mult") from None


def build_net(cfg: Config, num_classes: int, in_shape: tuple[int, int, int]) -> PCNet:
    """The PCNet of ``cfg.model``, with input/output sizes from the dataset."""
    m = cfg.model
    c, h, w = in_shape
    try:
        with _allocating("model"):
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


def _net_for(cfg: Config, info, device: torch.device, dtype: torch.dtype) -> PCNet:
    """:func:`build_net` for the dataset ``info``, on ``device`` in ``dtype``."""
    net = build_net(cfg, info.num_classes, info.in_shape)
    with _allocating("model"):
        return net.to(device=device, dtype=dtype)


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
def evaluate(net: PCNet, loader, loss: str,
             dtype: torch.dtype = torch.float32) -> tuple[float | None, float | None]:
    """Feedforward prediction over a loader -> (mean loss, accuracy in %); (None, None) when the
    loader holds no examples."""
    was_training = net.training
    net.eval()
    total, correct, n = 0.0, 0, 0
    for x, y in loader:
        out = net(x.to(dtype))
        total += E.output_cost(out, y, loss).item()
        correct += (out.argmax(1) == y).sum().item()
        n += y.shape[0]
    net.train(was_training)
    if n == 0:
        return None, None
    return total / n, 100.0 * correct / n


def format_acc(acc: float | None) -> str:
    """``87.81%``, or ``no test data`` for a split without examples."""
    return "no test data" if acc is None else f"{acc:.2f}%"


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


def _check_run_dir(run_dir: Path, resume: bool, overwrite: bool) -> RunState:
    """What ``run_dir`` is, refusing what this command may not do with it (writes nothing)."""
    state = inspect_run_dir(run_dir)
    if resume:
        if state is RunState.UNSTARTED or (run_dir / CHECKPOINT).is_file():
            return state  # a run killed before its first checkpoint simply starts again
        raise UserError(f"cannot resume {run_dir}: no checkpoint {run_dir / CHECKPOINT}")
    if state is RunState.FOREIGN:
        raise UserError(f"{run_dir} is a folder that is not a fastpc run (no config.yaml and checkpoint, or "
                        "other files); a run needs a new or empty folder and --overwrite only replaces run "
                        "folders; choose another train.out")
    if state is RunState.RUN and not overwrite:
        raise UserError(f"run folder {run_dir} already exists; pass --resume {run_dir} to continue it, "
                        "--overwrite to replace it, or choose another train.out")
    if state is not RunState.ABSENT:
        check_replaceable(run_dir)
    return state


def _run_config_dict(path: Path) -> dict[str, Any]:
    """A run's config.yaml as a normalised dict; an empty, truncated or invalid file is a UserError."""
    d = read_yaml(path)
    sections = list(config_to_dict(Config()))
    missing = [k for k in sections if not isinstance(d, dict) or k not in d]
    if missing:
        raise UserError(f"{path} is damaged (empty or truncated: no {', '.join(missing)} section); "
                        "fastpc train writes every section; restore it from a copy")
    return config_to_dict(config_from_dict(d))


def _differences(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    return [f"{s}.{k}: {a[s].get(k)!r} vs {b[s].get(k)!r}" for s in a for k in a[s] if a[s].get(k) != b[s].get(k)]


def _check_run_config(run_dir: Path, ckpt: dict[str, Any], path: Path) -> None:
    """A run's config.yaml must be the config its checkpoint ``ckpt`` (from ``path``) was written
    with, or, after a kill between writing the two, the one it replaced."""
    found = _run_config_dict(run_dir / "config.yaml")
    stored = [config_to_dict(config_from_dict(ckpt[k])) for k in ("config", "previous_config") if ckpt.get(k)]
    if stored and found not in stored:
        diff = _differences(found, stored[0])
        raise UserError(f"{run_dir / 'config.yaml'} does not match the config stored in {path} "
                        f"({'; '.join(diff[:3])}{'; ...' if len(diff) > 3 else ''}, config.yaml vs checkpoint); "
                        "it was damaged or edited: restore it, and change settings with --set")


def _results_complete(run_dir: Path, epochs: int) -> bool:
    """summary.json (written last) says the run completed ``epochs`` epochs."""
    try:
        summary = json.loads((run_dir / "summary.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(summary, dict) and summary.get("status") == "completed" \
        and summary.get("epochs_completed") == epochs


def _loaders(cfg: Config, device: torch.device):
    from .data import make_loaders

    d = cfg.data
    return make_loaders(
        d.name, batch_size=d.batch_size, seed=cfg.train.seed, val_split=d.val_split, root=d.root,
        download=d.download, device=device, augment=d.augment, eval_batch_size=d.eval_batch_size,
        image_size=d.image_size)


def _data_record(loaders) -> dict[str, Any]:
    """Which data a run used: dataset, folder, examples per split."""
    train, val, test, info = loaders
    return {"name": info.name, "path": str(info.path), "train_examples": train.num_examples,
            "val_examples": val.num_examples if val is not None else 0, "test_examples": test.num_examples}


def _diverged(cfg: Config, learner: Learner, run_dir: Path, history: dict[str, list], epoch: int, step: int,
              loss: float, energy: float) -> Diverged:
    knobs = [f"learner.state_lr (now {cfg.learner.state_lr:g})"] if "state_lr" in learner.options() else []
    knobs.append(f"optim.lr (now {cfg.optim.lr:g})")
    good = history["metrics"][-1]["epoch"] if history["metrics"] else 0
    return Diverged(
        f"training diverged at epoch {epoch}, step {step} (loss {loss:.4g}, energy per example {energy:.4g}, "
        f"limit train.max_energy={cfg.train.max_energy:g}); try a smaller {' or '.join(knobs)}; "
        f"last good checkpoint: {run_dir / CHECKPOINT} (epoch {good})")


# ---- the loop -----------------------------------------------------------------------------------
def fit(cfg: Config, resume: bool = False, overwrite: bool = False) -> dict[str, Any]:
    """Train ``cfg`` into its run folder (``cfg.train.out``) and return the summary.

    ``resume=True`` continues the run in ``cfg.train.out`` from ``checkpoints/last.pt`` and ends
    with exactly the weights of an uninterrupted run; a run whose last checkpoint was written
    but whose result files were not gets them written, and a run killed before its first
    checkpoint starts again. Nothing is written before the data, the model and (when resuming)
    the checkpoint and config.yaml have been checked, so bad input leaves the folder as it was;
    the folder is locked against other processes meanwhile (:class:`fastpc.rundir.RunLock`).
    """
    t = cfg.train
    run_dir = Path(t.out) if t.out is not None else _default_out(cfg)
    _check_run_dir(run_dir, resume, overwrite)
    device, dtype = resolve_device(t.device), getattr(torch, t.dtype)
    if t.threads is not None:
        torch.set_num_threads(t.threads)
    seed_everything(t.seed)

    loaders = _loaders(cfg, device)
    data = _data_record(loaders)
    if t.progress:
        tqdm.write(f"data: {data['name']} from {data['path']} ({data['train_examples']} training, "
                   f"{data['val_examples']} validation, {data['test_examples']} test examples)")
    net = _net_for(cfg, loaders.info, device, dtype)
    optimizer = build_optimizer(cfg, net)
    learner = build_learner(cfg, net, optimizer, steps=t.epochs * len(loaders.train))
    history: dict[str, list] = {"metrics": [], "energy": []}
    start_epoch, previous = 0, None
    lock = RunLock(run_dir)

    try:
        with writing(run_dir), lock:
            lock.acquire(create=not resume)
            remove_temporaries(run_dir)
            state = _check_run_dir(run_dir, resume, overwrite)  # again: another process may have finished
            if (run_dir / CHECKPOINT).is_file() and resume:
                ckpt = load_checkpoint(run_dir / CHECKPOINT)
                _check_run_config(run_dir, ckpt, run_dir / CHECKPOINT)
                _restore(learner, ckpt, run_dir / CHECKPOINT, cfg)
                start_epoch, history, previous = int(ckpt["epoch"]), ckpt["history"], ckpt.get("config")
                if start_epoch >= t.epochs:
                    return _finish(cfg, config_from_dict(ckpt["config"]), run_dir, learner, device, history,
                                   data, start_epoch)
                torch.set_rng_state(ckpt["rng"]["torch"])
                if device.type == "cuda" and ckpt["rng"].get("cuda"):
                    torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
            elif state is not RunState.ABSENT:
                clear_run_dir(run_dir)  # --overwrite, or a run killed before its first checkpoint
            return _train(cfg, run_dir, learner, loaders, data, history, start_epoch, previous, device, dtype)
    except KeyboardInterrupt as e:
        if (run_dir / CHECKPOINT).is_file():
            e.run_dir = run_dir  # type: ignore[attr-defined]  # the CLI names it in its message
        raise


def _train(cfg: Config, run_dir: Path, learner: Learner, loaders, data: dict[str, Any],
           history: dict[str, list], start_epoch: int, previous: dict[str, Any] | None,
           device: torch.device, dtype: torch.dtype) -> dict[str, Any]:
    """The epochs ``start_epoch`` .. ``train.epochs`` of a locked run folder."""
    t = cfg.train
    train_loader, val_loader, test_loader, _ = loaders
    net, optimizer = learner.net, learner.optimizer
    steps_per_epoch = len(train_loader)
    total_steps = t.epochs * steps_per_epoch

    def checkpoint(epoch: int) -> None:
        """The checkpoint, then config.yaml: a kill between them leaves config.yaml at the
        checkpoint's ``previous_config``, which a resume accepts."""
        rng = {"torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else []}
        save_checkpoint(run_dir / CHECKPOINT, {
            "format": CHECKPOINT_FORMAT, "epoch": epoch, "step": epoch * steps_per_epoch,
            "learner": learner.state_dict(), "config": config_to_dict(cfg), "previous_config": previous,
            "history": history, "rng": rng})
        save_config(cfg, run_dir / "config.yaml")

    if not (run_dir / CHECKPOINT).is_file():
        save_config(cfg, run_dir / "config.yaml")  # a kill before the checkpoint leaves a restartable folder
        checkpoint(0)  # a good checkpoint exists even if the first epoch diverges
    trace_x = test_loader.x[:TRACE_BATCH].to(dtype)
    trace_y = test_loader.y[:TRACE_BATCH]
    summary = _summary(cfg, run_dir, learner, device, history, data, status="running")
    _write_json(run_dir / "summary.json", summary)

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
                raise _diverged(cfg, learner, run_dir, history, epoch + 1, i + 1, loss, energy)
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
        if len(trace_y):
            history["energy"].append({"epoch": epoch + 1, **energy_trace(learner, trace_x, trace_y)})
        history["metrics"].append({
            "epoch": epoch + 1, "step": (epoch + 1) * steps_per_epoch, "lr": lr,
            "train_loss": loss_sum / seen, "train_acc": 100 * correct / seen, "train_energy": energy_sum / seen,
            "val_loss": val_loss, "val_acc": val_acc, "test_loss": test_loss, "test_acc": test_acc,
            "seconds": seconds, "eval_seconds": time.perf_counter() - t1})
        last = epoch + 1 == t.epochs
        if last or (t.checkpoint_every and (epoch + 1) % t.checkpoint_every == 0):
            checkpoint(epoch + 1)
        summary = _summary(cfg, run_dir, learner, device, history, data, status="completed" if last else "running")
        _write_results(run_dir, history, summary, plot=last)
        if t.progress:
            test = "no test data" if test_acc is None else f"test_acc {test_acc:.2f}% test_loss {test_loss:.4f}"
            tqdm.write(f"epoch {epoch + 1}: {test} ({seconds:.1f}s training)")
    return summary


def _finish(cfg: Config, trained: Config, run_dir: Path, learner: Learner, device: torch.device,
            history: dict[str, list], data: dict[str, Any], epochs: int) -> dict[str, Any]:
    """A resume of a run whose checkpoint (written with config ``trained``) holds all
    ``train.epochs``: write the config.yaml and result files a kill right after that checkpoint
    left unwritten, or refuse if they are complete."""
    if _results_complete(run_dir, epochs):
        raise UserError(f"run {run_dir} already completed {epochs} epoch(s) of train.epochs={cfg.train.epochs}; "
                        f"raise it, e.g. --set train.epochs={epochs + 1}")
    save_config(trained, run_dir / "config.yaml")
    summary = _summary(trained, run_dir, learner, device, history, data, status="completed")
    _write_results(run_dir, history, summary, plot=True)
    return summary


def _history_fields(history: dict[str, list]) -> dict[str, Any]:
    """The summary's fields that come from the per-epoch history."""
    rows = history["metrics"]
    lastrow = rows[-1] if rows else {}
    return {
        "epochs_completed": len(rows),
        "test_acc": lastrow.get("test_acc"),
        "test_loss": lastrow.get("test_loss"),
        "val_acc": lastrow.get("val_acc"),
        "train_acc": lastrow.get("train_acc"),
        "train_energy": lastrow.get("train_energy"),
        "epoch_seconds": [r["seconds"] for r in rows],
        "train_seconds": sum(r["seconds"] for r in rows),
    }


def _summary(cfg: Config, run_dir: Path, learner: Learner, device: torch.device, history: dict[str, list],
             data: dict[str, Any], status: str) -> dict[str, Any]:
    return {
        "status": status,
        "run_dir": str(run_dir),
        **_history_fields(history),
        "learner": cfg.learner.name,
        "learner_options": learner.options(),
        "compiled_step": bool(getattr(learner, "uses_compiled_step", False)),
        "compile_failed": getattr(learner, "compile_failed", None),
        "params": sum(p.numel() for p in learner.net.parameters()),
        "device": str(device),
        "torch": torch.__version__,
        "data": data,
        "config": config_to_dict(cfg),
    }


# ---- after training ------------------------------------------------------------------------------
def _restore(learner: Learner, state: dict[str, Any], path: Path, cfg: Config) -> None:
    try:
        learner.load_state_dict(state["learner"])
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        first = " ".join(str(e).split())[:300]
        m = cfg.model
        raise UserError(f"checkpoint {path} does not fit the configured model (model.arch={m.arch}, "
                        f"learner.name={cfg.learner.name}): {first}") from None


def _run_config(run_dir: Path, overrides: list[str] | None = None) -> Config:
    if not run_dir.is_dir():
        raise UserError(f"run folder {run_dir} not found")
    if not (run_dir / "config.yaml").is_file():
        raise UserError(f"{run_dir} is not a fastpc run folder (no config.yaml)")
    return load_config(run_dir / "config.yaml", overrides)


def _load_run(run_dir: Path, checkpoint: str | Path | None, overrides: list[str] | None):
    """Rebuild a run's config, learner (with its checkpoint) and data loaders."""
    cfg = _run_config(run_dir, overrides)
    path = Path(checkpoint) if checkpoint is not None else run_dir / CHECKPOINT
    ckpt = load_checkpoint(path)
    if path == run_dir / CHECKPOINT:
        _check_run_config(run_dir, ckpt, path)
    device, dtype = resolve_device(cfg.train.device), getattr(torch, cfg.train.dtype)
    loaders = _loaders(cfg, device)
    net = _net_for(cfg, loaders.info, device, dtype)
    learner = build_learner(cfg, net, None)
    _restore(learner, ckpt, path, cfg)
    return cfg, learner, loaders, path, int(ckpt["epoch"]), dtype


def evaluate_run(run_dir: str | Path, checkpoint: str | Path | None = None,
                 overrides: list[str] | None = None) -> dict[str, Any]:
    """Rebuild a run's model, load its checkpoint and evaluate on val/test. Writes nothing.
    Losses and accuracies of a split without examples are None."""
    run_dir = Path(run_dir)
    cfg, learner, loaders, path, epoch, dtype = _load_run(run_dir, checkpoint, overrides)
    out = {"run_dir": str(run_dir), "checkpoint": str(path), "epoch": epoch, "data": _data_record(loaders)}
    if loaders.val is not None:
        out["val_loss"], out["val_acc"] = evaluate(learner.net, loaders.val, cfg.learner.loss, dtype)
    out["test_loss"], out["test_acc"] = evaluate(learner.net, loaders.test, cfg.learner.loss, dtype)
    return out


def _read_json(path: Path, kind: type) -> Any:
    """A run's JSON result file, None if absent; unreadable or of another kind is a UserError."""
    if not path.is_file():
        return None
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is damaged ({' '.join(str(e).split())}); it is written by fastpc train") from None
    if not isinstance(value, kind):
        raise UserError(f"{path} is damaged: it holds a {type(value).__name__}, expected a JSON "
                        f"{'object' if kind is dict else 'list'}; it is written by fastpc train")
    return value


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
    _write_results(run_dir, history, {**base, **_history_fields(history), "status": status}, plot=False)
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
    cfg = _run_config(run_dir)
    ckpt = load_checkpoint(run_dir / CHECKPOINT) if (run_dir / CHECKPOINT).is_file() else None
    if ckpt is not None:
        _check_run_config(run_dir, ckpt, run_dir / CHECKPOINT)
    metrics_path = run_dir / "metrics.csv"
    rows = read_metrics(metrics_path) if metrics_path.is_file() else None
    summary = _read_json(run_dir / "summary.json", dict)
    traces = _read_json(run_dir / "energy_trace.json", list)
    with writing(run_dir):
        lock = RunLock(run_dir)
        if ckpt is not None and lock.try_acquire():
            with lock:
                remove_temporaries(run_dir)
                if _complete_results(run_dir, cfg, ckpt, rows, summary):
                    rows = read_metrics(metrics_path)
                    summary = _read_json(run_dir / "summary.json", dict)
                    traces = _read_json(run_dir / "energy_trace.json", list)
        if rows is None:
            raise UserError(f"run {run_dir} has no metrics.csv yet (no epoch finished)")
        summary = summary or {}
        written = plots.write_run_plots(run_dir, rows, traces or [])
        if diagnostics and ckpt is not None:
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
    lines.append(f"test_acc {format_acc(rows[-1]['test_acc'])}  training seconds per epoch {seconds}")
    data = summary.get("data")
    if isinstance(data, dict):
        lines.append(f"data: {data.get('name')} from {data.get('path')}")
    lines += [f"plot: {p}" for p in written]
    return "\n".join(lines)
