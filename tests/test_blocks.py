"""Block operations (fastpc/blocks.py) against torch.autograd, in float64: the analytic ops of
mlp / vgg / conv / pooling blocks and the autograd fallback of ResNet blocks give the block's
output, its input VJP and its weight gradients as autograd does."""

from __future__ import annotations

import pytest
import torch
from numerics import two_path_tol
from torch import nn

import fastpc as fpc
from fastpc.blocks import (ACTIVATIONS, AnalyticOps, AutogradOps, BlockFlops, block_ops,
                           preactivation_split)
from fastpc.nets import BasicBlock, frozen_batchnorm_stats

DT = torch.float64
B = 4
MLP_ACTS = ["relu", "gelu", "tanh", "sigmoid", "silu", "leaky_relu", "identity"]


def _mlp_blocks(act):
    torch.manual_seed(0)
    net = fpc.mlp([12, 9, 8, 4], act=act).to(DT)
    return list(net.blocks), [(B, 3, 4), (B, 9), (B, 8)]  # the first block flattens (B, 3, 4)


def _vgg_blocks():
    torch.manual_seed(0)
    net = fpc.vgg("vgg5", in_channels=1, image_size=16, width_mult=0.0625).to(DT)
    shapes = [(B, 1, 16, 16), (B, 8, 8, 8), (B, 16, 4, 4), (B, 32, 2, 2), (B, 32, 1, 1)]
    return list(net.blocks), shapes


def _resnet_blocks():
    torch.manual_seed(0)
    net = fpc.resnet(width_mult=0.0625).to(DT)
    shapes, s = [], torch.zeros(B, 3, 8, 8, dtype=DT)
    for block in net.blocks:
        shapes.append(tuple(s.shape))
        s = block(s)
    return list(net.blocks), shapes


def _other_blocks():
    torch.manual_seed(0)
    blocks = [
        nn.Sequential(nn.Conv2d(4, 6, 3, stride=2, padding=1, groups=2), nn.Tanh()),
        nn.Sequential(nn.Conv2d(4, 4, 3, padding=2, dilation=2, groups=4, bias=False), nn.SiLU()),
        nn.Sequential(nn.Conv2d(4, 6, (3, 1), stride=(1, 2)), nn.MaxPool2d(3, 2, padding=1, ceil_mode=True),
                      nn.LeakyReLU(0.2)),
        nn.Sequential(nn.Conv2d(4, 6, 3, padding=1), nn.AvgPool2d(2), nn.GELU(approximate="tanh")),
        nn.Sequential(nn.AvgPool2d(3, stride=2, padding=1, count_include_pad=False), nn.Sigmoid()),
        nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 3)),
        nn.Sequential(nn.AdaptiveAvgPool2d((2, 3)), nn.Flatten(), nn.Linear(24, 5), nn.Identity()),
        nn.Conv2d(4, 5, 2),  # a single module as a block
        nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Identity(), nn.Linear(6, 5), nn.GELU()),
    ]
    return [b.to(DT) for b in blocks], [(B, 4, 7, 7)] * 8 + [(B, 3, 8)]


def _cases():
    for act in MLP_ACTS:
        blocks, shapes = _mlp_blocks(act)
        for i, (b, s) in enumerate(zip(blocks, shapes)):
            yield pytest.param(b, s, AnalyticOps, id=f"mlp-{act}-{i}")
    for name, (blocks, shapes) in {"vgg5": _vgg_blocks(), "other": _other_blocks()}.items():
        for i, (b, s) in enumerate(zip(blocks, shapes)):
            yield pytest.param(b, s, AnalyticOps, id=f"{name}-{i}")
    blocks, shapes = _resnet_blocks()
    for i, (b, s) in enumerate(zip(blocks, shapes)):
        analytic = i == len(blocks) - 1  # the head (avg pool, flatten, linear); stem and basic blocks have BN
        yield pytest.param(b, s, AnalyticOps if analytic else AutogradOps, id=f"resnet-{i}")
    conv_same = nn.Sequential(nn.Conv2d(4, 4, 3, padding="same"), nn.ReLU()).to(DT)
    yield pytest.param(conv_same, (B, 4, 5, 5), AutogradOps, id="conv-padding-same")
    dropout = nn.Sequential(nn.Linear(5, 5), nn.Dropout(0.0), nn.Tanh()).to(DT)
    yield pytest.param(dropout, (B, 5), AutogradOps, id="dropout")


