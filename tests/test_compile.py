"""The compiled training step (``compile=True``): the same numbers as the eager step in
float64, a clean fall-back when compiling fails, and the ``learner.compile`` switch."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch.testing import assert_close

import fastpc as fpc
import fastpc.learners.compiled as compiled_mod
from fastpc.config import UserError, load_config
from fastpc.learners.base import Learner
from fastpc.train import COMPILE_AUTO_STEPS, resolve_compile

TOL = dict(rtol=1e-11, atol=1e-12)
WHY_NOT = compiled_mod.compile_unavailable()
needs_compile = pytest.mark.skipif(WHY_NOT is not None, reason=str(WHY_NOT))


@pytest.fixture(autouse=True)
def _fresh_compiler_caches():
    """Every test compiles the steps of its own learners: without a reset, dynamo's limit of 8
    recompiles of one code object (the step core) counts them across the whole file."""
    torch.compiler.reset()


def _data(n=3, B=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    xs = [torch.randn(B, 1, 3, 4, generator=g, dtype=torch.float64) for _ in range(n)]
    ys = [torch.randint(0, 4, (B,), generator=g) for _ in range(n)]
    return xs, ys


def _pair(name, widths=(12, 9, 8, 4), **opts):
    """(compiled, eager) learners on copies of one float64 net."""
    torch.manual_seed(0)
    net = fpc.mlp(list(widths), act="gelu").double()
    out = []
    for comp, n in zip((True, False), (net, copy.deepcopy(net))):
        opt = torch.optim.AdamW(n.parameters(), lr=1e-2)
        out.append(fpc.make_learner(name, n, optimizer=opt, compile=comp, **opts))
    return out


def _assert_same_training(comp, eager, steps=3):
    xs, ys = _data(steps)
    for x, y in zip(xs, ys):
        r1, r2 = comp.step(x, y), eager.step(x, y)
        assert_close(r1.loss, r2.loss, **TOL)
        assert_close(r1.energy, r2.energy, **TOL)
        assert_close(r1.output, r2.output, **TOL)
        assert r1.equilibrium.iters == r2.equilibrium.iters
        for a, b in zip(r1.equilibrium.states, r2.equilibrium.states, strict=True):
            assert_close(a, b, **TOL)
        assert_close(r1.equilibrium.output, r2.equilibrium.output, **TOL)
    for (k, a), (_, b) in zip(comp.net.state_dict().items(), eager.net.state_dict().items(), strict=True):
        assert_close(a, b, **TOL, msg=k)
    assert comp.compile_failed is None
    assert comp.uses_compiled_step and not eager.uses_compiled_step


@needs_compile
@pytest.mark.parametrize("name,opts", [
    ("spc", dict(iters=4, state_lr=0.2, momentum=0.5)),
    ("epc", dict(iters=4, state_lr=0.2)),  # the default safeguarded ePC (line search, armijo 0.99)
])
def test_compiled_step_matches_eager(name, opts):
    comp, eager = _pair(name, **opts)
    _assert_same_training(comp, eager)
    assert comp.last_flops > 0


@needs_compile
@pytest.mark.slow
@pytest.mark.parametrize("name,opts", [
    ("spc", dict(iters=4, state_lr=0.2, safeguard=True, armijo=0.5)),
    ("epc", dict(iters=4, state_lr=0.2, safeguard=False)),
    ("epc", dict(iters=3, state_lr=0.1, rescale=True, momentum=0.3, loss="mse")),
])
def test_compiled_step_matches_eager_more_options(name, opts):
    comp, eager = _pair(name, **opts)
    _assert_same_training(comp, eager)


DEEP = (12, 9, 8, 7, 6, 6, 5, 4)  # 6 hidden layers: 3 sPC steps from the FF state leave the lower 3 alone


@pytest.mark.parametrize("name,opts", [
    ("spc", dict(iters=3, state_lr=0.2)),
    ("spc", dict(iters=3, state_lr=0.2, momentum=0.5)),
    ("spc", dict(iters=3, state_lr=0.05, state_optimizer="adam")),
    ("spc", dict(iters=4, state_lr=5.0, safeguard=True, armijo=0.5, momentum=0.3)),  # rejects steps
    ("spc", dict(iters=8, state_lr=0.2)),  # the signal reaches every layer
    ("epc", dict(iters=3, state_lr=0.2)),
    ("epc", dict(iters=3, state_lr=0.2, safeguard=False, momentum=0.5)),
])
def test_step_core_per_tensor_equals_eager_at_depth(monkeypatch, name, opts):
    """The compiled step's core run uncompiled (per-tensor stacks, sync-free line search, the
    loop from the first layer that moves) gives the eager step's numbers on a deep MLP, where
    sPC from the FF state leaves the lower layers untouched for the first steps."""
    monkeypatch.setattr(compiled_mod, "compile_step", lambda core, device: core)
    comp, eager = _pair(name, DEEP, **opts)
    _assert_same_training(comp, eager)


@needs_compile
@pytest.mark.parametrize("name,opts", [
    ("spc", dict(iters=3, state_lr=0.2, momentum=0.5)),
    pytest.param("spc", dict(iters=4, state_lr=5.0, safeguard=True, armijo=0.5), marks=pytest.mark.slow),
    pytest.param("spc", dict(iters=3, state_lr=0.05, state_optimizer="adam"), marks=pytest.mark.slow),
])
def test_compiled_step_matches_eager_at_depth(name, opts):
    comp, eager = _pair(name, DEEP, **opts)
    _assert_same_training(comp, eager)


def test_compile_failure_falls_back_to_eager(monkeypatch):
    calls = []

    def broken(*args, **kwargs):
        def fn(x, y):
            calls.append(1)
            raise RuntimeError("no C++ compiler\nsecond line")
        return fn

    monkeypatch.setattr(compiled_mod, "compile_step", broken)
    comp, eager = _pair("spc", iters=3)
    xs, ys = _data(3)
    with pytest.warns(RuntimeWarning, match="compiling the spc step failed .*RuntimeError: no C\\+\\+ compiler"):
        r1 = comp.step(xs[0], ys[0])
    r2 = eager.step(xs[0], ys[0])
    assert_close(r1.loss, r2.loss, rtol=0, atol=0)
    assert comp.compile_failed == "RuntimeError: no C++ compiler"
    assert not comp.uses_compiled_step
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # one warning, not one per step
        for x, y in zip(xs[1:], ys[1:]):
            comp.step(x, y)
            eager.step(x, y)
    assert len(calls) == 1
    for a, b in zip(comp.net.parameters(), eager.net.parameters()):
        assert torch.equal(a, b)


def test_bad_input_is_not_blamed_on_the_compiler(monkeypatch):
    def failing(*args, **kwargs):
        def fn(x, y):
            raise RuntimeError("index out of range in compiled code")
        return fn

    monkeypatch.setattr(compiled_mod, "compile_step", failing)
    comp, _ = _pair("epc", iters=2)
    x, _ = _data(1)
    with pytest.raises(ValueError, match=r"class indices in y must lie in \[0, 4\)"):
        comp.step(x[0], torch.full((8,), 7))  # labels beyond the 4 classes: refused at the door
    assert comp.compile_failed is None and comp.uses_compiled_step
    # an error the eager step raises too is the input's, not the compiler's
    def eager_fails(self, x, y):
        raise IndexError("eager")

    monkeypatch.setattr(Learner, "step", eager_fails)
    with pytest.raises(IndexError, match="eager"):
        comp.step(x[0], torch.zeros(8, dtype=torch.long))
    assert comp.compile_failed is None and comp.uses_compiled_step


def test_compiled_step_only_where_it_applies():
    net = fpc.mlp([12, 8, 4]).double()
    assert fpc.make_learner("spc", net, compile=True).uses_compiled_step
    assert not fpc.make_learner("spc", net).uses_compiled_step  # off unless asked
    assert not fpc.make_learner("spc", net, compile=True, init="zeros").uses_compiled_step
    assert not fpc.make_learner("spc", net, compile=True, fast=False).uses_compiled_step
    assert not fpc.make_learner("spc", net, compile=True, incremental=True).uses_compiled_step
    conv = fpc.vgg("vgg5", in_channels=1, num_classes=4, image_size=16, width_mult=0.0625)
    assert fpc.make_learner("epc", conv, compile=True).uses_compiled_step  # every block analytic
    res = fpc.resnet(width_mult=0.0625)  # residual blocks run on the autograd fallback
    assert not fpc.make_learner("epc", res, compile=True).uses_compiled_step
    with pytest.raises(ValueError, match="compile must be True or False"):
        fpc.make_learner("epc", net, compile="yes")


def test_learner_compile_setting(tmp_path):
    cfg = load_config(None, ["learner.compile=true"])
    assert cfg.learner.compile is True
    assert load_config(None, []).learner.compile == "auto"
    with pytest.raises(UserError, match="learner.compile: expected one of true, false, auto, got 'sometimes'"):
        load_config(None, ["learner.compile=sometimes"])
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert resolve_compile(True, 1, cpu) is True and resolve_compile(False, 10**9, cpu) is False
    assert resolve_compile("auto", COMPILE_AUTO_STEPS - 1, cpu) is False
    assert resolve_compile("auto", COMPILE_AUTO_STEPS, cpu) is (WHY_NOT is None)
    assert resolve_compile("auto", 10**9, cuda) is False


@needs_compile
def test_compiled_training_resumes_bit_for_bit(data_root, tmp_path, monkeypatch, isolated):
    """``learner.compile: true`` through ``fit``: a run killed in epoch 2 and resumed ends with
    the weights of the uninterrupted run (a cosine schedule over 3 epochs)."""
    import fastpc.train as train_mod
    from tinydata import interrupt_evaluate, tiny_overrides

    extra = {"train.epochs": 3, "optim.schedule": "warmup_cosine", "optim.warmup": 0.2, "learner.name": "spc",
             "learner.compile": True}

    def cfg(out):
        return load_config(None, tiny_overrides(data_root, out, **extra))

    summary = train_mod.fit(cfg(tmp_path / "full"))
    assert summary["compiled_step"] is True and summary["compile_failed"] is None
    real = interrupt_evaluate(monkeypatch, 2)
    with pytest.raises(KeyboardInterrupt):
        train_mod.fit(cfg(tmp_path / "cut"))
    monkeypatch.setattr(train_mod, "evaluate", real)
    train_mod.fit(cfg(tmp_path / "cut"), resume=True)
    full = train_mod.load_checkpoint(tmp_path / "full" / train_mod.CHECKPOINT)["learner"]["net"]
    cut = train_mod.load_checkpoint(tmp_path / "cut" / train_mod.CHECKPOINT)["learner"]["net"]
    for k in full:
        assert torch.equal(full[k], cut[k]), k
