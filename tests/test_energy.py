"""energy.py v2: dense targets, a free input, the output as a free state, per-sample weights;
and every learner on dense targets (float64)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.testing import assert_close

import fastpc as fpc
from fastpc import energy as E

DT = torch.float64


def _tanh_net(widths=(6, 8, 8, 3), seed=0):
    torch.manual_seed(seed)
    return fpc.mlp(list(widths), act="tanh").to(DT)


def _batch(B=5, n_in=6, n_out=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, n_in, generator=g, dtype=DT), torch.randint(0, n_out, (B,), generator=g)


def _soft(B=5, n_out=3, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(B, n_out, generator=g, dtype=DT), 1)


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_dense_targets_cost_and_closed_form_gradient(loss):
    g = torch.Generator().manual_seed(0)
    yhat = torch.randn(5, 3, generator=g, dtype=DT, requires_grad=True)
    y = torch.randint(0, 3, (5,), generator=g)
    onehot = F.one_hot(y, 3).to(DT)
    soft = _soft()
    # index and one-hot targets are the same target: the same bits
    assert torch.equal(E.output_cost(yhat, y, loss), E.output_cost(yhat, onehot, loss))
    assert torch.equal(E.output_cost_grad(yhat.detach(), y, loss), E.output_cost_grad(yhat.detach(), onehot, loss))
    # a soft target: the cost is torch's (probability-target cross-entropy, or ½ squared error)
    ref = F.cross_entropy(yhat, soft, reduction="sum") if loss == "ce" else 0.5 * (yhat - soft).pow(2).sum()
    assert_close(E.output_cost(yhat, soft, loss), ref)
    assert_close(E.output_cost_per_sample(yhat, soft, loss).sum(), ref)
    (auto,) = torch.autograd.grad(E.output_cost(yhat, soft, loss), yhat)
    assert_close(E.output_cost_grad(yhat.detach(), soft, loss), auto)


def test_image_targets_with_mse():
    g = torch.Generator().manual_seed(0)
    yhat = torch.randn(4, 1, 3, 3, generator=g, dtype=DT, requires_grad=True)
    img = torch.rand(4, 1, 3, 3, generator=g, dtype=DT)
    assert_close(E.output_cost_per_sample(yhat, img, "mse"), 0.5 * (yhat - img).pow(2).flatten(1).sum(1))
    (auto,) = torch.autograd.grad(E.output_cost(yhat, img, "mse"), yhat)
    assert_close(E.output_cost_grad(yhat.detach(), img, "mse"), auto)


def test_free_input_energy_and_local_energy():
    """x=None: states[0] is the free s_0; the energy has no term for it, and the gradient of
    the local energy is the local update -(∂f_i/∂θ)ᵀ ε_i of every block."""
    net = _tanh_net((4, 6, 5))  # a generator: latent 4 → 6 → image 5
    g = torch.Generator().manual_seed(0)
    s0, s1 = torch.randn(3, 4, generator=g, dtype=DT), torch.randn(3, 6, generator=g, dtype=DT)
    img = torch.randn(3, 5, generator=g, dtype=DT)
    preds, out = E.predictions(net.blocks, None, [s0, s1])
    assert len(preds) == 1
    assert_close(preds[0], net.blocks[0](s0))
    assert_close(out, net.blocks[1](s1))
    errs = E.errors([s0, s1], preds)
    assert len(errs) == 1 and torch.equal(errs[0], s1 - preds[0])
    e = E.energy(errs, out, img, "mse")
    assert_close(e, 0.5 * (s1 - net.blocks[0](s0)).pow(2).sum() + 0.5 * (net.blocks[1](s1) - img).pow(2).sum())
    net.zero_grad()
    E.local_energy(net.blocks, None, [s0, s1], img, "mse").backward()
    lin = next(m for m in net.blocks[0] if isinstance(m, torch.nn.Linear))
    w, b = lin.weight, lin.bias
    a = s0 @ w.detach().T + b.detach()
    delta = (s1 - torch.tanh(a)) * (1 - torch.tanh(a) ** 2)
    assert_close(w.grad, -(delta.T @ s0))
    with pytest.raises(ValueError, match="2 blocks need 1 states"):
        E.predictions(net.blocks, s0, [s0, s1])


def test_output_as_a_free_state_and_per_sample_weights():
    """EP's energy: the output error joins the errors, the cost is taken at s_L and weighted
    per sample; y=None drops the cost."""
    g = torch.Generator().manual_seed(0)
    eps = [torch.randn(4, 3, generator=g, dtype=DT)]
    sL = torch.randn(4, 2, generator=g, dtype=DT)
    y = torch.tensor([0, 1, 1, 0])
    w = torch.tensor([0.5, -0.5, 0.25, 0.0], dtype=DT)
    per = E.energy_per_sample(eps, sL, y, "ce", weight=w)
    assert_close(per, 0.5 * eps[0].pow(2).sum(1) + w * F.cross_entropy(sL, y, reduction="none"))
    assert_close(E.energy(eps, sL, y, "ce", weight=w), per.sum())
    assert_close(E.energy(eps, sL, None, "ce"), 0.5 * eps[0].pow(2).sum())
    assert_close(E.energy_per_sample(eps, sL, None, "ce"), 0.5 * eps[0].pow(2).sum(1))
    net = _tanh_net((6, 3, 2))
    x = torch.randn(4, 6, generator=g, dtype=DT)
    s1 = torch.randn(4, 3, generator=g, dtype=DT)
    local = E.local_energy(net.blocks, x, [s1], y, "ce", output=sL)
    ref = 0.5 * (s1 - net.blocks[0](x)).pow(2).sum() + 0.5 * (sL - net.blocks[1](s1)).pow(2).sum()
    assert_close(local, ref)


def test_check_target_refuses_what_it_does_not_take():
    shape = (4, 3)
    E.check_target(torch.tensor([0, 2, 1, 0]), shape, "ce")
    E.check_target(_soft(4), shape, "ce")
    E.check_target(torch.randn(4, 3, dtype=DT), shape, "mse")
    cases = [
        ([0, 1, 2, 0], TypeError, "torch.Tensor"),
        (torch.tensor([0, 1, 3, 0]), ValueError, r"in \[0, 3\)"),
        (torch.tensor([-1, 1, 2, 0]), ValueError, r"in \[0, 3\)"),
        (torch.tensor([[0], [1], [2], [0]]), ValueError, r"shape \(4,\)"),
        (torch.randn(4, 3, dtype=DT), ValueError, "one distribution per row"),
        (torch.randn(4, 2, dtype=DT), ValueError, "output's shape"),
        (torch.full((4, 3), float("nan"), dtype=DT), ValueError, "NaN"),
    ]
    for y, err, msg in cases:
        with pytest.raises(err, match=msg):
            E.check_target(y, shape, "ce")


@pytest.mark.parametrize("name,opts", [
    ("bp", {}),
    ("spc", dict(iters=6, state_lr=0.2)),
    ("spc", dict(iters=6, state_lr=0.2, fast=False)),
    ("spc", dict(iters=6, state_lr=0.2, safeguard=True, armijo=0.5)),
    ("epc", dict(iters=6, state_lr=0.2)),
    ("epc", dict(iters=6, state_lr=0.2, fast=False)),
    ("epc", dict(iters=6, state_lr=0.2, safeguard=False)),
])
@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_dense_one_hot_target_gives_exactly_the_index_targets_gradients(name, opts, loss):
    net = _tanh_net()
    x, y = _batch()
    lrn = fpc.make_learner(name, net, loss=loss, **opts)
    g_idx = lrn.grads(x, y)
    g_dense = lrn.grads(x, F.one_hot(y, 3).to(DT))
    assert g_idx.keys() == g_dense.keys()
    for k in g_idx:
        assert torch.equal(g_idx[k], g_dense[k]), k  # the same target, the same code: same bits


@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_soft_targets_train_and_meet_the_theory(loss):
    """With a soft target: bp is autograd of the mean loss; converged epc and spc agree
    (same landscape, same equilibrium); a step of each learner lowers the soft-target loss."""
    net = _tanh_net()
    x, _ = _batch()
    soft = _soft()
    g_bp = fpc.make_learner("bp", net, loss=loss).grads(x, soft)
    net.zero_grad()
    ref = F.cross_entropy(net(x), soft) if loss == "ce" else 0.5 * (net(x) - soft).pow(2).sum(1).mean()
    ref.backward()
    for n, p in net.named_parameters():
        assert_close(g_bp[n], p.grad)
    net.zero_grad()
    g_spc = fpc.make_learner("spc", net, loss=loss, iters=3000, state_lr=0.15).grads(x, soft)
    g_epc = fpc.make_learner("epc", net, loss=loss, iters=3000, state_lr=0.15, safeguard=False).grads(x, soft)
    for k in g_spc:
        assert_close(g_epc[k], g_spc[k], rtol=1e-6, atol=1e-9)
    for name in ("bp", "spc", "epc"):
        n2 = _tanh_net()
        lrn = fpc.make_learner(name, n2, loss=loss, optimizer=torch.optim.SGD(n2.parameters(), lr=0.1))
        before = lrn.step(x, soft).loss
        for _ in range(20):
            after = lrn.step(x, soft).loss
        assert after < before, (name, before, after)
