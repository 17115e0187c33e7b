"""tvm_rbn.models: torchvision-compatible names, shapes, counts, state_dict round trip, fx tracing."""
from __future__ import annotations

import copy
import functools

import pytest
import torch
import torch.fx
from torch import nn

from tvm_rbn import models
from tvm_rbn.models import MODELS

from conftest import assert_close

NAMES = ["resnet18", "resnet34", "resnet50", "densenet121", "vgg11_bn"]

# torchvision's published totals at num_classes=1000.
PARAMS = {
    "resnet18": 11_689_512,
    "resnet34": 21_797_672,
    "resnet50": 25_557_032,
    "densenet121": 7_978_856,
    "vgg11_bn": 132_868_840,
}
BATCHNORMS = {"resnet18": 20, "resnet34": 36, "resnet50": 53, "densenet121": 121, "vgg11_bn": 8}
STATE_DICT_ENTRIES = {"resnet18": 122, "resnet34": 218, "resnet50": 320, "densenet121": 727, "vgg11_bn": 62}

# (model, state_dict key, shape) as in torchvision's state_dicts.
KEYS = [
    ("resnet18", "conv1.weight", (64, 3, 7, 7)),
    ("resnet18", "layer1.0.conv1.weight", (64, 64, 3, 3)),
    ("resnet18", "layer2.0.downsample.0.weight", (128, 64, 1, 1)),
    ("resnet18", "bn1.num_batches_tracked", ()),
    ("resnet18", "fc.weight", (1000, 512)),
    ("resnet34", "layer3.5.conv2.weight", (256, 256, 3, 3)),
    ("resnet34", "layer4.0.downsample.1.weight", (512,)),
    ("resnet50", "layer1.0.downsample.0.weight", (256, 64, 1, 1)),
    ("resnet50", "layer1.0.downsample.1.running_var", (256,)),
    ("resnet50", "layer2.0.conv2.weight", (128, 128, 3, 3)),
    ("resnet50", "layer4.2.conv3.weight", (2048, 512, 1, 1)),
    ("resnet50", "layer4.2.bn3.bias", (2048,)),
    ("resnet50", "fc.weight", (1000, 2048)),
    ("densenet121", "features.conv0.weight", (64, 3, 7, 7)),
    ("densenet121", "features.norm0.running_mean", (64,)),
    ("densenet121", "features.denseblock1.denselayer1.norm1.weight", (64,)),
    ("densenet121", "features.denseblock1.denselayer1.conv1.weight", (128, 64, 1, 1)),
    ("densenet121", "features.denseblock1.denselayer1.conv2.weight", (32, 128, 3, 3)),
    ("densenet121", "features.denseblock4.denselayer16.conv1.weight", (128, 992, 1, 1)),
    ("densenet121", "features.transition1.conv.weight", (128, 256, 1, 1)),
    ("densenet121", "features.transition3.norm.running_var", (1024,)),
    ("densenet121", "features.norm5.running_mean", (1024,)),
    ("densenet121", "classifier.weight", (1000, 1024)),
    ("vgg11_bn", "features.0.weight", (64, 3, 3, 3)),
    ("vgg11_bn", "features.0.bias", (64,)),
    ("vgg11_bn", "features.1.running_mean", (64,)),
    ("vgg11_bn", "features.4.weight", (128, 64, 3, 3)),
    ("vgg11_bn", "features.25.weight", (512, 512, 3, 3)),
    ("vgg11_bn", "features.26.running_var", (512,)),
    ("vgg11_bn", "classifier.0.weight", (4096, 512 * 7 * 7)),
    ("vgg11_bn", "classifier.3.weight", (4096, 4096)),
    ("vgg11_bn", "classifier.6.weight", (1000, 4096)),
]

# Smallest convenient input per model: the ResNets and DenseNet at 64x64, VGG at 32x32 (its
# adaptive 7x7 pool then upsamples a 1x1 map).
INPUT_HW = {"resnet18": 64, "resnet34": 64, "resnet50": 64, "densenet121": 64, "vgg11_bn": 32}


@functools.lru_cache(maxsize=None)
def _built(name: str, num_classes: int = 1000) -> nn.Module:
    """One instance per (model, classes), built once per session; tests that change it deepcopy it."""
    torch.manual_seed(0)
    return MODELS[name](num_classes=num_classes)


def _fresh(name: str, num_classes: int = 1000) -> nn.Module:
    return copy.deepcopy(_built(name, num_classes))


