"""bf16 mixed precision (fastpc.precision): the block products run with bfloat16 operands, what
comes back (states, energies, gradients, weights) is float32, fp32 is the code it was.

The bounds: bf16 keeps 8 significant bits, so rounding a value costs a relative error of at
most u = 2^-8. A product of bf16-rounded operands, accumulated in float32 and rounded to bf16,
is off by at most 3u per term (two operands, one output; Higham §3.1 componentwise), so
|computed − exact| ≤ 3u · (the same product on |operands|). Through L blocks (forward and
backward each) the first-order errors add: a learner's gradient is within 8·L·u of the float64
one (norm-wise, on these well-conditioned nets). bf16 results are bf16 numbers: cast back to
float32 they round-trip through bfloat16 exactly, which float32 results do not.
"""

from __future__ import annotations

import argparse
import json
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastpc as fpc
from fastpc.blocks import AnalyticOps, block_ops
from fastpc.build import build_learner
from fastpc.config import load_config
from fastpc.errors import UserError
from fastpc.precision import PRECISIONS, AutocastOps, CastOps, check_precision, forward_in
from numerics import two_path_tol
from tinydata import have_fashion_mnist

U = 2.0 ** -8  # bf16's unit roundoff
EPS32 = torch.finfo(torch.float32).eps


def _is_bf16(t: torch.Tensor) -> bool:
    """Every entry is a bfloat16 number (exact on every machine)."""
    return t.dtype == torch.float32 and bool((t.bfloat16().float() == t).all())


def _above_fp32_rounding(got: torch.Tensor, exact: torch.Tensor, terms: int) -> bool:
    """``got`` differs from ``exact`` by more than float32 rounding of ``terms``-term sums could."""
    return bool((got.double() - exact).abs().max() > 2 * terms * EPS32 * exact.abs().max())


def _products(block: nn.Module, s: torch.Tensor, g: torch.Tensor):
    """(output, input VJP, weight grad, bias grad) of a linear ``block`` (Linear or Conv2d) by
    autograd in float64, and the same on |s|, |W|, |b|, |g| (the rounding bounds' scale)."""
    def run(s, w, b, g):
        s, w, b = (t.detach().double().requires_grad_() for t in (s, w, b))
        out = F.linear(s, w, b) if isinstance(block, nn.Linear) else \
            F.conv2d(s, w, b, block.stride, block.padding)
        return (out.detach(), *torch.autograd.grad(out, (s, w, b), g.double()))

    exact = run(s, block.weight, block.bias, g)
    scale = run(s.abs(), block.weight.abs(), block.bias.abs(), g.abs())
    return exact, scale


@pytest.mark.parametrize("ops_type", [CastOps, AutocastOps])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_block_products_run_in_bf16_and_come_back_float32(kind, ops_type):
    torch.manual_seed(0)
    if kind == "linear":
        block, s = nn.Linear(48, 24), torch.randn(16, 48)
        terms = 48
    else:
        block, s = nn.Conv2d(4, 6, 3, padding=1), torch.randn(4, 4, 8, 8)
        terms = 4 * 9 * 4 * 64  # the weight gradient sums over batch and pixels
    ops = ops_type(nn.Sequential(block))
    tape = ops.forward(s)
    g = torch.randn_like(tape.out)
    for p in block.parameters():
        p.grad = None
    gx = ops.vjp_and_weight_grads(tape, g, 1.0)
    got = (tape.out, gx, block.weight.grad, block.bias.grad)
    exact, scale = _products(block, s, g)
    for name, a, e, sc in zip(("output", "input VJP", "weight grad", "bias grad"), got, exact, scale):
        assert a.dtype == torch.float32, name
        assert _is_bf16(a), f"{name} is not a bf16 result"
        err = (a.double() - e).abs()
        assert bool((err <= 3 * U * sc + 1e-30).all()), f"{name}: off by more than 3u of |operands| products"
        if name != "bias grad":  # a sum of bf16 values can be exact
            assert _above_fp32_rounding(a, e, terms), f"{name} agrees to fp32 rounding: not a bf16 product"
    assert ops.flops(s.shape) == block_ops(nn.Sequential(block)).flops(s.shape)  # same products counted


