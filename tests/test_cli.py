"""The `fastpc` command: every bad input exits 2 with one `error:` line and damages nothing."""

from __future__ import annotations

import gzip
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
from tinydata import FILES, tiny_overrides

from fastpc.cli import main
from fastpc.train import CHECKPOINT


pytestmark = pytest.mark.usefixtures("isolated")


@pytest.fixture(scope="module")
def trained(data_root, tmp_path_factory):
    """A finished 1-epoch run (shared; tests must not modify it)."""
    run = tmp_path_factory.mktemp("runs") / "run"
    assert main(["train", "--set", *tiny_overrides(data_root, run)]) == 0
    return run


def cli(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(list(args))
    out, err = capsys.readouterr()
    return rc, out, err


def assert_user_error(rc: int, err: str, *needles: str) -> None:
    assert rc == 2, err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    for n in needles:
        assert n in lines[0], lines[0]


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_train_eval_report(capsys, trained):
    rc, out, err = cli(capsys, "eval", str(trained))
    assert rc == 0 and '"test_acc"' in out
    rc, out, err = cli(capsys, "report", str(trained))
    assert rc == 0 and "test_acc" in out and (trained / "plots" / "curves.png").is_file()


@pytest.mark.parametrize("sets, needles", [
    (["learner.stat_lr=0.1"], ["unknown config key 'learner.stat_lr'", "did you mean 'learner.state_lr'"]),
    (["learner.iters=abc"], ["learner.iters", "expected an integer"]),
    (["learner.state_lr=-1"], ["learner.state_lr", "must be > 0"]),
    (["learner.name=ppc"], ["learner.name", "bp, spc, epc"]),
    (["data.name=imagenet"], ["data.name", "fashion-mnist"]),
    (["train.epochs=0"], ["train.epochs", ">= 1"]),
    (["model.arch=vgg", "model.name=vgg99"], ["model.name", "vgg5"]),
])
def test_bad_config_values(capsys, tmp_path, sets, needles):
    rc, _, err = cli(capsys, "train", "--set", *sets, f"train.out={tmp_path / 'run'}")
    assert_user_error(rc, err, *needles)
    assert not (tmp_path / "run").exists()


def test_bad_config_files_and_arguments(capsys, tmp_path):
    (tmp_path / "bad.yaml").write_text("learner: [1, 2\n")
    assert_user_error(*cli(capsys, "train", str(tmp_path / "bad.yaml"))[::2], "not valid YAML")
    assert_user_error(*cli(capsys, "train", str(tmp_path / "nope.yaml"))[::2], "not found")
    assert_user_error(*cli(capsys, "train", "no-such-preset")[::2], "presets:")
    assert_user_error(*cli(capsys, "train", "--set", "learner.iters")[::2], "key=value")
    assert_user_error(*cli(capsys, "train", "--bogus")[::2], "unrecognized arguments")
    assert_user_error(*cli(capsys, "frobnicate")[::2], "invalid choice")
    assert_user_error(*cli(capsys, "eval", str(tmp_path))[::2], "not a fastpc run folder")
    assert_user_error(*cli(capsys, "train", "--resume", str(tmp_path / "missing"))[::2], "cannot resume")


def test_missing_data_file(capsys, tmp_path, data_root):
    root = tmp_path / "partial"
    root.mkdir()
    for name in FILES["train"]:  # test files missing
        shutil.copy(data_root / name, root / name)
    rc, _, err = cli(capsys, "train", "--set", *tiny_overrides(root, tmp_path / "run"))
    assert_user_error(rc, err, "mnist test data not found")
    assert not (tmp_path / "run").exists()


def test_truncated_data_file(capsys, tmp_path, data_root):
    root = tmp_path / "trunc"
    shutil.copytree(data_root, root)
    img = root / FILES["train"][0]
    raw = gzip.decompress(img.read_bytes())
    img.write_bytes(gzip.compress(raw[:-7]))
    rc, _, err = cli(capsys, "train", "--set", *tiny_overrides(root, tmp_path / "run"))
    assert_user_error(rc, err, "truncated", str(img))
    img.write_bytes(img.read_bytes()[:40])  # a cut gzip stream
    rc, _, err = cli(capsys, "train", "--set", *tiny_overrides(root, tmp_path / "run"))
    assert_user_error(rc, err, str(img))


def test_checksum_mismatch(capsys, tmp_path, monkeypatch, data_root):
    mirror = tmp_path / "mirror" / "mnist"
    shutil.copytree(data_root, mirror)  # valid IDX files, but not the official bytes
    monkeypatch.setenv("FASTPC_MIRROR", (tmp_path / "mirror").as_uri())
    root = tmp_path / "empty"
    rc, _, err = cli(capsys, "train", "--set", *tiny_overrides(root, tmp_path / "run", **{"data.download": True}))
    assert rc == 2 and "Traceback" not in err
    errors = err.strip().splitlines()
    assert len(errors) == 1 and errors[0].startswith("error:")  # download notes go to stdout
    assert "checksum mismatch" in errors[0] and "expected md5" in errors[0]
    assert not any((root / "mnist").glob("*.gz")) and not (tmp_path / "run").exists()


def test_existing_run_folder_is_refused(capsys, data_root, trained):
    before = snapshot(trained)
    rc, _, err = cli(capsys, "train", "--set", *tiny_overrides(data_root, trained))
    assert_user_error(rc, err, "already exists", "--resume", "--overwrite")
    assert snapshot(trained) == before


def test_overwrite_replaces_run_folder(capsys, data_root, tmp_path):
    run = tmp_path / "run"  # a run folder (only those may be replaced) with a stray file in it
    assert main(["train", "--set", *tiny_overrides(data_root, run, **{"learner.name": "bp"})]) == 0
    (run / "stale.txt").write_text("old")
    rc, _, err = cli(capsys, "train", "--overwrite", "--set", *tiny_overrides(data_root, run))
    assert rc == 0, err
    assert not (run / "stale.txt").exists() and (run / CHECKPOINT).is_file()


def test_checkpoint_of_another_architecture(capsys, data_root, tmp_path, trained):
    before = snapshot(trained)
    rc, _, err = cli(capsys, "train", "--resume", str(trained), "--set", "train.epochs=2", "model.width=32")
    assert_user_error(rc, err, "does not fit the configured model", str(trained / CHECKPOINT))
    other = tmp_path / "other"
    assert main(["train", "--set", *tiny_overrides(data_root, other, **{"model.depth": 4})]) == 0
    capsys.readouterr()
    rc, _, err = cli(capsys, "eval", str(other), "--checkpoint", str(trained / CHECKPOINT))
    assert_user_error(rc, err, "does not fit the configured model")
    assert snapshot(trained) == before


def test_corrupt_checkpoint(capsys, tmp_path, trained):
    bad = tmp_path / "bad.pt"
    bad.write_bytes((trained / CHECKPOINT).read_bytes()[:1000])
    rc, _, err = cli(capsys, "eval", str(trained), "--checkpoint", str(bad))
    assert_user_error(rc, err, "unreadable or unsafe")


def test_resume_of_finished_run_names_the_knob(capsys, trained):
    before = snapshot(trained)
    rc, _, err = cli(capsys, "train", "--resume", str(trained))
    assert_user_error(rc, err, "already completed 1 epoch", "train.epochs=2")
    assert snapshot(trained) == before


def test_bench_dispatch(capsys, monkeypatch):
    import fastpc.bench as bench

    fake = types.ModuleType("fastpc_fake_suite")
    fake.add_arguments = lambda p: p.add_argument("--n", type=int, default=1)
    fake.run = lambda args: 0 if args.n == 3 else 5
    monkeypatch.setitem(sys.modules, "fastpc_fake_suite", fake)
    monkeypatch.setitem(bench.SUITES, "fake", "fastpc_fake_suite")
    assert main(["bench", "fake", "--n", "3"]) == 0
    assert main(["bench", "fake"]) == 5
    assert_user_error(*cli(capsys, "bench", "fake", "--m", "1")[::2], "unrecognized arguments")
    assert_user_error(*cli(capsys, "bench", "nope")[::2], "invalid choice")
    monkeypatch.setitem(bench.SUITES, "broken", "fastpc_no_such_module")
    assert_user_error(*cli(capsys, "bench", "broken")[::2], "not available")


def test_real_subprocess_bad_input(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "fastpc", "train", "--set", "learner.stat_lr=0.1", f"train.out={tmp_path / 'r'}"],
        capture_output=True, text=True, stdin=subprocess.DEVNULL, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: unknown config key 'learner.stat_lr'; did you mean 'learner.state_lr'?"]
    assert not (tmp_path / "r").exists()


def test_run_stored_before_weight_init_was_renamed(capsys, data_root, tmp_path, trained):
    """A run whose config.yaml and checkpoint say ``model.init`` (before ``model.weight_init``)
    can still be evaluated, reported and resumed; the resumed run stores the new name."""
    import yaml

    from fastpc.rundir import load_checkpoint, save_checkpoint

    run = Path(shutil.copytree(trained, tmp_path / "old"))

    def old_style(config: dict) -> dict:
        config = {k: dict(v) for k, v in config.items()}
        config["model"]["init"] = config["model"].pop("weight_init")
        return config

    config = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump(old_style(config), sort_keys=False))
    ckpt = load_checkpoint(run / CHECKPOINT)
    ckpt["config"] = old_style(ckpt["config"])
    save_checkpoint(run / CHECKPOINT, ckpt)
    assert "init: orthogonal" in (run / "config.yaml").read_text()

    rc, out, err = cli(capsys, "eval", str(run))
    assert rc == 0 and '"test_acc"' in out, err
    rc, out, err = cli(capsys, "report", str(run), "--no-diagnostics")
    assert rc == 0 and "test_acc" in out, err
    rc, out, err = cli(capsys, "train", "--resume", str(run), "--set", "train.epochs=2")
    assert rc == 0, err
    assert yaml.safe_load((run / "config.yaml").read_text())["model"]["weight_init"] == "orthogonal"
    assert load_checkpoint(run / CHECKPOINT)["epoch"] == 2
    # a config the user writes with the old key is refused, naming the new one
    rc, _, err = cli(capsys, "train", "--resume", str(run), "--set", "train.epochs=3", "model.init=gaussian")
    assert_user_error(rc, err, "'model.init' is now 'model.weight_init'")
