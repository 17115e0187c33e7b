"""Never slower (DESIGN.md section 6): BatchNorms left in PyTorch, forced or by the per-layer
decision measured at build time, train exactly like the unchanged model, and the report says
why."""
from __future__ import annotations

import copy
import json
import shutil
from collections import Counter

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tvm_rbn
from tvm_rbn.bridge import FORCED
from tvm_rbn.build import provider
from tvm_rbn.build.workloads import extract
from tvm_rbn.models import densenet121, resnet18

from conftest import assert_close
from test_bridge import Chain, _assert_same_state, _data, _sgd, _train


def _one_step_parity(reference: nn.Module, model: nn.Module, shape, classes: int, what: str) -> None:
    """One fp64 training step from the same weights: outputs, every gradient, running
    statistics; then the eval output."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    target = torch.randint(0, classes, (shape[0],), generator=g)
    outs = []
    for m in (model, reference):
        out = m(x)
        F.cross_entropy(out, target).backward()
        outs.append(out.detach())
    assert_close(outs[0], outs[1], f"{what}: output")
    for (name, p), q in zip(model.named_parameters(), reference.parameters()):
        assert_close(p.grad, q.grad, f"{what}: gradient of {name}")
    _assert_same_state(model.state_dict(), reference.state_dict(), f"{what}: after one step")
    model.eval(), reference.eval()
    with torch.no_grad():
        assert_close(model(x), reference(x), f"{what}: eval output")


@pytest.mark.parametrize("names", [{"bn2"}, {"bn1", "bn3"}, {"bn4"}], ids=lambda s: "+".join(sorted(s)))
def test_forced_fallback_trains_like_pytorch_and_says_why(names):
    """bn2: its producer conv2 reads bn1's activation (now materialized), its output feeds a
    conv-BN chain and the residual add; bn1+bn3: the stem and the BN without ReLU beside
    the add; bn4: after a pool, its consumer conv4 back to PyTorch."""
    ref = Chain().double()
    original = copy.deepcopy(ref)
    model = tvm_rbn.restructure(original, fallback=names)
    rows = {r.name: r for r in tvm_rbn.report(model)}
    for name, row in rows.items():
        assert row.restructured == (name not in names), row
        if name in names:
            assert row.reason == FORCED and row.fused == "none"
            assert type(model.get_submodule(name)) is nn.BatchNorm2d  # the module itself, unchanged
    if "bn2" in names:
        assert type(model.get_submodule("conv2")) is nn.Conv2d  # its producer conv runs in PyTorch too
        assert "standalone for conv2" in rows["bn1"].apply
    xs, ts = _data(steps=3, dtype=torch.float64)
    ours = _train(model, 3, xs, ts, _sgd(model))
    theirs = _train(ref, 3, xs, ts, _sgd(ref))
    assert_close(torch.tensor(ours, dtype=torch.float64), torch.tensor(theirs, dtype=torch.float64), "losses")
    _assert_same_state(model.state_dict(), ref.state_dict(), "fp64 after 3 steps")
    _assert_same_state(original.state_dict(), ref.state_dict(), "original model shares the tensors")
    model.eval(), ref.eval()
    with torch.no_grad():
        assert_close(model(xs[0]), ref(xs[0]), "eval output")


def test_forced_fallback_in_resnet18_blocks():
    """A basic block's inner BN (its conv's prologue and epilogue both go) and a projection
    shortcut's BN (the residual add+ReLU takes its PyTorch output as the identity)."""
    torch.manual_seed(0)
    reference = resnet18(num_classes=10).double()
    names = {"layer1.0.bn1", "layer2.0.downsample.1", "layer3.1.bn2"}
    model = tvm_rbn.restructure(copy.deepcopy(reference), fallback=names)
    rows = tvm_rbn.report(model)
    assert {r.name for r in rows if not r.restructured} == names
    assert all(r.reason == FORCED for r in rows if r.name in names)
    shape = (4, 3, 64, 64)  # every BatchNorm sees >= 16 values per channel (see test_model_training.py)
    provider.prepare([spec for spec, _ in extract(reference, shape, dtype=torch.float64, fallback=names)])
    _one_step_parity(reference, model, shape, 10, "resnet18 with 3 BatchNorms in PyTorch")