@pytest.mark.parametrize("kind", ["dense", "conv", "head"])
def test_analytic_bf16_ops_agree_with_autocast_autograd(kind):
    """CastOps (analytic ops of a bf16 copy) and AutocastOps (autograd under torch.autocast)
    run the same bf16 kernels: they agree to bf16 rounding (here, bit for bit)."""
    torch.manual_seed(0)
    block, s = {"dense": (nn.Sequential(nn.Linear(48, 24), nn.GELU()), torch.randn(16, 48)),
                "conv": (nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.MaxPool2d(2), nn.ReLU()),
                         torch.randn(4, 4, 8, 8)),
                "head": (nn.Sequential(nn.Flatten(), nn.Linear(48, 10)), torch.randn(16, 48))}[kind]
    results = []
    for ops in (CastOps(block), AutocastOps(block)):
        tape = ops.forward(s)
        g = torch.randn(tape.out.shape, generator=torch.Generator().manual_seed(2))
        block.zero_grad(set_to_none=True)
        gx = ops.vjp_and_weight_grads(tape, g, 0.5)
        results.append([tape.out, tape.pre, gx, *(p.grad for p in block.parameters())])
    for a, b in zip(*results):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, **two_path_tol(torch.bfloat16, 1))


def test_cast_ops_follow_the_weights():
    """The bf16 copy is refreshed when the float32 weights change (an optimizer step)."""
    torch.manual_seed(0)
    block, s = nn.Sequential(nn.Linear(8, 4)), torch.randn(3, 8)
    ops = CastOps(block)
    first = ops.forward(s).out
    with torch.no_grad():
        block[0].weight.mul_(-2.0)  # exact in bf16: the new output is -2 × the old one's product part
        block[0].bias.zero_()
    second = ops.forward(s).out
    ref = F.linear(s.bfloat16(), block[0].weight.bfloat16(), block[0].bias.bfloat16()).float()
    assert torch.equal(second, ref) and not torch.equal(first, second)


def test_fp32_ops_are_not_bf16_numbers():
    """The representability check can fail: the fp32 path's results are not bf16 numbers."""
    torch.manual_seed(0)
    block = nn.Sequential(nn.Linear(48, 24), nn.GELU())
    tape = block_ops(block).forward(torch.randn(16, 48))
    assert not _is_bf16(tape.out) and not _is_bf16(tape.pre)
    tape16 = AutocastOps(block).forward(torch.randn(16, 48))
    assert _is_bf16(tape16.out) and _is_bf16(tape16.pre)


def _net(arch: str):
    torch.manual_seed(0)
    if arch == "mlp":
        return fpc.mlp([20, 32, 32, 5], act="gelu"), torch.randn(8, 20)
    return fpc.vgg("vgg5", in_channels=1, num_classes=5, image_size=16, width_mult=0.125), torch.randn(8, 1, 16, 16)


# epc without its 0.99-Armijo line search, or with armijo 0 (bf16 hides steps below its
# resolution from the energy: test_epc_armijo_near_one_warns_under_bf16); ep at beta 0.25 (the
# estimate divides the states' rounding by beta)
CASES = {"bp": ("bp", {}), "spc": ("spc", {}), "epc": ("epc", {"safeguard": False}),
         "epc-armijo0": ("epc", {"armijo": 0.0}), "ep": ("ep", {"loss": "mse", "beta": 0.25})}


@pytest.mark.parametrize("arch", ["mlp", "vgg"])
@pytest.mark.parametrize(("case", "fast"), [(c, f) for c in sorted(CASES) for f in ("auto", False)
                                            if c != "bp" or f == "auto"])  # bp has no block ops
