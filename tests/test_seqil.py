"""Sequential inference (SeqIL) and the soft-clamped target (PAPERS.md §4), in float64, against
theory and an autograd reference:

- one sequential sweep from the FF state moves every hidden layer; one simultaneous step only
  the top one (the others stay bit for bit at the FF state);
- on a linear net (MSE) a sweep is one block Gauss–Seidel gradient step on the quadratic
  energy E = ½‖M s − c‖², built here from explicit matrices and solved with torch.linalg;
- a sweep on MLPs and the paper's conv net equals a layer-by-layer autograd reference, and the
  weight update is the local energy's gradient with the soft target after the last sweep;
- β → ∞ gives the hard target's result; options that do not combine raise ValueError.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.testing import assert_close

import fastpc as fpc
from fastpc import energy as E
from fastpc.bench.il import conv_net
from fastpc.learners.sequential import soft_target
from numerics import two_path_tol

DT = torch.float64


def _batch(shape=(6,), n_out=3, B=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, *shape, generator=g, dtype=DT), torch.randint(0, n_out, (B,), generator=g)


def _mlp(widths=(6, 8, 7, 8, 9, 3), act="tanh", seed=0):
    torch.manual_seed(seed)
    return fpc.mlp(list(widths), act=act).to(DT)


def _seq(net, **kw):
    return fpc.make_learner("spc", net, schedule="sequential", **kw)


# ---------------------------------------------------------------- one sweep reaches every layer
def test_one_sweep_moves_every_hidden_layer_one_step_only_the_top():
    net = _mlp()
    x, y = _batch()
    ff, _ = net.forward_states(x)
    seq = _seq(net, iters=1, state_lr=0.1).infer(x, y).states
    sim = fpc.make_learner("spc", net, iters=1, state_lr=0.1).infer(x, y).states
    assert all(not torch.equal(s, f) for s, f in zip(seq, ff)), "a sweep left a hidden layer at the FF state"
    assert all(torch.equal(s, f) for s, f in zip(sim[:-1], ff[:-1])), "a simultaneous step moved a lower layer"
    assert not torch.equal(sim[-1], ff[-1])
    # the top layer's first step is the same in both: −γ J_Lᵀ ∂ℓ/∂ŷ
    assert_close(seq[-1], sim[-1], **two_path_tol(DT, 64))
    # every hidden block's weight update is non-zero after one sweep, only the top one's after a step
    g_seq = _seq(net, iters=1, state_lr=0.1).grads(x, y)
    g_sim = fpc.make_learner("spc", net, iters=1, state_lr=0.1).grads(x, y)
    hidden = [f"blocks.{k}.{0 if k else 1}.weight" for k in range(net.depth - 1)]
    assert all(g_seq[n].abs().max() > 0 for n in hidden)
    assert [bool(g_sim[n].abs().max() > 0) for n in hidden] == [False] * (net.depth - 2) + [True]


# ---------------------------------------------------------------- linear net: block Gauss–Seidel
def _linear_energy_matrices(net, x, y_dense):
    """E(s) = ½‖M s − c_b‖² per sample b over s = [s_1; …; s_{L-1}]: M (rows ε_1..ε_{L-1}, ŷ − y)
    and c (B, rows). Returns (A = MᵀM, b = c Mᵀ (B, n), the hidden sizes)."""
    lins = [next(m for m in blk.modules() if isinstance(m, torch.nn.Linear)) for blk in net.blocks]
    W = [lin.weight.detach() for lin in lins]
    bias = [lin.bias.detach() for lin in lins]
    sizes = [w.shape[0] for w in W[:-1]]
    offs = [0]
    for n in sizes:
        offs.append(offs[-1] + n)
    C = W[-1].shape[0]
    M = torch.zeros(offs[-1] + C, offs[-1], dtype=DT)
    for i, n in enumerate(sizes):  # row block ε_{i+1} = s_{i+1} − W_{i+1} s_i − b_{i+1}
        M[offs[i]:offs[i + 1], offs[i]:offs[i + 1]] = torch.eye(n, dtype=DT)
        if i > 0:
            M[offs[i]:offs[i + 1], offs[i - 1]:offs[i]] = -W[i]
    M[offs[-1]:, offs[-2]:offs[-1]] = W[-1]  # ŷ − y = W_L s_{L-1} + b_L − y
    c = torch.cat([x @ W[0].T + bias[0], *[bias[i].expand(x.shape[0], -1) for i in range(1, len(sizes))],
                   y_dense - bias[-1]], dim=1)
    return M.T @ M, c @ M, sizes, offs


@pytest.mark.parametrize("iters", [1, 2, 3])
def test_linear_sweep_is_one_block_gauss_seidel_step(iters):
    net = _mlp((6, 5, 4, 5, 3), act="identity")
    x, y = _batch()
    gamma = 0.3
    A, b, sizes, offs = _linear_energy_matrices(net, x, E.one_hot(y, 3, DT))
    n = offs[-1]
    # top-down order: layer l sees the new values of the layers above it. With A = Lo + D + U
    # (U: blocks coupling l to layers above), (I + γU) s' = (I − γ(Lo + D)) s + γ b
    U = torch.zeros_like(A)
    for i in range(len(sizes)):
        U[offs[i]:offs[i + 1], offs[i + 1]:] = A[offs[i]:offs[i + 1], offs[i + 1]:]
    eye = torch.eye(n, dtype=DT)
    ff, _ = net.forward_states(x)
    s = torch.cat(ff, dim=1).T  # (n, B)
    for t in range(iters):
        g = gamma / (1 + t)
        s = torch.linalg.solve(eye + g * U, (eye - g * (A - U)) @ s + g * b.T)
    want = list(s.T.split(sizes, dim=1))
    got = _seq(net, loss="mse", iters=iters, state_lr=gamma).infer(x, y).states
    for a, w in zip(got, want):
        assert_close(a, w, **two_path_tol(DT, 4 * n))
    # and the energy went down (γ below 1/λ_max of each diagonal block)
    eq = _seq(net, loss="mse", iters=iters, state_lr=gamma).infer(x, y, trace=True)
    assert torch.all(eq.trace[1:] < eq.trace[:-1])


# ---------------------------------------------------------------- against an autograd reference
def _reference(net, x, y, iters, gamma, loss, beta):
    """Layer-by-layer sweeps with torch.autograd.grad of the whole energy; then the local
    weight update's gradient (batch mean) with the target as it stands after the last sweep."""
    blocks = net.blocks
    with torch.no_grad():
        states, out = net.forward_states(x)
    states = [s.clone() for s in states]
    hard = E.dense_target(y, out)
    target = hard if beta is None else soft_target(hard, out, beta)
    for t in range(iters):
        for i in range(len(states) - 1, -1, -1):  # top hidden layer first
            v = states[i].clone().requires_grad_(True)
            cur = states[:i] + [v] + states[i + 1:]
            preds, yhat = E.predictions(blocks, x, cur)
            (g,) = torch.autograd.grad(E.energy(E.errors(cur, preds), yhat, target, loss), v)
            states[i] = (v - gamma / (1 + t) * g).detach()
        if beta is not None:
            with torch.no_grad():
                target = soft_target(hard, blocks[-1](states[-1]), beta)
    net.zero_grad(set_to_none=True)
    (E.local_energy(blocks, x, states, target, loss) / x.shape[0]).backward()
    grads = {n: p.grad.clone() for n, p in net.named_parameters()}
    net.zero_grad(set_to_none=True)
    return states, grads


