"""restructure(model) in unchanged training loops: parity with the original model, BatchNorm
semantics, state_dicts, fallbacks, prebuilt libraries, torch.compile."""
from __future__ import annotations

import copy
import io
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tvm_rbn

from conftest import assert_close


class Chain(nn.Module):
    """Every pattern the bridge rewrites: conv-BN-ReLU-conv chains, a BN without ReLU, a BN read
    by a conv and by a non-conv (residual add), a stride-2 7x7 stem, a BN after a pool."""

    def __init__(self, momentum=0.1, affine=True, track=True):
        super().__init__()
        bn = lambda c: nn.BatchNorm2d(c, momentum=momentum, affine=affine, track_running_stats=track)  # noqa: E731
        self.conv1 = nn.Conv2d(3, 8, 7, stride=2, padding=3, bias=False)
        self.bn1 = bn(8)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(8, 12, 3, padding=1, bias=False)
        self.bn2 = bn(12)
        self.conv3 = nn.Conv2d(12, 12, 1, bias=False)
        self.bn3 = bn(12)
        self.pool = nn.MaxPool2d(2)
        self.bn4 = bn(12)
        self.conv4 = nn.Conv2d(12, 16, 3, stride=2, padding=1, bias=False)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.relu(self.bn1(self.conv1(x)))
        a = self.relu(self.bn2(self.conv2(x)))
        b = self.bn3(self.conv3(a))  # no ReLU
        x = torch.relu(a + b)
        x = self.bn4(self.pool(x))  # statistics of a non-conv output
        x = self.conv4(x)
        return self.fc(x.mean((2, 3)))


def _train(model, steps, inputs, targets, optimizer):
    losses = []
    for x, t in zip(inputs[:steps], targets[:steps]):
        loss = F.cross_entropy(model(x), t)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def _data(steps=5, batch=4, size=20, dtype=torch.float32):
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(batch, 3, size, size, generator=g, dtype=dtype) for _ in range(steps)]
    ts = [torch.randint(0, 5, (batch,), generator=g) for _ in range(steps)]
    return xs, ts


def _sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)


def _assert_same_state(ours: dict, ref: dict, what: str):
    assert ours.keys() == ref.keys()
    for k in ref:
        if ref[k].dtype == torch.int64:
            assert torch.equal(ours[k], ref[k]), f"{what}: {k}"
        else:
            assert_close(ours[k], ref[k], f"{what}: {k}")


VARIANTS = [
    ("default", dict()),
    ("momentum-None", dict(momentum=None)),
    ("no-affine", dict(affine=False)),
    ("no-running-stats", dict(track=False)),
]


@pytest.mark.parametrize("kwargs", [v[1] for v in VARIANTS], ids=[v[0] for v in VARIANTS])
def test_five_sgd_steps_match_pytorch(kwargs):
    ref = Chain(**kwargs)
    original = copy.deepcopy(ref)
    model = tvm_rbn.restructure(original)
    assert all(r.restructured for r in tvm_rbn.report(model))
    xs, ts = _data()
    ours = _train(model, 5, xs, ts, _sgd(model))
    theirs = _train(ref, 5, xs, ts, _sgd(ref))
    assert_close(torch.tensor(ours), torch.tensor(theirs), "losses")
    _assert_same_state(model.state_dict(), ref.state_dict(), "after 5 steps")
    _assert_same_state(original.state_dict(), ref.state_dict(), "original model shares the tensors")
    model.eval(), ref.eval()
    with torch.no_grad():
        assert_close(model(xs[0]), ref(xs[0]), "eval output")


def test_fp64_and_optimizer_built_before_restructuring():
    ref = Chain().double()
    original = copy.deepcopy(ref)
    optimizer = _sgd(original)  # built on the original model's parameters
    model = tvm_rbn.restructure(original)
    xs, ts = _data(steps=3, dtype=torch.float64)
    ours = _train(model, 3, xs, ts, optimizer)
    theirs = _train(ref, 3, xs, ts, _sgd(ref))
    assert_close(torch.tensor(ours, dtype=torch.float64), torch.tensor(theirs, dtype=torch.float64), "losses")
    _assert_same_state(model.state_dict(), ref.state_dict(), "fp64 after 3 steps")


def test_state_dict_round_trip_and_save_load(tmp_path):
    ref = Chain()
    model = tvm_rbn.restructure(copy.deepcopy(Chain()))
    model.load_state_dict(ref.state_dict())  # original -> restructured
    xs, ts = _data(steps=2)
    _train(model, 2, xs, ts, _sgd(model))
    back = Chain()
    back.load_state_dict(model.state_dict())  # restructured -> original
    _assert_same_state(back.state_dict(), model.state_dict(), "round trip")

    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    loaded = torch.load(buf, weights_only=False)
    model.eval(), loaded.eval(), back.eval()
    with torch.no_grad():
        assert_close(loaded(xs[0]), model(xs[0]), "torch.load of a restructured model")
        assert_close(back(xs[0]), model(xs[0]), "original model with the restructured state_dict")


