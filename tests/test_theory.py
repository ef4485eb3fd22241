"""The core engine against theory (PAPERS.md §0–2), in float64.

- FF init: hidden errors are 0 and E is the output cost.
- Linear nets: the closed-form equilibrium (one linear system) is reached by spc and epc, and
  epc needs ≥ 10× fewer iterations at each one's best stable step size.
- Converged epc and spc give the same weight gradients (same landscape, same equilibrium).
- One epc step from zero errors: local update = η_e × BP gradient to first order.
- spc signal decay: nothing moves more than t blocks below the output after t steps, and
  the first change at distance i scales as λ^i.
- bp.grads is autograd of the batch-mean loss.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

import fastpc as fpc
from fastpc import energy as E
from numerics import two_path_tol

DT = torch.float64


def _batch(n_in=6, n_out=3, B=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, n_in, generator=g, dtype=DT)
    y = torch.randint(0, n_out, (B,), generator=g)
    return x, y


def _tanh_net(widths=(6, 8, 8, 8, 8, 3), seed=0):
    torch.manual_seed(seed)
    return fpc.mlp(list(widths), act="tanh").to(DT)


# ---------------------------------------------------------------- 1. FF init
@pytest.mark.parametrize("name", ["spc", "epc"])
def test_ff_init_hidden_errors_zero_and_energy_is_output_cost(name):
    net = _tanh_net()
    x, y = _batch()
    eq = fpc.make_learner(name, net, iters=0).infer(x, y, trace=True)
    assert eq.layer_trace.shape == (1, net.depth)
    assert torch.equal(eq.layer_trace[0, :-1], torch.zeros(net.depth - 1, dtype=DT))
    # The learner's FF pass (block ops: their own GEMMs, the classifier product transposed) and
    # net(x) are two code paths: equal to rounding, not bit for bit on every CPU. The rounded
    # terms on the way to E: each layer's dot product (width + bias) down the net, the
    # log-sum-exp over the classes and the batch sum.
    tol = two_path_tol(DT, net.depth * (max(x.shape[1], 8) + 1) + 3 + x.shape[0])
    cost = E.output_cost(net(x), y, "ce")
    assert_close(eq.energy, cost, **tol)
    ff_states, _ = net.forward_states(x)
    for s, f in zip(eq.states, ff_states, strict=True):
        assert_close(s, f, **tol)


# ---------------------------------------------------------------- 2. linear closed form
def _linear_problem(depth, width=8, n_out=4, B=3, init="orthogonal", seed=0):
    torch.manual_seed(seed)
    net = fpc.mlp([width] * depth + [n_out], act="identity", init=init).to(DT)
    x, y = _batch(width, n_out, B, seed)
    return net, x, y


def _flat_energy(net, x, y, shapes):
    sizes = [math.prod(s) for s in shapes]

    def energy_of(flat):
        states = [t.view(s) for t, s in zip(torch.split(flat, sizes), shapes)]
        preds = [net.blocks[0](x)] + [b(s) for b, s in zip(net.blocks[1:-1], states[:-1])]
        return E.energy(E.errors(states, preds), net.blocks[-1](states[-1]), y, "mse")

    return energy_of


def closed_form_equilibrium(net, x, y):
    """E is quadratic in the states of a linear net with mse: solve H s = -∇E(0)."""
    ff, _ = net.forward_states(x)
    shapes = [s.shape for s in ff]
    energy_of = _flat_energy(net, x, y, shapes)
    n = sum(math.prod(s) for s in shapes)
    zero = torch.zeros(n, dtype=DT)
    H = torch.autograd.functional.hessian(energy_of, zero)
    b = -torch.autograd.functional.jacobian(energy_of, zero)
    s_star = torch.linalg.solve(H, b)
    return s_star, H


def _error_hessian(net, H_s, x):
    """Hessian in error coordinates: H_ε = Mᵀ H_s M with M = ∂s/∂ε (unit lower triangular)."""
    ff, _ = net.forward_states(x)
    shapes = [s.shape for s in ff]
    sizes = [math.prod(s) for s in shapes]

    def states_of(flat):
        errs = [t.view(s) for t, s in zip(torch.split(flat, sizes), shapes)]
        s = [net.blocks[0](x) + errs[0]]
        for b, e in zip(net.blocks[1:-1], errs[1:]):
            s.append(b(s[-1]) + e)
        return torch.cat([t.flatten() for t in s])

    M = torch.autograd.functional.jacobian(states_of, torch.zeros(sum(sizes), dtype=DT))
    return M.T @ H_s @ M


def _flat(states):
    return torch.cat([s.flatten() for s in states])


def _rel_error(states, s0, s_star):
    """‖s − s*‖ / ‖s_0 − s*‖: the distance to the equilibrium relative to where inference
    started (the FF state)."""
    return ((_flat(states) - s_star).norm() / (s0 - s_star).norm()).item()


def _iters_to_tol(name, net, x, y, s_star, lr, tol=1e-6, max_iters=6000):
    """Iterations until the relative error drops below tol (None if never, or diverged)."""
    hit: list[int] = []
    s0 = _flat(net.forward_states(x)[0])

    def callback(t, states):
        rel = _rel_error(states, s0, s_star)
        if rel < tol:
            hit.append(t)
            return True
        return rel > 1e3 or not math.isfinite(rel)

    fpc.make_learner(name, net, loss="mse", iters=max_iters, state_lr=lr, safeguard=False).infer(
        x, y, callback=callback
    )
    return hit[0] if hit else None


def _best_count(name, net, x, y, s_star, H, max_iters):
    """Fewest iterations over step sizes up to the stability limit 2/λ_max of the energy's
    Hessian in the learner's own variables (the best fixed step is 2/(λ_min + λ_max))."""
    ev = torch.linalg.eigvalsh(H)
    lmin, lmax = ev[0].item(), ev[-1].item()
    steps = [f * 2 / lmax for f in (0.5, 0.8, 0.9, 0.95)] + [2 / (lmin + lmax)]
    counts = {lr: _iters_to_tol(name, net, x, y, s_star, lr, max_iters=max_iters) for lr in steps}
    good = {lr: c for lr, c in counts.items() if c is not None}
    assert good, f"{name} never reached the closed-form equilibrium: {counts}"
    lr = min(good, key=good.get)
    return good[lr], lr


