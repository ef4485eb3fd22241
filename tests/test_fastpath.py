"""The learners' one inference loop over block ops gives the numbers of a plain autograd
reference (tests/reference.py) in float64, and the analytic block ops give those of the
autograd fallback (``fast=False``) on an MLP, a VGG (conv + pool) and a ResNet-18 (residual
blocks on the fallback)."""

from __future__ import annotations

import copy

import pytest
import torch
from reference import Reference
from torch import nn
from torch.testing import assert_close

import fastpc as fpc
import fastpc.learners.descent as descent

TOL = dict(rtol=1e-10, atol=1e-11)

ACTS = ["gelu", "relu", "tanh", "sigmoid", "silu", "leaky_relu", "identity"]


def _data(n=3, B=8, seed=0, shape=(1, 4, 4), classes=5):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(B, *shape, generator=g, dtype=torch.float64) for _ in range(n)]
    ys = [torch.randint(0, classes, (B,), generator=g) for _ in range(n)]
    return xs, ys


def _learners(name, net, fasts=(True, False), sgd=False, **opts):
    """One learner per ``fast`` setting, each on its own copy of ``net`` with its own AdamW
    (``sgd``: SGD, which does not blow rounding noise in a near-zero gradient up to a step)."""
    out = []
    for fast in fasts:
        n = copy.deepcopy(net)
        opt = torch.optim.SGD(n.parameters(), lr=1e-3) if sgd else torch.optim.AdamW(n.parameters(), lr=1e-2)
        out.append(fpc.make_learner(name, n, optimizer=opt, fast=fast, **opts))
    return out


def _pair(name, widths=(16, 12, 10, 9, 5), act="gelu", **opts):
    """(learner on the analytic ops, the autograd reference of a learner with the same options)."""
    torch.manual_seed(0)
    net = fpc.mlp(list(widths), act=act).double()
    fast, generic = _learners(name, net, **opts)
    assert fast.uses_fast_path and not generic.uses_fast_path
    return fast, Reference(generic)


def _infer_both_stopping_at(fast, ref, stop: int):
    """Traced inference of both learners on one batch with a callback that records the states
    it is shown and stops at iteration ``stop``; the recorded states must agree step by step."""
    xs, ys = _data(n=1)
    seen: list[list] = [[], []]

    def cb(k):
        def f(t, states):
            seen[k].append([s.clone() for s in states])
            return t == stop

        return f

    e1 = fast.infer(xs[0], ys[0], trace=True, callback=cb(0))
    e2 = ref.infer(xs[0], ys[0], trace=True, callback=cb(1))
    for a, b in zip(seen[0], seen[1], strict=True):
        for s1, s2 in zip(a, b, strict=True):
            assert_close(s1, s2, **TOL)
    return e1, e2


def _assert_eq_same(e1, e2):
    assert e1.iters == e2.iters
    for a, b in zip(e1.states, e2.states, strict=True):
        assert_close(a, b, **TOL)
    assert_close(e1.output, e2.output, **TOL)
    assert_close(e1.energy, e2.energy, **TOL)
    if e2.layer_trace is not None:
        assert_close(e1.layer_trace, e2.layer_trace, **TOL)
        assert_close(e1.trace, e2.trace, **TOL)


@pytest.mark.parametrize("safeguard", [False, True])
@pytest.mark.parametrize("name", ["spc", "epc"])
@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_fast_matches_generic(name, loss, safeguard):
    fast, ref = _pair(name, loss=loss, iters=6, state_lr=0.3, safeguard=safeguard)
    xs, ys = _data()
    # equilibrium and trace
    _assert_eq_same(fast.infer(xs[0], ys[0], trace=True), ref.infer(xs[0], ys[0], trace=True))
    # weight gradients
    g1, g2 = fast.grads(xs[0], ys[0]), ref.grads(xs[0], ys[0])
    assert g1.keys() == g2.keys()
    for k in g1:
        assert_close(g1[k], g2[k], **TOL)
    # three training steps
    for x, y in zip(xs, ys):
        r1, r2 = fast.step(x, y), ref.step(x, y)
        assert_close(r1.loss, r2.loss, **TOL)
        assert_close(r1.energy, r2.energy, **TOL)
    for (n1, p1), (n2, p2) in zip(fast.net.named_parameters(), ref.net.named_parameters()):
        assert_close(p1, p2, **TOL, msg=n1)


