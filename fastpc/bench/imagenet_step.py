"""``fastpc bench imagenet-step``: one training step and one evaluation of the ImageNet presets at
224 x 224, through the streaming image-folder loader, with the step's time and peak memory.

Each preset (``imagenet-vgg10-ep``, ``imagenet-vgg10-ep-bp``) runs in a fresh process (spawned,
so its peak memory is its own) on an image folder: ``--data-root`` or, by default, one generated
here: ``--classes`` class folders of ImageNet-like JPEGs (smooth random images, 300-500 pixels a
side) with one training image each, and ``--eval-images`` validation images. The process builds
the preset's loaders, net, optimizer and learner exactly as ``fastpc train`` does (only batch
size, workers, threads and device overridden), draws one training batch, then measures:

- ``step``: one ``learner.step`` (wall time; memory: on CUDA ``torch.cuda.max_memory_allocated``
  during the step, else the rise of the process's peak resident set (ru_maxrss) above its
  resident set just before the step);
- the batch's mean loss before and after the step (same batch, feedforward): the step moved the
  weights downhill;
- ``eval``: one evaluation over the validation images (``fastpc.train.evaluate``).

Writes ``<out>/imagenet_step.{md,json}`` with the command and the machine.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .suite import begin, machine

__all__ = ["add_arguments", "run", "measure", "make_image_folder", "PRESETS"]

PRESETS = ("imagenet-vgg10-ep", "imagenet-vgg10-ep-bp")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--batch-size", type=int, default=8, help="training batch (paper: 256)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--classes", type=int, default=1000, help="class folders of the generated folder")
    parser.add_argument("--eval-images", type=int, default=16, help="validation images of the generated folder")
    parser.add_argument("--presets", nargs="+", default=list(PRESETS), choices=list(PRESETS))
    parser.add_argument("--data-root", default=None, help="an image folder (default: generate one)")
    parser.add_argument("--workers", type=int, default=2, help="data.workers")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="train.device (cpu, cuda, auto)")
    parser.add_argument("--out", default="benchmarks/results")


def make_image_folder(root: Path, classes: int, eval_images: int, seed: int = 0) -> Path:
    """``root/train/<class>/0.jpg`` (one image per class) and ``root/val/<class>/*.jpg``
    (``eval_images`` spread over the first classes): smooth random RGB images whose sides are
    300-500 pixels, JPEG quality 90; returns ``root``."""
    from PIL import Image

    rng = np.random.default_rng(seed)

    def image(path: Path) -> None:
        w, h = (int(v) for v in rng.integers(300, 501, 2))
        small = rng.integers(0, 256, (h // 16 + 1, w // 16 + 1, 3), dtype=np.uint8)
        Image.fromarray(small).resize((w, h), Image.Resampling.BICUBIC).save(path, quality=90)

    for c in range(classes):
        (root / "train" / f"n{c:05d}").mkdir(parents=True, exist_ok=True)
        image(root / "train" / f"n{c:05d}" / "0.jpg")
    for i in range(eval_images):
        d = root / "val" / f"n{i % classes:05d}"
        d.mkdir(parents=True, exist_ok=True)
        image(d / f"{i}.jpg")
    return root


def _rss_bytes() -> int | None:
    """The resident set of this process now (Linux), else None."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    import os

    return pages * os.sysconf("SC_PAGE_SIZE")


def _maxrss_bytes() -> int:
    scale = 1 if sys.platform == "darwin" else 1024  # bytes on macOS, KiB elsewhere
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale


def measure(preset: str, overrides: list[str], threads: int) -> dict[str, Any]:
    """One step and one evaluation of ``preset`` (with ``overrides``) in this process."""
    from fastpc.build import (build_learner, build_net_for, build_optimizer, make_run_loaders, resolve_device,
                              seed_everything)
    from fastpc.config import load_config
    from fastpc.energy import output_cost
    from fastpc.presets import preset_path
    from fastpc.train import evaluate

    torch.set_num_threads(max(1, threads))
    cfg = load_config(preset_path(preset), overrides)
    seed_everything(cfg.train.seed)
    device = resolve_device(cfg.train.device)
    loaders = make_run_loaders(cfg, device)
    net = build_net_for(cfg, loaders.info, device, torch.float32)
    learner = build_learner(cfg, net, build_optimizer(cfg, net), steps=1)
    loaders.train.set_epoch(0)
    t0 = time.perf_counter()
    x, y = next(iter(loaders.train))
    load_s = time.perf_counter() - t0

    def batch_loss() -> float:
        with torch.no_grad():
            return output_cost(net(x), y, cfg.learner.loss).item() / len(y)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    before = batch_loss()
    rss0, maxrss0 = _rss_bytes(), _maxrss_bytes()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    sync()
    t0 = time.perf_counter()
    learner.step(x, y)
    sync()
    step_s = time.perf_counter() - t0
    if device.type == "cuda":
        step_mem, how = torch.cuda.max_memory_allocated(device) - base, "cuda max_memory_allocated"
    else:
        step_mem, how = _maxrss_bytes() - (rss0 if rss0 is not None else maxrss0), "ru_maxrss rise"
    after = batch_loss()
    t0 = time.perf_counter()
    eval_loss, eval_acc = evaluate(net, loaders.test, cfg.learner.loss)
    sync()
    eval_s = time.perf_counter() - t0
    return {
        "preset": preset, "learner": cfg.learner.name, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "batch_size": len(y), "image_size": list(loaders.info.in_shape[1:]), "classes": loaders.info.num_classes,
        "params": sum(p.numel() for p in net.parameters()), "first_batch_s": load_s,
        "step_s": step_s, "step_peak_mib": step_mem / 2**20, "memory_measure": how,
        "process_peak_rss_mib": _maxrss_bytes() / 2**20,
        "loss_before": before, "loss_after": after,
        "eval_s": eval_s, "eval_images": loaders.test.num_examples, "eval_loss": eval_loss, "eval_acc": eval_acc,
    }


def _child(queue, preset: str, overrides: list[str], threads: int) -> None:
    try:
        queue.put(measure(preset, overrides, threads))
    except BaseException as e:  # reported by the parent, which names the preset
        queue.put({"preset": preset, "error": f"{type(e).__name__}: {' '.join(str(e).split())[:300]}"})


def _in_fresh_process(preset: str, overrides: list[str], threads: int) -> dict[str, Any]:
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    proc = ctx.Process(target=_child, args=(queue, preset, overrides, threads))
    proc.start()
    result = queue.get()
    proc.join()
    return result


def _table(rows: list[dict[str, Any]]) -> str:
    head = ("| preset | learner | batch | image | classes | params | first batch s | step s | step peak MiB | "
            "process peak MiB | loss before → after | eval s (images) |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['preset']} | error: {r['error']} |")
            continue
        lines.append(
            f"| {r['preset']} | {r['learner']} | {r['batch_size']} | {r['image_size'][0]}×{r['image_size'][1]} | "
            f"{r['classes']} | {r['params'] / 1e6:.1f} M | {r['first_batch_s']:.2f} | {r['step_s']:.2f} | "
            f"{r['step_peak_mib']:.0f} | {r['process_peak_rss_mib']:.0f} | "
            f"{r['loss_before']:.4f} → {r['loss_after']:.4f} | {r['eval_s']:.2f} ({r['eval_images']}) |")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    out, command = begin(args, "imagenet-step")
    with tempfile.TemporaryDirectory(prefix="fastpc-imagenet-step-") as tmp:
        root = Path(args.data_root) if args.data_root else make_image_folder(Path(tmp), args.classes,
                                                                               args.eval_images)
        sets = [f"data.root={root}", f"data.batch_size={args.batch_size}", f"data.eval_batch_size={args.batch_size}",
                f"data.image_size={args.image_size}", f"data.workers={args.workers}", "data.stream=true",
                f"train.device={args.device}", "train.progress=false", f"train.threads={args.threads}"]
        rows = []
        for preset in args.presets:
            print(f"imagenet-step: {preset} ...", flush=True)
            rows.append(_in_fresh_process(preset, sets, args.threads))
    table = _table(rows)
    where = machine() + (f", {rows[0].get('device_name')}" if rows and rows[0].get("device", "cpu") != "cpu" else "")
    md = (f"# One training step and one evaluation at {args.image_size}×{args.image_size} (imagenet-step)\n\n"
          f"Command: `{command}`\n\nMachine: {where}\n\n"
          f"Data: {'the image folder ' + args.data_root if args.data_root else f'a generated folder ({args.classes} classes, one 300-500 px JPEG each; {args.eval_images} validation images)'}, "
          f"streamed (data.workers={args.workers}).\n\n{table}\n\n"
          "Step peak memory: the rise of the process's peak resident set over its resident set just before the "
          "step (CPU), or torch.cuda.max_memory_allocated above the memory allocated before it (CUDA). "
          "Loss: the batch's mean output cost before and after the step (same batch).\n")
    (out / "imagenet_step.md").write_text(md)
    (out / "imagenet_step.json").write_text(json.dumps(
        {"command": command, "machine": where, "settings": {k: v for k, v in vars(args).items() if k != "func"},
         "results": rows}, indent=2, default=str))
    print(table)
    return 1 if any("error" in r for r in rows) else 0
