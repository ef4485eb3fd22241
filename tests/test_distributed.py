"""Data parallel through torchrun (fastpc.distributed): 2 CPU processes on gloo train the same
weights as 1 process on the same global batch.

The launches are real: ``python -m torch.distributed.run --nproc_per_node 2 --standalone``. One
runs this file as its worker (``__main__`` below): bp, spc, epc, ep, iPC and SeqIL at the library
level, each rank checking its replica against the 1-process steps it computes itself under
``distributed.local()``; one runs ``fastpc train``; the rest (a killed run resumed, bad input,
the bench suite) are marked slow. Float64 throughout: the two paths differ only
by the order of the batch sums (rank parts added after), so they agree to a few hundred ulps
(tests/numerics.py), far below what a different line-search decision or an unreduced gradient
changes (the controls, which must differ).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from numerics import two_path_tol
from tinydata import tiny_overrides

HERE = Path(__file__).resolve()
# terms summed on the way to a weight: batch sums of 16 in up to 40 inference steps, three updates
TOL = two_path_tol(torch.float64, 16 * 40 * 3)
STEPS, GLOBAL_BATCH = 3, 16
CASES = {  # learner: options (defaults; spc with the line search on, long enough for its late phase)
    "bp": {},
    "spc": {"iters": 25, "state_lr": 0.5, "safeguard": True, "armijo": 0.5},
    "epc": {"iters": 8},
    "epc-tol": {"iters": 40, "tol": 1e-3},
    "ep": {},
    "spc-ipc": {"incremental": True, "iters": 4},
    "spc-seqil": {"schedule": "sequential", "iters": 12, "tol": 0.05},
}
LINE_SEARCH = ("spc", "epc", "epc-tol")  # the cases whose decisions read batch sums in descent.minimize


def launch(*args: str, nproc: int = 2, timeout: float = 180, **popen) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node nproc --standalone ARGS`` (a free port, one thread per rank)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE.parent), os.environ.get("PYTHONPATH")]))}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env,
                          stdin=subprocess.DEVNULL, **popen)


def weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=False)["learner"]["net"]


# ---- the worker: runs under torchrun -------------------------------------------------------------
def _problem(seed: int):
    import fastpc as fpc

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(STEPS, GLOBAL_BATCH, 12, generator=g, dtype=torch.float64)
    y = torch.randint(0, 5, (STEPS, GLOBAL_BATCH), generator=g)
    torch.manual_seed(seed)
    net = fpc.mlp([12, 10, 10, 10, 5], act="tanh").double()
    return net, x, y


def _train(name: str, shard: bool, reduce: bool, line_search: bool = True) -> dict[str, torch.Tensor]:
    """Weights after STEPS steps: on this rank's parts (``shard``) or the whole batches, with or
    without the reductions (``line_search=False``: the gradients reduced, but the line search
    deciding on the rank's part alone)."""
    import contextlib

    import fastpc as fpc
    from fastpc import distributed
    from fastpc.learners import descent

    if not line_search:
        hook, descent.batch_total = descent.batch_total, lambda *s: s
        try:
            return _train(name, shard, reduce)
        finally:
            descent.batch_total = hook

    net, x, y = _problem(0)
    opts = CASES[name]
    learner = fpc.make_learner(name.split("-")[0], net, optimizer=torch.optim.SGD(net.parameters(), lr=0.2), **opts)
    with contextlib.nullcontext() if reduce else distributed.local():
        for t in range(STEPS):
            n = GLOBAL_BATCH - (t == STEPS - 1)  # the last batch odd: parts of 8 and 7 examples
            part = distributed.part(n) if shard else slice(None)
            learner.step(x[t, :n][part], y[t, :n][part])
    return {k: v.clone() for k, v in net.state_dict().items()}


def _worker(out: Path) -> None:
    from fastpc import distributed

    torch.set_num_threads(1)
    report = {}
    # the library's group: gloo, and a barrier + collection before it is destroyed (without them
    # a rank that leaves first aborts its peer's shutdown now and then: "terminate called without
    # an active exception", SIGABRT, in 2 of 10 runs)
    with distributed.process_group(torch.device("cpu")):
        for name in CASES:
            ddp = _train(name, shard=True, reduce=True)  # this rank's part, reduced: the global step
            ref = _train(name, shard=False, reduce=False)  # one process on the whole batches
            unreduced = _train(name, shard=True, reduce=False)  # control: the part alone
            local_search = _train(name, shard=True, reduce=True, line_search=False)  # control: decisions per part
            gap = max((ddp[k] - ref[k]).abs().max().item() for k in ref)
            ctrl = max((unreduced[k] - ref[k]).abs().max().item() for k in ref)
            ls_ctrl = max((local_search[k] - ref[k]).abs().max().item() for k in ref)
            report[name] = {"gap": gap, "control": ctrl, "line_search_control": ls_ctrl,
                            "close": all(torch.allclose(ddp[k], ref[k], **TOL) for k in ref)}
    (out / f"rank{distributed.rank()}.json").write_text(json.dumps(report))


# ---- the tests ------------------------------------------------------------------------------------
def test_two_processes_equal_one_at_the_library_level(tmp_path):
    """bp, spc (line search, Armijo and late phase), epc (default line search; and tol), ep, iPC
    and SeqIL (tol) on 2 gloo processes give the 1-process weights, also from a batch split into
    unequal parts; each rank's part alone (no reductions) does not, nor the line search deciding
    on a rank's part."""
    proc = launch(str(HERE), str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for rank in (0, 1):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        for name, r in report.items():
            assert r["close"], f"rank {rank} {name}: 2 processes differ from 1 by {r['gap']:.3g}"
            assert r["control"] > 1e6 * TOL["atol"], f"{name}: the control should differ ({r['control']:.3g})"
            if name in LINE_SEARCH:  # the line search deciding on a part alone moves the weights too
                assert r["line_search_control"] > 1e6 * TOL["atol"], (name, r["line_search_control"])


def _config(data_root: Path, out: Path, **extra) -> list[str]:
    sets = {"train.dtype": "float64", "train.threads": 1, "data.eval_batch_size": 50, "learner.name": "epc",
            "train.epochs": 1, "learner.iters": 6}
    sets.update(extra)
    return ["-m", "fastpc", "train", "--set", *tiny_overrides(data_root, out, **sets)]


def test_fastpc_train_on_two_processes_equals_one(data_root, tmp_path):
    """``torchrun -m fastpc train`` (epc, default line search): rank 0 writes the run folder; the
    weights, test accuracy and training metrics are the 1-process run's."""
    from fastpc.cli import main

    args = _config(data_root, tmp_path / "two")
    proc = launch(*args)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("test_acc") == 1  # rank 0 reports
    assert main(_config(data_root, tmp_path / "one")[2:]) == 0
    one, two = weights(tmp_path / "one/checkpoints/last.pt"), weights(tmp_path / "two/checkpoints/last.pt")
    for k in one:
        torch.testing.assert_close(two[k], one[k], **TOL)
    s1, s2 = (json.loads((tmp_path / run / "summary.json").read_text()) for run in ("one", "two"))
    assert s2["test_acc"] == s1["test_acc"] and s2["status"] == s1["status"] == "completed"
    rows = [torch.load(tmp_path / run / "checkpoints/last.pt", weights_only=False)["history"]["metrics"][-1]
            for run in ("one", "two")]
    for key in ("train_loss", "train_acc", "train_energy", "test_loss", "iters"):
        assert rows[1][key] == pytest.approx(rows[0][key], rel=1e-12), key


def test_batch_parts_of_all_ranks_are_the_one_process_batches():
    """Every rank draws the same seeded order (and augmentation); the ranks' parts, in rank order,
    are exactly the batches of one process; a last batch smaller than the rank count is dropped."""
    from fastpc.data import BatchLoader

    x = torch.arange(23 * 3 * 8 * 8, dtype=torch.float32).reshape(23, 3, 8, 8)
    y = torch.arange(23) % 5
    for augment, n in ((False, 23), (True, 23), (False, 21)):
        one = list(BatchLoader(x[:n], y[:n], 4, seed=7, augment=augment))
        parts = []
        for r in range(3):
            loader = BatchLoader(x[:n], y[:n], 4, seed=7, augment=augment)
            loader.shard(r, 3)
            parts.append(list(loader))
            assert len(loader) == len(parts[-1])
        kept = [b for b in one if len(b[1]) >= 3]  # 23 = 5·4 + 3 keeps the last; 21 = 5·4 + 1 drops it
        assert len(kept) == len(parts[0]) == len(one) - (n == 21)
        for i, (xb, yb) in enumerate(kept):
            assert torch.equal(torch.cat([p[i][0] for p in parts]), xb)
            assert torch.equal(torch.cat([p[i][1] for p in parts]), yb)
            assert [len(p[i][1]) for p in parts] == [len(yb) // 3 + (r < len(yb) % 3) for r in range(3)]


def test_torchrun_settings_before_the_group_exists(monkeypatch):
    """Under torchrun's environment: a batch size the processes cannot split is a UserError naming
    both numbers; device auto is this rank's GPU or the CPU, one GPU for all ranks is refused;
    compile auto is off, true refused."""
    from fastpc import UserError, distributed
    from fastpc.build import resolve_compile, resolve_device

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert distributed.launched() and not distributed.is_main() and not distributed.active()
    with pytest.raises(UserError, match=r"data.batch_size=31 is not divisible by the 2 processes"):
        distributed.check_batch_size(31)
    distributed.check_batch_size(32)
    if not torch.cuda.is_available():
        assert resolve_device("auto") == torch.device("cpu")
    elif torch.cuda.device_count() > 1:
        assert resolve_device("auto") == torch.device("cuda:1")
    with pytest.raises(UserError, match="would put every process on one GPU"):
        resolve_device("cuda:0")
    assert resolve_compile("auto", 10**9, torch.device("cpu")) is False
    with pytest.raises(UserError, match="learner.compile=true does not run under torchrun"):
        resolve_compile(True, 1, torch.device("cpu"))
    assert distributed.part(5) == slice(3, 5)  # rank 1 of 2: the second, smaller part


@pytest.mark.slow
def test_batch_size_not_divisible_fails_on_every_rank(data_root, tmp_path):
    """data.batch_size 31 on 2 processes: each rank ends with the same one-line error and status
    2 before joining the group (no rank waits in a collective; the timeout would catch it)."""
    proc = launch(*_config(data_root, tmp_path / "bad", **{"data.batch_size": 31}), timeout=120)
    assert proc.returncode != 0
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("error:")]
    assert len(lines) == 2 and lines[0] == lines[1], proc.stderr[-2000:]
    assert "data.batch_size=31" in lines[0] and "2 processes" in lines[0]
    # torchrun's record: status 2, or SIGTERM for a rank still shutting down when the first had
    # exited (torchrun then ends the rest), after it printed its line
    codes = [ln.split(":")[1].split()[0] for ln in proc.stderr.splitlines() if ln.strip().startswith("exitcode")]
    assert "2" in codes and set(codes) <= {"2", "-15"}, codes
    assert not (tmp_path / "bad").exists()


def kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and every process below it, as a job scheduler ends a job (torchrun starts
    each worker in a session of its own, so its process group alone would leave them running)."""
    def below(p: int) -> list[int]:
        kids = []
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                kids += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
        return kids + [d for k in kids for d in below(k)]

    for p in [pid, *below(pid)]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds the workers through /proc (Linux)")
def test_a_killed_two_process_run_resumes_to_the_uninterrupted_weights(data_root, tmp_path):
    """SIGKILL the whole torchrun group once the first epoch's checkpoint is written, resume with
    torchrun: the weights of an uninterrupted 2-process run, bit for bit (same process count)."""
    sets = {"train.epochs": 6, "learner.iters": 20}
    full = launch(*_config(data_root, tmp_path / "full", **sets))
    assert full.returncode == 0, full.stderr[-3000:]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--standalone",
           *_config(data_root, tmp_path / "killed", **sets)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env,
                            start_new_session=True)
    ckpt = tmp_path / "killed/checkpoints/last.pt"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if ckpt.is_file() and torch.load(ckpt, weights_only=False)["epoch"] >= 1:
            break
        time.sleep(0.05)
    kill_tree(proc.pid)
    proc.wait(timeout=30)
    epoch = torch.load(ckpt, weights_only=False)["epoch"]
    assert 1 <= epoch < 6, f"killed after epoch {epoch}: too late to test a resume"
    resumed = launch("-m", "fastpc", "train", "--resume", str(tmp_path / "killed"))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = weights(tmp_path / "full/checkpoints/last.pt"), weights(ckpt)
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.mark.slow
def test_bench_ddp_quick_on_tiny_data(data_root, tmp_path):
    """``fastpc bench ddp --quick`` (bp, float64) writes its table: the 2-process run reaches the
    1-process run's test accuracy, its weights within rounding of it after these few steps."""
    from fastpc.cli import main

    sets = [s for s in tiny_overrides(data_root, tmp_path / "unused") if not s.startswith("train.out=")]
    assert main(["bench", "ddp", "--quick", "--threads", "1", "--out", str(tmp_path), "--set", *sets]) == 0
    rows = json.loads((tmp_path / "ddp.json").read_text())["rows"]
    assert [(r["processes"], r["threads_each"]) for r in rows] == [(1, 1), (2, 1)]
    assert rows[1]["test_acc"] == rows[0]["test_acc"] and rows[1]["weight_gap"] < 1e-12
    assert "| bp | float64 | 2 |" in (tmp_path / "ddp.md").read_text()


if __name__ == "__main__":  # the worker of test_two_processes_equal_one_at_the_library_level
    _worker(Path(sys.argv[1]))
