"""Faults around the run folder, the CLI, configs and data (issue 16, items 1-5 and 7-16): every
one ends in a finished run or one `error:` line with exit status 2, and nothing written is lost.

Kills are injected at exact points with fault hooks (a KeyboardInterrupt raised right after a
given write, as SIGINT does) and, where strace is available, with a real SIGKILL at a system call.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from test_cli import assert_user_error, cli, snapshot
from tinydata import tiny_overrides, write_tiny_idx

import fastpc.rundir as rundir
import fastpc.train as train_mod
from fastpc.cli import main
from fastpc.config import load_config, valid_keys
from fastpc.errors import UserError
from fastpc.rundir import CHECKPOINT, LOCK, RunLock, load_checkpoint
from fastpc.train import fit

pytestmark = pytest.mark.usefixtures("isolated")


@pytest.fixture(scope="module")
def finished(data_root, tmp_path_factory):
    """A finished 2-epoch run (shared: tests copy it with ``run``)."""
    run = tmp_path_factory.mktemp("finished") / "run"
    assert main(["train", "--set", *tiny_overrides(data_root, run, **{"train.epochs": 2})]) == 0
    return run


@pytest.fixture
def run(finished, tmp_path):
    """A private copy of the finished run."""
    return Path(shutil.copytree(finished, tmp_path / "run"))


def train_args(data_root: Path, out: Path, **extra) -> list[str]:
    return ["train", "--set", *tiny_overrides(data_root, out, **extra)]


def interrupt_after(monkeypatch, name: str, when) -> None:
    """Make ``fastpc.train.<name>`` raise KeyboardInterrupt right after a call for which
    ``when(*args)`` is true (the write itself completes, as with a kill just after it)."""
    real = getattr(train_mod, name)

    def hooked(*args, **kwargs):
        out = real(*args, **kwargs)
        if when(*args):
            raise KeyboardInterrupt
        return out

    monkeypatch.setattr(train_mod, name, hooked)


class _FailingOs:
    """``os`` for fastpc.rundir whose ``fsync`` (a full disk) or ``open`` (a read-only folder) fails."""

    def __init__(self, fail: str, err: int) -> None:
        self.fail, self.err = fail, err

    def __getattr__(self, name):
        if name == self.fail:
            def refuse(*args, **kwargs):
                raise OSError(self.err, os.strerror(self.err))
            return refuse
        return getattr(os, name)


# ---- 1: --overwrite only replaces a run folder -----------------------------------------------------
def test_overwrite_refuses_what_is_not_a_run_folder(capsys, data_root, tmp_path):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "thesis.tex").write_text("years of work")
    rc, _, err = cli(capsys, *train_args(data_root, notes), "--overwrite")
    assert_user_error(rc, err, "not a fastpc run", "--overwrite only replaces run folders")
    assert (notes / "thesis.tex").read_text() == "years of work"

    regular = tmp_path / "file.txt"
    regular.write_text("keep me")
    rc, _, err = cli(capsys, *train_args(data_root, regular), "--overwrite")
    assert_user_error(rc, err, "is a file")
    assert regular.read_text() == "keep me"


def test_overwrite_refuses_an_empty_or_current_folder(capsys, data_root, run, monkeypatch, tmp_path):
    here = tmp_path / "here"  # the current folder ('' used to mean it): a scratch one, should this fail
    here.mkdir()
    (here / "sentinel").write_text("still here")
    monkeypatch.chdir(here)
    rc, _, err = cli(capsys, *train_args(data_root, run), "--overwrite", "--set", "train.out=''")
    assert_user_error(rc, err, "train.out", "empty string")
    assert (here / "sentinel").read_text() == "still here"
    before = snapshot(run)
    monkeypatch.chdir(run)
    rc, _, err = cli(capsys, *train_args(data_root, Path(".")), "--overwrite")
    assert_user_error(rc, err, "refusing to replace", "current folder")
    assert snapshot(run) == before


# ---- 2: a damaged checkpoint is refused -----------------------------------------------------------
def flip_tensor_bytes(path: Path, n: int = 64) -> None:
    """Invert ``n`` bytes inside the largest tensor of a checkpoint."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        member = max((i for i in z.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    name_len, extra_len = struct.unpack("<HH", data[member.header_offset + 26:member.header_offset + 30])
    start = member.header_offset + 30 + name_len + extra_len
    assert member.file_size >= n + 16
    for k in range(start + 16, start + 16 + n):
        data[k] ^= 0xFF
    path.write_bytes(bytes(data))


