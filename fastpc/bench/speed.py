"""``fastpc bench speed``: how fast fastpc trains a PCN (issue 5; issue 2 item 8).

All in one process, on the same data in the same order, algorithms interleaved within every
repeat (median over repeats), so ratios come from one run on one machine:

- Fashion-MNIST MLPs 4×128 and 20×128 (GELU, batch 128, T = 5, CE, AdamW): seconds per epoch
  and steps per second of bp, spc, epc (fast path) and of spc / epc on the generic autograd
  path; every ratio to bp; spc ÷ PCX when a PCX interpreter is given (``--pcx-python`` or
  ``FASTPC_PCX_PYTHON``; PCX runs ``fastpc/bench/pcx_speed.py`` in its own environment on the
  same batches); epc ÷ bp against the ratio of their analytic FLOP counts. With ``--baseline DIR``
  another fastpc checkout's bp / spc / epc too, in a worker process (``baseline_client.py``),
  interleaved with the rest; ratios of the current engine to it.
- A wide MLP (4 layers × 1024, batch 256): achieved GFLOP/s of a spc / epc training step
  against the machine's measured fp32 matmul rate.
- VGG-5 (``width_mult`` shrunk for a CPU) on Fashion-MNIST: bp, spc, epc per epoch.

FLOPs are counted analytically: 2·m·k·n per matrix product (elementwise work and the optimizer
are not counted). For spc / epc the fast path counts the products it runs; for bp it is
forward + weight gradients + input gradients of every block but the first.

Writes ``speed.md`` and ``speed.json`` (``speed-quick.*`` with ``--quick``) under ``--out``.
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

import fastpc as fpc

from ..runtime import available_cores, flush_denormals, pick_threads
from .baseline_client import BaselineRun, resolve_baseline
from .pcx_client import PCX_SCRIPT, start_pcx
from .speed_report import EpochRow, MlpRow, VggRow, WideRow, command_line, json_default, machine_info, markdown

__all__ = ["add_arguments", "run", "matmul_gflops", "bp_flops", "epc_flops", "dispatch_flops",
           "PCX_SCRIPT"]  # PCX_SCRIPT: the worker script, from pcx_client

def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quick", action="store_true", help="a subset of batches, 2 repeats (< 60 s)")
    p.add_argument("--batches", type=int, default=0,
                   help="timed batches per repeat for the MLPs (0: one full epoch; quick: 20)")
    p.add_argument("--generic-batches", type=int, default=40,
                   help="timed batches per repeat for the generic-path columns (quick: 8)")
    p.add_argument("--repeats", type=int, default=3, help="repeats; the median is reported (quick: 2)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", default="auto",
                   help="intra-op threads for torch and PCX: a number, or 'auto' (all cores on a quiet "
                        "machine, 1 when the load average already fills the cores)")
    p.add_argument("--pcx-python", default=os.environ.get("FASTPC_PCX_PYTHON", ""),
                   help="python of a virtual environment with pcx==0.6.3 (or env FASTPC_PCX_PYTHON)")
    p.add_argument("--vgg-width", type=float, default=0.125, help="VGG-5 width_mult")
    p.add_argument("--data-root", default=None, help="where Fashion-MNIST is (default: fastpc's search)")
    p.add_argument("--synthetic", action="store_true", help="random data instead of Fashion-MNIST")
    p.add_argument("--out", default="benchmarks/results", help="results folder")
    p.add_argument("--skip", default="", help="comma list of sections to skip: mlp,wide,vgg,pcx")
    p.add_argument("--chunk", type=int, default=39,
                   help="MLP sections: batches each case (and PCX) runs in turn before the next takes over "
                        "(468 batches = 12 chunks of 39)")
    p.add_argument("--no-compile", dest="compile", action="store_false", default=None,
                   help="leave out the compiled-step rows (compiling takes ~15 s to a few minutes per net on a "
                        "2-core CPU; left out by default with --quick)")
    p.add_argument("--compile", dest="compile", action="store_true", help="time the compiled step even with --quick")
    p.add_argument("--baseline", default="", metavar="DIR",
                   help="also time bp/spc/epc of the fastpc package in DIR (another checkout, e.g. from "
                        "'git archive REV | tar -x -C DIR') on the MLPs, interleaved with the current one")
    p.add_argument("--baseline-label", default="", metavar="TEXT",
                   help="the baseline's name in the tables (default: DIR's short commit if it is a git "
                        "checkout, else its folder name)")
    p.add_argument("--no-flush-denormal", dest="flush_denormal", action="store_false",
                   help="leave subnormal floats as they are (flushed to zero by default, as in training)")


# ---- measurements ---------------------------------------------------------------------------
def matmul_gflops(n: int = 1024, repeats: int = 7) -> float:
    """The machine's fp32 matmul rate: median of timed n×n @ n×n products."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    c = torch.empty(n, n)
    for _ in range(3):
        torch.mm(a, b, out=c)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        for _ in range(4):
            torch.mm(a, b, out=c)
        times.append((time.perf_counter() - t) / 4)
    return 2 * n**3 / statistics.median(times) / 1e9