@pytest.mark.parametrize("arch,loss,beta", [("mlp", "ce", None), ("mlp", "ce", 100.0), ("mlp", "mse", 2.0),
                                            ("conv", "ce", 100.0), ("conv", "mse", None)])
def test_sweeps_and_update_match_autograd_reference(arch, loss, beta):
    if arch == "conv":
        torch.manual_seed(1)
        net = conv_net(1, 10, 28, width_mult=1 / 16).to(DT)
        x, y = _batch((1, 28, 28), 10, B=3)
    else:
        net = _mlp(act="gelu")
        x, y = _batch()
    T, gamma = 3, 0.2
    want_states, want_grads = _reference(net, x, y, T, gamma, loss, beta)
    lrn = _seq(net, loss=loss, iters=T, state_lr=gamma, beta=beta)
    eq = lrn.infer(x, y)
    assert eq.iters == T
    terms = 5000 if arch == "conv" else 200
    for a, w in zip(eq.states, want_states):
        assert_close(a, w, **two_path_tol(DT, terms))
    got = lrn.grads(x, y)
    assert got.keys() == want_grads.keys()
    for k in want_grads:
        assert_close(got[k], want_grads[k], **two_path_tol(DT, terms))
    # the autograd fallback for every block runs the same sweep
    slow = _seq(net, loss=loss, iters=T, state_lr=gamma, beta=beta, fast=False).infer(x, y)
    for a, w in zip(slow.states, want_states):
        assert_close(a, w, **two_path_tol(DT, terms))