def test_forced_fallback_inside_a_dense_block_leaves_the_block_in_pytorch():
    torch.manual_seed(0)
    reference = densenet121(num_classes=10, growth_rate=8, block_config=(2, 3), num_init_features=16).double()
    forced = "features.denseblock2.denselayer2.norm2"
    model = tvm_rbn.restructure(copy.deepcopy(reference), fallback=[forced])
    rows = {r.name: r for r in tvm_rbn.report(model)}
    block2 = [n for n in rows if n.startswith("features.denseblock2.")]
    assert len(block2) == 6
    for name in block2:
        assert not rows[name].restructured
        assert rows[name].reason == FORCED if name == forced else "left in PyTorch as a whole" in rows[name].reason
    assert all(r.restructured for n, r in rows.items() if n not in block2)
    assert rows["features.denseblock1.denselayer1.norm1"].fused == "full"  # the other block keeps its buffer
    shape = (2, 3, 32, 32)
    provider.prepare([spec for spec, _ in extract(reference, shape, dtype=torch.float64, fallback=[forced])])
    _one_step_parity(reference, model, shape, 10, "densenet with a block in PyTorch")


def test_fallback_names_are_checked():
    with pytest.raises(ValueError, match="bn9"):
        tvm_rbn.restructure(Chain(), fallback={"bn9"})
    with pytest.raises(TypeError):
        tvm_rbn.restructure(Chain(), fallback="bn1")


def test_library_decisions_are_honoured(tmp_path):
    """A manifest row with choice "pytorch" leaves that BatchNorm in PyTorch, and the report
    quotes the measurement."""
    from tvm_rbn.build.compile import build_cached

    shape = (4, 3, 20, 20)
    entry = build_cached([spec for spec, _ in extract(Chain(), shape, fallback={"bn2"})])
    lib = tmp_path / "lib"
    shutil.copytree(entry, lib)
    manifest = json.loads((lib / "manifest.json").read_text())
    manifest["layers"] = {
        "bn1": {"ours_ms": 1.0, "torch_ms": 1.5, "choice": "tvm"},
        "bn2": {"ours_ms": 3.1, "torch_ms": 2.4, "choice": "pytorch"},
    }
    (lib / "manifest.json").write_text(json.dumps(manifest))
    ref = Chain()
    model = tvm_rbn.restructure(copy.deepcopy(ref), library=lib)
    rows = {r.name: r for r in tvm_rbn.report(model)}
    assert not rows["bn2"].restructured
    assert rows["bn2"].reason == "measured slower at build: ours 3.10 ms vs PyTorch 2.40 ms"
    assert all(rows[n].restructured for n in ("bn1", "bn3", "bn4"))
    xs, ts = _data(steps=2)
    ours = _train(model, 2, xs, ts, _sgd(model))
    theirs = _train(ref, 2, xs, ts, _sgd(ref))
    assert_close(torch.tensor(ours), torch.tensor(theirs), "losses")


