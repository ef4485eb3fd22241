"""fastpc.optim.MQ against a hand-computed example, its state contract and the learners."""

from __future__ import annotations

import copy
import io
import math

import pytest
import torch
from torch import nn
from torch.testing import assert_close

import fastpc as fpc
from fastpc.optim import MQ, mq

LR, R, LR_MIN = 0.01, 1e-6, 1e-3
W0 = [[0.5, -0.25], [1.0, 0.75]]
B0 = [0.1, -0.2]
# descent gradients (torch convention) handed to the optimizer at step 1 and step 2
GRADS = [
    ([[0.2, -0.4], [0.1, 0.3]], [-0.2, 0.4]),
    ([[-0.05, 0.15], [0.25, -0.1]], [0.3, 0.05]),
]


def _hand(rho_max: float, maximize: bool = False):
    """Weights, v and ρ after each step, by plain arithmetic: g = −grad (ascent direction),
    W ← W + (α/(v+r) + lr_min)·g with the old v; N counted first; v starts at α."""
    w = [row[:] for row in W0]
    b = B0[:]
    v, out = LR, []
    for n, (gw, gb) in enumerate(GRADS, start=1):
        sign = 1.0 if maximize else -1.0
        step = LR / (v + R) + LR_MIN
        w = [[w[i][j] + step * sign * gw[i][j] for j in range(2)] for i in range(2)]
        b = [b[i] + step * sign * gb[i] for i in range(2)]
        flat = [abs(a) for row in gw for a in row] + [abs(a) for a in gb]
        mean_abs = sum(flat) / 6
        rho = min(n / (n + 1), rho_max)
        v = rho * v + (1 - rho) * mean_abs
        out.append((w, b, v, rho, mean_abs))
    return out


def _linear() -> nn.Linear:
    lin = nn.Linear(2, 2).double()
    with torch.no_grad():
        lin.weight.copy_(torch.tensor(W0, dtype=torch.float64))
        lin.bias.copy_(torch.tensor(B0, dtype=torch.float64))
    return lin


def _set_grads(lin: nn.Linear, k: int) -> None:
    gw, gb = GRADS[k]
    lin.weight.grad = torch.tensor(gw, dtype=torch.float64)
    lin.bias.grad = torch.tensor(gb, dtype=torch.float64)


@pytest.mark.parametrize("maximize", [False, True])
@pytest.mark.parametrize("rho_max", [0.9999, 0.6])
def test_two_steps_match_the_hand_computation(rho_max, maximize):
    expected = _hand(rho_max, maximize)
    assert expected[0][3] == 0.5 and expected[1][3] == (2 / 3 if rho_max > 0.9 else 0.6)
    lin = _linear()
    opt = MQ(lin, lr=LR, r=R, lr_min=LR_MIN, rho_max=rho_max, maximize=maximize)
    v_old = LR
    for k, (w, b, v, rho, mean_abs) in enumerate(expected):
        _set_grads(lin, k)
        opt.step()
        state = opt.state[lin.weight]
        assert state["step"] == k + 1
        assert state["v"].ndim == 0 and state["v"].dtype == torch.float64
        assert_close(lin.weight.detach(), torch.tensor(w, dtype=torch.float64), rtol=1e-14, atol=0)
        assert_close(lin.bias.detach(), torch.tensor(b, dtype=torch.float64), rtol=1e-14, atol=0)
        assert_close(state["v"].item(), v, rtol=1e-14, atol=0)
        # ρ as the implementation applied it: v_new = ρ v_old + (1 − ρ) mean|g|
        assert math.isclose((state["v"].item() - mean_abs) / (v_old - mean_abs), rho, rel_tol=1e-9)
        v_old = state["v"].item()


