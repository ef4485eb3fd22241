"""``fastpc bench gpu``: the GPU suite, one command that measures what only a GPU can show.

Four parts, run in order, each under its own time cap (seconds, checked between cases; the
caps sum to 420 and are also cut to what is left of ``--budget-s``, default 480, leaving room
for one compile or step that runs past its part's cap):

1. ``checks`` (cap 45): every registered learner's gradients and one SGD step on the device in
   float32, float64 and bf16 against the same learner on the CPU in float64 (``gpu_checks``), one
   pass/fail row each.
2. ``speed`` (cap 200): step times of bp / spc / epc / ep on MLPs 4×128 and 20×128 (batch 128),
   VGG-5 and ResNet-18 at CIFAR size: eager, a CUDA-graphed plain bp step, compiled
   (``compile=True``; started only while 60 s of the cap are left); ratios to bp; PCX when
   ``import pcx`` works, else skipped with the reason.
3. ``imagenet`` (cap 100): the VGG-10 ImageNet presets' step (bp, centered EP with K = 10) at
   batch 256, 224 × 224 on synthetic data: step time, peak memory, projected epoch and run.
4. ``torchrun`` (cap 75): a short ``fastpc train`` through ``python -m torch.distributed.run``
   on the device's GPUs with nccl (on the CPU: 2 processes with gloo) on a generated image folder.

After every part, ``gpu.md`` and ``gpu.json`` under ``--out`` hold everything finished so far
(with the command, the machine and the device name), so a killed run leaves its partial results;
a part that raises is recorded as failed and the next part runs. ``--dry-run`` runs the same code
on the CPU at toy sizes (tiny nets, few steps, 32-pixel images) in well under a minute.
The exit status is 1 when a check or a part failed, else 0.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

import torch

from ..errors import UserError
from .gpu_checks import check_rows
from .gpu_speed import imagenet_rows, speed_rows
from .suite import begin, machine

__all__ = ["add_arguments", "run", "PARTS", "CAPS"]

PARTS = ("checks", "speed", "imagenet", "torchrun")
CAPS = {"checks": 45, "speed": 200, "imagenet": 100, "torchrun": 75}  # seconds; sum 420, 60 s of slack in 480


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="benchmarks/results/gpu", help="results folder (gpu.md, gpu.json)")
    p.add_argument("--budget-s", type=float, default=480, help="seconds for the whole suite")
    p.add_argument("--dry-run", action="store_true", help="the same code on the CPU at toy sizes")
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma list of parts to run ({','.join(PARTS)})")
    p.add_argument("--device", default="cuda", help="the device (default cuda; cpu with --dry-run)")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _part_checks(ctx: dict[str, Any], deadline: float) -> dict[str, Any]:
    dry = ctx["dry"]
    rows = check_rows(ctx["device"], [20, 16, 16, 10] if dry else [784, 128, 128, 128, 10],
                      8 if dry else 64, 3 if dry else 5)
    failed = [r for r in rows if r["status"] != "pass"]
    return {"rows": rows, "status": "fail" if failed else "ok",
            "note": f"{len(rows) - len(failed)}/{len(rows)} checks pass"}


def _part_speed(ctx: dict[str, Any], deadline: float) -> dict[str, Any]:
    dry = ctx["dry"]
    rows = ctx["rows"] = []  # kept by the caller when a case raises past its own guard
    speed_rows(rows, ctx["device"], dry, deadline, batch=8 if dry else 128, warmup=2 if dry else 5,
               timed=2 if dry else 30, compile_reserve_s=0 if dry else 60, log=ctx["log"])
    try:
        import pcx  # noqa: F401  (PCX timed on this device only where it is installed)
        pcx_note = "pcx importable, but the suite does not time it on this device (use fastpc bench speed --pcx-python)"
    except Exception as e:
        pcx_note = f"skipped: import pcx failed ({type(e).__name__}: {e})"[:200]
    errors = [r for r in rows if r["status"].startswith("error")]
    return {"rows": rows, "pcx": pcx_note, "status": "fail" if errors else "ok",
            "note": f"{sum(r['status'] == 'ok' for r in rows)}/{len(rows)} cases timed"}


def _part_imagenet(ctx: dict[str, Any], deadline: float) -> dict[str, Any]:
    rows = imagenet_rows(ctx["device"], ctx["dry"], deadline, timed=1 if ctx["dry"] else 3, log=ctx["log"])
    bad = [r for r in rows if r["status"].startswith("error")]
    return {"rows": rows, "status": "fail" if bad else "ok",
            "note": f"{sum(r['status'] == 'ok' for r in rows)}/{len(rows)} presets timed"}


# one all_reduce over torchrun's processes: the backend itself, also where fastpc train has a
# single process (WORLD_SIZE 1: it then joins no group)
_PROBE = """import os, torch, torch.distributed as dist
cuda = os.environ["FASTPC_PROBE_BACKEND"] == "nccl"
if cuda:
    torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
