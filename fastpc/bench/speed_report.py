"""Results of ``fastpc bench speed``: typed rows, the machine record, speed.md.

Each section of the suite holds its table as rows of one dataclass; ``to_json()`` is the row as
speed.json stores it (fields in declaration order).
"""

from __future__ import annotations

import dataclasses
import os
import platform
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = ["EpochRow", "MlpRow", "WideRow", "VggRow", "json_default", "machine_info", "markdown", "command_line"]


class _Row:
    def to_json(self) -> dict[str, Any]:
        """The row as speed.json stores it."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}  # type: ignore[arg-type]


@dataclass
class EpochRow(_Row):
    """One algorithm on an MLP of the suite, timed over the MLP section's batches (the rows of PCX
    and of a ``--baseline`` checkout; ``ratio_to_bp`` is to the current bp's step there too)."""

    algo: str
    step_s: float
    """Median seconds per training step over the repeats."""
    epoch_s: float
    """``step_s`` × steps per epoch."""
    steps_per_s: float
    ratio_to_bp: float
    """``step_s`` ÷ bp's."""
    fast_path: bool | None
    """Whether the learner ran on the fast path; None for PCX."""
    flops_per_step: float | None
    """Matmul FLOPs of one step (None where not counted)."""
    gflops: float | None
    timed_batches: int


@dataclass
class MlpRow(EpochRow):
    """A fastpc learner on an MLP: an :class:`EpochRow` with its compile time."""

    compile_s: float | None
    """Seconds of the first step of a compiled learner (its compile time); None when eager."""


@dataclass
class WideRow(_Row):
    """One algorithm on the wide MLP, against the machine's matmul rate."""

    algo: str
    step_s: float
    steps_per_s: float
    flops_per_step: float
    gflops: float
    fraction_of_matmul: float
    """``gflops`` ÷ the measured fp32 matmul rate."""


@dataclass
class VggRow(_Row):
    """One algorithm on VGG-5, with FLOPs counted at the dispatcher."""

    algo: str
    step_s: float
    epoch_s: float
    steps_per_s: float
    ratio_to_bp: float
    fast_path: bool
    flops_per_step: float
    gflops: float
    flop_ratio: float
    """``flops_per_step`` ÷ bp's."""
    over_flop_ratio: float
    """``ratio_to_bp`` ÷ ``flop_ratio``: 1 means the step costs what its FLOPs say."""


def json_default(obj: Any) -> Any:
    """``json.dumps``'s ``default`` for the suite's results: a row as :meth:`to_json`, else ``str``."""
    return obj.to_json() if isinstance(obj, _Row) else str(obj)