def test_flipped_bytes_in_a_checkpoint_are_refused(capsys, run):
    flip_tensor_bytes(run / CHECKPOINT)
    before = snapshot(run)
    rc, _, err = cli(capsys, "eval", str(run))
    assert_user_error(rc, err, "is damaged", "CRC", str(run / CHECKPOINT))
    rc, _, err = cli(capsys, "train", "--resume", str(run), "--set", "train.epochs=3")
    assert_user_error(rc, err, "is damaged", "CRC")
    assert snapshot(run) == before


# ---- 3: a kill right after the last checkpoint -----------------------------------------------------
def kill_after_last_checkpoint(monkeypatch, capsys, data_root, out: Path) -> None:
    interrupt_after(monkeypatch, "save_checkpoint", lambda path, state: state["epoch"] == 2)
    assert main(train_args(data_root, out, **{"train.epochs": 2})) == 130
    monkeypatch.undo()
    capsys.readouterr()
    assert load_checkpoint(out / CHECKPOINT)["epoch"] == 2
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["status"], summary["epochs_completed"]) == ("running", 1)


def test_resume_completes_a_run_killed_after_its_last_checkpoint(capsys, monkeypatch, data_root, tmp_path):
    out = tmp_path / "run"
    kill_after_last_checkpoint(monkeypatch, capsys, data_root, out)
    weights = (out / CHECKPOINT).read_bytes()
    rc, stdout, err = cli(capsys, "train", "--resume", str(out))
    assert rc == 0, err
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["status"], summary["epochs_completed"]) == ("completed", 2)
    assert f"test_acc {summary['test_acc']:.2f}%" in stdout
    assert len(train_mod.read_metrics(out / "metrics.csv")) == 2
    assert (out / "plots" / "curves.png").is_file() and (out / CHECKPOINT).read_bytes() == weights
    rc, _, err = cli(capsys, "train", "--resume", str(out))
    assert_user_error(rc, err, "already completed 2 epoch")


def test_report_completes_a_run_killed_after_its_last_checkpoint(capsys, monkeypatch, data_root, tmp_path):
    out = tmp_path / "run"
    kill_after_last_checkpoint(monkeypatch, capsys, data_root, out)
    rc, stdout, err = cli(capsys, "report", str(out), "--no-diagnostics")
    assert rc == 0, err
    assert "status completed" in stdout
    assert [r["epoch"] for r in train_mod.read_metrics(out / "metrics.csv")] == [1.0, 2.0]
    assert json.loads((out / "summary.json").read_text())["epochs_completed"] == 2


# ---- 4: one process per run folder ----------------------------------------------------------------
HOLD_LOCK = "import sys; from fastpc.rundir import RunLock; RunLock(sys.argv[1]).acquire(); print('locked', flush=True); sys.stdin.read()"


def test_a_second_process_is_refused_and_a_dead_ones_lock_is_taken_over(capsys, run):
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, str(run)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        before = snapshot(run)
        rc, _, err = cli(capsys, "train", "--resume", str(run), "--set", "train.epochs=3")
        assert_user_error(rc, err, "in use by another fastpc process", f"pid {holder.pid}")
        assert snapshot(run) == before
    finally:
        holder.communicate("")  # the holder exits without removing its lock file, as if killed
    assert (run / LOCK).read_text().strip() == str(holder.pid)
    rc, _, err = cli(capsys, "train", "--resume", str(run), "--set", "train.epochs=3")
    assert rc == 0, err
    assert load_checkpoint(run / CHECKPOINT)["epoch"] == 3 and not (run / LOCK).exists()


def test_a_new_run_is_locked_before_anything_is_written(capsys, data_root, tmp_path):
    out = tmp_path / "run"
    lock = RunLock(out)
    lock.acquire(create=True)
    try:
        rc, _, err = cli(capsys, *train_args(data_root, out))
        assert_user_error(rc, err, "in use by another fastpc process")
        assert sorted(p.name for p in out.iterdir()) == [LOCK]
    finally:
        lock.release()
    assert not out.exists()  # the folder the lock made is gone with it


