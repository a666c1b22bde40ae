"""Networks used for matching and evaluation: ConvNet-D, CIFAR ResNet-10/18, CIFAR DenseNet-BC-121.

Every network returned by :func:`get_network` has

* ``forward(x) -> logits`` of shape (B, num_classes);
* ``embed(x) -> features`` of shape (B, feature_dim): the flattened (ConvNet) or globally pooled
  (ResNet, DenseNet) output of the last feature layer, i.e. what distribution matching compares;
* an integer attribute ``feature_dim``.
"""
from __future__ import annotations

import math
import re

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["ConvNet", "ResNet", "BasicBlock", "DenseNet", "get_network", "available_networks"]


# ---------------------------------------------------------------------------------------- ConvNet

def convnet_depth_for(image_size: int) -> int:
    """Default ConvNet depth for a resolution: 3 up to 32 px, 4 at 64 px, 5 at 128 px, ..."""
    if image_size <= 32:
        return 3
    return 3 + max(0, round(math.log2(image_size / 32)))


def _norm_layer(norm: str, width: int) -> nn.Module:
    if norm == "instancenorm":
        return nn.GroupNorm(width, width, affine=True)
    if norm == "batchnorm":
        return nn.BatchNorm2d(width)
    if norm == "layernorm":
        return nn.GroupNorm(1, width, affine=True)
    if norm == "groupnorm":
        return nn.GroupNorm(4, width, affine=True)
    if norm == "none":
        return nn.Identity()
    raise ValueError(f"unknown norm {norm!r}; use instancenorm, batchnorm, layernorm, groupnorm or none")


def _act_layer(act: str) -> nn.Module:
    if act == "relu":
        return nn.ReLU(inplace=True)
    if act == "leakyrelu":
        return nn.LeakyReLU(0.01, inplace=True)
    if act == "sigmoid":
        return nn.Sigmoid()
    raise ValueError(f"unknown activation {act!r}; use relu, leakyrelu or sigmoid")


def _pool_layer(pooling: str) -> nn.Module:
    if pooling == "avgpooling":
        return nn.AvgPool2d(2, 2)
    if pooling == "maxpooling":
        return nn.MaxPool2d(2, 2)
    if pooling == "none":
        return nn.Identity()
    raise ValueError(f"unknown pooling {pooling!r}; use avgpooling, maxpooling or none")