def machine_info() -> dict[str, Any]:
    """The machine the suite runs on: CPU, cores, torch threads, versions, load average at start."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        load = os.getloadavg()
    except OSError:
        load = None
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "python": platform.python_version(), "platform": platform.platform(),
            "loadavg_start": load}


def _fmt(v, spec=".2f"):
    return "—" if v is None else format(v, spec)


def markdown(res: dict[str, Any]) -> str:
    """The suite's results ``res`` (rows as :class:`MlpRow` / :class:`WideRow` / :class:`VggRow`) as
    speed.md."""
    m = res["machine"]
    lines = ["# fastpc speed benchmark", "",
             f"Command: `{res['command']}`  ", f"Date: {res['date']}  ",
             f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} ({m['torch_threads']} threads), "
             f"Python {m['python']}  ",
             f"Load average at start / end: {_fmt_load(m.get('loadavg_start'))} / {_fmt_load(m.get('loadavg_end'))}  ",
             f"Data: {res['data']}; repeats {res['repeats']} (median); on the MLPs every algorithm, PCX "
             f"{'and the baseline ' if res.get('baseline') else ''}included, runs {res.get('chunk', '?')} batches in turn (then the next), so machine drift falls on all "
             "alike; the generic-path rows and the other sections take turns once per repeat.  ",
             f"Measured fp32 matmul rate (1024² torch.mm): **{res['matmul_gflops']:.1f} GFLOP/s**", ""]
    for sec in res.get("mlp", []):
        lines += [f"## {sec['net']} (widths {sec['widths'][0]}→…→{sec['widths'][-1]}, batch {sec['batch']}, "
                  f"T = {sec['iters']}, CE, AdamW)", "",
                  "| algorithm | s / epoch | steps / s | ÷ bp | MFLOP / step | GFLOP/s | timed batches |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for r in sec["rows"]:
            mf = None if r.flops_per_step is None else r.flops_per_step / 1e6
            lines.append(f"| {r.algo} | {r.epoch_s:.2f} | {r.steps_per_s:.1f} | {r.ratio_to_bp:.2f} | "
                         f"{_fmt(mf, '.1f')} | {_fmt(r.gflops, '.1f')} | {r.timed_batches} |")
        lines.append("")
        def verdict(v):
            return "target ≤ 0.5 met" if v <= 0.5 else ("faster than PCX, target ≤ 0.5 missed" if v <= 1
                                                        else "SLOWER than PCX")

        if "spc_over_pcx" in sec:
            v = sec["spc_over_pcx"]
            lines.append(f"- fastpc spc ÷ PCX spc: **{v:.2f}** eager ({verdict(v)})"
                         + (f", **{sec['spc_compiled_over_pcx']:.2f}** compiled ({verdict(sec['spc_compiled_over_pcx'])})"
                            if "spc_compiled_over_pcx" in sec else "")
                         + f"; PCX compile {sec['pcx']['compile_s']:.1f} s (jax {sec['pcx']['jax_version']}), not counted.")
        elif "pcx" in sec:
            lines.append(f"- PCX run failed: {sec['pcx'].get('error')}")
        else:
            lines.append("- PCX column skipped: no PCX interpreter given (`--pcx-python` / `FASTPC_PCX_PYTHON`).")
        lim = 1.15 * sec["epc_flop_ratio"]
        lines.append(f"- fastpc epc ÷ bp: **{sec['epc_over_bp']:.2f}**; analytic FLOP ratio {sec['epc_flop_ratio']:.2f} "
                     f"→ {sec['epc_over_bp_vs_flops']:.2f} × the FLOP ratio (target ≤ 1.15: "
                     f"{'met' if sec['epc_over_bp'] <= lim else 'missed'}).")
        if "baseline" in sec:
            lines.append(_baseline_line(sec))
        if "epc_compiled_over_bp" in sec:
            v = sec["epc_compiled_over_bp"]
            lines.append(f"- compiled epc ÷ bp: **{v:.2f}** → {v / sec['epc_flop_ratio']:.2f} × the FLOP ratio "
                         f"(target ≤ 1.15: {'met' if v <= lim else 'missed'}).")
        lines.append(f"- fast path vs generic autograd path: spc {sec['fast_speedup']['spc']:.1f}× faster, "
                     f"epc {sec['fast_speedup']['epc']:.1f}× faster.")
        if "compiled_speedup" in sec:
            cs, ct = sec["compiled_speedup"], sec["compile_s"]
            lines.append(f"- compiled step vs eager fast path: spc {cs['spc']:.2f}× faster, epc {cs['epc']:.2f}× "
                         f"faster; compiling took {_fmt(ct['spc'], '.0f')} s (spc), {_fmt(ct['epc'], '.0f')} s (epc), "
                         "not counted (a warm inductor cache shortens it).")
        if sec.get("drift"):
            lines.append("- steps over training (first vs last 100 timed steps, median ms; weights train throughout): "
                         + "; ".join(f"{k} {d['first_ms']:.2f} → {d['last_ms']:.2f} ({d['last_over_first']:.2f}×)"
                                     for k, d in sec["drift"].items()) + ".")
        lines.append("")
    if "wide" in res:
        w = res["wide"]
        lines += [f"## Wide MLP {w['widths']} , batch {w['batch']}, T = {w['iters']}", "",
                  "| algorithm | ms / step | MFLOP / step | GFLOP/s | ÷ matmul rate |", "|---|---:|---:|---:|---:|"]
        for r in w["rows"]:
            lines.append(f"| {r.algo} | {r.step_s * 1e3:.1f} | {r.flops_per_step / 1e6:.0f} | "
                         f"{r.gflops:.1f} | {r.fraction_of_matmul:.0%} |")
        lines += ["", f"Matmul rate {w['matmul_gflops']:.1f} GFLOP/s; target ≥ 50 % for spc and epc.", ""]
    if "vgg" in res:
        v = res["vgg"]
        lines += [f"## {v['net']} on Fashion-MNIST 28×28, batch {v['batch']}, T = {v['iters']} "
                  f"({v['timed_batches']} batches timed)", "",
                  "| algorithm | s / epoch | steps / s | ÷ bp | MFLOP / step | FLOP ratio to bp | ÷ bp ÷ FLOP ratio "
                  "| GFLOP/s | fast path |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in v["rows"]:
            lines.append(f"| {r.algo} | {r.epoch_s:.1f} | {r.steps_per_s:.2f} | {r.ratio_to_bp:.2f} | "
                         f"{r.flops_per_step / 1e6:.0f} | {r.flop_ratio:.2f} | {r.over_flop_ratio:.2f} | "
                         f"{r.gflops:.1f} | {'yes' if r.fast_path else 'no (generic)'} |")
        lines += ["", "FLOPs here are counted at the dispatcher for the path that runs (matrix products and "
                  "convolutions, forward and backward, PyTorch's formulas)", ""]
    lines += ["Epoch seconds = median seconds per step × 469 steps (60,000 / 128). FLOPs: 2·m·k·n per matrix "
              "product, elementwise work and the optimizer not counted; spc/epc counted by the fast path "
              "(sPC skips products on exactly-zero errors), bp = forward + weight grads + input grads.", ""]
    return "\n".join(lines)


def _baseline_line(sec: dict[str, Any]) -> str:
    """The bullet comparing the current engine with the ``--baseline`` checkout in an MLP section."""
    b = sec["baseline"]
    if "error" in b:
        return f"- baseline {b['label']} failed: {b['error']}"
    parts = []
    if "spc_over_pcx" in b:
        parts.append(f"spc ÷ PCX {b['spc_over_pcx']:.2f} (current {_fmt(sec.get('spc_over_pcx'))})")
    parts.append(f"epc ÷ bp ÷ FLOP ratio {b['epc_over_bp_vs_flops']:.2f} (current {sec['epc_over_bp_vs_flops']:.2f})")
    twin = b.get("current_worker", {})
    if "spc_over_pcx" in twin:
        parts.append(f"the current engine in the same kind of worker: spc ÷ PCX {twin['spc_over_pcx']:.2f}")
    both = "both in worker processes" if "step_s" in twin else "current in the suite's process"
    parts.append(f"current ÷ baseline step time ({both}): "
                 + ", ".join(f"{a} {v:.2f}" for a, v in b["current_over_baseline"].items()))
    return f"- baseline {b['label']} (same run, interleaved): " + "; ".join(parts)


def _fmt_load(load) -> str:
    return "?" if not load else ", ".join(f"{v:.2f}" for v in load)


def command_line(pcx: bool, suite_argv: list[str] | None, baseline: tuple[str, str] | None = None) -> str:
    """The invocation (``fastpc bench speed ARGS`` when run through the CLI, else this process's
    command line); a local PCX interpreter path becomes ``FASTPC_PCX_PYTHON=<pcx venv python>``.
    ``baseline`` (DIR, label), when DIR is set, is added as ``--baseline DIR --baseline-label
    LABEL`` if the arguments do not already name it (a suite run from Python)."""
    if suite_argv is not None:
        argv = ["fastpc", "bench", "speed", *suite_argv]
    else:
        prog = Path(sys.argv[0]).name if sys.argv else ""
        argv = (["python", "-m", "fastpc.bench.speed"] if prog == "speed.py" else [sys.argv[0]]) + sys.argv[1:]
    kept, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--pcx-python":
            skip = True
        elif not a.startswith("--pcx-python="):
            kept.append(a)
    if baseline and baseline[0] and not any(a.startswith("--baseline") for a in kept[1:]):
        kept += ["--baseline", baseline[0], "--baseline-label", baseline[1]]
    cmd = shlex.join(kept)
    return ("FASTPC_PCX_PYTHON=<pcx venv>/bin/python " + cmd) if pcx else cmd