def test_functional_core_matches_the_hand_computation():
    expected = _hand(0.9999)
    lin = _linear()
    v = torch.tensor(LR, dtype=torch.float64)
    for n, (w, b, v_hand, _, _) in enumerate(expected, start=1):
        _set_grads(lin, n - 1)
        with torch.no_grad():
            mq([lin.weight, lin.bias], [lin.weight.grad, lin.bias.grad], v, n,
               lr=LR, r=R, lr_min=LR_MIN, rho_max=0.9999)
        assert_close(lin.weight.detach(), torch.tensor(w, dtype=torch.float64), rtol=1e-14, atol=0)
        assert_close(v.item(), v_hand, rtol=1e-14, atol=0)
    with pytest.raises(ValueError, match="n counts"):
        mq([lin.weight], [lin.weight.grad], v, 0, lr=LR, r=R, lr_min=LR_MIN, rho_max=0.9)


def _problem(dtype=torch.float64, seed=1, B=16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, 6, generator=g, dtype=dtype)
    return x, torch.randint(0, 3, (B,), generator=g)


def _learner(name, net, opt):
    options = {} if name == "bp" else {"iters": 5, "state_lr": 0.1}
    return fpc.make_learner(name, net, optimizer=opt, **options)


def test_state_holds_one_scalar_per_matrix():
    torch.manual_seed(0)
    net = fpc.mlp([6, 8, 8, 3]).double()
    opt = MQ(net, lr=1e-2)
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    assert len(opt.param_groups) == len(linears) == 3
    assert [g["params"] for g in opt.param_groups] == [[m.weight, m.bias] for m in linears]
    learner = _learner("bp", net, opt)
    x, y = _problem()
    for _ in range(3):
        learner.step(x, y)
    state = opt.state_dict()["state"]
    tensors = [t for s in state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    assert len(state) == len(tensors) == 3
    assert all(t.ndim == 0 for t in tensors)
    assert all(s["step"] == 3 for s in state.values())


def test_state_dict_round_trip_continues_bit_identically():
    x, y = _problem()
    torch.manual_seed(0)
    net = fpc.mlp([6, 8, 3]).double()
    learner = _learner("bp", net, MQ(net, lr=1e-2))
    for _ in range(3):
        learner.step(x, y)
    buf = io.BytesIO()
    torch.save(learner.state_dict(), buf)
    for _ in range(3):
        learner.step(x, y)

    torch.manual_seed(5)
    net2 = fpc.mlp([6, 8, 3]).double()
    learner2 = _learner("bp", net2, MQ(net2, lr=1e-2))
    buf.seek(0)
    learner2.load_state_dict(torch.load(buf, weights_only=True))
    for _ in range(3):
        learner2.step(x, y)
    for p, q in zip(net.parameters(), net2.parameters()):
        assert torch.equal(p, q)
    for s, s2 in zip(learner.optimizer.state.values(), learner2.optimizer.state.values()):
        assert torch.equal(s["v"], s2["v"]) and s["step"] == s2["step"] == 6


def test_parameters_without_grad_are_skipped():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)).double()
    opt = MQ(net, lr=1e-2)
    before = copy.deepcopy(net)
    net[0].weight.grad = torch.ones_like(net[0].weight)  # bias has no grad
    opt.step()
    assert opt.state[net[0].weight]["step"] == 1
    assert_close(opt.state[net[0].weight]["v"].item(), 0.5 * 1e-2 + 0.5 * 1.0)  # mean over W only
    assert torch.equal(net[0].bias, before[0].bias)
    assert not opt.state[net[1].weight] and torch.equal(net[1].weight, before[1].weight)


def test_grouping_of_modules_and_of_plain_parameters():
    net = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.Flatten(),
                        nn.Linear(2, 3, bias=False))
    opt = MQ(net, lr=1e-3)
    assert [(g["name"], len(g["params"])) for g in opt.param_groups] == [
        ("0", 2), ("1.weight", 1), ("1.bias", 1), ("3", 1)]
    assert opt.param_groups[0]["params"] == [net[0].weight, net[0].bias]
    assert MQ(net.parameters(), lr=1e-3).param_groups[0]["params"] == list(net.parameters())
    groups = MQ([{"params": [net[0].weight], "lr": 0.5}, {"params": [net[3].weight]}], lr=1e-3)
    assert [g["lr"] for g in groups.param_groups] == [0.5, 1e-3]