def _tol(*tensors):
    # every reduction inside one small block sums at most as many terms as its input or output has
    return two_path_tol(DT, max(t.numel() for t in tensors))


def _reference(block, s, g):
    """(f(s), ∂⟨g, f(s)⟩/∂s, {param: ∂⟨g, f(s)⟩/∂θ}) by torch.autograd."""
    leaf = s.clone().requires_grad_()
    out = block(leaf)
    params = [p for p in block.parameters() if p.requires_grad]
    grads = torch.autograd.grad(out, [leaf, *params], g, allow_unused=True)
    return out.detach(), grads[0], dict(zip(params, grads[1:]))


@pytest.mark.parametrize("block,shape,kind", list(_cases()))
def test_ops_match_autograd(block, shape, kind):
    torch.manual_seed(1)
    block.train()
    bns = [m for m in block.modules() if isinstance(m, nn.BatchNorm2d)]
    stats = [(bn.running_mean.clone(), bn.num_batches_tracked.clone()) for bn in bns]
    s = torch.randn(shape, dtype=DT)
    ops = block_ops(block)
    assert type(ops) is kind
    with frozen_batchnorm_stats(block):
        out, ref_vjp, ref_grads = _reference(block, s, g := torch.randn_like(block(s)))
        tol = _tol(s, out)
        tape = ops.forward(s)
        torch.testing.assert_close(tape.out, out, **tol)
        torch.testing.assert_close(ops.act(ops.preact(tape)), tape.out, **tol)
        torch.testing.assert_close(ops.vjp(tape, g), ref_vjp, **tol)
        block.zero_grad(set_to_none=True)
        ops.weight_grads(tape, g)  # .grad created
        ops.weight_grads(tape, g, scale=0.5)  # .grad accumulated
        for p, ref in ref_grads.items():
            torch.testing.assert_close(p.grad, 1.5 * ref if ref is not None else None, **tol)
        block.zero_grad(set_to_none=True)
        torch.testing.assert_close(ops.vjp_and_weight_grads(tape, g, torch.tensor(2.0, dtype=DT)), ref_vjp, **tol)
        for p, ref in ref_grads.items():
            torch.testing.assert_close(p.grad, 2 * ref if ref is not None else None, **tol)
    for bn, (mean, count) in zip(bns, stats):  # the ops never counted a batch
        assert torch.equal(bn.running_mean, mean) and torch.equal(bn.num_batches_tracked, count)


def test_weight_grads_of_first_block_skip_the_input_vjp_and_frozen_params():
    torch.manual_seed(0)
    block = fpc.vgg("vgg5", in_channels=1, image_size=16, width_mult=0.0625).to(DT).blocks[0]
    block[0].weight.requires_grad_(False)
    s = torch.randn(B, 1, 16, 16, dtype=DT)
    ops = block_ops(block)
    tape = ops.forward(s)
    g = torch.randn_like(tape.out)
    _, _, ref = _reference(block, s, g)
    ops.weight_grads(tape, g)
    assert block[0].weight.grad is None
    torch.testing.assert_close(block[0].bias.grad, ref[block[0].bias], **_tol(s, g))


def test_plain_ops_give_the_same_numbers():
    blocks, shapes = _mlp_blocks("gelu")
    for block, shape in zip(blocks, shapes):
        s = torch.randn(shape, dtype=DT)
        eager, plain = block_ops(block), block_ops(block, plain=True)
        t1, t2 = eager.forward(s), plain.forward(s)
        g = torch.randn_like(t1.out)
        assert torch.equal(t1.out, t2.out)
        assert torch.equal(eager.vjp(t1, g), plain.vjp(t2, g))