def bp_flops(widths: list[int], B: int) -> int:
    """BP step: forward + weight gradients (both Σ 2B·in·out) + input gradients (no first layer)."""
    mm = [2 * B * a * b for a, b in zip(widths[:-1], widths[1:])]
    return 2 * sum(mm) + sum(mm[1:])


def epc_flops(widths: list[int], B: int, T: int) -> int:
    """ePC step on the fast path (forward init): FF, T backward passes, T perturbed forwards (the
    first is the FF pass, the last rebuilds the final states), the local weight gradients."""
    mm = [2 * B * a * b for a, b in zip(widths[:-1], widths[1:])]
    return sum(mm) + T * sum(mm[1:]) + T * sum(mm[1:]) + sum(mm)


def _load_data(args) -> tuple[torch.Tensor, torch.Tensor, str]:
    if args.synthetic:
        g = torch.Generator().manual_seed(args.seed)
        return torch.randn(60000, 1, 28, 28, generator=g), torch.randint(0, 10, (60000,), generator=g), "synthetic"
    from fastpc.data import load_dataset

    ds = load_dataset("fashion-mnist", root=args.data_root, split="train", download=False)
    return ds.x, ds.y, f"fashion-mnist train ({ds.path})"


class Case:
    """One learner on its own copy of a net, timed over the same batches as the others."""

    def __init__(self, label: str, name: str, net: fpc.PCNet, **opts: Any):
        self.label, self.name = label, name
        self.net = copy.deepcopy(net)
        opt = torch.optim.AdamW(self.net.parameters(), lr=1e-3, **_fused())
        self.learner = fpc.make_learner(name, self.net, loss="ce", optimizer=opt, **opts)
        self.fast = bool(getattr(self.learner, "uses_fast_path", False))
        self.times: list[float] = []
        self.step_times: list[float] = []  # every timed step in order (the drift check)
        self.flops_per_step: float | None = None

    compile_s: float | None = None  # seconds of the first step of a compiled learner

    def time(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Record the per-step seconds over ``batches`` (after one untimed warm-up step)."""
        self.times.append(self.time_chunk(batches) / len(batches))

    def time_chunk(self, batches: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
        """Seconds for ``batches`` after one untimed warm-up step (for a compiled learner, the
        first warm-up step's seconds are its compile time), not recorded."""
        t = time.perf_counter()
        self.learner.step(*batches[0])
        if self.compile_s is None and getattr(self.learner, "compile", False):
            self.compile_s = time.perf_counter() - t
            if self.learner.compile_failed:
                print(f"  {self.label}: compiling failed ({self.learner.compile_failed}); timed eager", file=sys.stderr)
        t = t0 = time.perf_counter()
        for x, y in batches:
            self.learner.step(x, y)
            t1 = time.perf_counter()
            self.step_times.append(t1 - t)
            t = t1
        return t - t0

    def count_flops(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Matmul FLOPs of one step as the fast path runs it (None on the generic path)."""
        if not self.fast:
            return
        self.learner.step(x, y)
        self.flops_per_step = float(self.learner.last_flops)

    @property
    def step_s(self) -> float:
        return statistics.median(self.times)


def _fused() -> dict[str, bool]:
    try:
        torch.optim.AdamW([torch.zeros(1, requires_grad=True)], fused=True)
        return {"fused": True}
    except (RuntimeError, TypeError, ValueError):
        return {"foreach": True}


def dispatch_flops(learner, x: torch.Tensor, y: torch.Tensor) -> int:
    """Matrix-product and convolution FLOPs of one training step on any path (the generic
    autograd path included), counted by PyTorch's FLOP formulas at the dispatcher (one step is
    taken). ``FlopCounterMode`` itself cannot be used: its module tracker breaks
    ``torch.autograd.grad`` on leaf tensors, which inference uses."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry as registry

    class _Count(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            count = registry.get(func._overloadpacket)
            if count is not None:
                self.total += count(*args, **kwargs, out_val=out)
            return out

    with _Count() as c:
        learner.step(x, y)
    return int(c.total)


def _batches(x, y, B, n, seed, flatten=False):
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(len(y), generator=g)
    n = min(n, len(y) // B)
    out = []
    for i in range(n):
        idx = perm[i * B:(i + 1) * B]
        xb = x[idx]
        out.append((xb.flatten(1) if flatten else xb.contiguous(), y[idx]))
    return out


def _pick_threads(threads: str | int) -> int:
    """'auto': :func:`fastpc.runtime.pick_threads` (the cores the load average leaves free);
    a number as given (0 or less: every core)."""
    if str(threads) == "auto":
        return pick_threads("auto") or available_cores()
    n = int(threads)
    return n if n > 0 else available_cores()


# ---- sections -----------------------------------------------------------------------------
def _mlp_section(args, X, Y, depth, n_batches, n_generic, repeats) -> dict[str, Any]:
    widths = [784] + [128] * (depth - 1) + [10]
    B, T = 128, 5
    torch.manual_seed(args.seed)
    net = fpc.mlp(widths, act="gelu")
    pc = {"iters": T, "state_lr": 0.1}
    cases = [Case("bp", "bp", net), Case("spc", "spc", net, **pc), Case("epc", "epc", net, **pc),
             Case("spc (generic)", "spc", net, fast=False, **pc), Case("epc (generic)", "epc", net, fast=False, **pc)]
    if args.compile:
        cases += [Case("spc (compiled)", "spc", net, compile=True, **pc),
                  Case("epc (compiled)", "epc", net, compile=True, **pc)]
    batches = _batches(X, Y, B, n_batches, args.seed)
    for c in cases:
        if "compiled" in c.label:  # compile first (timed), so the FLOP count is the compiled step's
            c.time_chunk(batches[:1])
            print(f"  {depth}x128 {c.label}: first step (compiling) {c.compile_s:.1f} s")
        c.count_flops(*batches[0])
    worker, pcx = start_pcx(args, widths, batches)
    base = twin = None
    if args.baseline:  # the baseline, and the current engine in the same kind of worker beside it
        base = BaselineRun(args, widths, batches)
        twin = BaselineRun(args, widths, batches, root=str(Path(fpc.__file__).resolve().parent.parent),
                           label="current", kind="worker")
    chunk = max(1, args.chunk)
    pcx_times: list[float] = []
    for r in range(repeats):
        # every case (and PCX) runs chunk after chunk of the same batches in turn, so a drift
        # in the machine's speed (large on a shared VM) falls on all of them alike
        spent = {c.label: 0.0 for c in cases}
        pcx_s = 0.0
        for start in range(0, len(batches), chunk):
            part = batches[start:start + chunk]
            for c in cases:
                if "generic" not in c.label:
                    spent[c.label] += c.time_chunk(part)
            if worker is not None:
                pcx_s += worker.time_pass(start, len(part)) * len(part)
            for run in (base, twin) if start // chunk % 2 == 0 else (twin, base):  # alternate who goes first
                if run is not None:
                    run.chunk(start, len(part))
        for c in cases:
            if "generic" in c.label:
                c.time(batches[:n_generic])
            else:
                c.times.append(spent[c.label] / len(batches))
        note = ""
        if worker is not None:
            pcx_times.append(pcx_s / len(batches))
            note = f", PCX spc {pcx_times[-1] * 1e3:.2f} ms"
        if base is not None:
            note += base.end_repeat(len(batches)) + twin.end_repeat(len(batches))
        print(f"  {depth}x128 repeat {r + 1}/{repeats}: "
              + ", ".join(f"{c.label} {c.times[-1] * 1e3:.2f} ms" for c in cases) + note)
    if worker is not None:
        pcx = worker.close()
        pcx["per_step_s"] = pcx_times  # the interleaved chunks, one figure per repeat
        pcx["step_s"] = statistics.median(pcx_times)
    steps_per_epoch = math.ceil(60000 / B)
    case = {c.label: c for c in cases}
    s = {label: c.step_s for label, c in case.items()}  # median seconds per step
    bp = s["bp"]
    flops = {"bp": bp_flops(widths, B)}
    rows: list[EpochRow] = []
    for c in cases:
        f = c.flops_per_step if c.fast else (flops["bp"] if c.name == "bp" else None)
        rows.append(MlpRow(algo=c.label, step_s=c.step_s, epoch_s=c.step_s * steps_per_epoch,
                           steps_per_s=1 / c.step_s, ratio_to_bp=c.step_s / bp, fast_path=c.fast,
                           flops_per_step=f, gflops=None if f is None else f / c.step_s / 1e9,
                           timed_batches=n_generic if "generic" in c.label else len(batches),
                           compile_s=c.compile_s))
    out: dict[str, Any] = {"net": f"mlp {depth}x128", "widths": widths, "batch": B, "iters": T,
                           "steps_per_epoch": steps_per_epoch, "rows": rows}
    if pcx is not None and "step_s" in pcx:
        rows.append(EpochRow(algo="PCX spc (jit)", step_s=pcx["step_s"], epoch_s=pcx["step_s"] * steps_per_epoch,
                             steps_per_s=1 / pcx["step_s"], ratio_to_bp=pcx["step_s"] / bp, fast_path=None,
                             flops_per_step=None, gflops=None, timed_batches=pcx["batches"]))
        out["pcx"] = pcx
        out["spc_over_pcx"] = s["spc"] / pcx["step_s"]
        if args.compile:
            out["spc_compiled_over_pcx"] = s["spc (compiled)"] / pcx["step_s"]
    elif pcx is not None:
        out["pcx"] = pcx
    ef = epc_flops(widths, B, T)
    out["epc_over_bp"] = s["epc"] / bp
    out["epc_flop_ratio"] = ef / flops["bp"]
    out["epc_over_bp_vs_flops"] = out["epc_over_bp"] / out["epc_flop_ratio"]
    out["fast_speedup"] = {"spc": s["spc (generic)"] / s["spc"], "epc": s["epc (generic)"] / s["epc"]}
    if base is not None:
        twin_rows, twin_out = twin.results(s, steps_per_epoch, len(batches), (pcx or {}).get("step_s"),
                                           out["epc_flop_ratio"])
        like = twin_out.get("step_s", s)  # current ÷ baseline from two workers alike, when the twin ran
        base_rows, out["baseline"] = base.results(like, steps_per_epoch, len(batches),
                                                  (pcx or {}).get("step_s"), out["epc_flop_ratio"])
        out["baseline"]["current_worker"] = twin_out
        rows += twin_rows + base_rows
    out["drift"] = step_drift({c.label: c.step_times for c in cases if "generic" not in c.label})
    if args.compile:
        out["epc_compiled_over_bp"] = s["epc (compiled)"] / bp
        out["compiled_speedup"] = {"spc": s["spc"] / s["spc (compiled)"], "epc": s["epc"] / s["epc (compiled)"]}
        out["compile_s"] = {"spc": case["spc (compiled)"].compile_s, "epc": case["epc (compiled)"].compile_s}
    return out


def step_drift(step_times: dict[str, list[float]], n: int = 100) -> dict[str, dict[str, float]]:
    """Per case, the median step time of its first ``n`` and last ``n`` timed steps (the
    weights train throughout: a step that slows as training goes on, e.g. on denormals, shows
    as last/first > 1)."""
    out = {}
    for label, ts in step_times.items():
        if len(ts) >= 2 * n:
            first, last = statistics.median(ts[:n]), statistics.median(ts[-n:])
            out[label] = {"first_ms": first * 1e3, "last_ms": last * 1e3, "last_over_first": last / first,
                          "steps": len(ts)}
    return out


def _wide_section(args, X, Y, n_batches, repeats, mm_rate) -> dict[str, Any]:
    widths, B = [784, 1024, 1024, 1024, 10], 256
    torch.manual_seed(args.seed)
    net = fpc.mlp(widths, act="gelu")
    pc = {"iters": 5, "state_lr": 0.1}
    cases = [Case("bp", "bp", net), Case("spc", "spc", net, **pc), Case("epc", "epc", net, **pc)]
    batches = _batches(X, Y, B, n_batches, args.seed)
    for c in cases:
        c.count_flops(*batches[0])
    for _ in range(repeats):
        for c in cases:
            c.time(batches)
    rows = []
    for c in cases:
        f = c.flops_per_step if c.fast else bp_flops(widths, B)
        g = f / c.step_s / 1e9
        rows.append(WideRow(algo=c.label, step_s=c.step_s, steps_per_s=1 / c.step_s, flops_per_step=f,
                            gflops=g, fraction_of_matmul=g / mm_rate))
    return {"net": "mlp 4x1024", "widths": widths, "batch": B, "iters": 5, "rows": rows, "matmul_gflops": mm_rate}


def _vgg_section(args, X, Y, n_batches, repeats) -> dict[str, Any]:
    B = 128
    torch.manual_seed(args.seed)
    net = fpc.vgg("vgg5", in_channels=1, num_classes=10, image_size=28, width_mult=args.vgg_width)
    pc = {"iters": 5, "state_lr": 0.1}
    cases = [Case("bp", "bp", net), Case("spc", "spc", net, **pc), Case("epc", "epc", net, **pc)]
    batches = _batches(X, Y, B, n_batches, args.seed)
    for c in cases:
        c.flops_per_step = float(dispatch_flops(c.learner, *batches[0]))
    for _ in range(repeats):
        for c in cases:
            c.time(batches)
    steps_per_epoch = math.ceil(60000 / B)
    bp, bp_f = cases[0].step_s, cases[0].flops_per_step
    rows = [VggRow(algo=c.label, step_s=c.step_s, epoch_s=c.step_s * steps_per_epoch, steps_per_s=1 / c.step_s,
                   ratio_to_bp=c.step_s / bp, fast_path=c.fast, flops_per_step=c.flops_per_step,
                   gflops=c.flops_per_step / c.step_s / 1e9, flop_ratio=c.flops_per_step / bp_f,
                   over_flop_ratio=(c.step_s / bp) / (c.flops_per_step / bp_f)) for c in cases]
    return {"net": f"vgg5 width_mult={args.vgg_width}", "batch": B, "iters": 5, "rows": rows,
            "steps_per_epoch": steps_per_epoch, "timed_batches": len(batches)}


def _sections(args, res, X, Y, quick, n_batches, n_generic, repeats) -> None:
    t0 = time.perf_counter()
    res["matmul_gflops"] = matmul_gflops()
    print(f"fp32 matmul rate: {res['matmul_gflops']:.1f} GFLOP/s")
    if "mlp" not in args.skip_set:
        res["mlp"] = [_mlp_section(args, X, Y, d, n_batches, n_generic, repeats) for d in (4, 20)]
    if "wide" not in args.skip_set:
        res["wide"] = _wide_section(args, X, Y, 3 if quick else 10, repeats, res["matmul_gflops"])
    if "vgg" not in args.skip_set:
        res["vgg"] = _vgg_section(args, X, Y, 2 if quick else 10, repeats)
    res["machine"]["loadavg_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    res["seconds"] = time.perf_counter() - t0


def run(args: argparse.Namespace) -> int:
    bad = resolve_baseline(args)  # a DIR without fastpc: one line, before anything is timed
    if bad:
        print(f"speed: {bad}", file=sys.stderr)
        return 2
    args.skip_set = {s.strip() for s in args.skip.split(",") if s.strip()}
    args.threads = _pick_threads(args.threads)
    torch.set_num_threads(args.threads)
    if args.threads == 1 and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core, as the PCX side
    quick = args.quick
    if args.compile is None:
        args.compile = not quick
    n_batches = args.batches or (12 if quick else math.ceil(60000 / 128))
    n_generic = min(n_batches, 4 if quick else args.generic_batches)
    repeats = 2 if quick and args.repeats == 3 else args.repeats
    try:
        X, Y, data_name = _load_data(args)
    except fpc.UserError as e:
        print(f"speed: {e} (or pass --synthetic)", file=sys.stderr)
        return 2
    res: dict[str, Any] = {"command": command_line(bool(args.pcx_python), getattr(args, "argv", None),
                                                   baseline=(args.baseline, args.baseline_label)),
                           "date": _dt.datetime.now().isoformat(timespec="seconds"), "machine": machine_info(), "data": data_name, "repeats": repeats, "quick": quick,
                           "chunk": args.chunk}
    if args.baseline:
        res["baseline"] = {"dir": args.baseline, "label": args.baseline_label}
    if not args.pcx_python:
        print("speed: no PCX interpreter given (--pcx-python or FASTPC_PCX_PYTHON): the PCX column is skipped")
    res["flush_denormal"] = args.flush_denormal
    with flush_denormals(args.flush_denormal):
        _sections(args, res, X, Y, quick, n_batches, n_generic, repeats)
    md = markdown(res)
    print(md)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "speed-quick" if quick else "speed"
    (out / f"{stem}.md").write_text(md)
    (out / f"{stem}.json").write_text(json.dumps(res, indent=2, default=json_default))
    print(f"wrote {out / (stem + '.md')} and {out / (stem + '.json')} in {res['seconds']:.0f} s")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="fastpc bench speed", description=__doc__.splitlines()[0])
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