def test_learner_bf16_grads_match_float64_to_bf16_rounding(case, fast, arch):
    net, x = _net(arch)
    y = torch.randint(0, 5, (x.shape[0],), generator=torch.Generator().manual_seed(1))
    name, opts = CASES[case]
    exact = fpc.make_learner(name, net.double(), **opts).grads(x.double(), y)
    net.float()
    if name != "bp":
        opts = {**opts, "fast": fast}
    lrn = fpc.make_learner(name, net, precision="bf16", **opts)
    want = CastOps if fast == "auto" else AutocastOps
    assert name == "bp" or all(isinstance(o, want) for o in lrn._netops().ops)
    got = lrn.grads(x, y)
    assert set(got) == set(exact) and all(g.dtype == torch.float32 for g in got.values())
    a = torch.cat([got[k].double().flatten() for k in exact])
    e = torch.cat([exact[k].flatten() for k in exact])
    rel = ((a - e).norm() / e.norm()).item()
    L = len(net.blocks)
    assert rel <= 8 * L * U, f"{case} on {arch}: bf16 gradient off by {rel / U:.1f}u > {8 * L}u"
    assert rel > 64 * EPS32, f"{case} on {arch}: bf16 gradient within fp32 rounding: not run in bf16"
    eq = lrn.infer(x, y)
    assert eq.energy.dtype == torch.float32 and eq.output.dtype == torch.float32
    assert all(s.dtype == torch.float32 for s in eq.states)


