"""The end-to-end benchmark's plumbing on a tiny model (never its timings): every side trains
and is timed, the output is saved, and the traffic model covers every BatchNorm."""
from __future__ import annotations

import json
import math

import pytest

from tvm_rbn.benchmarks import step, traffic
from tvm_rbn.models import MODELS

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_step_benchmark_times_every_side_and_saves(tmp_path):
    out = tmp_path / "step"
    step.main(["--model", "resnet18", "--batch", "2", "--size", "32", "--steps", "2", "--warmup", "0",
               "--no-compile", "--no-layer-choice", "--out", str(out)])
    saved = json.loads(out.with_suffix(".json").read_text())
    assert out.with_suffix(".png").read_bytes()[:8] == PNG_SIGNATURE
    (r,) = saved["results"]
    assert set(r["median_s"]) == {"eager", "tvm_rbn"}
    assert all(len(ts) == 2 and all(t > 0 for t in ts) for ts in r["times_s"].values())
    # no warm-up: the first step of both sides starts from the same weights and data
    assert math.isclose(r["losses"]["eager"][0], r["losses"]["tvm_rbn"][0], rel_tol=1e-3), r["losses"]
    assert r["restructured"] == "20/20"
    lib = r["library"]
    assert lib["kernels"] == lib["tuned"] + lib["class"] + lib["default"] > 0


@pytest.mark.parametrize("name", ["resnet18", "densenet121"])
def test_traffic_model_covers_every_batchnorm(name):
    model = MODELS[name]()
    t = traffic.summary(model, (2, 3, 64, 64))
    bns = [n for n, m in model.named_modules() if type(m).__name__ == "BatchNorm2d"]
    assert [row["name"] for row in t["layers"]] == bns
    assert all(row["fused"] != "none" for row in t["layers"])
    assert 0 < t["tvm_rbn_mib"] < t["eager_mib"]


def test_layer_benchmark_times_every_side_of_each_kind(tmp_path):
    from tvm_rbn.benchmarks import layers

    out = tmp_path / "layers.json"
    layers.main(["--model", "resnet18", "--batch", "2", "--size", "32", "--limit", "1", "--reps", "1",
                 "--out", str(out), "--plot", str(tmp_path / "layers.png")])
    r = json.loads(out.read_text())
    assert (tmp_path / "layers.png").read_bytes()[:8] == PNG_SIGNATURE
    assert {row["kind"] for row in r["rows"]} == {"forward", "dgrad", "wgrad"}
    for row in r["rows"]:
        med = row["median_ms"]
        assert set(med) == {"tvm_rbn", "torch_unfused", "onednn", "onednn_cl"} and min(med.values()) > 0, row
        assert math.isclose(row["vs_onednn_cl"], med["onednn_cl"] / med["tvm_rbn"]), row
    assert set(r["summary"]) == {"forward", "dgrad", "wgrad"}
    h = r["headroom"]
    assert 0 < h["flop_share"] < 1, h  # one layer of resnet18's
    assert math.isclose(h["ours_ms"], sum(s["step_weighted_ms"]["tvm_rbn"] for s in r["summary"].values())), h
    assert 0 < h["fastest_ms"] <= h["ours_ms"] and sum(h["fastest_side_counts"].values()) == len(r["rows"]), h


def _row(calls, gflop, **ms):
    return {"calls_per_step": calls, "gflop": gflop, "median_ms": ms}


def test_where_the_step_time_goes_from_the_per_layer_medians():
    from tvm_rbn.benchmarks import layers, suite

    rows = [_row(2, 1.0, tvm_rbn=10.0, torch_unfused=12.0, onednn=11.0, onednn_cl=8.0),  # oneDNN CL fastest
            _row(1, 3.0, tvm_rbn=20.0, torch_unfused=30.0, onednn=25.0, onednn_cl=21.0)]  # ours fastest
    h = layers.headroom(rows, step_gflop=5.0)
    assert (h["ours_ms"], h["fastest_ms"], h["gain_ms"]) == (40.0, 36.0, 4.0), h
    assert h["fastest_side_counts"] == {"onednn_cl": 1, "tvm_rbn": 1} and h["flop_share"] == 1.0, h
    assert math.isclose(h["gflops_ours"], 5.0 / 40.0 * 1e3), h
    step_result = {"model": "m", "median_s": {"eager": 0.5, "torch.compile": 0.3, "tvm_rbn": 0.25}}
    w = suite.where_time_goes(step_result, {"model": "m", "headroom": h})
    assert math.isclose(w["rest_s"], 0.21) and math.isclose(w["step_with_fastest_s"], 0.246), w
    assert math.isclose(w["vs_eager"], 2.0) and math.isclose(w["vs_eager_with_fastest"], 0.5 / 0.246), w
    assert "m " in suite.format_where_time_goes([w])
    with pytest.raises(ValueError, match="--layers 0"):  # a sample of layers cannot split the step
        suite.where_time_goes(step_result, {"model": "m", "headroom": layers.headroom(rows[:1], step_gflop=5.0)})


def test_pool_benchmark_gives_each_side_its_own_pool(tmp_path, monkeypatch):
    from tvm_rbn.benchmarks import pool
    from tvm_rbn.runtime import buffers

    monkeypatch.setattr(buffers, "MIN_BYTES", 1 << 14)  # pool this tiny model's outputs
    monkeypatch.delenv("TVM_RBN_BUFFER_POOL", raising=False)
    outer = buffers._state
    out = tmp_path / "pool"
    pool.main(["--model", "resnet18", "--batch", "2", "--size", "64", "--steps", "2", "--warmup", "1",
               "--no-layer-choice", "--out", str(out)])
    assert buffers._state is outer
    (r,) = json.loads(out.with_suffix(".json").read_text())["results"]
    sides = r["sides"]
    assert set(sides) == {"off", "capped", "default"}
    assert all(len(s["times_s"]) == 2 and s["median_s"] > 0 for s in sides.values()), sides
    assert sides["off"]["pool_bytes"] == sides["off"]["blocks_created_per_step"] == 0
    assert sides["default"]["pool_bytes"] > 0 and sides["capped"]["pool_bytes"] > 0
    # after one warm-up step the default headroom keeps every block a step needs
    assert sides["default"]["blocks_created_per_step"] == 0, sides["default"]
    assert sides["capped"]["pool_bytes"] <= sides["capped"]["high_water_bytes"]