# ---------------------------------------------------------------- soft target
def test_soft_target_formula_and_large_beta_is_the_hard_target():
    torch.manual_seed(0)
    y = E.one_hot(torch.tensor([0, 2]), 3, DT)
    out = torch.randn(2, 3, dtype=DT)
    m = 1 / (1 + 4.0)
    assert_close(soft_target(y, out, 4.0), (1 - m) * y + m * torch.softmax(out, 1), **two_path_tol(DT, 8))
    net = _mlp()
    x, yi = _batch()
    hard = _seq(net, iters=3, state_lr=0.2)
    g_hard, s_hard = hard.grads(x, yi), hard.infer(x, yi).states
    diffs = []
    for beta in (1e2, 1e6, 1e12):
        soft = _seq(net, iters=3, state_lr=0.2, beta=beta)
        g = soft.grads(x, yi)
        diffs.append(max(float((g[k] - g_hard[k]).abs().max()) for k in g))
    assert diffs[0] > 1e-6  # β = 100 is a different target
    assert diffs[1] < diffs[0] * 1e-3 and diffs[2] < 1e-10  # → the hard target's update as β → ∞
    # the states differ by O(m) = O(1/β) too
    assert max(float((a - w).abs().max()) for a, w in zip(soft.infer(x, yi).states, s_hard)) < 1e-10


# ---------------------------------------------------------------- options
@pytest.mark.parametrize("kw,msg", [
    ({"incremental": True}, "incremental"),
    ({"safeguard": True}, "safeguard"),
    ({"momentum": 0.5}, "momentum"),
    ({"state_optimizer": "adam"}, "adam"),
])
def test_sequential_rejects_options_it_does_not_take(kw, msg):
    with pytest.raises(ValueError, match=f"does not combine with.*{msg}"):
        _seq(_mlp(), **kw)


def test_tol_stops_the_sweeps_and_reports_them():
    """The sweeps stop at the first one whose gradient norm is ≤ tol × the first one's (its
    steps γ/(1+t) shrink, so SeqIL approaches its equilibrium slowly: a loose tol here), and
    the same learner capped there ends at the same states."""
    net = _mlp()
    x, y = _batch()
    lrn = _seq(net, iters=500, state_lr=0.5, tol=0.2)
    eq = lrn.infer(x, y, trace=True)
    assert 1 < eq.iters < 500
    norms = eq.grad_trace
    assert norms.shape == (eq.iters + 1,)
    assert norms[eq.iters - 1] <= 0.2 * norms[0] < norms[eq.iters - 2]
    plain = _seq(net, iters=eq.iters, state_lr=0.5).infer(x, y)
    for a, b in zip(eq.states, plain.states):
        assert torch.equal(a, b)  # the same sweeps, one code path


@pytest.mark.parametrize("kw,msg", [
    ({"schedule": "parallel"}, "schedule must be 'simultaneous' or 'sequential'"),
    ({"beta": 10.0}, "beta .* schedule='sequential' only"),
    ({"schedule": "sequential", "beta": -1.0}, "beta must be a finite number > 0"),
    ({"schedule": "sequential", "beta": math.nan}, "beta must be a finite number > 0"),
])
def test_bad_schedule_or_beta(kw, msg):
    with pytest.raises(ValueError, match=msg):
        fpc.make_learner("spc", _mlp(), **kw)


def test_sequential_steps_eagerly_and_trains():
    torch.manual_seed(0)
    net = _mlp(act="gelu")
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    lrn = _seq(net, iters=3, state_lr=0.05, beta=100.0, optimizer=opt, compile=True)
    assert not lrn.uses_compiled_step  # SeqIL runs eagerly
    x, _ = _batch(B=32)
    y = x[:, :3].argmax(1)  # a learnable rule
    first = float(lrn.step(x, y).loss)
    for _ in range(40):
        last = float(lrn.step(x, y).loss)
    assert last < 0.5 * first
    assert lrn.options()["schedule"] == "sequential" and lrn.options()["beta"] == 100.0
