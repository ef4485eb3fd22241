"""Property-based tests (issue 22): on random MLP and conv nets (depth, widths, activations,
pooling), dtypes (float32/float64), batch sizes (1 included), losses (ce/mse) and targets, every
registered learner either gives the gradients of its autograd reference (``tests/reference.py``
for the PC learners; the autograd fallback ``fast=False`` for the others) within a tolerance
derived from the dtype, or its door refuses the batch with a ValueError/TypeError naming the
argument. Parametrized over ``fastpc.list_learners()``, so a new learner is covered."""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from numerics import two_path_tol
from reference import Reference
from torch import nn
from torch.testing import assert_close

import fastpc as fpc
import fastpc.energy as E

ACTS = ["gelu", "relu", "tanh", "sigmoid", "silu", "leaky_relu", "identity"]
REFERENCE = {"spc", "epc"}  # learners tests/reference.py replays; bp: autograd; the rest: fast=False
TERMS = 4096  # rounded terms on the way to a gradient: batch sums, a few relaxation steps, depth
FAST = settings(max_examples=15, deadline=None, suppress_health_check=list(HealthCheck))
SLOW = settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))


@st.composite
def problems(draw):
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    B = draw(st.sampled_from([1, 2, 5]))
    loss = draw(st.sampled_from(["ce", "mse"]))
    classes = draw(st.integers(2, 5))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    if draw(st.booleans()):  # MLP
        widths = [draw(st.integers(2, 9)) for _ in range(draw(st.integers(2, 5)))]
        net = fpc.mlp([8, *widths, classes], act=draw(st.sampled_from(ACTS)))
        x = torch.randn(B, 8, generator=g, dtype=dtype)
    else:  # conv + pool blocks, then a linear head
        act = {"relu": nn.ReLU, "tanh": nn.Tanh, "gelu": nn.GELU}[draw(st.sampled_from(["relu", "tanh", "gelu"]))]
        pool = draw(st.sampled_from([nn.MaxPool2d, nn.AvgPool2d]))
        c = draw(st.integers(1, 3))
        net = fpc.nets.PCNet([nn.Sequential(nn.Conv2d(1, c, 3, padding=1), act()),
                              nn.Sequential(nn.Conv2d(c, c, 3, padding=1), pool(2), act()),
                              nn.Sequential(nn.Flatten(1), nn.Linear(c * 4, classes))])
        x = torch.randn(B, 1, 4, 4, generator=g, dtype=dtype)
    net = net.to(dtype)
    y = torch.randint(0, classes, (B,), generator=g)
    return net, x, y, loss, dtype


def _check(name, problem):
    net, x, y, loss, dtype = problem
    opts = dict(loss=loss) if name == "bp" else dict(loss=loss, iters=3)
    try:
        lrn = fpc.make_learner(name, copy.deepcopy(net), **opts)
        got = lrn.grads(x, y)
    except (ValueError, TypeError) as e:  # refused: the message names what was wrong
        assert any(w in str(e) for w in ("x", "y", "loss", "net", "dtype", "block")), e
        return
    if name in REFERENCE:
        want = Reference(fpc.make_learner(name, copy.deepcopy(net), fast=False, **opts)).grads(x, y)
    elif name == "bp":  # plain autograd of the mean output cost
        ref = copy.deepcopy(net)
        E.output_cost_per_sample(ref(x), y, loss).mean().backward()
        want = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    else:
        want = fpc.make_learner(name, copy.deepcopy(net), fast=False, **opts).grads(x, y)
    assert got.keys() == want.keys() and got
    for k in want:
        assert_close(got[k], want[k], **two_path_tol(dtype, TERMS), msg=lambda m, k=k: f"{name} {k}: {m}")


@pytest.mark.parametrize("name", fpc.list_learners())
@FAST
@given(problem=problems())
def test_grads_equal_the_reference_or_the_door_refuses(name, problem):
    _check(name, problem)


@pytest.mark.slow
@pytest.mark.parametrize("name", fpc.list_learners())
@SLOW
@given(problem=problems())
def test_grads_equal_the_reference_or_the_door_refuses_many(name, problem):
    _check(name, problem)
