"""The benchmark: ``python -m tvm_rbn bench`` (and ``scripts/bench.sh``).

    python -m tvm_rbn bench [--model resnet50 densenet121] [--batch 16] [--size 224] [--steps 5]
                            [--layers 12] [--no-compile] [--no-memory] [--out out/bench]

For each model, at the batch and size given, fp32, every side at torch's thread count:
  1. end to end (``step``): training steps of tvm_rbn, PyTorch eager and torch.compile in
     alternation, medians; the BatchNorm traffic model; peak memory (``memory``);
  2. per layer (``layers``): each fused kernel (forward, data gradient, weight gradient)
     against PyTorch's unfused sequence for that layer and against the oneDNN convolution
     alone, on NCHW tensors (as eager runs it) and on channels-last ones (as torch.compile
     does), for `--layers` layers spread over the model's FLOPs (0: every layer).
Printed as tables; saved as OUT_step.json/.png and OUT_layers_<model>.json/.png.
"""
from __future__ import annotations

import argparse


def main(argv=None, prog=None) -> int:
    from ..models import MODELS
    from . import layers, step

    ap = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", nargs="+", default=["resnet50", "densenet121"], choices=sorted(MODELS))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--steps", type=int, default=5, help="measured training steps per side (default 5)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--layers", type=int, default=12, help="layers per model in the per-layer table (0: all)")
    ap.add_argument("--reps", type=int, default=5, help="timed reps per kernel in the per-layer table")
    ap.add_argument("--no-compile", action="store_true", help="leave torch.compile out")
    ap.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    ap.add_argument("--no-layers", action="store_true", help="skip the per-layer table")
    ap.add_argument("--out", default="out/bench", help="prefix of the files written (default out/bench)")
    a = ap.parse_args(argv)
    common = ["--batch", str(a.batch), "--size", str(a.size)]
    step_args = ["--model", *a.model, *common, "--steps", str(a.steps), "--warmup", str(a.warmup),
                 "--out", f"{a.out}_step"]
    step.main(step_args + (["--no-compile"] if a.no_compile else []) + ([] if a.no_memory else ["--memory"]))
    if not a.no_layers:
        for name in a.model:
            layers.main(["--model", name, *common, "--reps", str(a.reps), "--out", f"{a.out}_layers_{name}.json"]
                        + (["--limit", str(a.layers)] if a.layers else []))
    return 0


if __name__ == "__main__":
    main()
