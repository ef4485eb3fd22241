"""bf16 mixed precision (fastpc.precision): the block products run with bfloat16 operands, what
comes back (states, energies, gradients, weights) is float32, fp32 is the code it was.

The bounds: bf16 keeps 8 significant bits, so rounding a value costs a relative error of at
most u = 2^-8. A product of bf16-rounded operands, accumulated in float32 and rounded to bf16,
is off by at most 3u per term (two operands, one output; Higham §3.1 componentwise), so
|computed − exact| ≤ 3u · (the same product on |operands|). Through L blocks (forward and
backward each) the first-order errors add: a learner's gradient is within 8·L·u of the float64
one (norm-wise, on these well-conditioned nets). bf16 results are bf16 numbers: cast back to
float32 they round-trip through bfloat16 exactly, which float32 results do not. CastOps adds
a bf16 product of the input's deviation from a reference to the reference's product (in
float32): a small move of the input then changes the output by the float32 change to 3u of
the move's own product, where plain bf16 loses it.
"""

from __future__ import annotations

import argparse
import copy
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
    """CastOps (analytic ops on a bf16 copy of the weights) and AutocastOps (autograd under
    torch.autocast) run the same bf16 product kernels; CastOps runs the activations and pooling
    in float32 (autocast: in bf16), so they agree to bf16 rounding of sums of ``terms`` terms
    (the longest reduction: the weight gradient's over batch and pixels)."""
    torch.manual_seed(0)
    block, s, terms = {
        "dense": (nn.Sequential(nn.Linear(48, 24), nn.GELU()), torch.randn(16, 48), 24),
        "conv": (nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.MaxPool2d(2), nn.ReLU()),
                 torch.randn(4, 4, 8, 8), 4 * 8 * 8),
        "head": (nn.Sequential(nn.Flatten(), nn.Linear(48, 10)), torch.randn(16, 48), 16)}[kind]
    results = []
    for ops in (CastOps(block), AutocastOps(block)):
        tape = ops.forward(s)
        g = torch.randn(tape.out.shape, generator=torch.Generator().manual_seed(2))
        block.zero_grad(set_to_none=True)
        gx = ops.vjp_and_weight_grads(tape, g, 0.5)
        results.append([tape.out, tape.pre, gx, *(p.grad for p in block.parameters())])
    for a, b in zip(*results):
        assert a.dtype == torch.float32
        torch.testing.assert_close(a, b, **two_path_tol(torch.bfloat16, terms))


def _abs_product(block: nn.Module, s: torch.Tensor, bias: bool = True) -> torch.Tensor:
    """|W|·|s| (+ |b|) in float64: the scale of a product's rounding bound."""
    w = block.weight.detach().double().abs()
    b = block.bias.detach().double().abs() if bias else None
    if isinstance(block, nn.Linear):
        return F.linear(s.double().abs(), w, b)
    return F.conv2d(s.double().abs(), w, b, block.stride, block.padding)


def _f64(block: nn.Module, s: torch.Tensor) -> torch.Tensor:
    """The Linear or Conv2d ``block`` on ``s`` in float64."""
    w, b = block.weight.detach().double(), block.bias.detach().double()
    if isinstance(block, nn.Linear):
        return F.linear(s.double(), w, b)
    return F.conv2d(s.double(), w, b, block.stride, block.padding)


def _small_move(s: torch.Tensor) -> torch.Tensor:
    """s moved by 1e-4 of its size along a seeded direction, in float32."""
    direction = torch.randn(s.shape, generator=torch.Generator().manual_seed(5))
    return (s + 1e-4 * s.abs().mean() * direction).float()


@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_small_input_moves_change_the_bf16_output_as_fp32(kind):
    """f(s + d) − f(s) for a move d of 1e-4 of s: CastOps forms d in float32 and rounds only d
    to bf16, so the difference is the float64 one to 3u of |W|·|d| (two bf16 operands, a bf16
    product) plus the float32 rounding of the sum with the reference product; plain bf16 (the
    autocast ops) rounds s + d to the bf16 grid of s and loses the move. The move is made in
    place, as inference moves its state buffers: the reference is a copy."""
    torch.manual_seed(0)
    if kind == "linear":
        block, s = nn.Linear(48, 24), torch.randn(16, 48)
    else:
        block, s = nn.Conv2d(4, 6, 3, padding=1), torch.randn(4, 4, 8, 8)
    moved = _small_move(s)
    want = _f64(block, moved) - _f64(block, s)
    ops, plain = CastOps(nn.Sequential(block)), AutocastOps(nn.Sequential(block))
    buf = s.clone()
    first = ops.forward(buf).out.double()
    before = plain.forward(buf).out.double()
    buf.copy_(moved)  # in place
    got = ops.forward(buf).out.double() - first
    lost = plain.forward(buf).out.double() - before
    bound = 3 * U * _abs_product(block, moved - s, bias=False) + EPS32 * (first.abs() + want.abs())
    assert bool(((got - want).abs() <= bound).all()), f"difference off by {((got - want).abs() / bound).max():.2f}x its bound"
    assert ((lost - want).norm() / want.norm()).item() > 0.5  # plain bf16: the move is (mostly) lost
    assert ((got - want).norm() / want.norm()).item() < 3 * U