def _randomize_bn(model: nn.Module) -> None:
    """Give every BatchNorm non-trivial statistics and affine parameters, so eval mode is a real test."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                c = m.num_features
                m.running_mean.copy_(torch.randn(c, generator=g) * 0.1)
                m.running_var.copy_(torch.rand(c, generator=g) + 0.5)
                m.weight.copy_(torch.rand(c, generator=g) + 0.5)
                m.bias.copy_(torch.randn(c, generator=g) * 0.1)


def _input(name: str, n: int = 2) -> torch.Tensor:
    hw = INPUT_HW[name]
    return torch.randn(n, 3, hw, hw)


def test_models_dict():
    assert list(MODELS) == NAMES
    for name in NAMES:
        assert MODELS[name] is getattr(models, name)


@pytest.mark.parametrize("name", NAMES)
def test_parameter_count(name):
    assert sum(p.numel() for p in _built(name).parameters()) == PARAMS[name]


@pytest.mark.parametrize("name", NAMES)
def test_batchnorm_count(name):
    assert sum(isinstance(m, nn.BatchNorm2d) for m in _built(name).modules()) == BATCHNORMS[name]


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_entries(name):
    assert len(_built(name).state_dict()) == STATE_DICT_ENTRIES[name]


@pytest.mark.parametrize("name,key,shape", KEYS, ids=[f"{m}:{k}" for m, k, _ in KEYS])
def test_state_dict_key(name, key, shape):
    sd = _built(name).state_dict()
    assert key in sd
    assert tuple(sd[key].shape) == shape


def test_resnet50_stride_on_3x3():
    # v1.5 bottleneck: the first block of stages 2-4 downsamples in conv2 (3x3) and the shortcut.
    block = _built("resnet50").layer2[0]
    assert block.conv1.stride == (1, 1)
    assert block.conv2.stride == (2, 2)
    assert block.downsample[0].stride == (2, 2)


def test_torchvision_init():
    bns = [b for b in _built("resnet18").modules() if isinstance(b, nn.BatchNorm2d)]
    assert all(torch.equal(b.weight.detach(), torch.ones_like(b.weight)) for b in bns)
    assert all(torch.equal(b.bias.detach(), torch.zeros_like(b.bias)) for b in bns)
    # kaiming_normal_ fan_out relu: std = sqrt(2 / (out_channels * k * k)).
    w = _built("resnet50").layer4[0].conv2.weight  # 512 x 512 x 3 x 3
    assert abs(w.std().item() / (2 / (512 * 9)) ** 0.5 - 1) < 0.02
    zero = models.resnet18(zero_init_residual=True)
    assert all(not blk.bn2.weight.detach().any() for layer in (zero.layer1, zero.layer4) for blk in layer)


@pytest.mark.parametrize("name", NAMES)
def test_output_shape(name):
    model = _built(name, 10).eval()
    with torch.no_grad():
        y = model(_input(name))
    assert y.shape == (2, 10)
    assert torch.isfinite(y).all()


@pytest.mark.parametrize("name", NAMES)
def test_state_dict_round_trip(name):
    src = _fresh(name, 10)
    _randomize_bn(src)
    torch.manual_seed(123)  # a differently initialized target
    dst = MODELS[name](num_classes=10)
    dst.load_state_dict(src.state_dict(), strict=True)
    src.eval(), dst.eval()
    x = _input(name)
    with torch.no_grad():
        expected, actual = src(x), dst(x)
    assert_close(actual, expected, f"{name} after state_dict round trip")


@pytest.mark.parametrize("name", NAMES)
def test_fx_symbolic_trace(name):
    model = _fresh(name, 10)
    _randomize_bn(model)
    model.eval()
    traced = torch.fx.symbolic_trace(model)
    x = _input(name)
    with torch.no_grad():
        expected, actual = model(x), traced(x)
    assert_close(actual, expected, f"{name} traced by torch.fx")
    # The traced module keeps the original parameter and buffer names.
    assert set(traced.state_dict()) == set(model.state_dict())


def test_densenet_fx_graph_concatenates_with_torch_cat():
    graph = torch.fx.symbolic_trace(_built("densenet121")).graph
    cats = [n for n in graph.nodes if n.op == "call_function" and n.target is torch.cat]
    # Before each dense layer (58 layers) plus one block output per block (4).
    assert len(cats) == 58 + 4


@pytest.mark.parametrize("name", ["resnet18", "densenet121"])
def test_train_step(name):
    # Training-mode forward and backward run (no in-place ReLU clobbering a saved tensor) and
    # update the BN running statistics.
    model = _fresh(name, 10).train()
    model.zero_grad()
    model(_input(name)).square().mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    bn = next(m for m in model.modules() if isinstance(m, nn.BatchNorm2d))
    assert int(bn.num_batches_tracked) == 1


@pytest.mark.parametrize("name", NAMES)
def test_pretrained_weights_rejected(name):
    with pytest.raises(ValueError, match="pretrained weights are not available"):
        MODELS[name](weights="IMAGENET1K_V1")
