"""`fastpc bench speed` smoke run (2 synthetic batches, no PCX): the suite runs end to end and
its FLOP counts follow the analytic formulas in benchmarks/README.md."""

from __future__ import annotations

import json

import pytest

import torch

import fastpc as fpc
from fastpc.bench.speed import bp_flops, dispatch_flops, epc_flops
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