@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("name", ["spc", "epc"])
def test_every_activation(name, act):
    fast, ref = _pair(name, act=act, iters=4, state_lr=0.2)
    xs, ys = _data(n=1)
    _assert_eq_same(fast.infer(xs[0], ys[0], trace=True), ref.infer(xs[0], ys[0], trace=True))
    g1, g2 = fast.grads(xs[0], ys[0]), ref.grads(xs[0], ys[0])
    for k in g2:
        assert_close(g1[k], g2[k], **TOL)


@pytest.mark.parametrize("name", ["spc", "epc"])
@pytest.mark.parametrize("init", ["zeros", "normal"])
def test_other_inits_and_momentum(name, init):
    fast, ref = _pair(name, iters=5, state_lr=0.1, momentum=0.5, init=init)
    xs, ys = _data(n=1)
    torch.manual_seed(1)
    e1 = fast.infer(xs[0], ys[0], trace=True)
    torch.manual_seed(1)
    e2 = ref.infer(xs[0], ys[0], trace=True)
    _assert_eq_same(e1, e2)


@pytest.mark.parametrize("name", ["spc", "epc"])
def test_deep_net_signal_tracking(name):
    """20 blocks, T = 5: sPC's activity tracking skips the unmoved layers; numbers unchanged."""
    fast, ref = _pair(name, widths=[16] + [7] * 19 + [5], iters=5, state_lr=0.1)
    xs, ys = _data(n=2)
    _assert_eq_same(fast.infer(xs[0], ys[0], trace=True), ref.infer(xs[0], ys[0], trace=True))
    for x, y in zip(xs, ys):
        fast.step(x, y), ref.step(x, y)
    for p1, p2 in zip(fast.net.parameters(), ref.net.parameters()):
        assert_close(p1, p2, **TOL)


def test_spc_from_the_ff_state_skips_the_layers_the_signal_has_not_reached():
    """sPC's step from the FF state on a 20-block net with T = 5 runs a fraction of ePC's
    products (ePC reaches every layer on step 1; sPC's signal moves one layer per step)."""
    torch.manual_seed(0)
    net = fpc.mlp([16] + [7] * 19 + [5]).double()
    spc, epc = (_learners(name, net, fasts=(True,), iters=5, state_lr=0.1)[0] for name in ("spc", "epc"))
    xs, ys = _data(n=1)
    spc.step(xs[0], ys[0]), epc.step(xs[0], ys[0])
    assert 0 < spc.last_flops < 0.4 * epc.last_flops


@pytest.mark.parametrize("opts", [{}, dict(momentum=0.5), dict(state_optimizer="adam"), dict(incremental=True),
                                  dict(init="normal")])
def test_spc_gradient_written_over_its_errors_changes_no_bit(opts, monkeypatch):
    """sPC's plain loop writes ∇E over its own error buffer (``grad_scratch``: one addmm in place,
    no copy of ε into a gradient buffer); the same kernels on the same numbers as writing it
    into a separate buffer, so the same bits, at a depth where the FF states of the layers the
    signal has not reached are never copied into the state buffer."""
    from fastpc.learners.spc import _SPCRelaxation

    torch.manual_seed(0)
    net = fpc.mlp([16] + [7] * 7 + [5]).double()
    a, b = _learners("spc", net, fasts=(True, True), iters=5, state_lr=0.1, **opts)
    xs, ys = _data(n=2)
    for x, y in zip(xs, ys):
        torch.manual_seed(1)
        ra = a.step(x, y)
        monkeypatch.setattr(_SPCRelaxation, "grad_scratch", property(lambda self: None))
        torch.manual_seed(1)
        rb = b.step(x, y)
        monkeypatch.undo()
        assert torch.equal(ra.energy, rb.energy) and torch.equal(ra.loss, rb.loss)
        for s1, s2 in zip(ra.equilibrium.states, rb.equilibrium.states, strict=True):
            assert torch.equal(s1, s2)
    assert "g" not in a._workspace._stacks and "g" in b._workspace._stacks  # the two paths ran
    for p, q in zip(a.net.parameters(), b.net.parameters()):
        assert torch.equal(p, q)


