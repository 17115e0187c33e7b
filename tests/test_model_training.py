"""Every model of tvm_rbn.models, restructured, trains like the original.

Five SGD steps (lr 1e-4, momentum 0.9, weight decay 1e-4: small enough that random-data training stays stable and does not amplify rounding) from the same weights on the same batches,
in float64 so that the comparison checks the restructured math rather than fp32 rounding
(the fp32 path is compared in test_bridge.py and by the demo). The first step's gradients
must agree to fp64's table tolerance (1e-10 relative to each tensor's magnitude); after five
free-running steps, losses, parameters, running statistics and eval outputs must agree to the
"float64-after-sgd-steps" entry (1e-7): see tests/conftest.py for why.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import tvm_rbn
from tvm_rbn.build import provider
from tvm_rbn.build.workloads import extract
from tvm_rbn.models import MODELS

from conftest import assert_close

AFTER_STEPS = "float64-after-sgd-steps"

# (model, batch, size): the smallest input at which every BatchNorm sees >= 16 values per channel
CASES = [
    ("resnet18", 4, 64),
    ("resnet34", 4, 64),
    ("resnet50", 4, 64),
    ("densenet121", 4, 64),
    ("vgg11_bn", 4, 32),
]


@pytest.mark.parametrize("name,batch,size", CASES, ids=[c[0] for c in CASES])
def test_five_sgd_steps(name, batch, size):
    torch.manual_seed(0)
    reference = MODELS[name](num_classes=10).double()
    model = tvm_rbn.restructure(copy.deepcopy(reference))
    rows = tvm_rbn.report(model)
    assert len(rows) == sum(isinstance(m, torch.nn.BatchNorm2d) for m in reference.modules())
    shape = (batch, 3, size, size)
    provider.prepare([spec for spec, _ in extract(reference, shape, dtype=torch.float64)])  # one build

    opts = [torch.optim.SGD(m.parameters(), lr=1e-4, momentum=0.9, weight_decay=1e-4) for m in (model, reference)]
    g = torch.Generator().manual_seed(1)
    for step in range(5):
        x = torch.randn(shape, generator=g, dtype=torch.float64)
        target = torch.randint(0, 10, (batch,), generator=g)
        losses = []
        for m, opt in zip((model, reference), opts):
            torch.manual_seed(step)  # the same dropout masks (vgg11_bn) for both
            loss = F.cross_entropy(m(x), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        if step == 0:
            for (pname, p), q in zip(model.named_parameters(), reference.parameters()):
                assert_close(p.grad, q.grad, f"{name} step 0: gradient of {pname}")
        assert_close(losses[0], losses[1], f"{name} step {step}: loss", tolerance=AFTER_STEPS)
    ours, ref = model.state_dict(), reference.state_dict()
    assert ours.keys() == ref.keys()
    for key in ref:
        assert_close(ours[key].double(), ref[key].double(), f"{name} after 5 steps: {key}", tolerance=AFTER_STEPS)
    model.eval(), reference.eval()
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    with torch.no_grad():
        assert_close(model(x), reference(x), f"{name}: eval output", tolerance=AFTER_STEPS)
