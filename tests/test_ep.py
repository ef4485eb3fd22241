"""Equilibrium propagation (fastpc.learners.ep, PAPERS.md §5) against theory, in float64.

- β → 0: the centered estimate tends to bp's gradient (autograd of the batch-mean loss) with
  error O(β²) (4× smaller when β halves), the one-sided ones with O(β) (2×).
- random sign: per sample, the mean over its two signs of (s_b/β)·∂F_b/∂θ(h*_{s_b β}) is the
  centered estimate of that sample, and samples relax independently, so the mean over all 2^B
  sign patterns of a batch equals the centered estimate exactly (to rounding).
- clamp: with K = 0 only the output error ε_L = β(y − h_L⁰) (mse) exists: the head's gradient is
  exactly bp's, every other block's is zero; the estimate has an O(β) limit as β → 0.
- A mod-PGD fixed point: h_k = relu(a_k + Δ_k) per hidden layer (the projected gradient of
  ½‖h − a_k‖² − ⟨Δ_k, h⟩ over h ≥ 0 is zero), F's gradient is zero at the output and on the
  units with a_k > 0 < h_k, and ≥ 0 on units with a_k > 0 = h_k (KKT); checked with autograd
  on F built from fastpc.energy, for a ReLU MLP and a conv → max-pool → ReLU net.
- Linear net: mod-PGD and gradient descent on F reach the same equilibrium.
- β = 0: zero gradients and states equal to the FF state, bit for bit.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from numerics import two_path_tol
from torch import nn
from torch.testing import assert_close

import fastpc as fpc
from fastpc import energy as E

DT = torch.float64


def _mlp(act="relu", widths=(10, 16, 16, 4), seed=0):
    torch.manual_seed(seed)
    return fpc.mlp(list(widths), act=act).to(DT)


def _conv(seed=0):
    torch.manual_seed(seed)
    blocks = [nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.MaxPool2d(2), nn.ReLU()),
              nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.MaxPool2d(2), nn.ReLU()),
              nn.Sequential(nn.Flatten(), nn.Linear(6 * 2 * 2, 3))]
    return fpc.PCNet(blocks).to(DT)


def _batch(shape=(10,), classes=4, B=6, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, *shape, generator=g, dtype=DT), torch.randint(0, classes, (B,), generator=g)


def _bp(net, x, y, loss):
    return fpc.make_learner("bp", net, loss=loss).grads(x, y)


def _rel(g, ref):
    num = sum((g[n] - ref[n]).pow(2).sum() for n in ref)
    return float(num.sqrt() / sum(v.pow(2).sum() for v in ref.values()).sqrt())


@pytest.mark.parametrize("loss", ["mse", "ce"])
@pytest.mark.parametrize("net_fn,shape,classes", [(_mlp, (10,), 4), (_conv, (1, 8, 8), 3)], ids=["mlp", "conv"])
def test_estimate_tends_to_bp_centered_quadratically_one_sided_linearly(loss, net_fn, shape, classes):
    net = net_fn()
    x, y = _batch(shape, classes)
    ref = _bp(net, x, y, loss)
    betas = [4e-3, 2e-3, 1e-3]
    for est, (lo, hi) in {"centered": (3.5, 4.5), "positive": (1.8, 2.2), "negative": (1.8, 2.2)}.items():
        errs = [_rel(fpc.make_learner("ep", net, loss=loss, beta=b, estimator=est, iters=60).grads(x, y), ref)
                for b in betas]
        assert errs[-1] < (1e-3 if est == "centered" else 2e-2), (est, errs)
        ratios = [a / b for a, b in itertools.pairwise(errs)]
        assert all(lo < r < hi for r in ratios), (est, errs, ratios)


def test_random_sign_mean_over_all_sign_patterns_is_the_centered_estimate():
    net = _mlp()
    x, y = _batch(B=3)
    centered = fpc.make_learner("ep", net, loss="mse", beta=0.05, iters=20).grads(x, y)
    learner = fpc.make_learner("ep", net, loss="mse", beta=0.05, iters=20, estimator="random")
    total = {n: torch.zeros_like(v) for n, v in centered.items()}
    patterns = list(itertools.product([-1.0, 1.0], repeat=3))
    for signs in patterns:
        learner.draw_signs = lambda B, like, s=signs: torch.tensor(s, dtype=like.dtype)
        eq = learner.infer(x, y)
        assert torch.equal(eq.phases["random"].output, eq.output)
        for n, g in learner.grads(x, y).items():
            total[n] += g / len(patterns)
    assert_close(total, centered, **two_path_tol(DT, 200))
    # one pattern alone is not the centered estimate (the test can fail)
    assert _rel(learner.grads(x, y), centered) > 1e-3


def test_clamp_k0_head_gradient_is_bp_and_the_estimate_has_an_order_beta_limit():
    net = _mlp()
    x, y = _batch()
    ref = _bp(net, x, y, "mse")
    g0 = fpc.make_learner("ep", net, loss="mse", beta=0.3, iters=0, estimator="clamp").grads(x, y)
    head = {n for n in ref if n.startswith("blocks.2.")}
    assert_close({n: g0[n] for n in head}, {n: ref[n] for n in head}, **two_path_tol(DT, 100))
    assert all(torch.equal(g0[n], torch.zeros_like(g0[n])) for n in ref if n not in head)
    gs = [fpc.make_learner("ep", net, loss="mse", beta=b, iters=2, estimator="clamp").grads(x, y)
          for b in (4e-3, 2e-3, 1e-3)]
    d1, d2 = _rel(gs[0], gs[1]), _rel(gs[1], gs[2])
    assert 1.8 < d1 / d2 < 2.2, (d1, d2)


def _autograd_F(net, x, states, output, y, loss, beta):
    """F = E + β·C with the output a state, built from fastpc.energy (autograd on)."""
    preds, yhat = E.predictions(net.blocks, x, states)
    errs = E.errors(states, preds) + [output - yhat]
    return E.energy(errs, output, y, loss, weight=beta)


@pytest.mark.parametrize("net_fn,shape,classes", [(_mlp, (10,), 4), (_conv, (1, 8, 8), 3)], ids=["mlp", "conv"])
def test_mod_pgd_fixed_point_is_stationary_per_layer(net_fn, shape, classes):
    net = net_fn()
    x, y = _batch(shape, classes)
    beta = 0.1  # (at 0.5 the MLP's sweeps oscillate instead of converging)
    eq = fpc.make_learner("ep", net, loss="mse", beta=beta, iters=300, estimator="positive").infer(x, y)
    hs = [s.clone().requires_grad_(True) for s in [*eq.states, eq.output]]
    with torch.enable_grad():
        F = _autograd_F(net, x, hs[:-1], hs[-1], y, "mse", beta)
        grads = torch.autograd.grad(F, hs)
    tol = two_path_tol(DT, 2000)
    assert_close(grads[-1], torch.zeros_like(grads[-1]), **tol)  # output: ∂F/∂h_L = 0
    moved = 0
    for k, (h, g) in enumerate(zip(hs[:-1], grads[:-1])):
        block = net.blocks[k]
        a = block[:-1](x if k == 0 else hs[k - 1]).detach()  # pre-activation a_k
        # Δ_k = −∂/∂h_k of the layers above = g − ε_k  (∂F/∂h_k = ε_k − Δ_k)
        delta = -(g - (h - block(x if k == 0 else hs[k - 1]))).detach()
        assert_close(h.detach(), torch.relu(a + delta), **tol)
        active, on = a > 0, h.detach() > 0
        assert_close(g[active & on], torch.zeros_like(g[active & on]), **tol)
        assert bool((g[active & ~on] >= -tol["atol"]).all())
        moved += int((delta.abs() > 1e-6).sum())
    assert moved > 0  # the nudge reached the hidden layers


def test_linear_net_mod_pgd_and_gd_reach_the_same_equilibrium():
    net = _mlp(act="identity")
    x, y = _batch()
    eqs = [fpc.make_learner("ep", net, loss="mse", beta=0.2, iters=n, equilibration=e, state_lr=0.3,
                            estimator="positive").infer(x, y) for e, n in (("mod_pgd", 200), ("gd", 3000))]
    tol = two_path_tol(DT, 2000)
    for a, b in zip([*eqs[0].states, eqs[0].output], [*eqs[1].states, eqs[1].output]):
        assert_close(a, b, **tol)
    assert not torch.equal(eqs[0].output, net(x))


@pytest.mark.parametrize("estimator", ["centered", "positive", "negative", "random", "clamp"])
@pytest.mark.parametrize("equilibration", ["mod_pgd", "pgd", "gd"])
def test_beta_zero_gives_zero_gradients_and_the_ff_state(estimator, equilibration):
    net = _conv()
    x, y = _batch((1, 8, 8), 3)
    learner = fpc.make_learner("ep", net, loss="ce", beta=0.0, iters=4, estimator=estimator,
                               equilibration=equilibration)
    ff_states, ff_out = net.forward_states(x)
    still = fpc.make_learner("ep", net, loss="ce", beta=0.0, iters=0, estimator=estimator,
                             equilibration=equilibration).infer(x, y)  # the learner's own FF pass
    eq = learner.infer(x, y)
    for p in eq.phases.values():  # bit for bit the FF tensors; autograd's FF pass to rounding
        assert all(torch.equal(s, f) for s, f in zip([*p.states, p.output], [*still.states, still.output]))
        assert_close([*p.states, p.output], [*ff_states, ff_out.detach()], **two_path_tol(DT, 100))
    grads = learner.grads(x, y)
    assert grads.keys() == dict(net.named_parameters()).keys()
    assert all(torch.equal(g, torch.zeros_like(g)) for g in grads.values())


def test_grads_are_what_step_applies_and_match_autograd_of_the_local_energy():
    net = _conv()
    x, y = _batch((1, 8, 8), 3)
    opts = {"loss": "ce", "beta": 0.1, "iters": 5}
    learner = fpc.make_learner("ep", net, **opts)
    grads = learner.grads(x, y)
    # the same estimate from autograd of E_local at the two phases (no block ops)
    eq = learner.infer(x, y)
    ref = {n: torch.zeros_like(p) for n, p in net.named_parameters()}
    for name, sign in (("+beta", 1.0), ("-beta", -1.0)):
        ph = eq.phases[name]
        with torch.enable_grad():
            e = E.local_energy(net.blocks, x, ph.states, None, "ce", output=ph.output)
            gs = torch.autograd.grad(e, list(net.parameters()))
        for (n, _), g in zip(net.named_parameters(), gs):
            ref[n] += sign * g / (2 * opts["beta"] * x.shape[0])
    assert_close(grads, ref, **two_path_tol(DT, 500))
    fast_off = fpc.make_learner("ep", net, fast=False, **opts).grads(x, y)
    assert_close(fast_off, grads, **two_path_tol(DT, 500))
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    stepper = fpc.make_learner("ep", net, optimizer=torch.optim.SGD(net.parameters(), lr=1.0), **opts)
    stepper.step(x, y)
    for n, p in net.named_parameters():
        assert_close(before[n] - p.detach(), grads[n], **two_path_tol(DT, 10))


def test_sweeps_skip_layers_the_nudge_has_not_reached():
    torch.manual_seed(0)
    net = fpc.mlp([10, 8, 8, 8, 8, 8, 4], act="relu").to(DT)  # L = 6, even/odd sweeps
    x, y = _batch()

    def learns(grads):
        return [any(bool(g.abs().sum() > 0) for n, g in grads.items() if n.startswith(f"blocks.{k}.")) for k in range(6)]

    # iteration 1: the even sweep moves h_6 (output), the odd sweep h_5: blocks 5 and 6 learn
    assert learns(fpc.make_learner("ep", net, loss="mse", iters=1).grads(x, y)) == [False] * 4 + [True] * 2
    assert learns(fpc.make_learner("ep", net, loss="mse", iters=2).grads(x, y)) == [False] * 2 + [True] * 4
    # synchronous sweeps: one layer per iteration
    sync = fpc.make_learner("ep", net, loss="mse", iters=2, synchronous=True).grads(x, y)
    assert learns(sync) == [False] * 4 + [True] * 2
    flops = {}
    for k in (1, 3):
        learner = fpc.make_learner("ep", net, loss="mse", iters=k, optimizer=torch.optim.SGD(net.parameters(), lr=0.0))
        learner.step(x, y)
        flops[k] = learner.last_flops
    assert flops[1] < flops[3]


def test_bad_options_raise_clear_errors():
    gelu = _mlp(act="gelu")
    with pytest.raises(ValueError, match="GELU, which has no closed-form projection; supported: ReLU, Identity"):
        fpc.make_learner("ep", gelu, equilibration="mod_pgd")
    with pytest.raises(ValueError, match="no closed-form projection"):
        fpc.make_learner("ep", gelu, equilibration="pgd")
    assert fpc.make_learner("ep", gelu).equilibration == "gd"  # the default falls back to gd
    res = fpc.resnet("resnet18", in_channels=1, num_classes=3, width_mult=1 / 16)
    with pytest.raises(ValueError, match=r"block 1 \(BasicBlock\) has no pre-activation split"):
        fpc.make_learner("ep", res, equilibration="mod_pgd")
    net = _mlp()
    with pytest.raises(ValueError, match="unknown estimator 'both'; expected one of"):
        fpc.make_learner("ep", net, estimator="both")
    with pytest.raises(ValueError, match="unknown equilibration 'newton'; expected one of"):
        fpc.make_learner("ep", net, equilibration="newton")
    with pytest.raises(ValueError, match="init must be 'forward'"):
        fpc.make_learner("ep", net, init="zeros")
    with pytest.raises(ValueError, match=r"has no option\(s\) \['momentum'\]"):
        fpc.make_learner("ep", net, momentum=0.9)
    with pytest.raises(ValueError, match="beta must be a finite number >= 0"):
        fpc.make_learner("ep", net, beta=-0.1)
    with pytest.raises(ValueError, match="<= 1 for clamp"):
        fpc.make_learner("ep", net, beta=2.0, estimator="clamp")


EP_PRESETS = ["fmnist-vgg5-ep", "fmnist-vgg5-ep-bp", "cifar10-vgg5-ep", "cifar10-vgg5-ep-bp",
              "imagenet-vgg10-ep", "imagenet-vgg10-ep-bp"]


@pytest.mark.parametrize("name", EP_PRESETS)
def test_ep_presets_load_and_build_their_learner(name):
    from fastpc.build import build_learner, build_net
    from fastpc.config import load_config
    from fastpc.presets import preset_path

    cfg = load_config(preset_path(name))
    cfg.model.width_mult = 1 / 32
    size = 64 if "imagenet" in name else 32
    net = build_net(cfg, 10, (3, size, size))
    learner = build_learner(cfg, net, torch.optim.SGD(net.parameters(), lr=0.01))
    assert learner.name == ("ep" if name.endswith("-ep") else "bp")
    if learner.name == "ep":
        assert learner.equilibration == "mod_pgd" and learner.estimator == "centered"
        assert (learner.beta, learner.iters) == ((0.05, 10) if "imagenet" in name else (0.02, 5))


@pytest.mark.slow
def test_ep_presets_train_on_tiny_data(tmp_path):
    from PIL import Image
    from tinydata import tiny_overrides, write_tiny_idx

    from fastpc.cli import main

    idx = write_tiny_idx(tmp_path / "idx", n_train=32, n_test=16, size=16)
    folder = tmp_path / "images"
    for split in ("train", "val"):
        for c, color in enumerate([(255, 0, 0), (0, 255, 0)]):
            (folder / split / str(c)).mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (40, 36), tuple(v // (i + 1) for v in color)).save(folder / split / str(c) / f"{i}.png")
    tiny = {"model.width_mult": 0.0625, "data.batch_size": 8, "train.epochs": 1, "optim.lr": 0.001}
    for preset in ("fmnist-vgg5-ep", "fmnist-vgg5-ep-bp"):
        sets = tiny_overrides(idx, tmp_path / preset, **tiny)
        sets = [s for s in sets if not s.startswith(("model.width=", "model.depth=", "learner.iters=",
                                                     "learner.state_lr="))]
        assert main(["train", preset, "--set", *sets]) == 0
    for preset in ("imagenet-vgg10-ep", "imagenet-vgg10-ep-bp"):
        sets = {**tiny, "data.root": str(folder), "data.image_size": 32, "data.eval_batch_size": 8,
                "train.progress": False, "train.out": str(tmp_path / preset)}
        assert main(["train", preset, "--set", *[f"{k}={v}" for k, v in sets.items()]]) == 0


def _relu_case(seed):
    torch.manual_seed(seed)
    net = fpc.mlp([10, 12, 12, 4], act="relu").to(torch.float64)
    g = torch.Generator().manual_seed(seed + 100)
    x = torch.randn(16, 10, generator=g, dtype=torch.float64)
    return net, x, torch.randint(0, 4, (16,), generator=g)


def _assert_second_order(net, x, y):
    """fixed_point's centered error against bp falls 3-5x per halving of β."""
    ref = fpc.make_learner("bp", net, loss="ce").grads(x, y)

    def rel(g):
        num = sum((g[n] - ref[n]).pow(2).sum() for n in ref)
        return float(num.sqrt() / sum(v.pow(2).sum() for v in ref.values()).sqrt())
    errs = [rel(fpc.make_learner("ep", net, loss="ce", beta=b, equilibration="fixed_point", iters=60).grads(x, y))
            for b in (0.04, 0.02, 0.01, 0.005)]
    for a, b in zip(errs, errs[1:]):
        assert 3 < a / b < 5, errs


