"""Long inference converges (issue 15): with the default options and a large ``iters``, epc and
spc reach the equilibrium (the closed form on a linear net, each other's weight gradients on a
nonlinear one); ``tol`` stops early and reports the iterations run; the short-inference regime
(T ≤ ``armijo_steps``) is untouched by the late phase of the line search."""

from __future__ import annotations

import pytest
import torch

import fastpc as fpc
from fastpc import energy as E
from fastpc.learners import descent
from reference import Reference

DT = torch.float64


def _tanh_problem(seed=0):
    """The issue's net: a 5-layer tanh MLP 12-10-10-10-10-4, batch 16, float64."""
    torch.manual_seed(seed)
    net = fpc.mlp([12, 10, 10, 10, 10, 4], act="tanh").to(DT)
    x = torch.randn(16, 12, dtype=DT)
    y = torch.randint(0, 4, (16,))
    return net, x, y


def _rel(a: dict, b: dict) -> float:
    return max(((a[k] - b[k]).norm() / b[k].norm()).item() for k in b)


@pytest.mark.parametrize("loss,iters", [("mse", 4000), ("ce", 1000)])
def test_epc_default_options_reach_spc_converged_gradients(loss, iters):
    """The default line search (armijo 0.99) no longer stalls: at η_e = 0.05 the issue measured
    13 % (mse) / 0.7 % (ce) from sPC's converged gradients after 4,000 iterations."""
    net, x, y = _tanh_problem()
    ref = fpc.make_learner("spc", net, loss=loss, iters=20000, state_lr=0.2).grads(x, y)
    lrn = fpc.make_learner("epc", net, loss=loss, iters=iters, state_lr=0.05)
    assert lrn.safeguard and lrn.armijo == 0.99  # the defaults
    eq = lrn.infer(x, y, trace=True)
    assert eq.grad_trace[-1] < 1e-6 * eq.grad_trace[0]
    assert _rel(lrn.grads(x, y), ref) < 1e-6


def _linear_equilibrium(net, x, y):
    """The minimiser of the quadratic energy of a linear net with mse, by one Newton step
    from zero (exact for a quadratic): H s* = −∇E(0), H and ∇E by autograd of energy.py."""
    shapes = [s.shape for s in net.forward_states(x)[0]]
    sizes = [torch.Size(s).numel() for s in shapes]

    def e_of(flat):
        states = [t.view(s) for t, s in zip(flat.split(sizes), shapes)]
        preds, out = E.predictions(net.blocks, x, states)
        return E.energy(E.errors(states, preds), out, y, "mse")

    z = torch.zeros(sum(sizes), dtype=DT)
    g0 = torch.autograd.functional.jacobian(e_of, z)
    H = torch.autograd.functional.hessian(e_of, z)
    sol = torch.linalg.solve(H, -g0)
    return [t.view(s) for t, s in zip(sol.split(sizes), shapes)]


@pytest.mark.parametrize("name", ["spc", "epc"])
def test_default_options_reach_linear_closed_form(name):
    torch.manual_seed(1)
    net = fpc.mlp([6, 5, 5, 4, 3], act="identity").to(DT)
    x, y = torch.randn(4, 6, dtype=DT), torch.randn(4, 3, dtype=DT)
    want = _linear_equilibrium(net, x, y)
    lrn = fpc.make_learner(name, net, loss="mse", iters=3000)
    eq = lrn.infer(x, y)
    scale = max(w.abs().max().item() for w in want)
    for s, w in zip(eq.states, want):
        torch.testing.assert_close(s, w, rtol=0, atol=1e-9 * scale)


