"""``fastpc bench depth --quick``: the smoke run CI executes (< 2 minutes on 2 cores)."""

import argparse
import json
from pathlib import Path

import pytest
from tinydata import have_fashion_mnist

from fastpc.bench import depth

FMNIST = Path("/usr/share/datasets/fashion-mnist")


@pytest.mark.skipif(not have_fashion_mnist(), reason="Fashion-MNIST not available locally")
def test_depth_quick_writes_results(tmp_path):
    parser = argparse.ArgumentParser()
    depth.add_arguments(parser)
    args = parser.parse_args(["--quick", "--out", str(tmp_path)])
    args.argv = ["--quick", "--out", str(tmp_path)]
    assert depth.run(args) == 0  # no wall-time assertion: timings belong in benchmarks (issue 22)
    res = json.loads((tmp_path / "depth.json").read_text())
    assert res["command"].startswith("fastpc bench depth --quick")
    assert {c["variant"] for c in res["cells"]} == set(depth.DEFAULT_VARIANTS)
    assert {r["depth"] for r in res["rows"]} == {2, 4}
    for c in res["cells"]:
        assert 0.0 <= c["test_acc"] <= 100.0 and c["sec_per_epoch"] > 0
    bp = [r for r in res["rows"] if r["variant"] == "bp"]
    assert all(r["ratio_to_bp"] == pytest.approx(1.0) for r in bp)
    md = (tmp_path / "depth.md").read_text()
    assert "| depth | learner |" in md and "Machine:" in md and "Command:" in md
    for png in ("depth_energy_heatmap.png", "depth_alignment.png", "depth_iters_vs_depth.png", "depth_accuracy.png"):
        assert (tmp_path / png).stat().st_size > 0, png


def test_summarize_rows():
    C = depth.CellResult
    cells = [C("bp", "bp", 4, s, 1, 10, acc, 0.5, sec, False, None) for s, acc, sec in ((0, 80.0, 1.0), (1, 82.0, 3.0))]
    cells += [C("spc", "spc", 4, 0, 1, 10, 70.0, 0.7, 8.0, False, None)]
    rows = depth.summarize(cells)
    assert rows[0]["variant"] == "bp" and rows[0]["acc_mean"] == 81.0 and rows[0]["acc_spread"] == 1.0
    assert rows[1]["ratio_to_bp"] == pytest.approx(4.0)


@pytest.mark.skipif(not have_fashion_mnist(), reason="Fashion-MNIST not available locally")
def test_depth_paper_regime_applies_the_papers_settings(tmp_path):
    parser = argparse.ArgumentParser()
    depth.add_arguments(parser)
    argv = ["--regime", "paper", "--quick", "--max-steps", "3", "--learners", "bp", "epc-T64-0.1", "--out", str(tmp_path)]
    args = parser.parse_args(argv)
    args.argv = argv
    assert depth.run(args) == 0
    res = json.loads((tmp_path / "depth-paper.json").read_text())
    st = res["settings"]
    assert (st["batch_size"], st["lr"], st["regime"]) == (64, 1e-4, "paper")
    assert res["variants"]["epc-T64-0.1"]["options"] == {"iters": 64, "state_lr": 0.1, "safeguard": False}
    assert not (tmp_path / "depth.md").exists()  # our regime's table is left alone
    assert "the ePC paper's regime" in (tmp_path / "depth-paper.md").read_text()
    # the paper's defaults fill only what was not given
    args = parser.parse_args(["--regime", "paper", "--lr", "3e-4"])
    depth._apply_regime(args)
    assert (args.lr, args.batch_size, args.epochs) == (3e-4, 64, 5) and args.learners == list(depth.PAPER_VARIANTS)
