"""``fastpc bench init``: the discriminative smoke run, the claim's arithmetic and the merge of
the two parts' results."""

import argparse
import json
from pathlib import Path

import pytest

from fastpc.bench import init as bench

FMNIST = Path("/usr/share/datasets/fashion-mnist")


def _have_data() -> bool:
    from fastpc.data import search_paths
    return any(p.is_dir() and any(p.glob("*idx3*")) for p in search_paths("fashion-mnist"))


def _args(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    bench.add_arguments(parser)
    args = parser.parse_args(list(argv))
    args.argv = list(argv)
    return args


@pytest.mark.skipif(not _have_data(), reason="Fashion-MNIST not available locally")
def test_init_quick_writes_results(tmp_path):
    args = _args("--quick", "--out", str(tmp_path), "--variants", "forward", "class_average")
    assert bench.run(args) == 0
    res = json.loads((tmp_path / "init.json").read_text())
    part = res["parts"]["discriminative"]
    assert part["command"] == f"fastpc bench init --quick --out {tmp_path} --variants forward class_average"
    assert {(c["variant"], c["iters"]) for c in part["cells"]} == {
        ("forward", 1), ("forward", 2), ("class_average", 1), ("class_average", 2), ("bp", 0)}
    depth = args.depth
    for c in part["cells"]:  # the paper's unit: sPC 2T, BP 2L - 1
        assert c["smm"] == (2 * depth - 1 if c["variant"] == "bp" else 2 * c["iters"])
        assert 0.0 <= c["test_acc"] <= 100.0 and c["test_loss"] > 0
    assert [v["pair"] for v in part["claims"]][0] == ["forward", "class_average"]
    md = (tmp_path / "init.md").read_text()
    assert "Command: `fastpc bench init --quick" in md and "**Claim**" in md
    assert (tmp_path / "init.png").stat().st_size > 0


def _row(variant, iters, acc):
    return {"variant": variant, "iters": iters, "smm": 2 * iters, "acc_mean": acc}


def test_claim_confirmed_refuted_and_never_reached():
    rows = [_row("forward", t, a) for t, a in ((1, 70.0), (2, 75.0), (4, 80.0), (16, 80.0))]
    # forward's best is 80 % first at T = 4 (8 SMM); class_average reaches it at T = 1 (2 SMM): 4x
    v = bench.claim(rows + [_row("class_average", t, a) for t, a in ((1, 80.5), (2, 81.0))], depth=5)
    assert (v["forward_smm"], v["avg_smm"], v["ratio"]) == (8, 2, 4.0) and v["verdict"].startswith("refuted")
    assert v["ratio_with_ff"] == pytest.approx((8 + 4) / 2)
    rows[-2] = _row("forward", 4, 79.0)  # now the best is 80 % at T = 16 (32 SMM): 16x
    v = bench.claim(rows + [_row("class_average", t, a) for t, a in ((1, 80.5), (2, 81.0))], depth=5)
    assert v["ratio"] == 16.0 and v["verdict"].startswith("confirmed")
    v = bench.claim(rows + [_row("class_average", 1, 60.0)], depth=5)
    assert v["ratio"] is None and v["verdict"].startswith("refuted: class_average never reaches")
    assert bench.claim(rows, depth=5)["verdict"].startswith("not tested")


def test_generative_part_is_its_own_module(tmp_path, monkeypatch):
    """--part generative calls fastpc.bench.init_generative.run_part(args) -> (markdown, dict)."""
    import sys
    import types

    fake = types.ModuleType("fastpc.bench.init_generative")
    fake.run_part = lambda args: ("## Generative (fake)", {"command": args.command, "rows": [1]})
    monkeypatch.setitem(sys.modules, "fastpc.bench.init_generative", fake)
    assert bench.run(_args("--part", "generative", "--out", str(tmp_path))) == 0
    res = json.loads((tmp_path / "init.json").read_text())
    assert list(res["parts"]) == ["generative"] and res["parts"]["generative"]["rows"] == [1]
    assert res["parts"]["generative"]["command"] == "fastpc bench init --part generative --out " + str(tmp_path)
    assert "## Generative (fake)" in (tmp_path / "init.md").read_text()
    # a run of one part replaces that part and keeps the other's earlier results
    res["parts"]["discriminative"] = {"markdown": "## Discriminative (kept)", "rows": [2]}
    (tmp_path / "init.json").write_text(json.dumps(res))
    fake.run_part = lambda args: ("## Generative (again)", {"rows": [3]})
    assert bench.run(_args("--part", "generative", "--out", str(tmp_path))) == 0
    res = json.loads((tmp_path / "init.json").read_text())
    assert res["parts"]["discriminative"] == {"markdown": "## Discriminative (kept)", "rows": [2]}
    assert res["parts"]["generative"]["rows"] == [3]
    md = (tmp_path / "init.md").read_text()
    assert md.index("## Discriminative (kept)") < md.index("## Generative (again)") and "(fake)" not in md
