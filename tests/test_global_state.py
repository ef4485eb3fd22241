"""Every registered learner under the global torch state a user may hold around it.

Parametrized over the learner registry (plus the schedule variants of spc, iPC and SeqIL) and
the initializer registry, so a new learner or initializer is covered without being listed: default dtype float64,
deterministic algorithms, ``no_grad`` / ``inference_mode`` around the call, anomaly mode,
autocast, channels_last and non-contiguous inputs, batch size 1, the meta device, a 1-D input,
and a finite batch that overflows followed by clean ones.

Where a setting should not change the numbers, the test compares against the same call made
without it (``torch.equal`` where the same kernels run, the dtype's two-path tolerance where a
layout changes the kernels); where the learner cannot honour it, it must refuse in one
``ValueError``/``TypeError`` that names the setting.
"""

from __future__ import annotations

import contextlib
import copy

import pytest
import torch
from numerics import two_path_tol
from torch.testing import assert_close

import fastpc as fpc

# every registered learner, and the variants of one learner that run another loop
CASES = [(name, {}) for name in fpc.list_learners()] + [
    ("spc", {"incremental": True}),  # iPC
    ("spc", {"schedule": "sequential"}),  # SeqIL
]
IDS = [name + "".join(f"-{k}" for k in opts) for name, opts in CASES]


def _options(name: str, opts: dict) -> dict:
    return opts if name == "bp" else {"iters": 4, "state_lr": 0.1, **opts}


def _learner(name, opts, net, optimizer="adamw", **extra):
    params = list(net.parameters())
    opt = torch.optim.SGD(params, lr=0.05) if optimizer == "sgd" else torch.optim.AdamW(params, lr=1e-3)
    return fpc.make_learner(name, net, optimizer=opt, **_options(name, opts), **extra)


def _batch(dtype=torch.float32, B=6, d=8, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, d, generator=g, dtype=torch.float32)
    return x.to(dtype), torch.randint(0, classes, (B,), generator=g)


def _mlp(dtype=torch.float32, act="gelu"):
    torch.manual_seed(0)
    return fpc.mlp([8, 12, 10, 4], act=act).to(dtype)


def _conv_net(dtype=torch.float32):
    torch.manual_seed(0)
    return fpc.PCNet([
        torch.nn.Sequential(torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.ReLU()),
        torch.nn.Sequential(torch.nn.Conv2d(4, 4, 3, padding=1), torch.nn.MaxPool2d(2), torch.nn.ReLU()),
        torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(4 * 3 * 3, 3)),
    ]).to(dtype)


def _run(name, opts, make_net, x, y, around=contextlib.nullcontext, optimizer="adamw", steps=2):
    """Two steps, then grads and infer, each inside ``around()``: what the calls return and
    the weights they leave."""
    learner = _learner(name, opts, make_net(), optimizer)
    out = {}
    for t in range(steps):
        with around():
            out[f"loss{t}"] = learner.step(x, y).loss
    with around():
        out.update({f"grad:{k}": v for k, v in learner.grads(x, y).items()})
    with around():
        out["energy"] = learner.infer(x, y).energy
    out.update({f"weight:{k}": v.detach().clone() for k, v in learner.net.named_parameters()})
    return out, learner


def _assert_same(a: dict, b: dict, **tol):
    assert a.keys() == b.keys()
    for k in a:
        if tol:
            assert_close(a[k], b[k], msg=k, **tol)
        else:
            assert torch.equal(a[k], b[k]), k


@pytest.fixture
def default_float64():
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("name,opts", CASES, ids=IDS)
def test_default_dtype_float64_changes_nothing(name, opts, optimizer, default_float64):
    """Under ``set_default_dtype(float64)`` a float32 net trains to the same bits: no tensor in
    the engine takes its dtype from the global default."""
    torch.set_default_dtype(torch.float32)
    x, y = _batch()
    net = _mlp()
    want, _ = _run(name, opts, lambda: copy.deepcopy(net), x, y, optimizer=optimizer)
    torch.set_default_dtype(torch.float64)
    got, _ = _run(name, opts, lambda: copy.deepcopy(net), x, y, optimizer=optimizer)
    _assert_same(got, want)


@pytest.mark.parametrize("name,opts", CASES, ids=IDS)
def test_a_net_made_under_default_float64_trains_in_float64(name, opts, default_float64):
    net = fpc.mlp([8, 12, 4], act="gelu")  # float64 parameters: the user's default
    learner = _learner(name, opts, net)
    x, y = _batch(torch.float64)
    result = learner.step(x, y)
    assert result.loss.dtype == torch.float64 and torch.isfinite(result.loss)
    assert learner.skipped_updates == 0
    assert all(g.dtype == torch.float64 for g in learner.grads(x, y).values())


@contextlib.contextmanager
def _deterministic():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before)


@contextlib.contextmanager
def _anomaly():
    with torch.autograd.detect_anomaly(check_nan=True):
        yield


