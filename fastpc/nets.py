"""PCNet and its builders.

A PCNet is a chain of blocks f_1 ... f_L (plain ``nn.Module``s). States s_1 ... s_{L-1} live
between blocks; s_0 = x is the clamped input and f_L(s_{L-1}) is the output (logits).

Builders follow the papers (PAPERS.md §2, §5): ``mlp``, ``vgg`` (vgg5/7/9/10) and ``resnet``
(resnet18 with its 8 basic blocks, each one PC block).

Batch norm inside a block: its running statistics are updated once per training step, by the
feedforward pass that initialises the states. During inference iterations and the local weight
update the block still normalises with the statistics of the current batch, but the running
estimates are frozen (see :func:`frozen_batchnorm_stats`), so T inference steps do not count as
T batches.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence

import torch
from torch import nn

__all__ = ["PCNet", "mlp", "vgg", "resnet", "make_act", "frozen_batchnorm_stats", "VGG_CONFIGS", "ACTIVATIONS"]

ACTIVATIONS = {
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "silu": nn.SiLU,
    "leaky_relu": nn.LeakyReLU,
    "identity": nn.Identity,
    "linear": nn.Identity,
}


def make_act(name: str) -> nn.Module:
    """Activation module by name: relu, gelu, tanh, sigmoid, silu, leaky_relu, identity."""
    try:
        return ACTIVATIONS[name]()
    except KeyError:
        raise ValueError(f"unknown activation {name!r}; expected one of {sorted(ACTIVATIONS)}") from None


class PCNet(nn.Module):
    """A chain of blocks f_1 ... f_L. ``forward(x)`` is the feedforward prediction."""

    def __init__(self, blocks: Sequence[nn.Module]):
        super().__init__()
        if len(blocks) < 1:
            raise ValueError("PCNet needs at least one block")
        self.blocks = nn.ModuleList(blocks)

    @property
    def depth(self) -> int:
        """L, the number of blocks (so there are L - 1 hidden states)."""
        return len(self.blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x

    def forward_states(self, x: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The feedforward state: ([s_1, ..., s_{L-1}], output) with s_i = f_i(s_{i-1})."""
        states = []
        for block in self.blocks[:-1]:
            x = block(x)
            states.append(x)
        return states, self.blocks[-1](x)