def test_frozen_parameters_no_grad_and_inputs_untouched():
    ref = Chain()
    model = tvm_rbn.restructure(copy.deepcopy(ref))
    for m in (ref, model):
        m.bn2.weight.requires_grad_(False)
        m.conv1.weight.requires_grad_(False)
    xs, ts = _data(steps=2)
    snapshot = xs[0].clone()
    ours = _train(model, 2, xs, ts, torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.05))
    theirs = _train(ref, 2, xs, ts, torch.optim.SGD([p for p in ref.parameters() if p.requires_grad], lr=0.05))
    assert_close(torch.tensor(ours), torch.tensor(theirs), "losses with frozen parameters")
    assert torch.equal(xs[0], snapshot), "the input was modified"
    assert model.bn2.weight.grad is None and model.conv1.weight.grad is None
    with torch.no_grad():
        assert_close(model(xs[0]), ref(xs[0]), "no_grad training-mode forward")
    _assert_same_state(model.state_dict(), ref.state_dict(), "running statistics after no_grad forward")


def test_channels_last_input_is_accepted():
    ref = Chain()
    model = tvm_rbn.restructure(copy.deepcopy(ref))
    x = torch.randn(2, 3, 16, 16).to(memory_format=torch.channels_last)
    model.eval(), ref.eval()
    with torch.no_grad():
        assert_close(model(x), ref(x), "channels_last input")


def test_wrong_dtype_input_is_named():
    model = tvm_rbn.restructure(Chain())
    with pytest.raises(ValueError, match="dtype"):
        model(torch.randn(2, 3, 16, 16, dtype=torch.float64))


class Unsupported(nn.Module):
    def __init__(self):
        super().__init__()
        self.grouped = nn.Conv2d(8, 8, 3, padding=1, groups=2, bias=False)
        self.bn_grouped = nn.BatchNorm2d(8)
        self.dilated = nn.Conv2d(8, 8, 3, padding=2, dilation=2, bias=False)
        self.bn_dilated = nn.BatchNorm2d(8)
        self.biased = nn.Conv2d(8, 8, 1)
        self.bn_biased = nn.BatchNorm2d(8)
        self.bn3d = nn.BatchNorm3d(8)

    def forward(self, x):
        x = torch.relu(self.bn_grouped(self.grouped(x)))
        x = torch.relu(self.bn_dilated(self.dilated(x)))
        x = self.bn_biased(self.biased(x))
        return self.bn3d(x.unsqueeze(2)).squeeze(2)


def test_unsupported_layers_fall_back_and_say_why():
    ref = Unsupported()
    model = tvm_rbn.restructure(copy.deepcopy(ref))
    rows = {r.name: r for r in tvm_rbn.report(model)}
    assert "groups=2" in rows["bn_grouped"].stats
    assert "dilation=(2, 2)" in rows["bn_dilated"].stats
    assert rows["bn_biased"].stats.startswith("epilogue of biased")  # a conv bias is folded into the BN
    assert not rows["bn3d"].restructured and "BatchNorm3d" in rows["bn3d"].reason
    assert "bn3d" in str(tvm_rbn.report(model))
    x = torch.randn(2, 8, 9, 9, requires_grad=True)
    out, ref_out = model(x), ref(x)
    assert_close(out, ref_out, "fallback model output")
    probe = torch.randn_like(ref_out)  # sum(out^2) of a normalized output has zero gradient
    gx, = torch.autograd.grad((out * probe).sum(), x)
    rx, = torch.autograd.grad((ref_out * probe).sum(), x)
    assert_close(gx, rx, "input gradient through fallbacks", scale=float(rx.abs().max()))


def test_untraceable_model_restructures_its_traceable_children():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = Chain()

        def forward(self, x):
            if x.sum() > float("inf"):  # data-dependent control flow: fx cannot trace this
                return x
            return self.body(x)

    ref = DataDependent()
    model = tvm_rbn.restructure(copy.deepcopy(ref))
    assert [r.name for r in tvm_rbn.report(model) if r.restructured] == [f"body.bn{i}" for i in range(1, 5)]
    model.eval(), ref.eval()
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert_close(model(x), ref(x), "output of a partly traceable model")


def test_torch_compile():
    ref = Chain()
    model = torch.compile(tvm_rbn.restructure(copy.deepcopy(ref)))
    xs, ts = _data(steps=2)
    ours = _train(model, 2, xs, ts, _sgd(model))
    theirs = _train(ref, 2, xs, ts, _sgd(ref))
    assert_close(torch.tensor(ours), torch.tensor(theirs), "losses under torch.compile")


def test_prebuilt_library_trains_without_the_compiler(tmp_path):
    from tvm_rbn.build.workloads import build_for_model

    torch.manual_seed(0)
    lib = build_for_model(Chain(), (4, 3, 20, 20), out_dir=tmp_path / "lib")
    env = dict(os.environ, TVM_RBN_CACHE_DIR=str(tmp_path / "empty-cache"))  # nothing cached: only the library
    code = f"""
        import sys
        sys.modules["tvm"] = None  # any `import tvm` raises
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import copy, torch, torch.nn.functional as F, tvm_rbn
        from test_bridge import Chain, _data, _sgd, _train
        ref = Chain(); model = tvm_rbn.restructure(copy.deepcopy(ref), library={str(lib)!r})
        xs, ts = _data(steps=2)
        ours, theirs = _train(model, 2, xs, ts, _sgd(model)), _train(ref, 2, xs, ts, _sgd(ref))
        print(max(abs(a - b) for a, b in zip(ours, theirs)))
        print(sorted(m for m, mod in sys.modules.items() if mod is not None and (m == "tvm" or m.startswith("tvm."))))
    """
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, env=env,
                            timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    diff, modules = result.stdout.strip().splitlines()[-2:]
    assert float(diff) < 1e-4
    assert modules == "[]"