@pytest.mark.parametrize("around", [torch.no_grad, torch.enable_grad, torch.inference_mode, _deterministic,
                                    _anomaly], ids=["no_grad", "enable_grad", "inference_mode", "deterministic",
                                                    "anomaly"])
@pytest.mark.parametrize("name,opts", CASES, ids=IDS)
def test_grad_modes_around_the_calls_train_the_same(name, opts, around):
    """``no_grad``, ``inference_mode``, deterministic algorithms or anomaly mode around every
    call give the numbers of the plain calls (the learner turns autograd on where it needs it
    and runs outside inference mode)."""
    x, y = _batch()
    want, _ = _run(name, opts, _mlp, x, y)
    got, _ = _run(name, opts, _mlp, x, y, around=around)
    _assert_same(got, want)


@pytest.mark.parametrize("name,opts", CASES, ids=IDS)
def test_inference_mode_leaves_nothing_that_breaks_the_next_call(name, opts):
    """A first ``infer`` or ``step`` under ``inference_mode`` (inputs made there too) must not
    leave inference tensors in the learner's buffers: the next plain steps train as if the
    first call had been plain."""
    x, y = _batch()
    plain = _learner(name, opts, _mlp())
    plain.infer(x, y)
    plain.step(x, y)
    first = _learner(name, opts, _mlp())
    with torch.inference_mode():
        xi, yi = x.clone(), y.clone()
        first.infer(xi, yi)
        first.step(xi, yi)
    for _ in range(2):
        assert torch.equal(first.step(x, y).loss, plain.step(x, y).loss)
    for a, b in zip(first.net.parameters(), plain.net.parameters()):
        assert not a.is_inference() and torch.equal(a, b)


@pytest.mark.parametrize("name,opts", CASES, ids=IDS)
def test_autocast_trains_or_refuses_in_one_line(name, opts):
    """An ambient ``torch.autocast``: bp trains under it (autograd's forward and backward), the
    others refuse with a ValueError that names autocast and the ``precision`` option; either
    way nothing is left half-changed."""
    x, y = _batch()
    learner = _learner(name, opts, _mlp())
    before = [p.detach().clone() for p in learner.net.parameters()]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if learner.runs_under_autocast:
            result = learner.step(x, y)
            assert torch.isfinite(result.loss) and learner.skipped_updates == 0
            assert all(p.dtype == torch.float32 for p in learner.net.parameters())
            assert any(not torch.equal(a, p) for a, p in zip(before, learner.net.parameters()))
            return
        for call in (lambda: learner.step(x, y), lambda: learner.grads(x, y), lambda: learner.infer(x, y)):
            with pytest.raises(ValueError, match="autocast.*precision='bf16'"):
                call()
    assert all(torch.equal(a, p) for a, p in zip(before, learner.net.parameters()))
    learner.step(x, y)  # still usable outside autocast
    assert learner.skipped_updates == 0


@pytest.mark.parametrize("name,opts", CASES, ids=IDS)
def test_channels_last_and_non_contiguous_inputs_give_the_same_step(name, opts):
    """An input's memory layout is not its value: channels_last images and a strided view of a
    wider batch give the contiguous input's step, to the rounding of another kernel."""
    g = torch.Generator().manual_seed(1)
    img, y = torch.randn(5, 2, 6, 6, generator=g), torch.randint(0, 3, (5,), generator=g)
    want, _ = _run(name, opts, _conv_net, img, y, steps=1)
    got, _ = _run(name, opts, _conv_net, img.to(memory_format=torch.channels_last), y, steps=1)
    _assert_same(got, want, **two_path_tol(torch.float32, 2000))

    x, y = _batch()
    wide = torch.zeros(x.shape[0], 2 * x.shape[1])
    wide[:, ::2] = x
    strided = wide[:, ::2]
    assert not strided.is_contiguous() and torch.equal(strided, x)
    want, _ = _run(name, opts, _mlp, x, y, steps=1)
    got, _ = _run(name, opts, _mlp, strided, y, steps=1)
    _assert_same(got, want, **two_path_tol(torch.float32, 200))


@pytest.mark.parametrize("name,opts", CASES, ids=IDS)
def test_a_batch_of_one_is_the_mean_of_its_copies(name, opts):
    """Batch size 1 runs, and its gradients are those of a batch of two copies of the same
    example (every learner's update is a batch mean of per-example terms), in float64."""
    x, y = _batch(torch.float64, B=1)
    one = _learner(name, opts, _mlp(torch.float64)).grads(x, y)
    two = _learner(name, opts, _mlp(torch.float64)).grads(torch.cat([x, x]), torch.cat([y, y]))
    _assert_same(one, two, **two_path_tol(torch.float64, 1000))
    assert all(torch.isfinite(g).all() for g in one.values())