def test_fixed_point_is_stationary_for_F():
    """fixed_point's fixed point has ∂F/∂h = 0 in every layer and both phases."""
    from fastpc import energy as En
    net, x, y = _relu_case(11)
    beta = 0.04
    eq = fpc.make_learner("ep", net, loss="ce", beta=beta, equilibration="fixed_point", iters=60).infer(x, y)
    tol = 100 * torch.finfo(torch.float64).eps
    for name, w in (("+beta", beta), ("-beta", -beta)):
        p = eq.phases[name]
        hs = [s.clone().requires_grad_(True) for s in [*p.states, p.output]]
        with torch.enable_grad():
            preds, yhat = En.predictions(net.blocks, x, hs[:-1])
            errs = En.errors(hs[:-1], preds) + [hs[-1] - yhat]
            F = En.energy(errs, hs[-1], y, "ce", weight=w)
            grads = torch.autograd.grad(F, hs)
        assert max(float(gr.abs().max()) for gr in grads) < tol


@pytest.mark.parametrize("seed", [2, 11])
def test_fixed_point_centered_bias_is_second_order_on_relu(seed):
    """Where no ReLU kink is crossed between the phases, the centered error falls 4x per halving of β."""
    net, x, y = _relu_case(seed)
    _assert_second_order(net, x, y)


def test_fixed_point_centered_bias_is_second_order_on_maxpool_conv():
    """conv → max-pool → ReLU then a dense head: the centered error falls 4x per halving of β."""
    from torch import nn
    torch.manual_seed(1)
    net = fpc.PCNet([nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.MaxPool2d(2), nn.ReLU()),
                     nn.Sequential(nn.Flatten(), nn.Linear(64, 3))]).to(torch.float64)
    x = torch.randn(8, 1, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 3, (8,))
    _assert_second_order(net, x, y)