def test_spc_callback_states_at_depth_without_a_trace():
    """The states a callback sees at depth (layers the signal has not reached: their FF states,
    never copied into the state buffer) and the final ones are the reference's."""
    fast, ref = _pair("spc", widths=[16] + [7] * 9 + [5], iters=5, state_lr=0.1)
    xs, ys = _data(n=1)
    seen: list[list] = [[], []]
    for k, lrn in enumerate((fast, ref)):
        eq = lrn.infer(xs[0], ys[0], callback=lambda t, states, k=k: seen[k].append([s.clone() for s in states]))
        seen[k].append(eq.states)
    assert len(seen[0]) == len(seen[1]) == 6
    for a, b in zip(seen[0], seen[1]):
        for s1, s2 in zip(a, b, strict=True):
            assert_close(s1, s2, **TOL)


@pytest.mark.parametrize("name", ["spc", "epc"])
def test_callback_and_early_stop(name):
    fast, ref = _pair(name, iters=8, state_lr=0.2)
    e1, e2 = _infer_both_stopping_at(fast, ref, 3)
    assert e1.iters == 3
    _assert_eq_same(e1, e2)


def test_float32_close():
    torch.manual_seed(0)
    net = fpc.mlp([16, 12, 10, 5], act="gelu")
    ref = copy.deepcopy(net)
    x, y = torch.randn(8, 16), torch.randint(0, 5, (8,))
    for name in ("spc", "epc"):
        a = fpc.make_learner(name, net, iters=5).grads(x, y)
        b = fpc.make_learner(name, ref, iters=5, fast=False).grads(x, y)
        for k in b:
            assert_close(a[k], b[k], rtol=1e-4, atol=1e-6)


def test_fast_option():
    """fast="auto": analytic ops where a block has them; True: every block must; False: the
    autograd fallback everywhere. Every option of the learners runs on the analytic ops."""
    net = fpc.mlp([16, 12, 5])
    for name in ("spc", "epc"):
        for safeguard in (False, True):
            assert fpc.make_learner(name, net, safeguard=safeguard, armijo=0.5, fast=True).uses_fast_path
        assert not fpc.make_learner(name, net, fast=False).uses_fast_path
    assert fpc.make_learner("spc", net, state_optimizer="adam", fast=True).uses_fast_path
    assert fpc.make_learner("spc", net, incremental=True, fast=True).uses_fast_path
    with pytest.raises(ValueError, match="fast must be"):
        fpc.make_learner("spc", net, fast="yes")
    conv = fpc.vgg("vgg5", in_channels=1, image_size=16, width_mult=1 / 32)
    assert fpc.make_learner("epc", conv, fast=True).uses_fast_path
    res = fpc.resnet(width_mult=0.0625)
    assert not fpc.make_learner("epc", res).uses_fast_path  # residual blocks: the fallback
    with pytest.raises(ValueError, match=r"block 0 \(Sequential\), block 1 \(BasicBlock\).* have no analytic ops"):
        fpc.make_learner("epc", res, fast=True)
    odd = fpc.PCNet([nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.1)), nn.Linear(4, 2)])
    assert not fpc.make_learner("spc", odd).uses_fast_path


def test_bias_free_and_frozen_params():
    torch.manual_seed(0)
    net = fpc.mlp([16, 12, 10, 5], bias=False).double()
    net.blocks[1][0].weight.requires_grad_(False)
    x, y = _data(n=1)[0][0], _data(n=1)[1][0]
    fast, generic = _learners("spc", net, iters=4)
    a, b = fast.grads(x, y), Reference(generic).grads(x, y)
    assert a.keys() == b.keys() and "blocks.1.0.weight" not in a
    for k in b:
        assert_close(a[k], b[k], **TOL)


