"""`fastpc bench gpu --dry-run`: the GPU suite's code on the CPU at toy sizes. Every part runs
and is recorded with a status, the correctness checks compare (a perturbed reference fails),
a part that raises is recorded and the next part still runs, and bad options are one-line
errors (exit 2)."""

from __future__ import annotations

import json
import math
import time

import pytest
import torch

from fastpc.bench import get_suite
from fastpc.bench import gpu
from fastpc.bench.gpu_checks import check_rows
from fastpc.bench.gpu_speed import imagenet_rows
from fastpc.cli import main


def test_dry_run_writes_every_part(tmp_path):
    rc = main(["bench", "gpu", "--dry-run", "--out", str(tmp_path)])
    assert rc == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu.json", "gpu.md"]
    res = json.loads((tmp_path / "gpu.json").read_text())
    assert res["command"].startswith("fastpc bench gpu --dry-run")
    assert res["device_name"] == "cpu"
    assert {n: p["status"] for n, p in res["parts"].items()} == {n: "ok" for n in gpu.PARTS}
    md = (tmp_path / "gpu.md").read_text()
    for name in gpu.PARTS:
        assert f"| {name} |" in md
    checks = res["parts"]["checks"]["rows"]
    assert {r["learner"] for r in checks} >= {"bp", "spc", "epc", "ep"}
    assert {r["dtype"] for r in checks} == {"float32", "float64", "bf16"}
    for r in checks:
        assert math.isfinite(r["error"]) and 0 <= r["error"] <= r["tol"], r
    speed = res["parts"]["speed"]["rows"]
    timed = [r for r in speed if r["status"] == "ok"]
    assert {r["learner"] for r in timed} == {"bp", "spc", "epc", "ep"}
    assert all(r["step_ms"] > 0 for r in timed)
    assert any(r["mode"] == "compiled" for r in timed)
    assert all(r["status"].startswith("skipped") for r in speed if r["mode"] == "cuda graph")
    assert res["parts"]["speed"]["pcx"]  # timed or skipped with the reason
    for r in res["parts"]["imagenet"]["rows"]:
        assert r["status"] == "ok" and r["run_h"] == pytest.approx(r["epoch_h"] * 50)
    tr = res["parts"]["torchrun"]
    assert tr["backend"] == "gloo" and tr["processes"] == 2 and tr["returncode"] == 0


def test_perturbed_reference_fails():
    rows = check_rows(torch.device("cpu"), [12, 8, 6], 4, 2, perturb=1e-3)
    grads = [r for r in rows if r["quantity"] == "grads" and r["dtype"] == "float32"]
    assert grads and all(r["status"] == "fail" and r["error"] > r["tol"] for r in grads)
    same = check_rows(torch.device("cpu"), [12, 8, 6], 4, 2)
    assert all(r["status"] == "pass" for r in same)


def test_failed_part_is_recorded_and_the_next_runs(tmp_path, monkeypatch):
    def boom(ctx, deadline):
        raise RuntimeError("broken part")

    monkeypatch.setitem(gpu._RUNNERS, "checks", boom)
    rc = main(["bench", "gpu", "--dry-run", "--parts", "checks,imagenet", "--out", str(tmp_path)])
    assert rc == 1
    parts = json.loads((tmp_path / "gpu.json").read_text())["parts"]
    assert parts["checks"]["status"] == "fail" and "broken part" in parts["checks"]["note"]
    assert parts["imagenet"]["status"] == "ok"
    assert parts["speed"]["status"] == parts["torchrun"]["status"] == "skipped: not asked"


def test_past_the_cap_cases_are_skipped():
    rows = imagenet_rows(torch.device("cpu"), True, time.monotonic() - 1, 1, log=lambda m: None)
    assert [r["status"] for r in rows] == ["skipped: cap", "skipped: cap"]


def test_bad_options_exit_2(tmp_path, capsys):
    assert get_suite("gpu") is gpu
    assert main(["bench", "gpu", "--dry-run", "--parts", "nope", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--parts" in err
    assert main(["bench", "gpu", "--dry-run", "--budget-s", "0", "--out", str(tmp_path)]) == 2