@pytest.mark.parametrize("act", MLP_ACTS)
def test_mlp_hidden_blocks_split_and_head_is_identity(act):
    blocks, shapes = _mlp_blocks(act)
    for block, shape in zip(blocks[:-1], shapes):
        s = torch.randn(shape, dtype=DT)
        pre, a = preactivation_split(block)
        assert type(a) in ACTIVATIONS and a is block[-1]
        assert torch.equal(a(pre(s)), block(s))
        ops = block_ops(block)
        torch.testing.assert_close(ops.preact(ops.forward(s)), pre(s), **_tol(s))
    head, s = blocks[-1], torch.randn(shapes[-1], dtype=DT)
    with pytest.raises(ValueError, match="Sequential ending in one of ReLU, GELU"):
        preactivation_split(head)
    ops = block_ops(head)
    tape = ops.forward(s)
    assert type(ops.act) is nn.Identity and ops.preact(tape) is tape.out


def test_vgg_hidden_blocks_split():
    blocks, shapes = _vgg_blocks()
    for block, shape in zip(blocks[:-1], shapes):
        s = torch.randn(shape, dtype=DT)
        pre, act = preactivation_split(block)
        assert type(act) is nn.ReLU and torch.equal(act(pre(s)), block(s))
        ops = block_ops(block)
        torch.testing.assert_close(ops.preact(ops.forward(s)), pre(s), **_tol(s))


def test_basic_block_has_no_split():
    block = BasicBlock(4, 4, 1)
    with pytest.raises(ValueError, match=r"BasicBlock .*Sequential ending in one of ReLU, GELU, Tanh"):
        preactivation_split(block)
    assert type(block_ops(block).act) is nn.Identity
    stem = fpc.resnet(width_mult=0.0625).blocks[0]  # Conv, BN, ReLU: the fallback still splits
    assert type(block_ops(stem).act) is nn.ReLU


def test_flops():
    blocks, _ = _vgg_blocks()
    conv = block_ops(blocks[0]).flops((B, 1, 16, 16))
    fwd = 2 * B * 8 * 16 * 16 * 1 * 9
    assert conv == BlockFlops(forward=fwd, vjp=fwd, weight_grad=fwd)  # first op: no input VJP
    head = block_ops(nn.Sequential(nn.Flatten(), nn.Linear(12, 5), nn.ReLU(), nn.Linear(5, 3))).flops((B, 3, 4))
    f1, f2 = 2 * B * 12 * 5, 2 * B * 5 * 3
    assert head == BlockFlops(forward=f1 + f2, vjp=f1 + f2, weight_grad=f1 + 2 * f2)
    assert block_ops(BasicBlock(4, 4, 1)).flops((B, 4, 4, 4)) is None


def test_plain_ops_trace_in_one_graph():
    """``plain=True``: FF pass, VJPs and weight gradients of a conv + pool net trace into one
    graph (dynamo only; no inductor) and give the eager numbers."""
    blocks, shapes = _vgg_blocks()
    ops = [block_ops(b, plain=True) for b in blocks]

    def step(s, g):
        tapes = []
        for o in ops:
            tapes.append(o.forward(s))
            s = tapes[-1].out
        for o, tape in zip(reversed(ops), reversed(tapes)):
            g = o.vjp_and_weight_grads(tape, g, 0.5)
        return g

    s, g = torch.randn(shapes[0], dtype=DT), torch.randn(B, 10, dtype=DT)
    ref = step(s, g)
    grads = [p.grad.clone() for b in blocks for p in b.parameters()]
    for b in blocks:
        b.zero_grad(set_to_none=True)
    try:
        got = torch.compile(step, backend="eager", fullgraph=True)(s, g)
    finally:
        torch._dynamo.reset()
    assert torch.equal(got, ref)
    for p, ref_grad in zip([p for b in blocks for p in b.parameters()], grads):
        assert torch.equal(p.grad, ref_grad)
