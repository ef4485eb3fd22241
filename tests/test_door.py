"""The learner's door (issue 16, item 6): bad tensors and options get a ValueError/TypeError
naming the argument and what is accepted, and a non-finite update never reaches the weights."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import fastpc as fpc

LEARNERS = ["bp", "spc", "epc"]


def _learner(name, **opts):
    torch.manual_seed(0)
    net = fpc.mlp([6, 8, 3], act="gelu")
    return fpc.make_learner(name, net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1), **opts)


def _snapshot(lrn):
    return [p.detach().clone() for p in lrn.net.parameters()]


X = torch.randn(4, 6)
Y = torch.tensor([0, 1, 2, 1])
BAD = [
    ("x nan", X.clone().index_fill_(0, torch.tensor([1]), float("nan")), Y, ValueError, "x holds NaN or inf"),
    ("x inf", X.clone().index_fill_(0, torch.tensor([0]), float("inf")), Y, ValueError, "x holds NaN or inf"),
    ("empty batch", torch.randn(0, 6), Y[:0], ValueError, "non-empty batch"),
    ("x float64", X.double(), Y, TypeError, "net's dtype and device"),
    ("x int", X.long(), Y, TypeError, "net's dtype"),
    ("x numpy", X.numpy(), Y, TypeError, "x must be a torch.Tensor"),
    ("x list", X.tolist(), Y, TypeError, "x must be a torch.Tensor"),
    ("x features", torch.randn(4, 5), Y, ValueError, "does not fit the net"),
    ("y float (B,)", X, Y.float(), ValueError, "output's shape"),
    ("y out of range", X, torch.tensor([0, 1, 3, 1]), ValueError, r"in \[0, 3\)"),
    ("y negative", X, torch.tensor([0, -1, 2, 1]), ValueError, r"in \[0, 3\)"),
    ("y (B, 1)", X, Y[:, None], ValueError, r"shape \(4,\)"),
    ("y wrong B", X, Y[:3], ValueError, r"shape \(4,\)"),
    ("y numpy", X, np.array([0, 1, 2, 1]), TypeError, "y must be a torch.Tensor"),
]


@pytest.mark.parametrize("name", LEARNERS)
@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_batches_are_refused_at_the_door_and_leave_the_weights(name, case):
    _, x, y, err, msg = case
    lrn = _learner(name)
    before = _snapshot(lrn)
    for call in (lrn.step, lrn.grads) + ((lrn.infer,) if name != "bp" else ()):
        with pytest.raises(err, match=msg):
            call(x, y)
    for a, b in zip(before, _snapshot(lrn)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", LEARNERS)
@pytest.mark.parametrize("bad", [float("inf"), float("-inf"), float("nan")])
def test_a_bad_x_is_refused_when_the_first_linear_ignores_it(name, bad):
    """spc/epc read the first Linear's output (W x + b) for the finiteness test, x only when that
    is not finite: an inf met by an all-zero weight column still shows (inf·0 is NaN), and a
    ReLU after it cannot hide it (the test reads the pre-activation)."""
    torch.manual_seed(0)
    net = fpc.mlp([6, 8, 3], act="relu")
    with torch.no_grad():
        next(m for m in net.blocks[0] if isinstance(m, torch.nn.Linear)).weight[:, 2] = 0.0
    lrn = fpc.make_learner(name, net, optimizer=torch.optim.SGD(net.parameters(), lr=0.1))
    before = _snapshot(lrn)
    x = X.clone()
    x[1, 2] = bad
    for call in (lrn.step, lrn.grads):
        with pytest.raises(ValueError, match="x holds NaN or inf"):
            call(x, Y)
    for a, b in zip(before, _snapshot(lrn)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("name", LEARNERS)
def test_int32_labels_are_class_indices(name):
    a, b = _learner(name), _learner(name)
    a.step(X, Y)
    b.step(X, Y.int())
    for p, q in zip(a.net.parameters(), b.net.parameters()):
        assert torch.equal(p, q)


@pytest.mark.parametrize("name", LEARNERS)
def test_a_non_finite_update_never_reaches_the_weights(name):
    lrn = _learner(name)
    before = _snapshot(lrn)
    huge = torch.full((4, 6), 3e38)  # finite input whose products overflow float32
    lrn.step(huge, Y)
    assert lrn.skipped_updates == 1
    for a, b in zip(before, _snapshot(lrn)):
        assert torch.equal(a, b)
    lrn.step(X, Y)  # and training goes on from the kept weights
    assert lrn.skipped_updates == 1


@pytest.mark.parametrize("opts,err,msg", [
    (dict(state_lr=float("inf")), ValueError, "state_lr must be a finite number > 0"),
    (dict(state_lr=float("nan")), ValueError, "state_lr must be a finite number > 0"),
    (dict(state_lr=0), ValueError, "state_lr must be a finite number > 0"),
    (dict(iters=2.5), ValueError, "iters must be an integer >= 0"),
    (dict(iters=-1), ValueError, "iters must be an integer >= 0"),
    (dict(momentum=1.0), ValueError, r"momentum must be in \[0, 1\)"),
    (dict(loss="l1"), ValueError, "unknown loss 'l1'"),
    (dict(fast="yes"), ValueError, "fast must be True, False or 'auto'"),
    (dict(bogus=1), ValueError, r"has no option\(s\) \['bogus'\]"),
])
@pytest.mark.parametrize("name", ["spc", "epc"])
def test_bad_options_are_refused_by_make_learner(name, opts, err, msg):
    with pytest.raises(err, match=msg):
        fpc.make_learner(name, fpc.mlp([6, 8, 3]), **opts)


@pytest.mark.parametrize("name", LEARNERS)
def test_optimizer_must_be_an_optimizer(name):
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer or None, got str"):
        fpc.make_learner(name, fpc.mlp([6, 8, 3]), optimizer="adam")
    with pytest.raises(TypeError, match="a learner needs a fastpc.PCNet"):
        fpc.make_learner(name, torch.nn.Linear(6, 3))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf"), None])
@pytest.mark.parametrize("where", [0, 1, 2])  # a large gradient (read by aminmax), a small one, the last
def test_the_finiteness_test_of_the_update_path(bad, where):
    from fastpc.learners.base import _all_finite

    ts = [torch.randn(300, 300), torch.randn(7), torch.randn(20, 30, dtype=torch.float64)]
    if bad is not None:
        ts[where].view(-1)[5] = bad
    assert _all_finite(ts) is (bad is None)