@pytest.mark.parametrize("name, value, accepted", [
    ("lr", -1e-3, ">= 0"), ("lr", float("nan"), ">= 0"), ("lr", float("inf"), ">= 0"),
    ("lr", "0.1", ">= 0"),
    ("r", 0.0, "> 0"), ("r", -1e-6, "> 0"), ("r", float("nan"), "> 0"),
    ("lr_min", -1e-3, ">= 0"), ("lr_min", float("inf"), ">= 0"),
    ("rho_max", 1.0, r"\[0, 1\)"), ("rho_max", -0.1, r"\[0, 1\)"),
    ("rho_max", float("nan"), r"\[0, 1\)"),
    ("maximize", "yes", "True or False"),
])
def test_bad_hyperparameters_raise_value_error(name, value, accepted):
    net = nn.Linear(2, 2)
    with pytest.raises(ValueError, match=rf"MQ: {name} must be .*{accepted}"):
        MQ(net, **{"lr": 1e-3, name: value})
    with pytest.raises(ValueError, match=rf"MQ: {name} must be .*{accepted}"):
        MQ([{"params": net.parameters(), name: value}], lr=1e-3)


@pytest.mark.parametrize("params", [torch.zeros(3), 3, [1, 2], None])
def test_bad_params_raise_type_error(params):
    with pytest.raises(TypeError, match="nn.Module or an iterable of tensors"):
        MQ(params, lr=1e-3)


@pytest.mark.parametrize("name", ["bp", "epc"])
def test_loss_falls_on_an_mlp(name):
    torch.manual_seed(0)
    net = fpc.mlp([6, 8, 3]).double()
    learner = _learner(name, net, MQ(net, lr=1e-2))
    x, y = _problem()
    first = nn.functional.cross_entropy(net(x), y).item()
    losses = [learner.step(x, y).loss.item() for _ in range(30)]
    last = nn.functional.cross_entropy(net(x), y).item()
    assert last < 0.6 * first, (first, last)
    assert all(math.isfinite(v) for v in losses)


@pytest.mark.parametrize("name", ["bp", "epc"])
def test_conv_net_gets_one_group_per_layer_and_learns(name):
    torch.manual_seed(0)
    net = fpc.vgg("vgg5", in_channels=1, image_size=16, width_mult=0.0625).double()
    opt = MQ(net, lr=3e-3, rho_max=0.999)
    layers = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert [g["params"] for g in opt.param_groups] == [[m.weight, m.bias] for m in layers]
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 1, 16, 16, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (8,), generator=g)
    learner = _learner(name, net, opt)
    first = nn.functional.cross_entropy(net(x), y).item()
    for _ in range(30):
        learner.step(x, y)
    assert nn.functional.cross_entropy(net(x), y).item() < 0.5 * first
    assert len(opt.state_dict()["state"]) == len(layers)


def test_mq_from_the_config():
    """optim.name: mq builds MQ with one group per layer; ρ cap 0.9999 (mlp) or 0.999 (conv)."""
    import fastpc as fpc
    from fastpc.build import build_optimizer
    from fastpc.config import load_config

    cfg = load_config(None, ["optim.name=mq", "optim.lr=3e-5"])
    opt = build_optimizer(cfg, fpc.mlp([12, 8, 4]))
    assert isinstance(opt, MQ) and len(opt.param_groups) == 2
    assert opt.defaults["lr"] == 3e-5 and opt.defaults["rho_max"] == 0.9999
    cfg = load_config(None, ["optim.name=mq", "model.arch=vgg", "model.name=vgg5"])
    conv = fpc.vgg("vgg5", in_channels=1, image_size=16, width_mult=0.0625)
    assert build_optimizer(cfg, conv).defaults["rho_max"] == 0.999
