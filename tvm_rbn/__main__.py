"""Command line: python -m tvm_rbn {tune,build,bench,info,demo}."""
from __future__ import annotations

import argparse
import json
import sys


def _shape(args) -> tuple[int, int, int, int]:
    return (args.batch, 3, args.size, args.size)


def _model(args):
    import torch

    from tvm_rbn.models import MODELS

    torch.manual_seed(0)
    return MODELS[args.model](num_classes=args.classes)


def _info(_args) -> int:
    import torch

    import tvm_rbn
    from tvm_rbn.build import cache, provider
    from tvm_rbn.build.target import cpu_name, host_cores, host_family
    from tvm_rbn.runtime import buffers
    from tvm_rbn.tuning import records

    logs = provider.tuning_logs()
    print(json.dumps({
        "tvm_rbn": tvm_rbn.__version__,
        "versions": cache.versions(),
        "torch": torch.__version__,
        "cpu": cpu_name(),
        "target_family": host_family(),
        "cores": host_cores(),
        "threads": {"torch": torch.get_num_threads(), "tvm": tvm_rbn.num_threads()},
        "output_pool": {"enabled": buffers.enabled(), "min_bytes": buffers.MIN_BYTES},
        "cache_dir": str(cache.cache_root()),
        "tuning_logs": str(logs),
        "tuning_records": sum(1 for _ in open(logs / records.RECORDS)) if records.has_records(logs) else 0,
    }, indent=1))
    return 0


def _tune(args) -> int:
    from tvm_rbn.build.target import host_family
    from tvm_rbn.tuning import records
    from tvm_rbn.tuning.tune import tune

    target = None
    if args.target == "cpu":
        family = host_family()
    elif args.target.startswith("x86-"):
        from tvm_rbn.build.target import family_tvm_target

        family, target = args.target, family_tvm_target(args.target)
    else:  # cuda:sm_XX
        from tvm_rbn.schedules import cuda_target

        arch = args.target.split(":", 1)[1] if ":" in args.target else "sm_90"
        family, target = f"cuda-{arch.replace('_', '')}", cuda_target(arch)
    out = records.folder(family, args.logs)
    runner = None
    if args.rpc_tracker:
        from tvm.s_tir import meta_schedule as ms

        from tvm_rbn.tuning.tune import evaluator_config

        host, port = args.rpc_tracker.rsplit(":", 1)
        runner = ms.runner.RPCRunner(ms.runner.RPCConfig(tracker_host=host, tracker_port=int(port),
                                                         tracker_key=args.rpc_key, session_timeout_sec=120),
                                     evaluator_config=evaluator_config())
    print(f"tuning {args.model} at input {_shape(args)} for {family}: budget {args.trials} trials"
          + (f" or {args.seconds:.0f} s" if args.seconds else "") + f"; records go to {out}", flush=True)
    report = tune(_model(args), _shape(args), out=out, family=family, trials=args.trials, seconds=args.seconds,
                  new_only=args.new_only, trials_per_batch=args.batch_trials, remeasure=args.remeasure,
                  runner=runner, target=target)
    if args.new_only and not report.tasks:
        print("--new-only: every kernel already has records of its own or of its structure class; nothing to tune")
        return 0
    seeded = f" (and {report.seeds} settings measured first)" if report.seeds else ""
    print(f"{report.trials} trials{seeded} over {report.tasks} kernels in {report.seconds:.0f} s "
          f"({report.seconds_per_trial:.1f} s per measurement); records in {report.folder}")
    return 0


def _build(args) -> int:
    from tvm_rbn.build import provider
    from tvm_rbn.build.workloads import build_for_model

    if args.logs:
        from tvm_rbn.build.target import host_family
        from tvm_rbn.tuning import records

        provider.set_tuning_logs(records.folder(host_family(), args.logs))
    if args.measure:
        print("building, then timing each BatchNorm's kernels against PyTorch's conv + BN + ReLU "
              f"(median of {args.reps} alternating reps; --no-measure skips this)", flush=True)
    out = build_for_model(_model(args), _shape(args), out_dir=args.out, tuning_logs=provider.tuning_logs(),
                          measure=args.measure, reps=args.reps, margin=args.margin)
    manifest = json.loads((out / "manifest.json").read_text())
    tuned = sum(k["tuned"] for k in manifest["kernels"])
    print(f"{len(manifest['kernels'])} kernels ({tuned} tuned) for {args.model} at {_shape(args)} -> {out}")
    layers = manifest.get("layers")
    if layers:
        slower = {name: row for name, row in layers.items() if row["choice"] == "pytorch"}
        print(f"per layer: {len(layers) - len(slower)} of {len(layers)} restructured BatchNorms run tvm_rbn kernels; "
              f"{len(slower)} run in PyTorch (measured slower by more than {100 * manifest['layer_measurement']['margin']:.0f}%)"
              + ("".join(f"\n  {name}: ours {row['ours_ms']:.2f} ms vs PyTorch {row['torch_ms']:.2f} ms"
                         for name, row in slower.items())))
    print(f"train with: tvm_rbn.restructure(model, library={str(out)!r})")
    return 0