class ConvNet(nn.Module):
    """The DC/DSA/DM ConvNet: ``depth`` blocks of Conv3x3 -> norm -> act -> pool, then one Linear.

    Args:
        channels: input channels.
        num_classes: output classes.
        width: channels of every conv (128 in the papers).
        depth: number of blocks; ``None`` picks it from ``image_size`` (3 at <=32 px, 4 at 64,
            5 at 128).
        norm: ``instancenorm`` (GroupNorm(width, width)), ``batchnorm``, ``layernorm``,
            ``groupnorm`` or ``none``.
        act: ``relu``, ``leakyrelu`` or ``sigmoid``.
        pooling: ``avgpooling``, ``maxpooling`` or ``none``.
        image_size: input height/width (square inputs assumed for the default depth; the feature
            size is computed from it).

    A 1-channel 28 px input (MNIST family) gets padding 3 on the first conv, so it is processed
    like a 32 px input. ``embed`` returns the flattened output of the last block
    (2048-d for ConvNet-3 at 32 px).
    """

    def __init__(self, channels: int, num_classes: int, width: int = 128, depth: int | None = None,
                 norm: str = "instancenorm", act: str = "relu", pooling: str = "avgpooling",
                 image_size: int = 32):
        super().__init__()
        if depth is None:
            depth = convnet_depth_for(image_size)
        if depth < 1:
            raise ValueError(f"ConvNet depth must be >= 1, got {depth}")
        self.depth = depth
        self.width = width
        layers: list[nn.Module] = []
        size = image_size
        in_ch = channels
        for d in range(depth):
            padding = 3 if (d == 0 and channels == 1 and image_size == 28) else 1
            layers.append(nn.Conv2d(in_ch, width, kernel_size=3, padding=padding))
            size = size + 2 * padding - 2
            layers.append(_norm_layer(norm, width))
            layers.append(_act_layer(act))
            layers.append(_pool_layer(pooling))
            if pooling != "none":
                size //= 2
            in_ch = width
        if size < 1:
            raise ValueError(f"ConvNet depth {depth} is too deep for {image_size} px inputs")
        self.features = nn.Sequential(*layers)
        self.feature_dim = width * size * size
        self.classifier = nn.Linear(self.feature_dim, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


# ----------------------------------------------------------------------------------------- ResNet

class BasicBlock(nn.Module):
    """The two-conv residual block of ResNet-18/34 (batch norm, 1x1 projection shortcut)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut: nn.Module = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class ResNet(nn.Module):
    """CIFAR-style ResNet: 3x3 stride-1 stem (no max-pool), four stages, global average pool.

    Args:
        channels: input channels.
        num_classes: output classes.
        blocks: BasicBlocks per stage, e.g. (1, 1, 1, 1) for ResNet-10, (2, 2, 2, 2) for ResNet-18.
        widths: stage widths; the stem has ``widths[0]`` channels. Strides are 1, 2, 2, 2.

    Global pooling is adaptive, so any input size >= 8 px works (32, 64, 128 ...).
    ``embed`` returns the pooled (B, widths[-1]) features.
    """

    def __init__(self, channels: int, num_classes: int, blocks=(2, 2, 2, 2),
                 widths=(64, 128, 256, 512)):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        in_planes = widths[0]
        stages = []
        for i, (n, w) in enumerate(zip(blocks, widths)):
            layers = []
            for j in range(n):
                layers.append(BasicBlock(in_planes, w, stride=(1 if i == 0 or j > 0 else 2)))
                in_planes = w
            stages.append(nn.Sequential(*layers))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.feature_dim = in_planes
        self.classifier = nn.Linear(in_planes, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


# --------------------------------------------------------------------------------------- DenseNet

class _Bottleneck(nn.Module):
    def __init__(self, in_planes: int, growth: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, 4 * growth, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(4 * growth)
        self.conv2 = nn.Conv2d(4 * growth, growth, 3, padding=1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(F.relu(self.bn1(x)))
        out = self.conv2(F.relu(self.bn2(out)))
        return torch.cat([out, x], 1)


class _Transition(nn.Module):
    def __init__(self, in_planes: int, out_planes: int):
        super().__init__()
        self.bn = nn.BatchNorm2d(in_planes)
        self.conv = nn.Conv2d(in_planes, out_planes, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.avg_pool2d(self.conv(F.relu(self.bn(x))), 2)


class DenseNet(nn.Module):
    """CIFAR DenseNet-BC: 3x3 stem of 2k channels, dense blocks of bottleneck layers
    (BN-ReLU-Conv1x1(4k) -> BN-ReLU-Conv3x3(k)), transitions with compression ``reduction``
    (BN-ReLU-Conv1x1-AvgPool2), final BN-ReLU and global average pool.

    ``DenseNet(c, n)`` with the defaults is the "DenseNet-121" of the IDC/DANCE tables
    (blocks 6/12/24/16, growth 12): 1,000,618 parameters for 3 channels / 10 classes.
    ``embed`` returns the pooled (B, feature_dim) features.
    """

    def __init__(self, channels: int, num_classes: int, blocks=(6, 12, 24, 16), growth: int = 12,
                 reduction: float = 0.5):
        super().__init__()
        planes = 2 * growth
        self.conv1 = nn.Conv2d(channels, planes, 3, padding=1, bias=False)
        stages: list[nn.Module] = []
        for i, n in enumerate(blocks):
            layers = []
            for _ in range(n):
                layers.append(_Bottleneck(planes, growth))
                planes += growth
            stages.append(nn.Sequential(*layers))
            if i < len(blocks) - 1:
                out_planes = int(math.floor(planes * reduction))
                stages.append(_Transition(planes, out_planes))
                planes = out_planes
        self.features = nn.Sequential(*stages)
        self.bn = nn.BatchNorm2d(planes)
        self.feature_dim = planes
        self.classifier = nn.Linear(planes, num_classes)

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn(self.features(self.conv1(x))))
        return F.adaptive_avg_pool2d(out, 1).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.embed(x))


# --------------------------------------------------------------------------------------- registry

_FIXED = ("convnet", "convnetd3", "convnetd4", "convnetd5", "resnet10", "resnet18", "densenet121")


def available_networks() -> list[str]:
    """Network names accepted by :func:`get_network` (``convnetdN`` works for any N >= 1)."""
    return list(_FIXED)


def get_network(name: str, channels: int, num_classes: int, image_size: int, **kwargs) -> nn.Module:
    """Build a network by name.

    Names are case-insensitive and ignore ``-``/``_`` (``ResNet-18`` == ``resnet18``).
    ``convnet`` picks its depth from ``image_size``; ``convnetdN`` fixes depth N. Extra keyword
    arguments go to the constructor (e.g. ``width``, ``norm``, ``act``, ``pooling`` for ConvNet).
    ResNets and DenseNet use global average pooling, so ``image_size`` only matters for ConvNet.

    Raises:
        ValueError: unknown name (the message lists the available names).
    """
    key = re.sub(r"[-_\s]", "", name.lower())
    if key == "convnet":
        return ConvNet(channels, num_classes, image_size=image_size, **kwargs)
    m = re.fullmatch(r"convnetd(\d+)", key)
    if m:
        if "depth" in kwargs:
            raise ValueError(f"{name} fixes the depth; do not also pass depth=")
        return ConvNet(channels, num_classes, depth=int(m.group(1)), image_size=image_size,
                       **kwargs)
    if key == "resnet10":
        return ResNet(channels, num_classes, blocks=(1, 1, 1, 1), widths=(32, 64, 128, 256),
                      **kwargs)
    if key == "resnet18":
        return ResNet(channels, num_classes, blocks=(2, 2, 2, 2), widths=(64, 128, 256, 512),
                      **kwargs)
    if key == "densenet121":
        return DenseNet(channels, num_classes, blocks=(6, 12, 24, 16), growth=12, **kwargs)
    raise ValueError(f"unknown network {name!r}; available: {', '.join(available_networks())} "
                     f"(convnetdN for any depth N)")
