"""fastpc.runtime: thread choice beside other work, denormal flushing (issue 15)."""

from __future__ import annotations

import pytest
import torch

import fastpc as fpc
from fastpc.bench.speed import step_drift
from fastpc.config import load_config
from fastpc.errors import UserError
from fastpc.runtime import available_cores, flush_denormals, pick_threads

SUB = torch.finfo(torch.float32).tiny / 4  # a subnormal float32


def _sub_survives() -> bool:
    return (torch.tensor([SUB]) * 1.0).item() != 0.0


def test_pick_threads():
    cores = available_cores()
    assert pick_threads(None) is None
    assert pick_threads(3) == 3
    assert pick_threads("auto", load=0.0) == cores
    assert pick_threads("auto", load=0.4) == cores
    assert pick_threads("auto", load=float(cores)) == 1  # the cores are busy: one thread, no spinning fight
    assert pick_threads("auto", load=100.0) == 1
    assert pick_threads("auto", load=float(cores - 1)) == 1
    if cores >= 4:
        assert pick_threads("auto", load=2.0) == cores - 2
    for bad in (0, -1, 1.5, "two", True):
        with pytest.raises(ValueError, match="threads"):
            pick_threads(bad)


def test_flush_denormals_flushes_inside_and_restores_after():
    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU cannot flush denormals")
    assert _sub_survives()
    with flush_denormals(True) as on:
        assert on and not _sub_survives()
    assert _sub_survives()
    with flush_denormals(False) as on:
        assert not on and _sub_survives()


def test_flushing_changes_no_training_result_beyond_rounding():
    """A few epc steps on a GELU net: losses, energies and weights with and without flushing
    agree to fp32 rounding (they differ only where a value falls below 1.2e-38)."""
    def run(flush):
        torch.manual_seed(0)
        net = fpc.mlp([20, 16, 16, 5], act="gelu")
        lrn = fpc.make_learner("epc", net, optimizer=torch.optim.Adam(net.parameters(), lr=1e-2), iters=8,
                               state_lr=0.001)
        g = torch.Generator().manual_seed(1)
        out = []
        with flush_denormals(flush):
            for _ in range(5):
                x, y = torch.randn(8, 20, generator=g), torch.randint(0, 5, (8,), generator=g)
                r = lrn.step(x, y)
                out.append(torch.stack([r.loss, r.energy]))
        return torch.stack(out), [p.detach().clone() for p in net.parameters()]

    (a, wa), (b, wb) = run(True), run(False)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-30)
    for p, q in zip(wa, wb):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-7)


def test_config_threads_and_flush_keys():
    cfg = load_config(None, ["train.threads=auto", "train.flush_denormal=false"])
    assert cfg.train.threads == "auto" and cfg.train.flush_denormal is False
    assert load_config(None, ["train.threads=2"]).train.threads == 2
    assert load_config(None, ["train.threads=null"]).train.threads is None
    for bad in ("0", "many"):
        with pytest.raises(UserError, match="train.threads"):
            load_config(None, [f"train.threads={bad}"])


def test_step_drift_reports_first_and_last_medians():
    ts = [0.001] * 150 + [0.002] * 150
    d = step_drift({"spc": ts, "short": ts[:150]})
    assert set(d) == {"spc"}  # fewer than 200 steps: no comparison
    assert d["spc"]["first_ms"] == pytest.approx(1.0) and d["spc"]["last_ms"] == pytest.approx(2.0)
    assert d["spc"]["last_over_first"] == pytest.approx(2.0)


def test_by_device_and_dtype_keeps_every_tensor_once_in_first_seen_order():
    from fastpc.runtime import by_device_and_dtype

    a, b, c, d = torch.zeros(2), torch.zeros(3, dtype=torch.float64), torch.ones(4), torch.ones(1, dtype=torch.float64)
    groups = by_device_and_dtype([a, b, c, d])
    assert list(groups) == [(a.device, torch.float32), (a.device, torch.float64)]
    assert [t is u for t, u in zip(groups[(a.device, torch.float32)], (a, c))] == [True, True]
    assert [t is u for t, u in zip(groups[(a.device, torch.float64)], (b, d))] == [True, True]
    same = by_device_and_dtype([a, c])
    assert list(same) == [(a.device, torch.float32)] and [id(t) for t in same[(a.device, torch.float32)]] == [id(a), id(c)]


def test_constant_is_made_once_per_kind():
    from fastpc.runtime import constant

    a = constant((0.5, 1.0), torch.float32, torch.device("cpu"))
    assert a is constant((0.5, 1.0), torch.float32, torch.device("cpu"))
    assert torch.equal(a, torch.tensor([0.5, 1.0]))
    b = constant((0.5, 1.0), torch.float64, torch.device("cpu"))
    assert b is not a and b.dtype == torch.float64