@pytest.mark.parametrize("arch", ["mlp", "vgg"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_learner_bf16_step_keeps_float32_weights(case, arch):
    name, opts = CASES[case]
    net, x = _net(arch)
    y = torch.randint(0, 5, (x.shape[0],), generator=torch.Generator().manual_seed(1))
    before = [p.detach().clone() for p in net.parameters()]
    lrn = fpc.make_learner(name, net, precision="bf16", optimizer=torch.optim.SGD(net.parameters(), lr=0.1),
                           **opts)
    res = lrn.step(x, y)
    assert all(p.dtype == torch.float32 for p in net.parameters())
    assert any(not torch.equal(p, b) for p, b in zip(net.parameters(), before))
    assert res.loss.dtype == torch.float32 and res.energy.dtype == torch.float32
    assert _is_bf16(res.output)  # the FF prediction of the step ran in bf16
    assert lrn.options()["precision"] == "bf16" and lrn.state_dict()["options"]["precision"] == "bf16"


@pytest.mark.parametrize("case", sorted(CASES))
def test_fp32_precision_is_the_code_it_was(case):
    name, opts = CASES[case]
    net, x = _net("mlp")
    y = torch.randint(0, 5, (x.shape[0],), generator=torch.Generator().manual_seed(1))
    default = fpc.make_learner(name, net, **opts)
    fp32 = fpc.make_learner(name, net, precision="fp32", **opts)
    a, b = default.grads(x, y), fp32.grads(x, y)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if name != "bp":
        assert fp32.uses_fast_path and all(isinstance(o, AnalyticOps) for o in fp32._netops().ops)
    assert forward_in("fp32", net, x) is not None and torch.equal(forward_in("fp32", net, x), net(x))


def test_bad_precision_values_are_refused():
    net = fpc.mlp([4, 3, 2])
    for bad in ("fp16", "bfloat16", None, 16):
        with pytest.raises(ValueError, match="precision must be one of 'fp32', 'bf16'"):
            fpc.make_learner("epc", net, precision=bad)
    with pytest.raises(ValueError, match="precision 'bf16' .* float32 net"):
        fpc.make_learner("bp", fpc.mlp([4, 3, 2]).double(), precision="bf16")
    assert all(isinstance(o, CastOps) for o in fpc.make_learner("spc", net, precision="bf16", fast=True)._netops().ops)
    odd = fpc.PCNet([nn.Sequential(nn.Linear(4, 3), nn.Dropout(0.0)), nn.Linear(3, 2)])
    with pytest.raises(ValueError, match=r"fast=True but block 0 \(Sequential\) has no analytic ops"):
        fpc.make_learner("spc", odd, precision="bf16", fast=True)
    assert PRECISIONS == ("fp32", "bf16") and check_precision("bf16", torch.float32) == "bf16"
    with pytest.raises(UserError, match="train.precision: unknown value 'fp16'|train.precision"):
        load_config(None, ["train.precision=fp16"])
    with pytest.raises(UserError, match="train.precision: bf16 .* needs train.dtype float32"):
        load_config(None, ["train.precision=bf16", "train.dtype=float64"])


def test_config_reaches_the_learner_and_bf16_runs_eagerly():
    cfg = load_config(None, ["train.precision=bf16", "learner.compile=true", "learner.armijo=0.0"])
    net = fpc.mlp([20, 16, 5], act="gelu")
    lrn = build_learner(cfg, net, torch.optim.SGD(net.parameters(), lr=0.1))
    assert lrn.precision == "bf16" and lrn.compile and not lrn.uses_compiled_step  # bf16: compile resolves off
    torch.manual_seed(0)
    x, y = torch.randn(8, 20), torch.randint(0, 5, (8,))
    twin = fpc.mlp([20, 16, 5], act="gelu")
    twin.load_state_dict(net.state_dict())
    eager = fpc.make_learner("epc", twin, precision="bf16", armijo=0.0, optimizer=torch.optim.SGD(twin.parameters(), lr=0.1))
    lrn.step(x, y)
    eager.step(x, y)
    assert all(torch.equal(p, q) for p, q in zip(net.parameters(), twin.parameters()))
    assert load_config(None, []).train.precision == "fp32"


def test_epc_armijo_near_one_warns_under_bf16():
    """bf16 rounds each block's input to 8 bits: the tiny steps an Armijo constant of 0.99
    allows after a rejection do not lower the bf16 energy, every step is rejected and inference
    stays at the FF state (the hidden blocks' update vanishes); armijo 0 descends as fp32 does."""
    torch.manual_seed(0)
    net = fpc.mlp([64, 64, 64, 10], act="gelu", init="orthogonal")
    x, y = torch.rand(64, 64), torch.randint(0, 10, (64,))
    with pytest.warns(RuntimeWarning, match="precision 'bf16' with armijo=0.99"):
        stuck = fpc.make_learner("epc", net, precision="bf16")
    trace = stuck.infer(x, y, trace=True).trace
    assert torch.equal(trace, trace[:1].expand_as(trace))  # not one step accepted
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        moving = fpc.make_learner("epc", net, precision="bf16", armijo=0.0)
        fp32 = fpc.make_learner("epc", net, armijo=0.0)
    e16, e32 = moving.infer(x, y, trace=True).trace, fp32.infer(x, y, trace=True).trace
    assert e16[-1] < e16[0] and abs(float(e16[-1] - e32[-1])) <= 8 * 3 * U * float(e32[0])


def test_bench_summary_compares_precisions_per_learner():
    from fastpc.bench.precision import Cell, summarize

    cells = [Cell("bp", "fp32", s, 10, 1.0, a, a, False) for s, a in ((0, 80.0), (1, 81.0))]
    cells += [Cell("bp", "bf16", s, 10, 1.0, a, a - 1, False) for s, a in ((0, 79.0), (1, 79.6))]
    (row,) = summarize(cells, {"bp": {"fp32": 2.0, "bf16": 1.0}}, ["bp"])
    assert row["fp32_acc"] == 80.5 and row["fp32_half_range"] == 0.5
    assert abs(row["delta_pp"] - (79.3 - 80.5)) < 1e-12 and not row["within_0_5pp"]
    assert abs(row["bf16_acc_bf16_eval"] - 78.3) < 1e-12 and row["bf16_ms_per_step"] == 1.0


@pytest.mark.slow
def test_bench_precision_quick_writes_results(tmp_path):
    if not have_fashion_mnist():
        pytest.skip("Fashion-MNIST is not available here")
    from fastpc.bench import precision

    parser = argparse.ArgumentParser()
    precision.add_arguments(parser)
    args = parser.parse_args(["--quick", "--learners", "bp", "epc-nosg", "--out", str(tmp_path)])
    args.argv = ["--quick", "--learners", "bp", "epc-nosg"]
    assert precision.run(args) == 0
    res = json.loads((tmp_path / "precision.json").read_text())
    assert res["command"] == "fastpc bench precision --quick --learners bp epc-nosg"
    assert [r["variant"] for r in res["rows"]] == ["bp", "epc-nosg"] and len(res["cells"]) == 4
    assert "avx512_bf16" in res["cpu_bf16_support"]["flags"]
    assert "Δ (bf16 − fp32)" in (tmp_path / "precision.md").read_text()