def test_decision_sites_attribute_every_conv_kernel_once():
    """Each restructured BatchNorm is one site (a dense block's BatchNorms: one site named
    after the block); every conv kernel call of a training step belongs to exactly one site."""
    from tvm_rbn.benchmarks.layers import KINDS
    from tvm_rbn.build.measure import sites

    torch.manual_seed(0)
    model = densenet121(num_classes=10, growth_rate=8, block_config=(2, 3), num_init_features=16)
    shape = (2, 3, 32, 32)
    found = sites(model, shape)
    names = [n for s in found for n in s.names]
    assert len(names) == len(set(names)) == sum(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    blocks = {s.dense_block: len(s.names) for s in found if s.dense_block}
    assert blocks == {"features.denseblock1": 4, "features.denseblock2": 6}
    total = sum((s.kernels for s in found), start=Counter())
    assert total == {spec: n for spec, n in extract(model, shape) if spec.op in KINDS and n}


class Tiny(nn.Sequential):
    def __init__(self):
        super().__init__(
            nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.Conv2d(8, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 3),
        )


@pytest.mark.parametrize("recheck_offset, choice", [(-0.2, "tvm"), (0.05, "pytorch")],
                         ids=["recheck-faster", "recheck-slower"])
def test_close_calls_are_retimed_before_deciding(monkeypatch, recheck_offset, choice):
    """A layer whose first pass lands near the threshold (1 + MARGIN) is timed again, with more
    reps, and decided on all of them; clear wins and losses are decided on the first pass."""
    from tvm_rbn.benchmarks import layers, timing
    from tvm_rbn.build import measure as cost

    threshold = 1 + cost.MARGIN
    recheck_ms = threshold + recheck_offset
    # ours per call (ms); PyTorch takes 1.0
    first = {"close": threshold + 0.02, "slow": threshold + 2 * cost.CLOSE, "fast": threshold - 2 * cost.CLOSE}
    calls = Counter()

    class FakeCase:
        def __init__(self, spec):
            self.spec = spec

        def ours(self):
            return ("tvm_rbn", self.spec)

        def torch_unfused(self):
            return ("torch_unfused", self.spec)

    def fake_time_sides(sides, reps, **_):
        spec = sides["tvm_rbn"][1]
        calls[spec] += 1
        ours = first[spec] if calls[spec] == 1 else recheck_ms
        return {"tvm_rbn": [ours / 1e3] * reps, "torch_unfused": [1e-3] * reps}

    monkeypatch.setattr(cost, "sites", lambda *a, **k: [cost.Site([n], Counter({n: 1})) for n in first])
    monkeypatch.setattr(provider, "prepare", lambda specs: None)
    monkeypatch.setattr(layers, "_Case", FakeCase)
    monkeypatch.setattr(timing, "time_sides", fake_time_sides)
    rows = cost.measure(None, (1, 3, 8, 8), reps=5)
    assert calls == {"close": 2, "slow": 1, "fast": 1}
    assert rows["close"]["reps"] == 5 + cost.RECHECK * 5 and rows["slow"]["reps"] == 5
    assert rows["close"]["choice"] == choice, rows["close"]
    assert rows["slow"]["choice"] == "pytorch" and rows["fast"]["choice"] == "tvm"


def test_build_measures_each_layer_and_restructure_follows(tmp_path):
    """Sane numbers (positive times, one choice per BatchNorm) without asserting which side
    wins: the decisions are whatever this machine measured, and restructure follows them."""
    from tvm_rbn.build.workloads import build_for_model

    torch.manual_seed(0)
    ref = Tiny()
    shape = (2, 3, 12, 12)
    lib = build_for_model(ref, shape, out_dir=tmp_path / "lib", measure=True, reps=3)
    manifest = json.loads((lib / "manifest.json").read_text())
    layers = manifest["layers"]
    assert set(layers) == {"1", "4"}
    for row in layers.values():
        assert row["ours_ms"] > 0 and row["torch_ms"] > 0 and row["kernel_calls"] >= 2
        assert row["choice"] in ("tvm", "pytorch")
    assert manifest["layer_measurement"]["reps"] == 3
    model = tvm_rbn.restructure(copy.deepcopy(ref), library=lib)
    for row in tvm_rbn.report(model):
        slower = layers[row.name]["choice"] == "pytorch"
        assert row.restructured != slower
        assert row.reason.startswith("measured slower at build: ours") == slower
    # every kernel the decided model runs is in the library: training needs no build
    symbols = {k["symbol"] for k in manifest["kernels"]}
    slower = {n for n, row in layers.items() if row["choice"] == "pytorch"}
    assert {s.symbol for s, _ in extract(ref, shape, fallback=slower)} <= symbols
    xs = [torch.randn(shape) for _ in range(2)]
    ts = [torch.randint(0, 3, (2,)) for _ in range(2)]
    ours = _train(model, 2, xs, ts, _sgd(model))
    theirs = _train(ref, 2, xs, ts, _sgd(ref))
    assert_close(torch.tensor(ours), torch.tensor(theirs), "losses")