def test_cast_ops_reference_resets_with_weights_and_shape():
    """The reference is the first forward after the weights change or the input's shape does:
    that forward is the plain bf16 product (a fresh CastOps' first forward, bit for bit: the same
    code). A new batch under the same weights keeps the old reference and is correct to the
    bound of |x_ref| + |x − x_ref| (two bf16 products, reference and deviation: 3u of each, on
    |W|) plus float32 rounding of their sum."""
    torch.manual_seed(0)
    lin = nn.Linear(8, 4)
    block, s, s2 = nn.Sequential(lin), torch.randn(3, 8), torch.randn(3, 8)
    ops = CastOps(block)

    def plain(x):
        return CastOps(block).forward(x).out

    first = ops.forward(s).out
    assert torch.equal(first, plain(s))
    bf16_linear = F.linear(s.bfloat16(), lin.weight.bfloat16(), lin.bias.bfloat16()).float()
    torch.testing.assert_close(first, bf16_linear, **two_path_tol(torch.bfloat16, 8))
    got = ops.forward(s2).out.double()  # a new batch, same weights: the old reference
    want = _f64(lin, s2)
    bound = 3 * U * (_abs_product(lin, s) + _abs_product(lin, s2 - s, bias=False)) + EPS32 * want.abs()
    assert bool(((got - want).abs() <= bound).all())
    assert not _is_bf16(got.float())  # the sum of reference and deviation, not a bf16 product
    short = torch.randn(2, 8)
    assert torch.equal(ops.forward(short).out, plain(short))  # a new shape: a new reference
    with torch.no_grad():
        lin.weight.mul_(-2.0)  # an optimizer step: the bf16 copy and the references refresh
        lin.bias.zero_()
    assert torch.equal(ops.forward(s2).out, plain(s2))


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


# epc without its 0.99-Armijo line search, or with armijo 0 (the autocast ops, fast=False, hide
# steps below bf16's resolution from the energy: test_epc_bf16_descends_like_fp32_at_its_default_armijo);
# ep at beta 0.25 (the estimate divides the states' rounding by beta)
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
def test_bf16_weight_copies_follow_a_fused_optimizer(case):
    """The fused AdamW kernel updates the weights in place without bumping their version
    counters; the learner's update path does, so the bf16 copies follow: after a step, the
    learner's gradients equal those of a fresh learner on the updated weights (same code on the
    same numbers: exact)."""
    name, opts = CASES[case]
    net, x = _net("mlp")
    y = torch.randint(0, 5, (x.shape[0],), generator=torch.Generator().manual_seed(1))
    y = F.one_hot(y, 5).float() if opts.get("loss") == "mse" else y
    x2 = torch.randn(x.shape, generator=torch.Generator().manual_seed(2))
    lrn = fpc.make_learner(name, net, precision="bf16",
                           optimizer=torch.optim.AdamW(net.parameters(), lr=0.05, fused=True), **opts)
    before = [p.detach().clone() for p in net.parameters()]
    lrn.step(x, y)
    assert all(not torch.equal(p, b) for p, b in zip(net.parameters(), before))
    fresh = fpc.make_learner(name, copy.deepcopy(net), precision="bf16", **opts)
    got, want = lrn.grads(x2, y), fresh.grads(x2, y)
    assert all(torch.equal(got[k], want[k]) for k in want)


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


def test_epc_bf16_descends_like_fp32_at_its_default_armijo():
    """epc's default line search (Armijo 0.99) under bf16: CastOps sees inference's small moves
    of the states, so the energy falls as in fp32; its decrease over the 5 steps is fp32's to
    8·L·u (the decrease is first order η·Σ‖∇E‖², the gradient within 8·L·u as above). The
    autocast ops (fast=False) round each block's input to 8 bits: every step is rejected and
    inference stays at the FF state, which the learner warns about."""
    torch.manual_seed(0)
    net = fpc.mlp([64, 64, 64, 10], act="gelu", init="orthogonal")
    x, y = torch.rand(64, 64), torch.randint(0, 10, (64,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        bf16 = fpc.make_learner("epc", net, precision="bf16")
        fp32 = fpc.make_learner("epc", net)
    e16, e32 = bf16.infer(x, y, trace=True).trace.double(), fp32.infer(x, y, trace=True).trace.double()
    d16, d32 = e16[0] - e16, e32[0] - e32
    assert d32[-1] > 0.05 * e32[0]  # fp32 descends
    assert float((d16 - d32).abs().max()) <= 8 * 3 * U * float(d32[-1])
    with pytest.warns(RuntimeWarning, match="precision 'bf16' with armijo=0.99: fast=False"):
        stuck = fpc.make_learner("epc", net, precision="bf16", fast=False)
    trace = stuck.infer(x, y, trace=True).trace
    assert torch.equal(trace, trace[:1].expand_as(trace))  # not one step accepted
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        moving = fpc.make_learner("epc", net, precision="bf16", fast=False, armijo=0.0)
    e = moving.infer(x, y, trace=True).trace
    assert e[-1] < e[0] - 0.5 * float(d32[-1])


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