# ---- 5: config.yaml is checked against the checkpoint's config ------------------------------------
@pytest.mark.parametrize("damage", ["empty", "truncated", "edited"])
def test_a_damaged_config_yaml_is_refused(capsys, run, damage):
    path = run / "config.yaml"
    text = path.read_text()
    path.write_text({"empty": "", "truncated": text[: len(text) // 2].rsplit("\n", 1)[0] + "\n",
                     "edited": text.replace("lr: 0.01", "lr: 0.002")}[damage])
    before = snapshot(run)
    for args in (["eval", str(run)], ["train", "--resume", str(run), "--set", "train.epochs=3"],
                 ["report", str(run)]):
        rc, _, err = cli(capsys, *args)
        needle = "does not match the config stored in" if damage == "edited" else "is damaged"
        assert_user_error(rc, err, str(path), needle)
    assert snapshot(run) == before


def test_a_kill_between_checkpoint_and_config_yaml_resumes(capsys, monkeypatch, run):
    """A resume with --set writes its checkpoint, then config.yaml; killed in between, the old
    config.yaml is still accepted (it is the checkpoint's previous config)."""
    interrupt_after(monkeypatch, "save_checkpoint", lambda path, state: state["epoch"] == 3)
    assert main(["train", "--resume", str(run), "--set", "train.epochs=3", "optim.lr=0.005"]) == 130
    monkeypatch.undo()
    assert load_config(run / "config.yaml").optim.lr == 0.01
    assert load_checkpoint(run / CHECKPOINT)["config"]["optim"]["lr"] == 0.005
    rc, _, err = cli(capsys, "eval", str(run))
    assert rc == 0, err
    rc, _, err = cli(capsys, "train", "--resume", str(run), "--set", "train.epochs=3", "optim.lr=0.005")
    assert rc == 0, err
    assert load_config(run / "config.yaml").optim.lr == 0.005


# ---- 7: clean errors for a file in the way, a full or read-only disk, no data, no memory ------------
def test_train_out_under_a_regular_file(capsys, data_root, tmp_path):
    (tmp_path / "file").write_text("x")
    rc, _, err = cli(capsys, *train_args(data_root, tmp_path / "file" / "run"))
    assert_user_error(rc, err, "lies under the file")
    assert (tmp_path / "file").read_text() == "x"


def test_full_disk_on_a_new_run_leaves_nothing(capsys, monkeypatch, data_root, tmp_path):
    monkeypatch.setattr(rundir, "os", _FailingOs("fsync", errno.ENOSPC))
    rc, _, err = cli(capsys, *train_args(data_root, tmp_path / "runs" / "new"))
    assert_user_error(rc, err, "cannot write to run folder", "No space left on device")
    assert not (tmp_path / "runs").exists()


def test_full_disk_on_resume_keeps_the_last_checkpoint(capsys, monkeypatch, run):
    before = snapshot(run)
    monkeypatch.setattr(rundir, "os", _FailingOs("fsync", errno.ENOSPC))
    rc, _, err = cli(capsys, "train", "--resume", str(run), "--set", "train.epochs=3")
    assert_user_error(rc, err, "No space left on device", f"the last checkpoint {run / CHECKPOINT} is intact")
    after = snapshot(run)
    assert after[str(CHECKPOINT)] == before[str(CHECKPOINT)] and after["config.yaml"] == before["config.yaml"]
    assert not [p for p in run.rglob(".*") if p.name != LOCK]  # no temporaries left


def test_read_only_run_folder_on_report(capsys, monkeypatch, run):
    before = snapshot(run)
    monkeypatch.setattr(rundir, "os", _FailingOs("open", errno.EROFS))
    rc, _, err = cli(capsys, "report", str(run))
    assert_user_error(rc, err, "cannot write to run folder", "Read-only file system")
    assert snapshot(run) == before


def test_a_training_set_without_images(capsys, tmp_path):
    root = write_tiny_idx(tmp_path / "data", n_train=0)
    rc, _, err = cli(capsys, *train_args(root, tmp_path / "run"))
    assert_user_error(rc, err, "train split", "holds no examples")
    assert not (tmp_path / "run").exists()


def test_a_model_too_large_to_allocate(capsys, data_root, tmp_path):
    rc, _, err = cli(capsys, *train_args(data_root, tmp_path / "run", **{"model.width": 10**9}))
    assert_user_error(rc, err, "not enough memory", "model.width")
    assert not (tmp_path / "run").exists()


def test_a_summary_holding_a_list(capsys, run):
    (run / "summary.json").write_text("[1, 2]\n")
    before = snapshot(run)
    rc, _, err = cli(capsys, "report", str(run))
    assert_user_error(rc, err, "summary.json is damaged", "holds a list")
    assert snapshot(run) == before


# ---- 8, 9: configs --------------------------------------------------------------------------------
def test_duplicate_yaml_keys_are_refused(capsys, tmp_path):
    (tmp_path / "dup.yaml").write_text("optim:\n  lr: 0.001\n  lr: 0.002\n")
    assert_user_error(*cli(capsys, "train", str(tmp_path / "dup.yaml"))[::2], "duplicate key 'lr'", "line 3")
    (tmp_path / "dup.yaml").write_text("optim:\n  lr: 0.001\ntrain:\n  epochs: 2\noptim:\n  name: sgd\n")
    assert_user_error(*cli(capsys, "train", str(tmp_path / "dup.yaml"))[::2], "duplicate key 'optim'")
    assert_user_error(*cli(capsys, "train", "--set", "model.widths={a: 1, a: 2}")[::2], "duplicate key 'a'")


def test_messages_name_keys_that_exist(tmp_path, data_root):
    from PIL import Image

    from fastpc.data import make_loaders

    for split in ("train", "val"):
        for i, size in enumerate([(8, 8), (6, 5)]):
            (tmp_path / "imgs" / split / "c").mkdir(parents=True, exist_ok=True)
            Image.new("RGB", size, "red").save(tmp_path / "imgs" / split / "c" / f"{i}.png")
    with pytest.raises(UserError) as e:
        make_loaders("imagefolder", 4, 0, root=tmp_path / "imgs", download=False)
    keys = re.findall(r"\b(?:data|model|learner|optim|train)\.[a-z_]+", str(e.value))
    assert keys == ["data.image_size"] and set(keys) <= set(valid_keys())
    cfg = load_config(None, tiny_overrides(data_root, tmp_path / "run", **{"data.image_size": 4}))
    assert fit(cfg)["params"] == 16 * 16 + 16 + 16 * 16 + 16 + 16 * 10 + 10  # 4x4 inputs


# ---- 10: an empty test split ----------------------------------------------------------------------
def test_an_empty_test_split_says_so(capsys, tmp_path):
    root = write_tiny_idx(tmp_path / "data", n_test=0)
    out = tmp_path / "run"
    rc, stdout, err = cli(capsys, *train_args(root, out))
    assert rc == 0, err
    assert "test_acc no test data" in stdout and "0.00%" not in stdout
    assert json.loads((out / "summary.json").read_text())["test_acc"] is None
    rc, stdout, _ = cli(capsys, "eval", str(out))
    assert rc == 0 and json.loads(stdout)["test_acc"] is None
    rc, stdout, err = cli(capsys, "report", str(out))
    assert rc == 0, err
    assert "test_acc no test data" in stdout


# ---- 11: report refuses damaged metrics -----------------------------------------------------------
@pytest.mark.parametrize("damage", ["empty", "cut mid-row", "last row dropped"])
def test_report_refuses_damaged_metrics_and_keeps_the_curves(capsys, run, damage):
    path = run / "metrics.csv"
    text = path.read_text()
    lines = text.splitlines(keepends=True)
    path.write_text({"empty": "", "cut mid-row": text[:-20], "last row dropped": "".join(lines[:-1])}[damage])
    before = snapshot(run)
    rc, _, err = cli(capsys, "report", str(run))
    assert_user_error(rc, err, str(path), "is damaged")
    assert snapshot(run) == before


# ---- 12: data.root must exist; the data used is named ---------------------------------------------
def test_data_root_must_exist_and_the_data_used_is_named(capsys, monkeypatch, data_root, tmp_path):
    (tmp_path / "file").write_text("x")
    rc, _, err = cli(capsys, *train_args(tmp_path / "file", tmp_path / "run"))
    assert_user_error(rc, err, "data.root", "is a file")
    monkeypatch.setenv("FASTPC_DATA", str(data_root))  # the data exists elsewhere: not used instead
    rc, _, err = cli(capsys, *train_args(tmp_path / "typo", tmp_path / "run"))
    assert_user_error(rc, err, f"data.root {tmp_path / 'typo'} does not exist", str(data_root))
    assert not (tmp_path / "run").exists()
    rc, stdout, err = cli(capsys, *train_args(data_root, tmp_path / "run"))
    assert rc == 0, err
    assert f"data mnist from {data_root}" in stdout
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["data"]["path"] == str(data_root)


# ---- 13, 14: interrupted before the first checkpoint ----------------------------------------------
def test_ctrl_c_before_the_run_folder_exists(capsys, monkeypatch, data_root, tmp_path):
    import fastpc.data

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(fastpc.data, "make_loaders", interrupted)
    rc, _, err = cli(capsys, *train_args(data_root, tmp_path / "run"))
    assert rc == 130 and "RUN" not in err and "nothing to resume" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("how", ["train", "resume"])
def test_a_run_killed_during_its_first_checkpoint_restarts(capsys, monkeypatch, data_root, tmp_path, how):
    out = tmp_path / "run"
    interrupt_after(monkeypatch, "save_config", lambda cfg, path: True)
    rc, _, err = cli(capsys, *train_args(data_root, out))
    assert rc == 130 and "nothing to resume" in err
    monkeypatch.undo()
    assert not (out / CHECKPOINT).exists() and (out / "config.yaml").is_file()
    args = train_args(data_root, out) if how == "train" else ["train", "--resume", str(out)]
    rc, _, err = cli(capsys, *args)
    assert rc == 0, err
    assert load_checkpoint(out / CHECKPOINT)["epoch"] == 1


# ---- 15: temporaries a kill left are cleaned up ---------------------------------------------------
def test_stale_temporaries_are_removed(capsys, run):
    stale = [run / "checkpoints" / ".last.pt.k1ll3d.tmp", run / ".summary.json.x7.tmp", run / "plots" / ".curves.png.tmp.png"]
    for p in stale:
        p.write_bytes(b"partial")
    rc, _, err = cli(capsys, "train", "--resume", str(run), "--set", "train.epochs=3")
    assert rc == 0, err
    assert not any(p.exists() for p in stale)


KILL_AT_THIRD_CHECKPOINT = """
import os, signal, sys
import fastpc.rundir as rundir
from fastpc.cli import main

class KillingOs:  # os for fastpc.rundir: SIGKILL just before the 3rd checkpoint is renamed into place
    renames = 0
    def __getattr__(self, name):
        return getattr(os, name)
    def replace(self, src, dst):
        if str(dst).endswith("last.pt"):
            KillingOs.renames += 1
            if KillingOs.renames == 3:
                os.kill(os.getpid(), signal.SIGKILL)
        os.replace(src, dst)

rundir.os = KillingOs()
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_during_the_last_checkpoint_write_then_resume(capsys, data_root, tmp_path):
    """A real SIGKILL as the last checkpoint is about to replace the previous one (checkpoints of
    epochs 0, 1, 2): the previous checkpoint is intact, the temporary and the dead process's lock
    are left behind, and --resume finishes the run exactly, removing both."""
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run([sys.executable, "-c", KILL_AT_THIRD_CHECKPOINT,
                           *train_args(data_root, out, **{"train.epochs": 2})],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == -9, proc.stderr
    assert load_checkpoint(out / CHECKPOINT)["epoch"] == 1
    assert list((out / "checkpoints").glob(".last.pt.*.tmp")) and (out / LOCK).is_file()
    rc, _, err = cli(capsys, "train", "--resume", str(out))
    assert rc == 0, err
    assert load_checkpoint(out / CHECKPOINT)["epoch"] == 2
    assert not list((out / "checkpoints").glob(".last.pt.*.tmp")) and not (out / LOCK).exists()


# ---- 16: the divergence message names the learner's knobs ----------------------------------------
def test_bp_divergence_does_not_suggest_state_lr(data_root, tmp_path):
    cfg = load_config(None, tiny_overrides(data_root, tmp_path / "run",
                                           **{"learner.name": "bp", "train.max_energy": 1e-9}))
    with pytest.raises(train_mod.Diverged) as e:
        fit(cfg)
    assert "state_lr" not in str(e.value) and "optim.lr (now 0.01)" in str(e.value)


def test_checkpoint_bytes_are_verified_before_unpickling(tmp_path):
    """The CRC check runs on the bytes that are then loaded (one read)."""
    path = tmp_path / "ck.pt"
    rundir.save_checkpoint(path, {"format": rundir.CHECKPOINT_FORMAT, "w": torch.arange(4096.0)})
    assert torch.equal(load_checkpoint(path)["w"], torch.arange(4096.0))
    flip_tensor_bytes(path, n=1)
    with pytest.raises(UserError, match="fails its CRC check"):
        load_checkpoint(path)
