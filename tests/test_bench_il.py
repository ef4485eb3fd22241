"""``fastpc bench il``: the smoke run (``--quick``), the conv net's geometry, the optimizer
state count and the claim verdicts."""

import argparse
import json

import pytest
import torch
from tinydata import have_fashion_mnist

from fastpc.bench import il


@pytest.mark.skipif(not have_fashion_mnist(), reason="Fashion-MNIST not available locally")
def test_il_quick_writes_results(tmp_path):
    parser = argparse.ArgumentParser()
    il.add_arguments(parser)
    argv = ["--quick", "--threads", "1", "--out", str(tmp_path)]
    args = parser.parse_args(argv)
    args.argv = argv
    assert il.run(args) == 0
    res = json.loads((tmp_path / "il.json").read_text())
    assert res["command"].startswith("fastpc bench il --quick")
    labels = {(r["part"], r["arch"], r["label"], r["T"]) for r in res["rows"]}
    assert ("schedule", "mlp4", "BP-Adam", None) in labels
    assert {("schedule", "mlp4", s, T) for s in ("sequential", "simultaneous") for T in (1, 3)} <= labels
    assert {(a, v.label) for a in ("mlp", "conv") for v in il.OPTIMIZER_VARIANTS[a] if not v.extra} == \
        {(r["arch"], r["label"]) for r in res["rows"] if r["part"] == "optimizers"}
    for r in res["rows"]:
        assert 0.0 <= r["best_acc"] <= 100.0 and r["sec_per_epoch"] > 0
    # one sweep reaches every hidden block; one simultaneous step only the top one
    reach = {(r["schedule"], r["T"]): r["reached"] for r in res["reach"]}
    assert reach[("sequential", 1)] == 4 and reach[("simultaneous", 1)] == 1 and reach[("simultaneous", 3)] == 3
    assert len(res["claims"]) == 4
    md = (tmp_path / "il.md").read_text()
    assert "Command: `fastpc bench il --quick" in md and "## Claims" in md
    assert (tmp_path / "il.png").stat().st_size > 0


@pytest.mark.parametrize("size", [28, 32])
def test_conv_net_is_the_papers_geometry(size):
    net = il.conv_net(1, 10, size)
    convs = [m for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.out_channels, c.kernel_size, c.stride) for c in convs] == \
        [(64, (5, 5), (2, 2)), (128, (5, 5), (2, 2)), (256, (3, 3), (2, 2))]
    head = net.blocks[-1][-1]
    assert (head.in_features, head.out_features) == (1024, 10)
    assert net(torch.zeros(2, 1, size, size)).shape == (2, 10)


def test_state_bytes_one_scalar_per_matrix_for_mq_two_buffers_for_adam():
    net = il.make_net("mlp", argparse.Namespace(in_shape=(1, 4, 4), num_classes=3), 8, 1.0)
    n_params = sum(p.numel() for p in net.parameters())
    sizes = {}
    for name in ("mq", "adam", "sgd"):
        opt = il.make_optimizer(name, net, 1e-3, "mlp")
        for p in net.parameters():
            p.grad = torch.ones_like(p)
        opt.step()
        sizes[name] = il.state_bytes(opt)
    assert sizes["mq"] == 4 * 4  # 4 Linear layers, one float32 scalar each
    assert sizes["adam"] == 2 * 4 * n_params + 4 * len(list(net.parameters()))  # exp_avg, exp_avg_sq, step
    assert sizes["sgd"] == 0


def _row(part, arch, label, acc, T=None, state=0):
    return {"part": part, "arch": arch, "label": label, "T": T, "best_acc": acc, "state_bytes": state}


def test_claim_verdicts_follow_the_numbers():
    reach = [{"schedule": "sequential", "T": 1, "cos": [0.9, 0.9, 1.0], "reached": 2},
             {"schedule": "simultaneous", "T": 1, "cos": [float("nan"), 1.0, 1.0], "reached": 1}]
    rows = [_row("schedule", "mlp4", "BP-Adam", 80.0), _row("schedule", "mlp4", "sequential", 79.5, 3),
            _row("optimizers", "mlp", "SeqIL-SGD", 70.0), _row("optimizers", "mlp", "SeqIL-MQ", 76.0),
            _row("optimizers", "mlp", "SeqIL-Adam", 80.0),
            _row("optimizers", "conv", "SeqIL-SGD", 70.0), _row("optimizers", "conv", "SeqIL-MQ", 72.0),
            _row("optimizers", "conv", "SeqIL-Adam", 80.0)]
    v = il.claims(rows, reach, tol_pp=1.0)
    assert "**confirmed**" in v[0] and "**confirmed**" in v[1]
    assert "**confirmed**" in v[2] and "60 % of the gap" in v[2]
    assert "**refuted**" in v[3] and "20 % of the gap" in v[3]
    rows[1]["best_acc"] = 77.0
    reach[0]["reached"] = 1
    v = il.claims(rows, reach, tol_pp=1.0)
    assert "**refuted**" in v[0] and "**refuted**" in v[1]
