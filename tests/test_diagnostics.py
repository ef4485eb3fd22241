"""fastpc.diagnostics: arithmetic on tiny nets, checked against theory (PAPERS.md §1–2)."""

import torch
from torch.testing import assert_close

import fastpc as fpc
from fastpc import diagnostics as D
from fastpc import energy as E


def _batch(n=6, d=7, k=4, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g, dtype=dtype), torch.randint(0, k, (n,), generator=g)


def _net(widths, act="tanh", seed=0):
    torch.manual_seed(seed)
    return fpc.mlp(widths, act=act).double()


def test_energy_map_equals_traced_energies():
    x, y = _batch()
    net = _net([7, 5, 5, 5, 4])
    for name in ("spc", "epc"):
        lrn = fpc.make_learner(name, net, iters=6, state_lr=0.1)
        m = D.energy_map(lrn, x, y)
        eq = lrn.infer(x, y, trace=True)
        assert m.energies.shape == (7, 4) and m.iters == 6 and m.depth == 4
        assert_close(m.energies, eq.layer_trace)
        # row t is the layer decomposition of the total energy after t steps
        assert_close(m.energies.sum(1), eq.trace)
        assert_close(m.energies[-1].sum(), eq.energy)
        # FF init: only the output cost is non-zero
        assert torch.all(m.energies[0, :-1] == 0) and m.energies[0, -1] > 0


def test_spc_first_arrival_one_layer_per_step_epc_all_at_once():
    """PAPERS.md §1: after FF init the signal moves one layer down per sPC step, so hidden
    layer k (distance L - k from the output) first has a non-zero error at iteration L - k;
    ePC reaches every layer on step 1."""
    x, y = _batch()
    L = 6
    net = _net([7] + [5] * (L - 1) + [4])
    spc = D.energy_map(fpc.make_learner("spc", net, iters=L + 2, state_lr=0.1), x, y)
    assert D.first_arrival(spc.energies) == [L - k for k in range(1, L)] + [0]
    epc = D.energy_map(fpc.make_learner("epc", net, iters=3, state_lr=0.1, safeguard=False), x, y)
    assert D.first_arrival(epc.energies) == [1] * (L - 1) + [0]


def test_spc_first_signal_scales_like_lambda_power_distance():
    """The first non-zero error at distance i from the output is ∝ λ^i (PAPERS.md §1): halving
    λ divides the energy ½‖ε‖² (∝ λ^{2i}) at its arrival by 4^i."""
    x, y = _batch()
    L = 5
    net = _net([7] + [5] * (L - 1) + [4], act="identity")
    e = [D.energy_map(fpc.make_learner("spc", net, iters=L, state_lr=lr), x, y).energies for lr in (0.02, 0.01)]
    for k in range(1, L):
        i = L - k
        assert_close(e[0][i, k - 1] / e[1][i, k - 1], torch.tensor(4.0 ** i, dtype=torch.float64), rtol=0.05, atol=0)


def test_alignment_of_bp_with_itself_is_one():
    x, y = _batch()
    net = _net([7, 6, 6, 4])
    a = D.alignment(fpc.make_learner("bp", net), x, y)
    assert_close(a.cosine, torch.ones(3, dtype=torch.float64))
    assert_close(a.norm_ratio, torch.ones(3, dtype=torch.float64))


def test_alignment_of_one_small_epc_step_matches_bp():
    """PAPERS.md §2: one ePC step from ε = 0 makes every hidden block's update η_e × its BP
    gradient to first order, and the output block's equal to its BP gradient."""
    x, y = _batch()
    net = _net([7, 6, 6, 6, 4])
    eta = 1e-6
    a = D.alignment(fpc.make_learner("epc", net, iters=1, state_lr=eta), x, y)
    assert_close(a.cosine, torch.ones(4, dtype=torch.float64), atol=1e-5, rtol=0)
    assert_close(a.norm_ratio[:-1], torch.full((3,), eta, dtype=torch.float64), rtol=1e-4, atol=0)
    assert_close(a.norm_ratio[-1], torch.tensor(1.0, dtype=torch.float64), rtol=1e-4, atol=0)