@pytest.mark.parametrize("opts", [
    dict(state_optimizer="adam", state_lr=0.05),
    dict(incremental=True),
    dict(incremental=True, momentum=0.5, init="normal"),
])
def test_adam_states_and_ipc(opts):
    fast, ref = _pair("spc", iters=5, **{"state_lr": 0.2, **opts})
    _check_pair(fast, ref, *_data())


# ---- safeguard (the backtracking line search of fastpc.learners.descent) ---------------------


def _rejected(eq) -> bool:
    """Whether the line search rejected a step: a rejected step keeps the accepted energies,
    so two in-loop trace entries are exactly equal (the last entry is recomputed)."""
    t = eq.layer_trace[:-1]
    return bool((t[1:] == t[:-1]).all(1).any())


def _check_pair(fast, ref, xs, ys, seed=1):
    torch.manual_seed(seed)
    e1 = fast.infer(xs[0], ys[0], trace=True)
    torch.manual_seed(seed)
    e2 = ref.infer(xs[0], ys[0], trace=True)
    _assert_eq_same(e1, e2)
    torch.manual_seed(seed)
    g1 = fast.grads(xs[0], ys[0])
    torch.manual_seed(seed)
    g2 = ref.grads(xs[0], ys[0])
    assert g1.keys() == g2.keys()
    for k in g2:
        assert_close(g1[k], g2[k], **TOL, msg=k)
    for x, y in zip(xs, ys):  # three AdamW steps
        torch.manual_seed(seed)
        r1 = fast.step(x, y)
        torch.manual_seed(seed)
        r2 = ref.step(x, y)
        assert_close(r1.loss, r2.loss, **TOL)
        assert_close(r1.energy, r2.energy, **TOL)
    for (n1, p1), (_, p2) in zip(fast.net.named_parameters(), ref.net.named_parameters()):
        assert_close(p1, p2, **TOL, msg=n1)
    return e2


WIDTHS5 = (16, 12, 10, 9, 7, 5)  # 5 blocks


@pytest.mark.parametrize("momentum", [0.0, 0.5])
@pytest.mark.parametrize("armijo", [0.0, 0.99])
@pytest.mark.parametrize("name", ["spc", "epc"])
def test_safeguard_matches_generic(name, armijo, momentum):
    """A step far past the stability limit: the line search rejects and shrinks; the learner
    takes the reference's decisions (states, energy, trace, grads, weights after 3 steps)."""
    opts = dict(widths=WIDTHS5, iters=6, state_lr=5.0, momentum=momentum)
    fast, ref = _pair(name, safeguard=True, armijo=armijo, **opts)
    xs, ys = _data()
    eq = _check_pair(fast, ref, xs, ys)
    assert _rejected(eq)
    plain = _pair(name, safeguard=False, **opts)[0].infer(xs[0], ys[0], trace=True)
    assert not torch.allclose(plain.trace, eq.trace)


@pytest.mark.parametrize("name", ["spc", "epc"])
@pytest.mark.parametrize("loss", ["ce", "mse"])
def test_safeguard_default_regime(name, loss):
    """ePC's default (safeguard, armijo 0.99, state_lr 0.1) and a non-FF init."""
    for init in ("forward", "normal"):
        fast, ref = _pair(name, widths=WIDTHS5, loss=loss, iters=5, state_lr=0.1, safeguard=True,
                          armijo=0.99, init=init)
        xs, ys = _data()
        eq = _check_pair(fast, ref, xs, ys)
        assert _rejected(eq)  # η = 0.1 is too long for armijo 0.99 at the start


@pytest.mark.parametrize("name", ["spc", "epc"])
def test_safeguard_sync_free_path(name, monkeypatch):
    """The torch.where line search (off the CPU, and compiled) gives the same numbers."""
    monkeypatch.setattr(descent, "BRANCH_ON_CPU", False)
    fast, ref = _pair(name, widths=WIDTHS5, iters=6, state_lr=5.0, momentum=0.5, safeguard=True, armijo=0.5)
    xs, ys = _data()
    assert _rejected(_check_pair(fast, ref, xs, ys))


