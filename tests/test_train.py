"""The training loop on a tiny generated dataset: run folder, reproducibility, resume, divergence."""

from __future__ import annotations

import csv
import json
import pickle
from pathlib import Path

import pytest
import torch
from tinydata import interrupt_evaluate, tiny_overrides

import fastpc as fpc
import fastpc.train as train_mod
from fastpc.config import load_config
from fastpc.build import lr_factor
from fastpc.report import evaluate_run, report
from fastpc.runfiles import RunSummary
from fastpc.train import CHECKPOINT, fit, load_checkpoint


pytestmark = pytest.mark.usefixtures("isolated")


def cfg_for(data_root, out, **extra):
    return load_config(None, tiny_overrides(data_root, out, **extra))


def weights(run: Path) -> dict[str, torch.Tensor]:
    return load_checkpoint(run / CHECKPOINT)["learner"]["net"]


def assert_same_weights(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_run_folder(data_root, tmp_path):
    run = tmp_path / "run"
    summary = fit(cfg_for(data_root, run, **{"train.epochs": 2, "data.val_split": 0.25}))
    assert (run / "config.yaml").is_file() and load_config(run / "config.yaml").train.epochs == 2
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["epoch"] for r in rows] == ["1", "2"]
    for col in ("train_loss", "train_acc", "train_energy", "val_loss", "val_acc", "test_loss", "test_acc", "seconds"):
        assert all(r[col] != "" for r in rows), col
    on_disk = json.loads((run / "summary.json").read_text())
    assert isinstance(summary, RunSummary) and on_disk == json.loads(json.dumps(summary.to_json()))
    assert on_disk["status"] == "completed" and on_disk["learner"] == "epc"
    assert len(on_disk["epoch_seconds"]) == 2 and all(s > 0 for s in on_disk["epoch_seconds"])
    assert on_disk["config"]["learner"]["iters"] == 3
    assert on_disk["test_acc"] > 30  # 10 classes: chance is 10 %
    for png in ("curves.png", "energy.png"):
        assert (run / "plots" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    traces = json.loads((run / "energy_trace.json").read_text())
    assert len(traces) == 2 and len(traces[-1]["total"]) == 3 + 1  # iters + 1 points
    assert len(traces[-1]["layers"][0]) == 3  # 3 blocks: two hidden errors + the output cost
    ev = evaluate_run(run)
    assert ev["test_acc"] == pytest.approx(summary.test_acc) and ev["epoch"] == 2
    weights_before = (run / CHECKPOINT).read_bytes()
    text = report(run)
    assert "test_acc" in text and "curves.png" in text
    for png in ("energy_heatmap.png", "alignment.png", "iters_vs_depth.png"):
        assert (run / "diagnostics" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert str(run / "diagnostics" / png) in text
    md = (run / "diagnostics" / "diagnostics.md").read_text()
    assert "cos" in md.lower()
    assert (run / CHECKPOINT).read_bytes() == weights_before  # report changes nothing it reads


@pytest.mark.parametrize("learner", ["bp", "spc", "epc"])
def test_seed_reproduces_bit_for_bit(data_root, tmp_path, learner):
    extra = {"learner.name": learner}
    fit(cfg_for(data_root, tmp_path / "a", **extra))
    fit(cfg_for(data_root, tmp_path / "b", **extra))
    assert_same_weights(weights(tmp_path / "a"), weights(tmp_path / "b"))
    fit(cfg_for(data_root, tmp_path / "c", **extra, **{"train.seed": 1}))
    assert not torch.equal(weights(tmp_path / "a")["blocks.0.1.weight"], weights(tmp_path / "c")["blocks.0.1.weight"])


def test_resume_extends_a_finished_run_exactly(data_root, tmp_path):
    fit(cfg_for(data_root, tmp_path / "full", **{"train.epochs": 2}))
    fit(cfg_for(data_root, tmp_path / "part", **{"train.epochs": 1}))
    cfg = cfg_for(data_root, tmp_path / "part", **{"train.epochs": 2})
    summary = fit(cfg, resume=True)
    assert_same_weights(weights(tmp_path / "full"), weights(tmp_path / "part"))
    assert summary.epochs_completed == 2
    with open(tmp_path / "part" / "metrics.csv") as f:
        assert len(list(csv.DictReader(f))) == 2


def test_resume_after_interruption_exactly(data_root, tmp_path, monkeypatch):
    """A cosine schedule over 3 epochs, killed during epoch 2, resumed: same weights and optimizer state."""
    extra = {"train.epochs": 3, "optim.schedule": "warmup_cosine", "optim.warmup": 0.2, "learner.name": "spc"}
    fit(cfg_for(data_root, tmp_path / "full", **extra))

    real_evaluate = interrupt_evaluate(monkeypatch, 2)  # after training epoch 2, before its checkpoint
    with pytest.raises(KeyboardInterrupt):
        fit(cfg_for(data_root, tmp_path / "cut", **extra))
    monkeypatch.setattr(train_mod, "evaluate", real_evaluate)
    assert load_checkpoint(tmp_path / "cut" / CHECKPOINT)["epoch"] == 1

    fit(cfg_for(data_root, tmp_path / "cut", **extra), resume=True)
    full, cut = load_checkpoint(tmp_path / "full" / CHECKPOINT), load_checkpoint(tmp_path / "cut" / CHECKPOINT)
    assert_same_weights(full["learner"]["net"], cut["learner"]["net"])
    for a, b in zip(full["learner"]["optimizer"]["state"].values(), cut["learner"]["optimizer"]["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert full["history"]["metrics"][-1]["test_acc"] == cut["history"]["metrics"][-1]["test_acc"]


def test_divergence_stops_and_keeps_last_good_checkpoint(data_root, tmp_path):
    run = tmp_path / "run"
    fit(cfg_for(data_root, run))
    good = (run / CHECKPOINT).read_bytes()
    cfg = cfg_for(data_root, run, **{"train.epochs": 2, "learner.state_lr": 1e6,
                                          "learner.safeguard": False})
    with pytest.raises(train_mod.Diverged) as e:
        fit(cfg, resume=True)
    msg = str(e.value)
    assert "epoch 2, step 1" in msg and "learner.state_lr" in msg and str(run / CHECKPOINT) in msg
    assert "\n" not in msg
    assert (run / CHECKPOINT).read_bytes() == good
    assert load_checkpoint(run / CHECKPOINT)["epoch"] == 1
    assert json.loads((run / "summary.json").read_text())["status"] == "diverged"


def test_divergence_in_first_epoch_keeps_initial_checkpoint(data_root, tmp_path):
    run = tmp_path / "run"
    with pytest.raises(fpc.UserError, match=r"epoch 1, step \d+ .*learner.state_lr"):
        fit(cfg_for(data_root, run, **{"learner.state_lr": 1e6, "learner.safeguard": False}))
    assert load_checkpoint(run / CHECKPOINT)["epoch"] == 0


def test_float64_and_sgd_nesterov(data_root, tmp_path):
    summary = fit(cfg_for(data_root, tmp_path / "r", **{"train.dtype": "float64", "optim.name": "sgd",
                                                        "optim.nesterov": True, "optim.lr": 0.05,
                                                        "optim.schedule": "cosine",
                                                        # with SGD, epc's small-error scale matters
                                                        "learner.rescale": True}))
    assert weights(tmp_path / "r")["blocks.0.1.weight"].dtype == torch.float64
    assert summary.test_acc > 20


def test_lr_schedules():
    cfg = load_config(None, ["optim.schedule=warmup_cosine", "optim.warmup=0.1", "optim.min_lr_ratio=0.1"])
    f = [lr_factor(cfg, s, 100) for s in range(100)]
    assert f[0] == pytest.approx(0.1) and f[9] == pytest.approx(1.0)  # linear warm-up over 10 steps
    assert f[10] == pytest.approx(1.0) and f[-1] == pytest.approx(0.1, abs=1e-3)
    assert all(a >= b for a, b in zip(f[10:], f[11:]))  # then cosine down to min_lr_ratio
    assert lr_factor(load_config(None, ["optim.schedule=none"]), 50, 100) == 1.0


def test_checkpoints_load_safely(tmp_path):
    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    p = tmp_path / "evil.pt"
    torch.save({"format": train_mod.CHECKPOINT_FORMAT, "x": Evil()}, p)
    with pytest.raises(fpc.UserError, match="unreadable or unsafe"):
        load_checkpoint(p)
    p.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(fpc.UserError, match="unreadable or unsafe"):
        load_checkpoint(p)
    torch.save({"not": "ours"}, p)
    with pytest.raises(fpc.UserError, match="not a fastpc checkpoint"):
        load_checkpoint(p)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "ck.pt"
    train_mod.save_checkpoint(path, {"format": train_mod.CHECKPOINT_FORMAT, "v": torch.ones(3)})
    before = path.read_bytes()

    def boom(*a, **k):
        raise OSError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(OSError):
        train_mod.save_checkpoint(path, {"format": train_mod.CHECKPOINT_FORMAT, "v": torch.zeros(3)})
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["ck.pt"]  # no temporary file left behind