@pytest.mark.parametrize("name,opts", CASES, ids=IDS)
def test_meta_devices_and_one_dimensional_inputs_are_refused_at_the_door(name, opts):
    with torch.device("meta"):
        meta = fpc.mlp([8, 12, 4])
    with pytest.raises(ValueError, match="meta device"):
        _learner(name, opts, meta)
    learner = _learner(name, opts, _mlp())
    x, y = _batch()
    with pytest.raises(ValueError, match="x must be a non-empty batch .*feature dimension.*shape \\(8,\\)"):
        learner.step(x[0], y[:1])
    with pytest.raises(TypeError, match="x must have the net's dtype and device"):
        learner.step(torch.empty(x.shape, device="meta"), y)
    assert learner.skipped_updates == 0
    learner.step(x, y)


def _discriminative_inits():
    return [n for n in fpc.list_inits() if "discriminative" in fpc.make_init(n).modes]


def _generative_inits():
    return [n for n in fpc.list_inits() if "generative" in fpc.make_init(n).modes]


def _takes_init(name, opts, init, generative):
    try:
        _learner(name, opts, _mlp(), init=init)
    except ValueError:
        return False
    return not generative or (name, opts) in [("spc", {}), ("epc", {})]


OVERFLOW = [(n, o, i) for n, o in CASES for i in _discriminative_inits() if _takes_init(n, o, i, False)]
OVERFLOW_GEN = [(n, o, i) for n, o in CASES for i in _generative_inits() if _takes_init(n, o, i, True)]


def _finite_init_state(learner) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in learner.init.state_dict().values() if t.is_floating_point())


@pytest.mark.parametrize("name,opts,init", OVERFLOW,
                         ids=[f"{n}{''.join('-' + k for k in o)}-{i}" for n, o, i in OVERFLOW])
def test_an_overflowing_batch_is_skipped_and_training_goes_on(name, opts, init):
    """A finite batch that overflows (one entry 1e30) is either trained on with finite numbers
    or has its update refused, and a refused step teaches the initializer nothing: every clean
    batch after it trains, with finite energy and an applied update, for every initializer."""
    net = _mlp()
    learner = _learner(name, opts, net, init=init)
    x, y = _batch(B=8)
    learner.step(x, y)  # the initializer has observed a clean batch
    bad = x.clone()
    bad[0, 0] = 1e30
    learner.step(bad, y)
    skipped = learner.skipped_updates
    assert _finite_init_state(learner)
    assert all(torch.isfinite(p).all() for p in net.parameters())
    for seed in range(3):
        xc, yc = _batch(B=8, seed=seed + 1)
        result = learner.step(xc, yc)
        assert torch.isfinite(result.energy) and torch.isfinite(result.loss), seed
        assert learner.skipped_updates == skipped, seed


@pytest.mark.parametrize("name,opts,init", OVERFLOW_GEN,
                         ids=[f"{n}{''.join('-' + k for k in o)}-{i}" for n, o, i in OVERFLOW_GEN])
def test_an_overflowing_image_batch_is_skipped_by_a_generative_pcn(name, opts, init):
    """Generative mode (x None, the data clamped at the output): data with one entry 1e30 is
    trained on finitely or refused, and a refused step is stored nowhere; the clean batches
    after it start from finite latents and train."""
    torch.manual_seed(0)
    gen = fpc.mlp([3, 10, 12], act="gelu")
    learner = _learner(name, opts, gen, init=init, loss="mse")
    g = torch.Generator().manual_seed(0)
    data = torch.rand(6, 12, generator=g)
    learner.step(None, data)
    bad = data.clone()
    bad[0, 0] = 1e30
    learner.step(None, bad)
    skipped = learner.skipped_updates
    assert _finite_init_state(learner)
    for seed in range(3):
        clean = torch.rand(6, 12, generator=torch.Generator().manual_seed(seed + 1))
        assert torch.isfinite(learner.infer(None, clean).states[0]).all(), seed
        result = learner.step(None, clean)
        assert torch.isfinite(result.energy), seed
        assert learner.skipped_updates == skipped, seed


INITS = fpc.list_inits()  # as registered when the cases were made (other tests register their own later)


def test_the_registries_are_covered():
    """Every registered learner and initializer is reached by the cases above (none is left
    out because no learner takes it)."""
    assert {n for n, _ in CASES} == set(fpc.list_learners())
    assert {i for *_, i in OVERFLOW + OVERFLOW_GEN} == set(INITS)


@pytest.mark.parametrize("name", ["epc", pytest.param("spc", marks=pytest.mark.slow)])
def test_compiled_steps_under_default_float64(name, default_float64):
    """The compiled step under default float64 runs (no fallback to eager) and equals the
    float32 eager step to the two-path tolerance."""
    torch.set_default_dtype(torch.float32)
    x, y = _batch()
    net = _mlp()
    torch.set_default_dtype(torch.float64)
    eager = _learner(name, {}, copy.deepcopy(net))
    comp = _learner(name, {}, copy.deepcopy(net), compile=True)
    for _ in range(2):
        assert_close(comp.step(x, y).loss, eager.step(x, y).loss, **two_path_tol(torch.float32, 200))
    assert comp.compile_failed is None
    for a, b in zip(comp.net.parameters(), eager.net.parameters()):
        assert_close(a, b, **two_path_tol(torch.float32, 200))