@pytest.mark.parametrize("name", ["spc", "epc"])
def test_tol_stops_early_and_reports_iterations(name):
    net, x, y = _tanh_problem()
    cap = 100_000
    lrn = fpc.make_learner(name, net, loss="ce", iters=cap, state_lr=0.1, tol=1e-8)
    eq = lrn.infer(x, y, trace=True)
    assert 0 < eq.iters < cap
    assert eq.grad_trace.shape == (eq.iters + 1,) and eq.trace.shape == (eq.iters + 1,)
    assert eq.grad_trace[-1] <= 1e-8 * eq.grad_trace[0]
    assert eq.grad_trace[-2] > 1e-8 * eq.grad_trace[0]  # it stopped at the first iterate below tol
    # the same run without tol, capped where tol stopped, ends at the same states
    plain = fpc.make_learner(name, net, loss="ce", iters=eq.iters, state_lr=0.1).infer(x, y)
    for a, b in zip(eq.states, plain.states):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert fpc.make_learner(name, net, iters=cap, tol=1e-8, compile=True).uses_compiled_step is False


@pytest.mark.parametrize("name", ["spc", "epc"])
def test_late_phase_and_tol_match_the_reference_loop(name):
    """Past ``armijo_steps`` the fast loop (grow / accept rule, tol) equals the autograd reference."""
    net, x, y = _tanh_problem(3)
    lrn = fpc.make_learner(name, net, loss="mse", iters=60, state_lr=0.05, safeguard=True, armijo=0.9,
                           armijo_steps=8, tol=1e-6)
    got, want = lrn.infer(x, y), Reference(lrn).infer(x, y)
    assert got.iters == want.iters
    for a, b in zip(got.states, want.states):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(lrn.grads(x, y), Reference(lrn).grads(x, y), rtol=1e-9, atol=1e-11)


def test_sync_free_line_search_matches_the_branching_one(monkeypatch):
    net, x, y = _tanh_problem(4)
    lrn = fpc.make_learner("epc", net, loss="mse", iters=80, state_lr=0.05)
    branched = lrn.grads(x, y)
    monkeypatch.setattr(descent, "BRANCH_ON_CPU", False)
    torch.testing.assert_close(lrn.grads(x, y), branched, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("T", [1, 5, 20])
def test_short_inference_is_untouched_by_the_late_phase(T):
    """T ≤ armijo_steps: every step answers to ``armijo``, as before the late phase existed."""
    net, x, y = _tanh_problem(2)
    a = fpc.make_learner("epc", net, iters=T).grads(x, y)
    b = fpc.make_learner("epc", net, iters=T, armijo_steps=10**9).grads(x, y)
    for k in a:
        assert torch.equal(a[k], b[k])


def test_bad_tol_and_armijo_steps():
    net, _, _ = _tanh_problem()
    for bad in (-1e-3, 1.0, "x"):
        with pytest.raises(ValueError, match="tol"):
            fpc.make_learner("epc", net, tol=bad)
    with pytest.raises(ValueError, match="armijo_steps"):
        fpc.make_learner("spc", net, armijo_steps=-1)
    with pytest.raises(ValueError, match="tol"):
        fpc.make_learner("bp", net, tol=1e-6)


def test_fit_reports_the_iterations_run(data_root, tmp_path, isolated):
    """learner.tol in a run: metrics.csv and summary.json give the mean inference iterations
    per step, below the cap; the energy trace carries ‖∇E‖ per iteration."""
    import json

    from fastpc.config import load_config
    from fastpc.runfiles import read_metrics
    from fastpc.train import fit
    from tinydata import tiny_overrides

    cfg = load_config(None, tiny_overrides(data_root, tmp_path / "run", **{
        "learner.name": "epc", "learner.iters": 500, "learner.tol": 1e-3, "train.epochs": 1}))
    summary = fit(cfg)
    rows = read_metrics(tmp_path / "run" / "metrics.csv")
    assert 0 < rows[0]["iters"] < 500
    assert summary.inference_iters == rows[0]["iters"]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["inference_iters"] == rows[0]["iters"]
    trace = json.loads((tmp_path / "run" / "energy_trace.json").read_text())[-1]
    assert len(trace["grad_norm"]) == len(trace["total"])
    assert trace["grad_norm"][-1] <= 1e-3 * trace["grad_norm"][0]
