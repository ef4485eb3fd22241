"""TensorBoard event files (train.tensorboard): the same numbers as metrics.csv, once per epoch
across a kill and a resume, and a clear error without the package."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import pytest
from tinydata import interrupt_evaluate, tiny_overrides

import fastpc.train as train_mod
from fastpc.config import load_config
from fastpc.errors import UserError
from fastpc.runfiles import METRIC_FIELDS
from fastpc.train import CHECKPOINT, fit, load_checkpoint

pytest.importorskip("tensorboard")
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

pytestmark = pytest.mark.usefixtures("isolated")


def cfg_for(data_root, out, **extra):
    return load_config(None, tiny_overrides(data_root, out, **{"train.tensorboard": True, **extra}))


def events(run: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar tag of ``run/tensorboard`` -> its (step, value) events as TensorBoard shows them."""
    acc = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def assert_events_match_metrics(run: Path) -> None:
    with open(run / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    got = events(run)
    expected = {}
    for key in METRIC_FIELDS:
        if key == "epoch":
            continue
        cells = [(int(r["epoch"]), float(r[key])) for r in rows if r[key] != ""]
        if cells:  # scalars are stored as float32: the csv value rounded to float32, exactly
            expected[key] = [(step, float(np.float32(v))) for step, v in cells]
    assert got == expected


def test_events_equal_metrics_csv(data_root, tmp_path):
    run = tmp_path / "run"
    fit(cfg_for(data_root, run, **{"train.epochs": 2, "data.val_split": 0.25}))
    assert_events_match_metrics(run)
    assert {"train_loss", "val_acc", "test_acc", "train_energy", "lr", "seconds"} <= set(events(run))


def test_resume_after_kill_logs_every_epoch_once(data_root, tmp_path, monkeypatch):
    """Checkpoints at epochs 2 and 4; killed in epoch 4 after epoch 3 was logged but not
    checkpointed: the resume redoes epoch 3, and TensorBoard shows it once, with the new run's
    numbers (its seconds differ from the killed run's)."""
    run = tmp_path / "run"
    extra = {"train.epochs": 4, "train.checkpoint_every": 2}
    real_evaluate = interrupt_evaluate(monkeypatch, 4)
    with pytest.raises(KeyboardInterrupt):
        fit(cfg_for(data_root, run, **extra))
    monkeypatch.setattr(train_mod, "evaluate", real_evaluate)
    assert load_checkpoint(run / CHECKPOINT)["epoch"] == 2
    assert [s for s, _ in events(run)["train_loss"]] == [1, 2, 3]

    fit(cfg_for(data_root, run, **extra), resume=True)
    assert [s for s, _ in events(run)["train_loss"]] == [1, 2, 3, 4]
    assert_events_match_metrics(run)


def test_off_by_default(data_root, tmp_path):
    run = tmp_path / "run"
    fit(load_config(None, tiny_overrides(data_root, run)))
    assert not (run / "tensorboard").exists()


def test_missing_package_is_one_line_error_before_writing(data_root, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard -> ImportError
    run = tmp_path / "run"
    with pytest.raises(UserError) as e:
        fit(cfg_for(data_root, run))
    msg = str(e.value)
    assert "pip install fastpc[tensorboard]" in msg and "\n" not in msg
    assert not run.exists()