def test_linear_equilibrium_reached_and_epc_10x_fewer_iterations(capsys):
    net, x, y = _linear_problem(depth=12)
    s_star, H_s = closed_form_equilibrium(net, x, y)
    H_e = _error_hessian(net, H_s, x)
    n_spc, lr_spc = _best_count("spc", net, x, y, s_star, H_s, max_iters=4000)
    n_epc, lr_epc = _best_count("epc", net, x, y, s_star, H_e, max_iters=4000)
    # both really reached the closed form (the counts above stop at rel. error 1e-6)
    s0 = _flat(net.forward_states(x)[0])
    assert (s0 - s_star).norm() > 1e-2 * s_star.norm()  # the target is not the start
    for name, lr, n in (("spc", lr_spc, n_spc), ("epc", lr_epc, n_epc)):
        eq = fpc.make_learner(name, net, loss="mse", iters=n, state_lr=lr, safeguard=False).infer(x, y)
        assert _rel_error(eq.states, s0, s_star) < 1e-6
    with capsys.disabled():
        print(f"\n[linear depth 12, orthogonal] iterations to 1e-6: spc {n_spc} (λ={lr_spc:.3g}), "
              f"epc {n_epc} (η_e={lr_epc:.3g}), ratio {n_spc / n_epc:.1f}")
    assert n_spc >= 10 * n_epc, (n_spc, n_epc)


# ---------------------------------------------------------------- 3. epc = spc at equilibrium
def test_converged_epc_and_spc_give_the_same_weight_gradients():
    net = _tanh_net(widths=(6, 8, 8, 8, 3))
    x, y = _batch()
    g_spc = fpc.make_learner("spc", net, iters=1000, state_lr=0.3).grads(x, y)
    g_epc = fpc.make_learner("epc", net, iters=1000, state_lr=0.3, safeguard=False).grads(x, y)
    assert g_spc.keys() == g_epc.keys() and len(g_spc) == 2 * net.depth
    for k in g_spc:
        assert_close(g_epc[k], g_spc[k], rtol=1e-6, atol=1e-9)
    # and they are not the BP gradients (PC at a real equilibrium is not BP)
    g_bp = fpc.make_learner("bp", net).grads(x, y)
    assert any((g_bp[k] - g_spc[k]).norm() > 1e-3 * g_bp[k].norm() for k in g_bp)


# ---------------------------------------------------------------- 4. one epc step ∝ BP
def _rel_errors_one_step(net, x, y, eta):
    g_bp = fpc.make_learner("bp", net).grads(x, y)
    g = fpc.make_learner("epc", net, iters=1, state_lr=eta, safeguard=False).grads(x, y)
    out = f"blocks.{net.depth - 1}."
    return {
        k: ((g[k] / (1.0 if k.startswith(out) else eta) - g_bp[k]).norm() / g_bp[k].norm()).item()
        for k in g_bp
    }


def test_one_epc_step_is_eta_times_bp_gradient_to_first_order():
    net = _tanh_net()
    x, y = _batch()
    r1 = _rel_errors_one_step(net, x, y, 1e-2)
    r2 = _rel_errors_one_step(net, x, y, 5e-3)
    for k in r1:
        if k.startswith("blocks.0."):
            # the first block's input x is clamped: ε_1 = −η_e ∂ℓ/∂s_1 exactly, so it is exact
            assert r1[k] < 1e-12 and r2[k] < 1e-12, k
        else:
            assert 0 < r1[k] < 0.3, (k, r1[k])
            assert r1[k] / r2[k] == pytest.approx(2.0, rel=0.05), (k, r1[k], r2[k])