def test_alignment_by_hand():
    x, y = _batch()
    net = _net([7, 6, 4])
    ref = fpc.make_learner("bp", net).grads(x, y)
    other = {k: -2.0 * v for k, v in ref.items()}

    class Fixed(type(fpc.make_learner("bp", net))):
        def grads(self, x, y):
            return other

    a = D.alignment(Fixed(net), x, y, reference=ref)
    assert_close(a.cosine, -torch.ones(2, dtype=torch.float64))
    assert_close(a.norm_ratio, 2 * torch.ones(2, dtype=torch.float64))


def test_linear_equilibrium_is_the_minimum():
    x, y = _batch()
    net = _net([7, 5, 6, 5, 4], act="identity")
    s = D.linear_equilibrium(net, x, y)
    assert [t.shape for t in s] == [(6, 5), (6, 6), (6, 5)]
    # gradient of E at s* is zero
    vs = [t.clone().requires_grad_(True) for t in s]
    preds, out = E.predictions(net.blocks, x, vs)
    g = torch.autograd.grad(E.energy(E.errors(vs, preds), out, y, "mse"), vs)
    for gi in g:
        assert_close(gi, torch.zeros_like(gi), atol=1e-10, rtol=0)
    # and long sPC / ePC inference lands on it
    for name in ("spc", "epc"):
        eq = fpc.make_learner(name, net, loss="mse", iters=3000, state_lr=0.1).infer(x, y)
        for a, b in zip(eq.states, s):
            assert_close(a, b, atol=1e-6, rtol=0)


def test_linear_equilibrium_rejects_nonlinear_net_and_ce():
    x, y = _batch()
    import pytest
    with pytest.raises(ValueError, match="identity"):
        D.linear_equilibrium(_net([7, 5, 4], act="tanh"), x, y)
    with pytest.raises(ValueError, match="mse"):
        D.linear_equilibrium(_net([7, 5, 4], act="identity"), x, y, loss="ce")


def test_iters_to_equilibrium_and_vs_depth():
    x, y = _batch(n=4)
    net = _net([7, 5, 5, 5, 4], act="identity")
    s = D.linear_equilibrium(net, x, y)
    lrn = fpc.make_learner("spc", net, loss="mse", iters=5, state_lr=0.1)
    n = D.iters_to_equilibrium(lrn, x, y, s, tol=1e-3, max_iters=5000)
    assert n is not None and 0 < n < 5000 and lrn.iters == 5
    # the count is where the distance first falls below tol
    for k, hit in ((n - 1, False), (n, True)):
        eq = fpc.make_learner("spc", net, loss="mse", iters=k, state_lr=0.1).infer(x, y)
        ff, _ = net.forward_states(x)
        d = sum(((a - b) ** 2).sum() for a, b in zip(eq.states, s)).sqrt()
        d0 = sum(((a - b) ** 2).sum() for a, b in zip(ff, s)).sqrt()
        assert (d <= 1e-3 * d0) == hit
    assert D.iters_to_equilibrium(lrn, x, y, s, tol=1e-3, max_iters=3) is None
    res = D.iters_vs_depth([2, 3, 6], x, y, width=8, max_iters=20000, num_classes=4)
    assert res.depths == [2, 3, 6] and set(res.iters) == {"spc", "epc"}
    assert all(v is not None for v in res.iters["spc"] + res.iters["epc"])
    assert res.iters["spc"][-1] > res.iters["spc"][0]  # sPC needs more iterations when deeper


def test_write_run_diagnostics(tmp_path):
    x, y = _batch(n=8, dtype=torch.float32)
    torch.manual_seed(0)
    net = fpc.mlp([7, 8, 8, 8, 4])
    lrn = fpc.make_learner("epc", net, iters=4, state_lr=0.05)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    paths = D.write_run_diagnostics(tmp_path, lrn, x, y)
    names = sorted(p.name for p in paths)
    assert names == ["alignment.png", "diagnostics.md", "energy_heatmap.png", "iters_vs_depth.png"]
    assert all(p.stat().st_size > 0 for p in paths)
    for k, v in net.state_dict().items():
        assert torch.equal(v, before[k])
    md = (tmp_path / "diagnostics" / "diagnostics.md").read_text()
    assert "Alignment" in md and "| 4 |" in md