dist.init_process_group(os.environ["FASTPC_PROBE_BACKEND"])
t = torch.ones(4, device="cuda" if cuda else "cpu")
dist.all_reduce(t)
assert t.tolist() == [float(dist.get_world_size())] * 4, t
dist.destroy_process_group()
"""


def _torchrun(n: int, tail: list[str], deadline: float, env: dict[str, str]) -> tuple[int | None, str, float]:
    """``python -m torch.distributed.run --nproc_per_node n --standalone`` + ``tail`` until
    ``deadline`` -> (exit status, None when killed at the deadline; stderr's end; seconds)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(n), "--standalone", *tail]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            stdin=subprocess.DEVNULL, start_new_session=True, env=env)
    try:
        _, err = proc.communicate(timeout=max(5.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:  # the launcher and its workers: their own process group
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
        return None, err[-1500:], time.perf_counter() - t0
    return proc.returncode, err[-1500:], time.perf_counter() - t0


def _part_torchrun(ctx: dict[str, Any], deadline: float) -> dict[str, Any]:
    from .imagenet_step import make_image_folder

    cuda = ctx["device"].type == "cuda"
    n = max(1, torch.cuda.device_count()) if cuda else 2
    backend = "nccl" if cuda else "gloo"
    env = {**_child_env(), "FASTPC_PROBE_BACKEND": backend}
    with tempfile.TemporaryDirectory(prefix="fastpc-gpu-torchrun-") as tmp:
        probe = Path(tmp) / "probe.py"
        probe.write_text(_PROBE)
        prc, perr, _ = _torchrun(n, [str(probe)], deadline, env)
        root = make_image_folder(Path(tmp) / "data", classes=8, eval_images=8)
        sets = ["learner.name=bp", f"data.root={root}", "data.image_size=32", "data.batch_size=4",
                "data.eval_batch_size=4", "data.workers=0", "data.stream=false", "data.augment=false",
                "model.width_mult=0.0625", "train.epochs=1", "train.progress=false", "train.threads=1",
                f"train.device={'cuda' if cuda else 'cpu'}", f"train.out={Path(tmp) / 'run'}"]
        rc, err, wall = _torchrun(n, ["-m", "fastpc", "train", "imagenet-vgg10-ep-bp", "--set", *sets], deadline, env)
        out = {"processes": n, "backend": backend, "wall_s": wall, "returncode": rc, "stderr_tail": err,
               "all_reduce_returncode": prc, "all_reduce_stderr_tail": "" if prc == 0 else perr}
        summary = Path(tmp) / "run" / "summary.json"
        probe_note = f"all_reduce {'ok' if prc == 0 else 'failed' if prc is not None else 'killed at the cap'}"
        if rc == 0 and summary.exists() and prc == 0:
            s = json.loads(summary.read_text())
            out.update(status="ok", note=f"{n} process(es), {backend}, {probe_note}, test acc {s.get('test_acc')}",
                       summary={k: s.get(k) for k in ("test_acc", "epoch_seconds", "device")})
        else:
            train = "killed at the part's cap" if rc is None else f"train exited {rc}"
            out.update(status="fail", note=f"{train}, {probe_note}")
    return out


def _child_env() -> dict[str, str]:
    """This environment with the folder holding this fastpc first on PYTHONPATH (the workers
    import the same package where fastpc is not installed)."""
    root = str(Path(__file__).resolve().parents[2])
    path = os.environ.get("PYTHONPATH", "")
    return {**os.environ, "PYTHONPATH": root + (os.pathsep + path if path else "")}


_RUNNERS = {"checks": _part_checks, "speed": _part_speed, "imagenet": _part_imagenet, "torchrun": _part_torchrun}


def _markdown(res: dict[str, Any]) -> str:
    """The results so far as markdown: one status line per part, then each part's rows."""
    lines = ["# GPU suite (fastpc bench gpu)", "", f"Command: `{res['command']}`  ", f"Date: {res['date']}  ",
             f"Machine: {res['machine']}  ", f"Device: {res['device_name']}  ", f"Dry run: {res['dry_run']}", "",
             "| part | cap s | status | seconds | note |", "|---|---|---|---|---|"]
    for name in PARTS:
        p = res["parts"].get(name, {"status": "not run"})
        secs = p.get("seconds")
        lines.append(f"| {name} | {p.get('cap_s', CAPS[name])} | {p['status']} | "
                     f"{'' if secs is None else f'{secs:.1f}'} | {p.get('note', '')} |")
    for name in PARTS:
        rows = res["parts"].get(name, {}).get("rows")
        if rows:
            keys = list(dict.fromkeys(k for r in rows for k in r))
            lines += ["", f"## {name}", "", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
            lines += ["| " + " | ".join(_cell(r.get(k)) for k in keys) + " |" for r in rows]
    if "pcx" in res["parts"].get("speed", {}):
        lines += ["", f"PCX: {res['parts']['speed']['pcx']}"]
    return "\n".join(lines) + "\n"


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.3g}"
    return "" if v is None else str(v).replace("|", "/")


def _write(out: Path, res: dict[str, Any]) -> None:
    (out / "gpu.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    (out / "gpu.md").write_text(_markdown(res))


def _context(args: argparse.Namespace) -> dict[str, Any]:
    parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    bad = [s for s in parts if s not in PARTS]
    if bad or not parts:
        raise UserError(f"bench gpu: --parts takes a comma list of {', '.join(PARTS)}; got {args.parts!r}")
    if args.budget_s <= 0:
        raise UserError(f"bench gpu: --budget-s must be positive, got {args.budget_s}")
    name = "cpu" if args.dry_run else args.device
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"bench gpu: --device {name!r} is not a torch device") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("bench gpu: no CUDA device here (torch.cuda.is_available() is False); "
                        "use --dry-run for the CPU rehearsal")
    return {"device": device, "dry": args.dry_run, "parts": parts,
            "log": lambda msg: print(msg, flush=True)}


def run(args: argparse.Namespace) -> int:
    ctx = _context(args)
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    out, command = begin(args, "gpu")
    start = time.monotonic()
    res: dict[str, Any] = {"suite": "gpu", "command": command, "date": _dt.datetime.now().isoformat(timespec="seconds"),
                           "machine": machine(), "device": str(ctx["device"]), "device_name": _device_name(ctx["device"]),
                           "cuda": torch.version.cuda,
                           "tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
                           "dry_run": args.dry_run, "budget_s": args.budget_s,
                           "caps_s": CAPS, "parts": {}}
    for name in PARTS:
        res["parts"][name] = {"status": "pending" if name in ctx["parts"] else "skipped: not asked"}
    _write(out, res)
    for name in ctx["parts"]:
        ctx.pop("rows", None)
        cap = min(CAPS[name], args.budget_s - (time.monotonic() - start))
        t0 = time.monotonic()
        if cap <= 0:
            res["parts"][name] = {"status": "skipped: budget", "cap_s": 0}
        else:
            print(f"gpu: part {name} (cap {cap:.0f} s)", flush=True)
            try:
                part = _RUNNERS[name](ctx, t0 + cap)
            except Exception as e:  # recorded; the next part runs
                traceback.print_exc()
                part = {"status": "fail", "note": f"{type(e).__name__}: {' '.join(str(e).split())}"[:300],
                        "rows": ctx.pop("rows", None)}
            res["parts"][name] = {**part, "cap_s": round(cap), "seconds": time.monotonic() - t0}
        res["wall_s"] = time.monotonic() - start
        _write(out, res)
        print(f"gpu: part {name}: {res['parts'][name]['status']} ({res['parts'][name].get('note', '')})", flush=True)
    print(f"wrote {out / 'gpu.md'} and {out / 'gpu.json'} in {res['wall_s']:.0f} s")
    return 1 if any(p["status"] == "fail" for p in res["parts"].values()) else 0
