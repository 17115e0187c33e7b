"""DenseNet-121 with torchvision's module names, parameter shapes, init and forward.

Written independently of torchvision; a torchvision ``densenet121`` state_dict in the current
key format (``...denselayer1.norm1.weight``, not the old ``norm.1``) loads with ``strict=True``
and gives the same outputs. Each dense block concatenates its running feature list with a plain
``torch.cat`` in its own forward, so the model is fx-traceable; there is no checkpointing
(torchvision's ``memory_efficient`` option is not offered).
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ._weights import check_no_weights

__all__ = ["DenseLayer", "DenseBlock", "Transition", "DenseNet", "densenet121"]


class DenseLayer(nn.Module):
    """BN-ReLU-1x1 conv (to bn_size * growth_rate), BN-ReLU-3x3 conv (to growth_rate)."""

    def __init__(self, in_ch: int, growth_rate: int, bn_size: int, drop_rate: float) -> None:
        super().__init__()
        mid = bn_size * growth_rate
        self.norm1 = nn.BatchNorm2d(in_ch)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_ch, mid, kernel_size=1, stride=1, bias=False)
        self.norm2 = nn.BatchNorm2d(mid)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(mid, growth_rate, kernel_size=3, stride=1, padding=1, bias=False)
        self.drop_rate = float(drop_rate)

    def forward(self, x: Tensor) -> Tensor:
        # x is the block's concatenation of all earlier features. relu1 is in place, but on
        # norm1's fresh output, so x itself is never modified.
        out = self.conv1(self.relu1(self.norm1(x)))
        out = self.conv2(self.relu2(self.norm2(out)))
        if self.drop_rate > 0:  # a configuration constant, not data-dependent
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return out


class DenseBlock(nn.Module):
    """`num_layers` dense layers (children "denselayer1".."denselayerN"); returns all features."""

    def __init__(self, num_layers: int, in_ch: int, bn_size: int, growth_rate: int, drop_rate: float) -> None:
        super().__init__()
        for i in range(num_layers):
            layer = DenseLayer(in_ch + i * growth_rate, growth_rate, bn_size, drop_rate)
            self.add_module(f"denselayer{i + 1}", layer)

    def forward(self, x: Tensor) -> Tensor:
        features = [x]
        for layer in self.children():
            features.append(layer(torch.cat(features, 1)))
        return torch.cat(features, 1)


class Transition(nn.Sequential):
    """BN, ReLU, 1x1 conv, 2x2 average pool (children norm, relu, conv, pool)."""

    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.add_module("norm", nn.BatchNorm2d(in_ch))
        self.add_module("relu", nn.ReLU(inplace=True))
        self.add_module("conv", nn.Conv2d(in_ch, out_ch, kernel_size=1, stride=1, bias=False))
        self.add_module("pool", nn.AvgPool2d(kernel_size=2, stride=2))


class DenseNet(nn.Module):
    """DenseNet-BC: stem, dense blocks joined by halving transitions, norm5, ReLU, pool, classifier."""

    def __init__(
        self,
        growth_rate: int = 32,
        block_config: tuple[int, ...] = (6, 12, 24, 16),
        num_init_features: int = 64,
        bn_size: int = 4,
        drop_rate: float = 0.0,
        num_classes: int = 1000,
    ) -> None:
        super().__init__()
        features = nn.Sequential()
        features.add_module("conv0", nn.Conv2d(3, num_init_features, kernel_size=7, stride=2, padding=3, bias=False))
        features.add_module("norm0", nn.BatchNorm2d(num_init_features))
        features.add_module("relu0", nn.ReLU(inplace=True))
        features.add_module("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1))

        ch = num_init_features
        for i, num_layers in enumerate(block_config):
            features.add_module(f"denseblock{i + 1}", DenseBlock(num_layers, ch, bn_size, growth_rate, drop_rate))
            ch += num_layers * growth_rate
            if i != len(block_config) - 1:
                features.add_module(f"transition{i + 1}", Transition(ch, ch // 2))
                ch //= 2
        features.add_module("norm5", nn.BatchNorm2d(ch))
        self.features = features
        self.classifier = nn.Linear(ch, num_classes)
        self._init_weights()

    def _init_weights(self) -> None:
        # torchvision's scheme: kaiming_normal_ with its defaults (fan_in, leaky_relu a=0) for
        # convs, BN weight 1 / bias 0, Linear bias 0 (weight keeps nn.Linear's default init).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = F.relu(self.features(x), inplace=True)
        x = torch.flatten(F.adaptive_avg_pool2d(x, (1, 1)), 1)
        return self.classifier(x)


def densenet121(
    num_classes: int = 1000, *, weights: Any = None, progress: bool = True, **kwargs: Any
) -> DenseNet:
    """DenseNet-121 (7,978,856 parameters at num_classes=1000).

    kwargs: drop_rate, and growth_rate / block_config / num_init_features / bn_size to depart
    from the 121 configuration. ``progress`` is ignored (nothing is downloaded).
    """
    check_no_weights("densenet121", weights)
    config = dict(growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64, bn_size=4)
    config.update(kwargs)
    return DenseNet(num_classes=num_classes, **config)