@contextlib.contextmanager
def frozen_batchnorm_stats(net: nn.Module) -> Iterator[None]:
    """Within the block, batch norms normalise with batch statistics but do not update their
    running estimates (nor ``num_batches_tracked``)."""
    bns = [m for m in net.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [bn.track_running_stats for bn in bns]
    try:
        for bn in bns:
            bn.track_running_stats = False
        yield
    finally:
        for bn, flag in zip(bns, saved):
            bn.track_running_stats = flag


def _orthogonal_init(module: nn.Module, gain: float) -> None:
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            nn.init.orthogonal_(m.weight, gain=gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


# gain of the orthogonal init per activation: the ReLU gain for the ReLU family (the ePC paper's
# "orthogonal with ReLU gain" for GELU nets), the activation's own gain otherwise.
_GAINS = {"relu": "relu", "gelu": "relu", "silu": "relu", "leaky_relu": "relu",
          "tanh": "tanh", "sigmoid": "sigmoid", "identity": "linear", "linear": "linear"}


def _apply_init(net: nn.Module, init: str, act: str = "relu") -> None:
    if init == "orthogonal":
        _orthogonal_init(net, nn.init.calculate_gain(_GAINS.get(act, "relu")))
    elif init == "kaiming_uniform":
        for m in net.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                nn.init.kaiming_uniform_(m.weight, nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
    elif init == "gaussian":
        # N(0, 1/fan_in): the "standard Gaussian" init of the ePC paper's comparison
        for m in net.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                fan_in = m.weight[0].numel()
                nn.init.normal_(m.weight, std=1.0 / math.sqrt(fan_in))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
    elif init != "default":
        raise ValueError(
            f"unknown init {init!r}; expected orthogonal, kaiming_uniform, gaussian or default"
        )


def mlp(
    widths: Sequence[int],
    act: str = "gelu",
    init: str = "orthogonal",
    bias: bool = True,
) -> PCNet:
    """Multilayer perceptron as a PCNet: block i = Linear(widths[i-1], widths[i]) + act,
    the last block a plain Linear. The first block flattens its input (images work).

    ``init="orthogonal"`` (default) uses orthogonal weights and zero biases, with ReLU gain √2
    for relu/gelu/silu (with PyTorch's default init a 20-layer MLP does not train even with
    BP) and the activation's own gain otherwise (1 for ``identity``: a linear net neither
    grows nor shrinks signals). ``"gaussian"`` is N(0, 1/fan_in); ``"default"`` is PyTorch's.
    """
    widths = list(widths)
    if len(widths) < 2 or any(int(w) < 1 for w in widths):
        raise ValueError(f"mlp needs at least two positive widths, got {widths}")
    blocks: list[nn.Module] = []
    for i in range(len(widths) - 1):
        layers: list[nn.Module] = []
        if i == 0:
            layers.append(nn.Flatten())
        layers.append(nn.Linear(widths[i], widths[i + 1], bias=bias))
        if i < len(widths) - 2:
            layers.append(make_act(act))
        blocks.append(nn.Sequential(*layers))
    net = PCNet(blocks)
    _apply_init(net, init, act)
    return net


# Conv channels, "M" = 2x2 max-pool after the preceding conv; then the dense layers.
# vgg5 and vgg10 follow PAPERS.md §5; vgg7 and vgg9 the ePC reference (§2).
# Note: §5 lists VGG5 as "128, 256, MP, 512, MP, 512, MP, 512, MP, dense" (5 convs + dense =
# 6 layers); the name and the ePC/EP references count 4 convs + 1 dense, which is what we build.
VGG_CONFIGS: dict[str, tuple[list, list[int]]] = {
    "vgg5": ([128, "M", 256, "M", 512, "M", 512, "M"], []),
    "vgg7": ([128, 128, "M", 256, 256, "M", 512, 512, "M"], []),
    "vgg9": ([64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M"], []),
    "vgg10": ([64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"], [2048]),
}


def vgg(
    name: str,
    in_channels: int = 3,
    num_classes: int = 10,
    image_size: int = 32,
    width_mult: float = 1.0,
    act: str = "relu",
    init: str = "kaiming_uniform",
) -> PCNet:
    """VGG-style PCNet. Each conv block is Conv3x3 (+ MaxPool2d(2)) + act, one PC block per
    conv; the head is Flatten + Linear (vgg10 has a hidden dense 2048 first).

    ``width_mult`` scales every channel count and hidden dense width (for CPU-sized runs).
    The activation is the last module of each hidden block, so ``block[:-1]`` is the
    pre-activation (EP's mod-PGD uses that).
    """
    if name not in VGG_CONFIGS:
        raise ValueError(f"unknown vgg {name!r}; expected one of {sorted(VGG_CONFIGS)}")
    convs, dense = VGG_CONFIGS[name]
    blocks: list[nn.Module] = []
    c, size = in_channels, image_size
    i = 0
    while i < len(convs):
        out = max(1, int(round(convs[i] * width_mult)))
        pool = i + 1 < len(convs) and convs[i + 1] == "M"
        layers: list[nn.Module] = [nn.Conv2d(c, out, 3, padding=1)]
        if pool:
            layers.append(nn.MaxPool2d(2))
            size //= 2
        layers.append(make_act(act))
        blocks.append(nn.Sequential(*layers))
        c = out
        i += 2 if pool else 1
    if size < 1:
        raise ValueError(f"image_size {image_size} is too small for {name}")
    feat = c * size * size
    for j, d in enumerate(dense):
        d = max(1, int(round(d * width_mult)))
        blocks.append(nn.Sequential(nn.Flatten(), nn.Linear(feat, d), make_act(act)))
        feat = d
    head: list[nn.Module] = [nn.Linear(feat, num_classes)]
    if not dense:
        head.insert(0, nn.Flatten())
    blocks.append(nn.Sequential(*head))
    net = PCNet(blocks)
    _apply_init(net, init, act)
    return net


class BasicBlock(nn.Module):
    """ResNet basic block: relu(bn(conv(relu(bn(conv(x))))) + shortcut(x)). One PC block."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.bn1(self.conv1(x)))
        return torch.relu(self.bn2(self.conv2(h)) + self.shortcut(x))


def resnet(
    name: str = "resnet18",
    in_channels: int = 3,
    num_classes: int = 10,
    image_size: int = 32,
    width_mult: float = 1.0,
) -> PCNet:
    """ResNet-18 (CIFAR stem: conv3x3, no max-pool) as a PCNet of 10 blocks: the stem,
    the 8 basic blocks (each one PC block) and the head (global average pool + Linear)."""
    if name != "resnet18":
        raise ValueError(f"unknown resnet {name!r}; expected 'resnet18'")
    del image_size  # global average pooling makes the net size-agnostic
    w = [max(1, int(round(c * width_mult))) for c in (64, 128, 256, 512)]
    blocks: list[nn.Module] = [
        nn.Sequential(nn.Conv2d(in_channels, w[0], 3, 1, 1, bias=False), nn.BatchNorm2d(w[0]), nn.ReLU())
    ]
    cin = w[0]
    for stage, cout in enumerate(w):
        for k in range(2):
            stride = 2 if (stage > 0 and k == 0) else 1
            blocks.append(BasicBlock(cin, cout, stride))
            cin = cout
    blocks.append(nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(cin, num_classes)))
    net = PCNet(blocks)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
    return net
