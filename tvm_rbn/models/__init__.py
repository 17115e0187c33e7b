"""CNN model builders with torchvision's module names, shapes and forward semantics.

Written from scratch (torchvision does not load on these machines), so that a torchvision
state_dict loads with ``strict=True`` and gives the same outputs. All models are
``torch.fx.symbolic_trace``-able. Builders accept ``weights=None`` only: nothing is downloaded.
"""
from __future__ import annotations

from typing import Callable

from torch import nn

from .densenet import DenseNet, densenet121
from .resnet import ResNet, resnet18, resnet34, resnet50
from .vgg import VGG, vgg11_bn

MODELS: dict[str, Callable[..., nn.Module]] = {
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "densenet121": densenet121,
    "vgg11_bn": vgg11_bn,
}

__all__ = ["MODELS", "DenseNet", "ResNet", "VGG", "densenet121", "resnet18", "resnet34", "resnet50", "vgg11_bn"]
