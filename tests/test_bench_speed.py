"""`fastpc bench speed` smoke run (2 synthetic batches, no PCX): the suite runs end to end and
its FLOP counts follow the analytic formulas in benchmarks/README.md; ``--baseline DIR`` (this
checkout as its own baseline) times another fastpc in a worker, interleaved."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest

import torch

import fastpc as fpc
from fastpc.bench.baseline_client import ALGOS, BaselineRun, BaselineWorker, resolve_baseline
from fastpc.bench.speed import bp_flops, dispatch_flops, epc_flops
from fastpc.bench.speed_report import _baseline_line
from fastpc.cli import main


def test_speed_suite_smoke(tmp_path, capsys):
    rc = main(["bench", "speed", "--quick", "--synthetic", "--skip", "pcx,wide,vgg", "--repeats", "1",
               "--batches", "2", "--generic-batches", "1", "--no-compile", "--out", str(tmp_path)])
    assert rc == 0
    res = json.loads((tmp_path / "speed-quick.json").read_text())
    assert res["command"].startswith("fastpc bench speed --quick --synthetic")  # what was run
    nets = {m["net"]: m for m in res["mlp"]}
    assert set(nets) == {"mlp 4x128", "mlp 20x128"}
    for m in nets.values():
        algos = [r["algo"] for r in m["rows"]]
        assert algos[:3] == ["bp", "spc", "epc"]
        assert all(r["step_s"] > 0 for r in m["rows"])
        assert m["epc_over_bp"] == pytest.approx(m["rows"][2]["step_s"] / m["rows"][0]["step_s"])
    # the count for 20x128, T = 5: epc ≈ 3.3–3.5 bp steps
    w = [784] + [128] * 19 + [10]
    assert epc_flops(w, 128, 5) / bp_flops(w, 128) == pytest.approx(nets["mlp 20x128"]["epc_flop_ratio"])
    assert 3.3 <= nets["mlp 20x128"]["epc_flop_ratio"] <= 3.5


def test_dispatch_flops_agree_with_the_analytic_counts():
    """The dispatcher count (used for the conv net) equals the MLP formulas: bp's analytic count
    and the fast path's own count of the products it runs."""
    torch.manual_seed(0)
    widths = [784, 64, 64, 64, 10]
    x, y = torch.randn(32, 784), torch.randint(0, 10, (32,))
    for name in ("bp", "spc", "epc"):
        net = fpc.mlp(widths)
        opts = {} if name == "bp" else {"iters": 5, "state_lr": 0.1}
        learner = fpc.make_learner(name, net, optimizer=torch.optim.SGD(net.parameters(), lr=0.01), **opts)
        counted = dispatch_flops(learner, x, y)
        assert counted == (bp_flops(widths, 32) if name == "bp" else learner.last_flops), name


# ---- --baseline DIR: another fastpc checkout timed in the same run (here: this checkout itself) ----
ROOT = Path(__file__).resolve().parent.parent  # the repository root, a folder holding the fastpc package


def _tiny_batches(n=3, B=8):
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(B, 1, 28, 28, generator=g), torch.randint(0, 10, (B,), generator=g)) for _ in range(n)]


def test_baseline_worker_times_bp_spc_epc():
    """The worker imports the package under --root (not this process's), builds the net and the
    three learners from the batches' .npz, and answers every timed chunk with a positive step time."""
    w = BaselineWorker(str(ROOT), [784, 16, 16, 10], _tiny_batches(), threads=1)
    try:
        assert w.ready["fastpc_file"] == str(ROOT / "fastpc" / "__init__.py")
        for algo in ALGOS:
            for start, count in ((0, 3), (1, 2)):
                s = w.time_chunk(algo, start, count)
                assert math.isfinite(s) and s > 0, (algo, start, count, s)
        with pytest.raises(RuntimeError, match="bad request"):  # the worker says so and keeps serving
            w.time_chunk("nope", 0, 1)
        assert w.time_chunk("bp", 2, 1) > 0
    except BaseException:
        w.stop()
        raise
    res = w.close()
    assert res["batches"] == 3 and res["batch_size"] == 8 and res["widths"] == [784, 16, 16, 10]
    assert {a: len(v) for a, v in res["chunk_step_s"].items()} == {"bp": 3, "spc": 2, "epc": 2}
    if (ROOT / ".git").exists():
        assert res["commit"] and len(res["commit"]) == 40


def test_baseline_without_fastpc_is_one_line_and_exit_2(tmp_path, capsys):
    rc = main(["bench", "speed", "--baseline", str(tmp_path / "nonexistent"), "--synthetic", "--quick",
               "--skip", "mlp,wide,vgg", "--out", str(tmp_path / "out")])
    assert rc == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--baseline" in err and "no fastpc package" in err
    assert not (tmp_path / "out").exists()  # stopped before anything ran


def test_a_failing_baseline_is_a_warning(tmp_path, capsys):
    """A baseline whose package cannot be imported: one warning line, no rows, the failure in the
    section's bullet (the suite goes on)."""
    (tmp_path / "fastpc").mkdir()
    (tmp_path / "fastpc" / "__init__.py").write_text("raise ImportError('broken on purpose')\n")
    args = argparse.Namespace(baseline=str(tmp_path), baseline_label="", seed=0, threads=1, flush_denormal=True)
    assert resolve_baseline(args) is None and args.baseline_label == tmp_path.name
    run = BaselineRun(args, [784, 8, 10], _tiny_batches(2))
    run.chunk(0, 2)
    assert run.end_repeat(2) == ""
    rows, out = run.results({"bp": 1.0, "spc": 1.0, "epc": 1.0}, 469, 2, None, 2.0)
    assert rows == [] and "broken on purpose" in out["error"]
    warned = [line for line in capsys.readouterr().err.splitlines() if "baseline" in line]
    assert len(warned) == 1 and "going on without it" in warned[0]
    assert _baseline_line({"baseline": out}).startswith(f"- baseline {tmp_path.name} failed: ")


def test_speed_suite_with_baseline_rows(tmp_path):
    rc = main(["bench", "speed", "--quick", "--synthetic", "--skip", "pcx,wide,vgg", "--repeats", "1",
               "--batches", "2", "--generic-batches", "1", "--no-compile", "--baseline", str(ROOT),
               "--baseline-label", "self", "--out", str(tmp_path)])
    assert rc == 0
    res = json.loads((tmp_path / "speed-quick.json").read_text())
    assert f"--baseline {ROOT}" in res["command"] and "--baseline-label self" in res["command"]
    md = (tmp_path / "speed-quick.md").read_text()
    for m in res["mlp"]:
        rows = {r["algo"]: r for r in m["rows"]}
        for algo in ALGOS:
            r = rows[f"{algo} (baseline self)"]
            assert r["step_s"] > 0 and r["fast_path"] is None and r["flops_per_step"] is None
            assert f"| {algo} (baseline self) |" in md
            # current ÷ baseline from the two workers alike (the current engine's worker rows)
            twin = rows[f"{algo} (worker current)"]
            assert m["baseline"]["current_over_baseline"][algo] == pytest.approx(twin["step_s"] / r["step_s"])
            assert m["baseline"]["current_worker"]["step_s"][algo] == pytest.approx(twin["step_s"])
        assert m["baseline"]["epc_over_bp"] == pytest.approx(rows["epc (baseline self)"]["step_s"]
                                                             / rows["bp (baseline self)"]["step_s"])
        assert "spc_over_pcx" not in m["baseline"]  # no PCX in this run
    assert md.count("- baseline self (same run, interleaved): epc ÷ bp ÷ FLOP ratio ") == 2
