"""VGG-11 with batch norm, with torchvision's module names, parameter shapes, init and forward.

Written independently of torchvision; a torchvision ``vgg11_bn`` state_dict loads with
``strict=True`` and gives the same outputs. ``features`` is a flat Sequential whose indices
follow torchvision's configuration "A" (conv, bn, relu per conv; one max-pool per "M").
"""
from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from ._weights import check_no_weights

__all__ = ["VGG", "make_features", "vgg11_bn"]

# Output channels per 3x3 conv; "M" is a 2x2/2 max-pool. Configuration "A" is VGG-11.
CFG_A: list[int | str] = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]


def make_features(cfg: list[int | str], batch_norm: bool = True) -> nn.Sequential:
    layers: list[nn.Module] = []
    in_ch = 3
    for item in cfg:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        out_ch = int(item)
        layers.append(nn.Conv2d(in_ch, out_ch, kernel_size=3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(out_ch))
        layers.append(nn.ReLU(inplace=True))
        in_ch = out_ch
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """features, 7x7 adaptive average pool, three-layer classifier with dropout."""

    def __init__(
        self, features: nn.Sequential, num_classes: int = 1000, init_weights: bool = True, dropout: float = 0.5
    ) -> None:
        super().__init__()
        self.features = features
        self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(
            nn.Linear(512 * 7 * 7, 4096),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, 4096),
            nn.ReLU(True),
            nn.Dropout(p=dropout),
            nn.Linear(4096, num_classes),
        )
        if init_weights:
            self._init_weights()

    def _init_weights(self) -> None:
        # torchvision's scheme.
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> Tensor:
        x = torch.flatten(self.avgpool(self.features(x)), 1)
        return self.classifier(x)


def vgg11_bn(num_classes: int = 1000, *, weights: Any = None, progress: bool = True, **kwargs: Any) -> VGG:
    """VGG-11 with BN (132,868,840 parameters at num_classes=1000).

    kwargs: init_weights, dropout. ``progress`` is ignored (nothing is downloaded).
    """
    check_no_weights("vgg11_bn", weights)
    return VGG(make_features(CFG_A, batch_norm=True), num_classes=num_classes, **kwargs)
