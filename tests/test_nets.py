"""PCNet builders, init and batch-norm handling."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import fastpc as fpc
from fastpc.nets import frozen_batchnorm_stats


def test_mlp_structure_and_orthogonal_relu_gain():
    net = fpc.mlp([784, 128, 128, 128, 10], act="gelu")
    assert net.depth == 4 and isinstance(net, fpc.PCNet)
    assert net(torch.randn(3, 1, 28, 28)).shape == (3, 10)
    w = net.blocks[1][0].weight  # 128 x 128, orthogonal with gain √2
    torch.testing.assert_close(w @ w.T, 2.0 * torch.eye(128), atol=1e-4, rtol=0)
    assert torch.count_nonzero(net.blocks[1][0].bias) == 0
    assert isinstance(net.blocks[-1], nn.Sequential) and isinstance(net.blocks[-1][-1], nn.Linear)


def test_linear_mlp_uses_unit_gain():
    net = fpc.mlp([16, 16, 16], act="identity")
    w = net.blocks[1][0].weight
    torch.testing.assert_close(w @ w.T, torch.eye(16), atol=1e-5, rtol=0)


def test_forward_states_is_the_chain():
    net = fpc.mlp([5, 7, 7, 3], act="tanh")
    x = torch.randn(4, 5)
    states, out = net.forward_states(x)
    assert [s.shape for s in states] == [(4, 7), (4, 7)]
    torch.testing.assert_close(net.blocks[1](net.blocks[0](x)), states[1])
    torch.testing.assert_close(out, net(x))


@pytest.mark.parametrize("name,n_blocks", [("vgg5", 5), ("vgg7", 7), ("vgg9", 9), ("vgg10", 10)])
def test_vgg_depths(name, n_blocks):
    net = fpc.vgg(name, in_channels=3, num_classes=10, image_size=32, width_mult=1 / 16)
    assert net.depth == n_blocks
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_vgg5_full_width_channels_follow_the_paper():
    net = fpc.vgg("vgg5", in_channels=3, num_classes=10, image_size=32)
    convs = [m.out_channels for m in net.modules() if isinstance(m, nn.Conv2d)]
    assert convs == [128, 256, 512, 512]
    # the activation is each hidden block's last module (pre-activation = block[:-1])
    assert all(isinstance(b[-1], nn.ReLU) for b in net.blocks[:-1])


def test_resnet18_has_the_eight_basic_blocks_as_pc_blocks():
    net = fpc.resnet("resnet18", in_channels=3, num_classes=10, width_mult=1 / 8)
    assert net.depth == 10
    assert sum(type(b).__name__ == "BasicBlock" for b in net.blocks) == 8
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)


def test_batchnorm_running_stats_update_once_per_step():
    torch.manual_seed(0)
    net = fpc.resnet("resnet18", in_channels=1, num_classes=3, width_mult=1 / 16)
    bn = net.blocks[0][1]
    learner = fpc.make_learner("epc", net, iters=4, optimizer=torch.optim.SGD(net.parameters(), 0.01))
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 0])
    learner.step(x, y)
    assert bn.num_batches_tracked.item() == 1  # FF pass only, not the 4 inference iterations
    # the running mean equals one momentum update with the FF batch statistics
    expected = 0.1 * net.blocks[0][0](x).mean(dim=(0, 2, 3))
    torch.testing.assert_close(bn.running_mean, expected.detach(), rtol=1e-3, atol=1e-4)
    with frozen_batchnorm_stats(net):
        net(x)
    assert bn.num_batches_tracked.item() == 1 and bn.track_running_stats


def test_bad_builder_arguments():
    with pytest.raises(ValueError, match="activation"):
        fpc.mlp([3, 3, 3], act="nope")
    with pytest.raises(ValueError, match="unknown vgg"):
        fpc.vgg("vgg11")
    with pytest.raises(ValueError, match="init"):
        fpc.mlp([3, 3], init="xavier-ish")
    assert math.isclose(nn.init.calculate_gain("relu"), math.sqrt(2))