def _demo(args) -> int:
    from tvm_rbn.demo import main

    return main(args.model, batch=args.batch, size=args.size, steps=args.steps)


def _bench(argv: list[str]) -> int:
    from tvm_rbn.benchmarks import suite

    return suite.main(argv, prog="python -m tvm_rbn bench")


def _model_args(p, batch=8, size=64) -> None:
    from tvm_rbn.models import MODELS

    p.add_argument("--model", default="resnet18", choices=sorted(MODELS), help="a model of tvm_rbn.models")
    p.add_argument("--batch", type=int, default=batch, help="batch size (kernels are specialized to it)")
    p.add_argument("--size", type=int, default=size, help="input height and width")
    p.add_argument("--classes", type=int, default=10, help="classifier outputs")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(
        prog="python -m tvm_rbn",
        description="Restructured BatchNorm for CNN training, kernels generated and tuned by Apache TVM.",
        epilog="Typical use: tune (once per model, batch size and machine family), build (one library), "
               "then tvm_rbn.restructure(model, library=...) in the training script.",
    )
    sub = ap.add_subparsers(dest="verb", required=True)
    p = sub.add_parser("tune", help="tune the convolution kernels of one training step with MetaSchedule",
                       description="Tune every fused convolution kernel (forward, data and weight gradient) of one "
                                   "training step of MODEL at the given batch and size. Trials go where the step's "
                                   "time is; records are saved after every batch, and rerunning resumes.")
    _model_args(p)
    p.add_argument("--trials", type=int, default=64, help="total trial budget over all kernels (default 64)")
    p.add_argument("--seconds", type=float, default=None,
                   help="wall-clock budget: no batch is proposed after it; batches in flight are kept for up "
                        "to max(30 s, 10%%) more")
    p.add_argument("--batch-trials", type=int, default=16, help="candidates measured per batch (default 16)")
    p.add_argument("--remeasure", type=int, default=0, metavar="N",
                   help="first measure each kernel's N fastest recorded settings again, and rank by those "
                        "times (after an update of the schedule templates); not counted in --trials")
    p.add_argument("--new-only", action="store_true",
                   help="tune only the kernels without records of their own or of their structure class "
                        "(those a model change added); --trials is then their budget")
    p.add_argument("--logs", default=None, help="tuning-log root (default: the project's tuning_logs/); "
                                                "records go to LOGS/<target family>/")
    p.add_argument("--target", default="cpu", metavar="cpu|x86-avx2|x86-avx512|cuda:sm_XX",
                   help="the host CPU (default); an x86 family measured on this host (e.g. x86-avx2 "
                        "on an AVX-512 machine); or an NVIDIA GPU by its architecture, e.g. cuda:sm_90")
    p.add_argument("--rpc-tracker", default=None, metavar="HOST:PORT",
                   help="measure on the RPC servers registered with this tracker instead of locally")
    p.add_argument("--rpc-key", default="tvm_rbn", help="device key of the RPC servers (default tvm_rbn)")
    p.set_defaults(run=_tune)
    p = sub.add_parser("build", help="build one kernel library for a model and input shape",
                       description="Build every kernel MODEL needs at the input shape into one shared library "
                                   "(tuned where the tuning logs have records), with a manifest; then time each "
                                   "BatchNorm's kernels against PyTorch on this machine and record, per layer, "
                                   "which runs (restructure(model, library=...) follows it).")
    _model_args(p)
    p.add_argument("--logs", default=None, help="tuning-log root (default: the project's tuning_logs/)")
    p.add_argument("--out", default=None, help="folder for kernels.so + manifest.json (default: the cache)")
    p.add_argument("--no-measure", dest="measure", action="store_false",
                   help="skip the per-layer decision (default: time each BatchNorm's kernels against PyTorch's "
                        "conv + BN + ReLU on this machine; layers where ours are slower run in PyTorch)")
    p.add_argument("--reps", type=int, default=5, help="timed repetitions per kernel and side (default 5)")
    p.add_argument("--margin", type=float, default=None,
                   help="a layer runs in PyTorch when ours, timed alone, take more than (1 + margin) x its time "
                        "(default 0.10: tvm_rbn.build.measure.MARGIN)")
    p.set_defaults(run=_build)
    p = sub.add_parser("demo", help="train a restructured model next to the unchanged PyTorch model")
    _model_args(p)
    p.add_argument("--steps", type=int, default=6)
    p.set_defaults(run=_demo)
    p = sub.add_parser("info", help="versions, detected target, thread counts, cache and tuning-log folders")
    p.set_defaults(run=_info)
    sub.add_parser("bench", help="training steps vs PyTorch eager and torch.compile, per-layer kernels, traffic, memory (options: bench --help)")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # the benchmark parses its own options
        return _bench(argv[1:])
    args = ap.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