def test_epc_rescale_rule_divides_by_eta_T():
    net = _tanh_net()
    x, y = _batch()
    plain = fpc.make_learner("epc", net, iters=2, state_lr=0.01, safeguard=False).grads(x, y)
    scaled = fpc.make_learner("epc", net, iters=2, state_lr=0.01, rescale=True, safeguard=False).grads(x, y)
    for k in plain:
        assert_close(scaled[k], plain[k] / 0.02)


# ---------------------------------------------------------------- 5. spc signal decay
def _spc_states_after(net, x, y, t, lam):
    return fpc.make_learner("spc", net, iters=t, state_lr=lam).infer(x, y).states


def test_spc_signal_decay_first_arrival():
    net = _tanh_net(widths=(6, 8, 8, 8, 8, 8, 8, 3))  # 6 hidden layers
    x, y = _batch()
    # the learner's own FF states (iters=0), so "untouched" is exact equality with the same
    # code path on any CPU (net.forward_states is another path, equal only to rounding)
    ff = _spc_states_after(net, x, y, 0, 0.1)
    n_hidden = len(ff)
    lam = 0.1
    for t in range(1, n_hidden + 1):
        states = _spc_states_after(net, x, y, t, lam)
        for layer in range(n_hidden):
            distance = n_hidden - layer  # s_{L-1} is at distance 1 from the output
            moved = not torch.equal(states[layer], ff[layer])
            assert moved == (distance <= t), (t, layer, distance)
    # the first change at distance i scales exactly as λ^i
    for i in range(1, n_hidden + 1):
        layer = n_hidden - i
        d1 = (_spc_states_after(net, x, y, i, lam)[layer] - ff[layer]).norm()
        d2 = (_spc_states_after(net, x, y, i, lam / 2)[layer] - ff[layer]).norm()
        assert (d1 / d2).item() == pytest.approx(2.0**i, rel=1e-9)


# ---------------------------------------------------------------- 6. bp
@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_bp_grads_equal_autograd_of_batch_mean_loss(loss):
    net = _tanh_net()
    x, y = _batch()
    g = fpc.make_learner("bp", net, loss=loss).grads(x, y)
    net.zero_grad()
    out = net(x)
    ref = (torch.nn.functional.cross_entropy(out, y) if loss == "ce"
           else 0.5 * (out - torch.nn.functional.one_hot(y, 3).to(DT)).pow(2).sum(1).mean())
    ref.backward()
    for name, p in net.named_parameters():
        assert_close(g[name], p.grad, rtol=1e-12, atol=1e-14)


def test_local_update_is_minus_jacobian_times_error():
    """The PC weight gradient of block i is −(∂f_i/∂θ_i)ᵀ ε_i / B (PAPERS.md §0): for a
    Linear+act block, −(ε ⊙ act'(a))ᵀ s_{i-1} / B."""
    net = _tanh_net(widths=(6, 8, 8, 3))
    x, y = _batch()
    learner = fpc.make_learner("spc", net, iters=3, state_lr=0.2)
    eq = learner.infer(x, y)
    g = learner.grads(x, y)
    s1, s2 = eq.states
    lin = net.blocks[1][0]
    a = lin(s1)
    eps = s2 - torch.tanh(a)
    delta = eps * (1 - torch.tanh(a) ** 2)
    assert_close(g["blocks.1.0.weight"], -(delta.T @ s1) / x.shape[0])
    assert_close(g["blocks.1.0.bias"], -delta.sum(0) / x.shape[0])


# ---------------------------------------------------------------- energy functions
@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_energy_functions_agree_with_each_other_and_autograd(loss):
    g = torch.Generator().manual_seed(0)
    yhat = torch.randn(5, 3, generator=g, dtype=DT, requires_grad=True)
    y = torch.randint(0, 3, (5,), generator=g)
    errs = [torch.randn(5, 4, generator=g, dtype=DT), torch.randn(5, 2, generator=g, dtype=DT)]
    per_sample = E.energy_per_sample(errs, yhat, y, loss)
    assert per_sample.shape == (5,)
    assert_close(per_sample.sum(), E.energy(errs, yhat, y, loss))
    assert_close(E.layer_energies(errs, yhat, y, loss).sum(), E.energy(errs, yhat, y, loss))
    (auto,) = torch.autograd.grad(E.output_cost(yhat, y, loss), yhat)
    assert_close(E.output_cost_grad(yhat.detach(), y, loss), auto)
