"""``fastpc bench ep``: the --quick smoke run writes its results; the claim verdicts follow the numbers."""

import argparse
import json

import pytest
from tinydata import have_fashion_mnist

from fastpc.bench import ep


@pytest.mark.slow
@pytest.mark.skipif(not have_fashion_mnist(), reason="Fashion-MNIST not available locally")
def test_ep_quick_writes_results(tmp_path):
    parser = argparse.ArgumentParser()
    ep.add_arguments(parser)
    argv = ["--quick", "--out", str(tmp_path)]
    args = parser.parse_args(argv)
    args.argv = argv
    assert ep.run(args) == 0
    res = json.loads((tmp_path / "ep.json").read_text())
    assert res["command"] == "fastpc bench ep --quick --out " + str(tmp_path)
    assert [r["label"] for r in res["main"]] == list(ep.METHODS)
    assert {c["value"] for c in res["beta"]} == {0.002, 0.1} and {c["value"] for c in res["iters"]} == {1, 2}
    bp = next(r for r in res["main"] if r["label"] == "bp")
    assert bp["ratio_to_bp"] == pytest.approx(1.0)
    f = res["flops"]
    assert f["centered_step"] > f["bp_step"] > 0  # two phases of sweeps cost more than one backward
    assert len(res["sync_trace"]["synchronous"]) == 9
    md = (tmp_path / "ep.md").read_text()
    assert "Command: `fastpc bench ep --quick" in md and "| claim | verdict | numbers |" in md
    assert (tmp_path / "ep.png").stat().st_size > 0


def _cell(value, acc, diverged=None):
    return {"value": value, "test_acc": acc, "diverged_at": diverged}


def _res(centered, bp, betas, ks, sync_last):
    main = [{"label": "centered", "acc_mean": centered, "acc_spread": 0.1, "ratio_to_bp": 4.0},
            {"label": "bp", "acc_mean": bp, "acc_spread": 0.1, "ratio_to_bp": 1.0}]
    return {"settings": {"iters": 5}, "main": main, "beta": [_cell(b, a) for b, a in betas],
            "iters": [_cell(k, a) for k, a in ks], "sync": {"diverged_at": None, "test_acc": 50.0},
            "sync_trace": {"even/odd": [10.0, 9.0], "synchronous": [10.0, sync_last]}}


def _verdicts(rows):
    return {claim: verdict for claim, verdict, _ in rows}


def test_claim_verdicts_follow_the_numbers():
    ok = _verdicts(ep.claims(_res(80.0, 80.3, [(0.0002, 80.0), (0.1, 80.5)], [(1, 60.0), (4, 80.0), (8, 80.2)], 1e9)))
    assert ok == {"centered EP within 0.5 pp of BP": "confirmed", "cost ≤ 6× BP per epoch at K = 5": "confirmed",
                  "results barely change for 0.0002 ≤ β ≤ 0.1": "confirmed",
                  "results barely change for K ≥ 4": "confirmed", "synchronous updates diverge": "confirmed"}
    bad = _verdicts(ep.claims(_res(78.0, 80.3, [(0.0002, 70.0), (0.1, 80.5)], [(4, 80.0), (8, 75.0)], 11.0)))
    assert set(bad.values()) == {"refuted", "confirmed"}  # cost still ≤ 6×
    assert bad["centered EP within 0.5 pp of BP"] == bad["synchronous updates diverge"] == "refuted"
    assert bad["results barely change for K ≥ 4"] == "refuted"