@pytest.mark.parametrize("name", ["spc", "epc"])
def test_safeguard_callback_and_early_stop(name):
    fast, ref = _pair(name, widths=WIDTHS5, iters=8, state_lr=5.0, momentum=0.5, safeguard=True, armijo=0.5)
    e1, e2 = _infer_both_stopping_at(fast, ref, 4)
    assert e1.iters == 4 and _rejected(e2)
    _assert_eq_same(e1, e2)


def test_native_gelu_restores_onednn_flag():
    """The GELU op switches oneDNN off only around small calls (and leaves it off if it was)."""
    fast, _ = _pair("spc", iters=3)
    xs, ys = _data(n=1)
    was = torch.backends.mkldnn.enabled
    try:
        for flag in (True, False):
            torch.backends.mkldnn.enabled = flag
            fast.step(xs[0], ys[0])
            assert torch.backends.mkldnn.enabled is flag
    finally:
        torch.backends.mkldnn.enabled = was


@pytest.mark.parametrize("n_classes", [5, 40])
def test_few_class_softmax_and_cost(n_classes):
    """energy.py's transposed (log-)softmax and its one-hot / cost helpers match torch's."""
    from fastpc import energy as E

    g = torch.Generator().manual_seed(0)
    yhat = torch.randn(7, n_classes, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, n_classes, (7,), generator=g)
    assert_close(E.softmax(yhat), torch.softmax(yhat, 1), **TOL)
    assert_close(E.log_softmax(yhat), torch.log_softmax(yhat, 1), **TOL)
    target = E.one_hot(y, n_classes, yhat.dtype)
    assert torch.equal(target, torch.nn.functional.one_hot(y, n_classes).to(yhat.dtype))
    assert_close(E.output_cost(yhat, y, "ce"), torch.nn.functional.cross_entropy(yhat, y, reduction="sum"), **TOL)
    assert_close(E.output_cost(yhat, y, "mse"), 0.5 * (yhat - target).pow(2).sum(), **TOL)


# ---- analytic block ops vs the autograd fallback, on every net --------------------------------
NETS = {
    "mlp": (lambda: fpc.mlp([16, 12, 10, 9, 5]), (1, 4, 4), 5),
    "vgg": (lambda: fpc.vgg("vgg5", in_channels=1, image_size=16, width_mult=0.0625), (1, 16, 16), 10),
    "resnet": (lambda: fpc.resnet(width_mult=0.0625), (3, 16, 16), 10),
}
CASES = {
    "spc": ("spc", dict(state_lr=0.2)),
    "spc-linesearch": ("spc", dict(state_lr=3.0, safeguard=True, armijo=0.5, momentum=0.5)),
    "ipc": ("spc", dict(state_lr=0.2, incremental=True)),
    "epc": ("epc", dict(state_lr=0.05, safeguard=False)),  # a stable step on every net
    "epc-linesearch": ("epc", dict(state_lr=0.2)),  # the default: line search, armijo 0.99
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("net_name", list(NETS))
def test_analytic_ops_match_the_fallback(net_name, case):
    """``fast`` (analytic ops where a block has them) equals ``fast=False`` (the autograd
    fallback for every block), and both equal the autograd reference: equilibrium, trace,
    gradients, and the weights after three SGD steps."""
    make, shape, classes = NETS[net_name]
    name, opts = CASES[case]
    torch.manual_seed(0)
    net = make().double()
    fast, generic, generic2, ref = _learners(name, net, fasts=("auto", False, False, False), iters=4, sgd=True,
                                             **opts)
    assert fast.uses_fast_path is (net_name != "resnet")
    xs, ys = _data(B=4, shape=shape, classes=classes)
    _check_pair(fast, generic, xs, ys)
    _check_pair(generic2, Reference(ref), xs, ys)
