"""Training: ``fit(cfg)`` runs the loop and keeps a run folder; read it top to bottom.

Run folder layout::

    runs/<name>/
      config.yaml          the resolved config (what `--resume` and `fastpc eval` read)
      metrics.csv          one row per epoch: losses, accuracies, energy, seconds
      energy_trace.json    per epoch: energy over inference iterations on a fixed test batch
      summary.json         test_acc, epoch_seconds, learner, config, status, ... (RunSummary)
      checkpoints/last.pt  learner (net + optimizer + init) + RNG + history, written atomically
      plots/curves.png     loss / accuracy per epoch
      plots/energy.png     energy over inference iterations
      tensorboard/         the metrics as TensorBoard event files (train.tensorboard: true)

Building the run's objects from the config is :mod:`fastpc.build`; the result files are
:mod:`fastpc.runfiles`; evaluating and reporting a finished run is :mod:`fastpc.report`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from . import distributed
from . import energy as E
from . import plots, tblog
from .build import (COMPILE_AUTO_STEPS, build_learner, build_net_for, build_optimizer, data_record, lr_factor,
                    make_run_loaders, resolve_compile, resolve_device, restore_learner, seed_everything)
from .config import Config, config_from_dict, config_to_dict, upgrade_stored_config
from .distributed import is_main
from .errors import UserError
from .init_latent import AmortizedInit
from .learners import Learner
from .nets import PCNet, frozen_batchnorm_stats
from .rundir import (CHECKPOINT, CHECKPOINT_FORMAT, RunLock, RunState, check_replaceable, clear_run_dir,
                     inspect_run_dir, load_checkpoint, remove_temporaries, save_checkpoint, save_config, writing)
from .runfiles import RunSummary, check_run_config, read_metrics, results_complete, write_json, write_results
from .runtime import available_cores, flush_denormals, pick_threads

__all__ = ["fit", "evaluate", "energy_trace", "Diverged", "TRACE_BATCH",
           # defined elsewhere, importable from here as before
           "CHECKPOINT", "CHECKPOINT_FORMAT", "COMPILE_AUTO_STEPS", "load_checkpoint", "lr_factor",
           "read_metrics", "resolve_compile", "save_checkpoint"]

TRACE_BATCH = 256


class Diverged(UserError):
    """Training produced a non-finite or exploding loss/energy."""


@torch.no_grad()
def evaluate(net: PCNet, loader, loss: str,
             dtype: torch.dtype = torch.float32) -> tuple[float | None, float | None]:
    """Feedforward prediction over a loader -> (mean loss, accuracy in %); (None, None) when the
    loader holds no examples."""
    was_training = net.training
    net.eval()
    total, correct, n = 0.0, 0, 0
    for x, y in loader:
        if distributed.reducing():  # data parallel: this rank's part of every batch, the sums added after
            part = distributed.part(y.shape[0])
            x, y = x[part], y[part]
            if not len(y):
                continue
        out = net(x.to(dtype))
        total += E.output_cost(out, y, loss).item()
        correct += (out.argmax(1) == y).sum().item()
        n += y.shape[0]
    total, correct, n = distributed.sum_floats([total, correct, n])
    net.train(was_training)
    if n == 0:
        return None, None
    return total / n, 100.0 * correct / n


@torch.no_grad()
def reconstruction_error(learner: Learner, loader, dtype: torch.dtype = torch.float32) -> float | None:
    """Generative mode's test: inference on every batch of images (no weight change, the
    initializer only read) -> the mean ½‖ŷ − y‖² per image at the converged latent; None when
    the loader holds no examples."""
    total, n = 0.0, 0
    with frozen_batchnorm_stats(learner.net), distributed.local():  # every rank alike, on every batch
        for x, _ in loader:
            y = x.to(dtype).flatten(1)
            total += E.output_cost(learner.infer(None, y).output, y, "mse").item()
            n += y.shape[0]
    return total / n if n else None


def generative_figures(learner: Learner, x: torch.Tensor, folder: Path, shape: tuple[int, ...]) -> list[Path]:
    """plots/reconstructions.png (images and their reconstructions after inference) and
    plots/samples.png (the generator's output for latents drawn from N(0, I), seed 0)."""
    x = x[:16]
    with torch.no_grad(), frozen_batchnorm_stats(learner.net), distributed.local():
        recon = learner.infer(None, x.flatten(1)).output
        z = torch.randn(16, learner.latent_size(), generator=torch.Generator().manual_seed(0))
        samples = learner.net(z.to(x))
    rows = {"data": x, "reconstruction": recon, "samples": samples}
    rows = {k: v.detach().cpu().double().numpy().reshape(-1, *shape) for k, v in rows.items()}
    return [plots.plot_images({k: rows[k] for k in ("data", "reconstruction")}, folder / "reconstructions.png"),
            plots.plot_images({"samples": rows["samples"]}, folder / "samples.png")]


def energy_trace(learner: Learner, x: torch.Tensor, y: torch.Tensor) -> dict[str, list]:
    """Traced inference on a fixed batch: energy per example before every iteration and at the end
    (data parallel: rank 0 alone, on the whole batch)."""
    with frozen_batchnorm_stats(learner.net), distributed.local():
        eq = learner.infer(x, y, trace=True)
    B = y.shape[0]
    total = eq.trace if eq.trace is not None else eq.energy[None]
    layers = eq.layer_trace if eq.layer_trace is not None else total[:, None]
    out = {"total": (total / B).tolist(), "layers": (layers / B).tolist()}
    if x is None:  # generative mode: the latent's prior is the first column
        out["prior_first"] = True
    if eq.grad_trace is not None:  # ‖∇E‖ over the inference variables: the distance to equilibrium
        out["grad_norm"] = eq.grad_trace.tolist()
    return out


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
def fit(cfg: Config, resume: bool = False, overwrite: bool = False) -> RunSummary:
    """Train ``cfg`` into its run folder (``cfg.train.out``) and return the summary.

    ``resume=True`` continues the run in ``cfg.train.out`` from ``checkpoints/last.pt`` and ends
    with exactly the weights of an uninterrupted run; a run whose last checkpoint was written
    but whose result files were not gets them written, and a run killed before its first
    checkpoint starts again. Nothing is written before the data, the model and (when resuming)
    the checkpoint and config.yaml have been checked, so bad input leaves the folder as it was;
    the folder is locked against other processes meanwhile (:class:`fastpc.rundir.RunLock`).
    ``train.threads`` and ``train.flush_denormal`` hold for the run; both are restored after.

    Under torchrun (``WORLD_SIZE`` > 1) the processes join a process group for the run (gloo on
    the CPU, nccl on CUDA) and train data-parallel: see :mod:`fastpc.distributed`; rank 0 alone
    writes the run folder.
    """
    before = torch.get_num_threads()
    try:
        distributed.check_batch_size(cfg.data.batch_size)  # before joining: every rank fails alike
        with distributed.process_group(resolve_device(cfg.train.device)):
            return _fit(cfg, resume, overwrite)
    finally:
        torch.set_num_threads(before)


def _fit(cfg: Config, resume: bool, overwrite: bool) -> RunSummary:
    t = cfg.train
    run_dir = Path(t.out) if t.out is not None else distributed.from_main(lambda: _default_out(cfg))
    with distributed.together():
        _check_run_dir(run_dir, resume, overwrite)
    if t.tensorboard and is_main():
        tblog.require()  # before anything is written
    device, dtype = resolve_device(t.device), getattr(torch, t.dtype)
    threads = pick_threads(t.threads)
    if t.threads == "auto" and distributed.launched():  # the node's cores shared by its processes
        threads = max(1, available_cores() // distributed.local_world_size())
    if threads is not None:
        torch.set_num_threads(threads)
    seed_everything(t.seed)

    loaders = make_run_loaders(cfg, device)
    data = data_record(loaders)
    if t.progress and is_main():
        tqdm.write(f"data: {data['name']} from {data['path']} ({data['train_examples']} training, "
                   f"{data['val_examples']} validation, {data['test_examples']} test examples)")
    net = build_net_for(cfg, loaders.info, device, dtype)
    distributed.broadcast_module(net)  # every replica starts from rank 0's weights (as DDP does)
    optimizer = build_optimizer(cfg, net)
    learner = build_learner(cfg, net, optimizer, steps=t.epochs * len(loaders.train))
    history: dict[str, list] = {"metrics": [], "energy": []}
    start_epoch, previous = 0, None
    lock = RunLock(run_dir) if is_main() else contextlib.nullcontext()  # rank 0 alone writes the folder

    try:
        with writing(run_dir), lock, flush_denormals(t.flush_denormal and device.type == "cpu"):
            with distributed.together():  # rank 0's refusal ends every rank
                if is_main():
                    _claim(lock, run_dir, resume, overwrite)
            if resume and distributed.from_main(lambda: (run_dir / CHECKPOINT).is_file()):
                with distributed.together():
                    ckpt = load_checkpoint(run_dir / CHECKPOINT)
                    check_run_config(run_dir, ckpt, run_dir / CHECKPOINT)
                    restore_learner(learner, ckpt, run_dir / CHECKPOINT, cfg)
                start_epoch, history, previous = int(ckpt["epoch"]), ckpt["history"], ckpt.get("config")
                if start_epoch >= t.epochs:
                    trained = config_from_dict(upgrade_stored_config(ckpt["config"]))
                    with distributed.together():
                        return _finish(cfg, trained, run_dir, learner, device, history, data, start_epoch)
                rng = ckpt["rng"]
                ranks = rng.get("ranks") or []  # data parallel: every rank's own generators
                rng = ranks[distributed.rank()] if len(ranks) == distributed.world_size() else rng
                torch.set_rng_state(rng["torch"])
                if device.type == "cuda" and rng.get("cuda"):
                    torch.cuda.set_rng_state_all(rng["cuda"])
            with tblog.epoch_log(run_dir, start_epoch, enabled=t.tensorboard and is_main()) as tb:
                return _train(cfg, run_dir, learner, loaders, data, history, start_epoch, previous, device, dtype, tb)
    except KeyboardInterrupt as e:
        if (run_dir / CHECKPOINT).is_file():
            e.run_dir = run_dir  # type: ignore[attr-defined]  # the CLI names it in its message
        raise


def _claim(lock: RunLock, run_dir: Path, resume: bool, overwrite: bool) -> None:
    """Lock the run folder, drop half-written files, check it again (another process may have
    finished meanwhile) and clear what a fresh start replaces (--overwrite, or a run killed
    before its first checkpoint)."""
    lock.acquire(create=not resume)
    remove_temporaries(run_dir)
    state = _check_run_dir(run_dir, resume, overwrite)
    if state is not RunState.ABSENT and not (resume and (run_dir / CHECKPOINT).is_file()):
        clear_run_dir(run_dir)


def _train(cfg: Config, run_dir: Path, learner: Learner, loaders, data: dict[str, Any],
           history: dict[str, list], start_epoch: int, previous: dict[str, Any] | None,
           device: torch.device, dtype: torch.dtype, tb: tblog.EpochLog | None = None) -> RunSummary:
    """The epochs ``start_epoch`` .. ``train.epochs`` of a locked run folder (each epoch's
    metrics also to ``tb``, TensorBoard, when given)."""
    t = cfg.train
    train_loader, val_loader, test_loader, _ = loaders
    net, optimizer = learner.net, learner.optimizer
    steps_per_epoch = len(train_loader)
    total_steps = t.epochs * steps_per_epoch

    def checkpoint(epoch: int) -> None:
        """The checkpoint, then config.yaml: a kill between them leaves config.yaml at the
        checkpoint's ``previous_config``, which a resume accepts. Data parallel: rank 0 writes
        it, with every rank's RNG state (``rng["ranks"]``)."""
        rng = {"torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state_all() if device.type == "cuda" else []}
        if distributed.active():
            rng["ranks"] = distributed.gather_objects(dict(rng))
        with distributed.together(), writing(run_dir):  # a failed write ends every rank
            if is_main():
                save_checkpoint(run_dir / CHECKPOINT, {
                    "format": CHECKPOINT_FORMAT, "epoch": epoch, "step": epoch * steps_per_epoch,
                    "learner": learner.state_dict(), "config": config_to_dict(cfg), "previous_config": previous,
                    "history": history, "rng": rng})
                save_config(cfg, run_dir / "config.yaml")

    if distributed.from_main(lambda: not (run_dir / CHECKPOINT).is_file()):
        if is_main():
            save_config(cfg, run_dir / "config.yaml")  # a kill before the checkpoint leaves a restartable folder
        checkpoint(0)  # a good checkpoint exists even if the first epoch diverges
    trace_x, trace_y = test_loader.head(TRACE_BATCH)
    trace_x = trace_x.to(dtype)
    gen = cfg.model.mode == "generative"  # images generated from a free latent: learner.step(None, images)
    summary = _summary(cfg, run_dir, learner, device, history, data, status="running")
    if is_main():
        write_json(run_dir / "summary.json", summary.to_json())

    for epoch in range(start_epoch, t.epochs):
        # -- train one epoch
        net.train()
        train_loader.set_epoch(epoch)
        loss_sum = energy_sum = 0.0
        correct = seen = iters_sum = 0
        smm_sum: int | None = 0  # sequential matrix multiplications of this epoch's steps (None: not counted)
        bar = tqdm(train_loader, desc=f"epoch {epoch + 1}/{t.epochs}", disable=not (t.progress and is_main()),
                   dynamic_ncols=True, mininterval=0.5, leave=True)
        t0 = time.perf_counter()
        for i, (x, y) in enumerate(bar):
            step = epoch * steps_per_epoch + i
            lr = cfg.optim.lr * lr_factor(cfg, step, total_steps)
            for g in optimizer.param_groups:
                g["lr"] = lr
            res = learner.step(None, x.to(dtype).flatten(1)) if gen else learner.step(x.to(dtype), y)
            loss, energy = res.loss.item(), res.energy.item()
            B, hits = y.shape[0], 0 if gen else (res.output.argmax(1) == y).sum().item()
            if distributed.reducing():  # data parallel: the global batch's numbers, so every rank stops alike
                loss, energy, B, hits = distributed.sum_floats([loss * B, energy * B, B, hits])
                loss, energy, B, hits = loss / B, energy / B, int(B), int(hits)
            if not (math.isfinite(loss) and math.isfinite(energy) and energy <= t.max_energy):
                bar.close()
                summary = dataclasses.replace(summary, status="diverged",
                                              diverged_at={"epoch": epoch + 1, "step": i + 1})
                if is_main():
                    write_json(run_dir / "summary.json", summary.to_json())
                raise _diverged(cfg, learner, run_dir, history, epoch + 1, i + 1, loss, energy)
            loss_sum, energy_sum, seen = loss_sum + loss * B, energy_sum + energy * B, seen + B
            correct += hits
            iters_sum += res.equilibrium.iters
            smm_sum = None if smm_sum is None or res.smm is None else smm_sum + res.smm
            if i % 10 == 0 or i == steps_per_epoch - 1:
                bar.set_postfix(loss=f"{loss_sum / seen:.4f}", acc=f"{100 * correct / seen:.2f}",
                                energy=f"{energy:.4g}", refresh=False)
        seconds = time.perf_counter() - t0
        bar.close()

        # -- evaluate, trace, record
        t1 = time.perf_counter()
        distributed.broadcast_module(net, buffers_only=True)  # batch-norm statistics: rank 0's (as DDP)
        evaluator = (lambda loader: (reconstruction_error(learner, loader, dtype), None)) if gen else \
            (lambda loader: evaluate(net, loader, cfg.learner.loss, dtype))
        val_loss, val_acc = evaluator(val_loader) if val_loader else (None, None)
        test_loss, test_acc = evaluator(test_loader)
        if len(trace_y) and is_main():
            args = (None, trace_x.flatten(1)) if gen else (trace_x, trace_y)
            history["energy"].append({"epoch": epoch + 1, **energy_trace(learner, *args)})
            if gen and isinstance(learner.init, AmortizedInit) and learner.init.layers is not None:
                with distributed.local():
                    states = learner.infer(*args).states  # autoencoder consistency of the recognition net
                history.setdefault("consistency", []).append(
                    {"epoch": epoch + 1, "per_layer": learner.init.consistency(net, states).tolist()})
        history["metrics"].append({
            "epoch": epoch + 1, "step": (epoch + 1) * steps_per_epoch, "lr": lr,
            "train_loss": loss_sum / seen, "train_acc": None if gen else 100 * correct / seen, "train_energy": energy_sum / seen,
            "val_loss": val_loss, "val_acc": val_acc, "test_loss": test_loss, "test_acc": test_acc,
            "seconds": seconds, "eval_seconds": time.perf_counter() - t1,
            "iters": iters_sum / steps_per_epoch,  # inference iterations run, mean per step (tol may stop early)
            "smm_per_step": None if smm_sum is None else smm_sum / steps_per_epoch,
            "smm_total": None if smm_sum is None else smm_sum + _smm_before(history)})
        last = epoch + 1 == t.epochs
        if last or (t.checkpoint_every and (epoch + 1) % t.checkpoint_every == 0):
            checkpoint(epoch + 1)
        summary = _summary(cfg, run_dir, learner, device, history, data, status="completed" if last else "running")
        with distributed.together(), writing(run_dir):  # rank 0 writes; a failed write ends every rank
            if is_main():
                if gen and last and len(trace_y):
                    generative_figures(learner, trace_x, run_dir / "plots", loaders[3].in_shape)
                write_results(run_dir, history, summary, plot=last)
                if tb is not None:
                    tb.log(history["metrics"][-1])
        if t.progress and is_main():
            test = "no test data" if test_loss is None else f"test reconstruction error {test_loss:.4f}" if gen \
                else f"test_acc {test_acc:.2f}% test_loss {test_loss:.4f}"
            smm = "" if smm_sum is None else f", {smm_sum / steps_per_epoch:.4g} SMM per step"
            tqdm.write(f"epoch {epoch + 1}: {test} ({seconds:.1f}s training{smm})")
    return summary


def _smm_before(history: dict[str, list]) -> int:
    """The SMM total of the epochs already in ``history`` (0 before any, or for rows written
    without a count)."""
    rows = history["metrics"]
    return int(rows[-1].get("smm_total") or 0) if rows else 0


def _finish(cfg: Config, trained: Config, run_dir: Path, learner: Learner, device: torch.device,
            history: dict[str, list], data: dict[str, Any], epochs: int) -> RunSummary:
    """A resume of a run whose checkpoint (written with config ``trained``) holds all
    ``train.epochs``: write the config.yaml and result files a kill right after that checkpoint
    left unwritten, or refuse if they are complete."""
    summary = _summary(trained, run_dir, learner, device, history, data, status="completed")
    if not is_main():  # rank 0 writes (data parallel)
        return summary
    if results_complete(run_dir, epochs):
        raise UserError(f"run {run_dir} already completed {epochs} epoch(s) of train.epochs={cfg.train.epochs}; "
                        f"raise it, e.g. --set train.epochs={epochs + 1}")
    save_config(trained, run_dir / "config.yaml")
    write_results(run_dir, history, summary, plot=True)
    return summary


def _summary(cfg: Config, run_dir: Path, learner: Learner, device: torch.device, history: dict[str, list],
             data: dict[str, Any], status: str) -> RunSummary:
    return RunSummary.from_history(
        history,
        status=status,
        run_dir=str(run_dir),
        learner=cfg.learner.name,
        learner_options=learner.options(),
        compiled_step=bool(getattr(learner, "uses_compiled_step", False)),
        compile_failed=getattr(learner, "compile_failed", None),
        params=sum(p.numel() for p in learner.net.parameters()),
        device=str(device),
        torch=torch.__version__,
        data=data,
        config=config_to_dict(cfg),
        generative=None if cfg.model.mode != "generative" else {
            "recon_error": history["metrics"][-1]["test_loss"] if history["metrics"] else None,
            "consistency": history.get("consistency", [])},
    )
