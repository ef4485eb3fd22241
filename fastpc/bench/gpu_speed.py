"""The timing parts of ``fastpc bench gpu``: training-step times of bp / spc / epc / ep on the
device (eager, compiled, and a CUDA-graphed plain PyTorch bp step), and the VGG-10 ImageNet step
at batch 256, 224 × 224 with its peak memory and projected epoch and run times.

Step times are taken with CUDA events around the timed steps after warm-up steps (on the CPU,
wall time); the median over the timed steps is reported. A case starts only while its part's
deadline leaves room for it (a compiled case needs ``compile_reserve_s``); otherwise its row
says ``skipped: cap``.
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

import fastpc as fpc

from .speed import Case

__all__ = ["step_times", "speed_rows", "imagenet_rows", "NETS", "IMAGENET_EPOCH", "IMAGENET_EPOCHS"]

IMAGENET_EPOCH, IMAGENET_EPOCHS = 1_281_167, 50  # training images per epoch; the paper's epochs
PC = {"iters": 5, "state_lr": 0.1}


def step_times(step: Callable[[], Any], device: torch.device, warmup: int, timed: int) -> tuple[float, float]:
    """(seconds of the first warm-up step, median seconds of ``timed`` steps after ``warmup``
    warm-up steps), timed with CUDA events on CUDA."""
    cuda = device.type == "cuda"
    sync = (lambda: torch.cuda.synchronize(device)) if cuda else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for i in range(max(1, warmup)):
        step()
        if i == 0:
            sync()
            first = time.perf_counter() - t0
    times = []
    for _ in range(timed):
        if cuda:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            step()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b) / 1e3)
        else:
            t = time.perf_counter()
            step()
            times.append(time.perf_counter() - t)
    return first, statistics.median(times)


def NETS(dry: bool) -> dict[str, Callable[[], tuple[fpc.PCNet, tuple[int, ...]]]]:
    """Net name -> builder of (net, input shape without the batch); toy sizes when ``dry``."""
    if dry:
        return {"mlp 4x16": lambda: (fpc.mlp([20, 16, 16, 16, 10]), (20,)),
                "vgg5 16px": lambda: (fpc.vgg("vgg5", image_size=16, width_mult=0.0625), (3, 16, 16))}
    return {"mlp 4x128": lambda: (fpc.mlp([784, 128, 128, 128, 10]), (784,)),
            "mlp 20x128": lambda: (fpc.mlp([784] + [128] * 19 + [10]), (784,)),
            "vgg5 cifar": lambda: (fpc.vgg("vgg5", image_size=32), (3, 32, 32)),
            "resnet18 cifar": lambda: (fpc.resnet("resnet18", image_size=32), (3, 32, 32))}


def _graphed_bp(net: fpc.PCNet, x: torch.Tensor, y: torch.Tensor) -> Callable[[], Any]:
    """A plain PyTorch bp step (cross-entropy, AdamW capturable) captured in one CUDA graph;
    returns its replay."""
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, capturable=True)

    def step():
        opt.zero_grad(set_to_none=False)
        loss = torch.nn.functional.cross_entropy(net(x), y)
        loss.backward()
        opt.step()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        step()
    return graph.replay


def _cases(names: list[str], mode: str) -> list[tuple[str, str, str, dict[str, Any]]]:
    """(label, learner, mode, options) of ``mode``: the eager cases, the CUDA graph or the compiled ones."""
    if mode == "compiled":
        return [(f"{n} (compiled)", n, mode, {**PC, "compile": True}) for n in names
                if "compile" in fpc.learner_options(n)]
    if mode == "cuda graph":
        return [("bp (cuda graph)", "bp", mode, {})]
    return [(n, n, mode, {} if n == "bp" else PC) for n in names]


def speed_rows(rows: list[dict[str, Any]], device: torch.device, dry: bool, deadline: float, batch: int,
               warmup: int, timed: int, compile_reserve_s: float, log: Callable[[str], None]) -> None:
    """Append to ``rows`` one row per net and case: step time, ratio to bp on the same net,
    first-step seconds (the compile time of a compiled case) and status (ok, skipped: REASON,
    error: ...). Every net's eager cases run first, then the CUDA graphs (a failed capture
    cannot spoil an eager row), then the compiled cases (the slowest to start), so the cap cuts
    the compiled rows first. A dry run compiles one
    case (epc on the first net)."""
    nets: dict[str, tuple[fpc.PCNet, torch.Tensor, torch.Tensor]] = {}
    for net_name, build in NETS(dry).items():
        torch.manual_seed(0)
        net, shape = build()
        nets[net_name] = (net.to(device), torch.randn(batch, *shape, device=device),
                          torch.randint(0, 10, (batch,), device=device))
    bp_s: dict[str, float] = {}
    for phase in ("eager", "cuda graph", "compiled"):
        compiled = phase == "compiled"
        for i, (net_name, (net, x, y)) in enumerate(nets.items()):
            for label, name, mode, opts in _cases(fpc.list_learners(), phase):
                row: dict[str, Any] = {"net": net_name, "case": label, "learner": name, "mode": mode, "batch": batch}
                rows.append(row)
                left = deadline - time.monotonic()
                if left <= 0 or (compiled and left < compile_reserve_s):
                    row["status"] = "skipped: cap"
                elif mode == "cuda graph" and device.type != "cuda":
                    row["status"] = "skipped: CUDA graphs need a CUDA device"
                elif compiled and dry and (i > 0 or name != "epc"):
                    row["status"] = "skipped: dry run (one compiled case)"
                else:
                    _time_case(row, net, x, y, device, warmup, timed, opts, bp_s.get(net_name), log)
                    if label == "bp" and row["status"] == "ok":
                        bp_s[net_name] = row["step_ms"] / 1e3
                        row["ratio_to_bp"] = 1.0


def _time_case(row: dict[str, Any], net: fpc.PCNet, x: torch.Tensor, y: torch.Tensor, device: torch.device,
               warmup: int, timed: int, opts: dict[str, Any], bp_s: float | None, log: Callable[[str], None]) -> None:
    """Time one case into ``row`` (its status ``ok`` or ``error: ...``)."""
    case = None
    try:
        if row["mode"] == "cuda graph":
            step = _graphed_bp(copy.deepcopy(net), x, y)
        else:
            case = Case(row["case"], row["learner"], net, **opts)
            step = (lambda: case.learner.step(x, y))
        first, med = step_times(step, device, warmup, timed)
    except Exception as e:  # recorded; the next case runs
        row["status"] = f"error: {type(e).__name__}: {' '.join(str(e).split())}"[:300]
        log(f"  {row['net']} {row['case']}: {row['status']}")
        return
    if case is not None and getattr(case.learner, "compile_failed", None):
        row["note"] = f"compile failed, timed eager: {case.learner.compile_failed}"
    elif case is not None and row["mode"] == "compiled" and not case.learner.uses_compiled_step:
        row["note"] = "the compiled step does not apply to this net: timed eager"
    row.update(status="ok", step_ms=med * 1e3, first_step_s=first, ratio_to_bp=None if bp_s is None else med / bp_s)
    log(f"  {row['net']} {row['case']}: {med * 1e3:.2f} ms/step (first step {first:.1f} s)")


def imagenet_rows(device: torch.device, dry: bool, deadline: float, timed: int,
                  log: Callable[[str], None]) -> list[dict[str, Any]]:
    """The ImageNet presets' step (VGG-10, SGD Nesterov; bp, and centered EP with K = 10) on one
    synthetic batch of 256 at 224 × 224 (4 at 32 × 32, width 1/16, when ``dry``): median step
    time, peak memory during the steps (``torch.cuda.max_memory_allocated``: weights, optimizer
    state, activations), and from the step time the projected epoch (1,281,167 images) and
    50-epoch run."""
    batch, size = (4, 32) if dry else (256, 224)
    rows = []
    for preset in ("imagenet-vgg10-ep-bp", "imagenet-vgg10-ep"):
        row: dict[str, Any] = {"preset": preset, "batch": batch, "image_size": size}
        rows.append(row)
        if time.monotonic() >= deadline:
            row["status"] = "skipped: cap"
            continue
        try:
            row.update(_imagenet_step(preset, device, batch, size, dry, timed))
        except Exception as e:  # an out-of-memory is a result too
            row["status"] = f"error: {type(e).__name__}: {' '.join(str(e).split())}"[:300]
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        log(f"  {preset}: {row['status']}, {row.get('step_s', 0):.3f} s/step, peak {row.get('peak_mib')} MiB, "
            f"epoch {row.get('epoch_h', 0):.2f} h")
    return rows


def _imagenet_step(preset: str, device: torch.device, batch: int, size: int, dry: bool, timed: int) -> dict[str, Any]:
    """One preset's net, optimizer and learner as ``fastpc train`` builds them, timed on one batch."""
    from fastpc.build import build_learner, build_net, build_optimizer
    from fastpc.config import load_config
    from fastpc.presets import preset_path

    sets = [f"data.image_size={size}", f"data.batch_size={batch}"] + (["model.width_mult=0.0625"] if dry else [])
    cfg = load_config(preset_path(preset), sets)
    torch.manual_seed(0)
    net = build_net(cfg, 1000, (3, size, size)).to(device)
    learner = build_learner(cfg, net, build_optimizer(cfg, net), steps=1)
    x = torch.randn(batch, 3, size, size, device=device)
    y = torch.randint(0, 1000, (batch,), device=device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    first, med = step_times(lambda: learner.step(x, y), device, 1, timed)
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None
    epoch_s = med * IMAGENET_EPOCH / batch
    return {"status": "ok", "learner": cfg.learner.name, "params_m": sum(p.numel() for p in net.parameters()) / 1e6,
            "step_s": med, "first_step_s": first, "peak_mib": peak, "images_per_s": batch / med,
            "epoch_h": epoch_s / 3600, "run_h": epoch_s * IMAGENET_EPOCHS / 3600}
