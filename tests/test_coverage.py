"""Every BatchNorm of the reference models is restructured, and DenseNet blocks run without
concatenation copies (the block buffer of tvm_rbn.bridge.dense)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

import tvm_rbn
from tvm_rbn.build import provider
from tvm_rbn.build.workloads import extract
from tvm_rbn.models import MODELS, densenet121

from conftest import assert_close

COVERED = ["resnet18", "resnet50", "densenet121", "vgg11_bn"]


@pytest.mark.parametrize("name", COVERED)
def test_every_batchnorm_is_restructured(name):
    model = MODELS[name](num_classes=10)
    rows = tvm_rbn.report(tvm_rbn.restructure(model))
    assert len(rows) == sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert [r.name for r in rows if not r.restructured] == []
    assert "(100%)" in str(rows)
    assert all(r.fused in ("full", "statistics") for r in rows)
    for r in rows:
        # statistics never come from a standalone pass over a conv output
        assert r.stats.startswith(("epilogue of", "shared block statistics of")), (r.name, r.stats)
        assert r.apply, r.name


@pytest.mark.parametrize("name,stem_bn", [("resnet50", "bn1"), ("densenet121", "features.norm0")])
def test_stem_batchnorm_applies_inside_the_max_pool(name, stem_bn):
    rows = {r.name: r for r in tvm_rbn.report(tvm_rbn.restructure(MODELS[name](num_classes=10)))}
    assert rows[stem_bn].fused == "full", rows[stem_bn]
    assert rows[stem_bn].apply.startswith("max-pool kernel of"), rows[stem_bn].apply


class CountCopies(TorchDispatchMode):
    """Counts concatenations and copies of 4-D (activation) tensors, including those inside
    tvm_rbn's custom ops (whose Python bodies are run under the mode)."""

    def __init__(self):
        super().__init__()
        self.cats = 0
        self.copies = 0
        self.zero_fills = 0  # activation-sized tensors filled with zeros (e.g. materialized gradients)
        self.torch_convs = 0  # PyTorch's own convolutions, forward or backward

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "tvm_rbn":
            opdef = torch._library.custom_ops._maybe_get_opdef(func)
            with self:
                return opdef._init_fn(*args, **kwargs)
        out = func(*args, **kwargs)
        if func.overloadpacket in (torch.ops.aten.convolution, torch.ops.aten.convolution_backward):
            self.torch_convs += 1
        if isinstance(out, torch.Tensor) and out.dim() == 4:
            if func.overloadpacket is torch.ops.aten.cat:
                self.cats += 1
            elif func.overloadpacket in (torch.ops.aten.copy_, torch.ops.aten.clone):
                self.copies += 1
            elif func.overloadpacket in ZERO_FILLS and (func.overloadpacket is not torch.ops.aten.fill_
                                                        or args[1] == 0):
                self.zero_fills += 1
        return out


ZERO_FILLS = (torch.ops.aten.fill_, torch.ops.aten.zero_, torch.ops.aten.zeros_like, torch.ops.aten.zeros,
              torch.ops.aten.new_zeros)


def _tiny_densenet():
    return densenet121(num_classes=10, growth_rate=8, block_config=(2, 3), num_init_features=16).double()


def test_densenet_forward_and_backward_make_no_concatenation_copies():
    torch.manual_seed(0)
    reference = _tiny_densenet()
    model = tvm_rbn.restructure(copy.deepcopy(reference))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    provider.prepare([spec for spec, _ in extract(reference, x.shape, dtype=torch.float64)])
    counts, convs = {}, {}
    for label, m in (("eager", reference), ("restructured", model)):
        with CountCopies() as mode:
            m(x).sum().backward()
        counts[label] = (mode.cats, mode.copies, mode.zero_fills)
        convs[label] = mode.torch_convs
    assert counts["eager"][0] == (2 + 1) + (3 + 1), counts  # one cat per layer and per block output
    # every conv on our kernels, the transition's too (moved after its pool): the stem, 2 x (2 + 3)
    # in the blocks and the transition, each forward and backward in eager
    assert convs == {"eager": 2 * (1 + 2 * 5 + 1), "restructured": 0}, convs
    # restructured: no concatenation; per block, one copy of its input into the block buffer
    # (forward) and none in backward (the first layer reads the incoming gradient in place, each
    # conv1 data gradient writes the running sum from its epilogue); no zero gradient
    # materialized for the block's saved-only outputs (conv1's, one per layer)
    assert counts["restructured"] == (0, 2, 0), counts
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert_close(p.grad, q.grad, f"gradient of {name}")


def test_densenet_transition_pooling_before_its_conv():
    """A transition that pools before its conv (BN-ReLU-pool-conv after a block's concatenation)
    is no dense layer: the blocks stay fused, the transition takes the per-BatchNorm path."""
    from tvm_rbn.models.densenet import Transition

    torch.manual_seed(0)
    reference = _tiny_densenet()
    for t in (m for m in reference.modules() if isinstance(m, Transition)):
        conv, pool = t.conv, t.pool
        del t.conv, t.pool
        t.add_module("pool", pool), t.add_module("conv", conv)
    model = tvm_rbn.restructure(copy.deepcopy(reference))
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with CountCopies() as mode:
        out = model(x)
    assert mode.cats == 0, "dense blocks not fused"
    expected = reference(x)
    assert_close(out, expected, "output")
    out.sum().backward(), expected.sum().backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert_close(p.grad, q.grad, f"gradient of {name}")


def test_densenet_blocks_with_frozen_batchnorms():
    """Eval-mode BatchNorms (running statistics) inside and after the dense blocks, with
    gradients: the block's eval path and the shared-statistics BatchNorm's."""
    torch.manual_seed(0)
    reference = _tiny_densenet()
    with torch.no_grad():
        for m in reference.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    model = tvm_rbn.restructure(copy.deepcopy(reference))
    model.eval(), reference.eval()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    target = torch.randint(0, 10, (2,))
    for m in (model, reference):
        F.cross_entropy(m(x), target).backward()
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert_close(p.grad, q.grad, f"eval-mode gradient of {name}")
