"""Command line: python -m tvm_rbn {demo,info,bench}."""
from __future__ import annotations

import argparse
import json
import sys


def _info(_args) -> int:
    import torch

    import tvm_rbn
    from tvm_rbn.build import cache
    from tvm_rbn.build.target import cpu_name, host_cores, host_family

    print(json.dumps({
        "tvm_rbn": tvm_rbn.__version__,
        "versions": cache.versions(),
        "torch": torch.__version__,
        "cpu": cpu_name(),
        "target_family": host_family(),
        "cores": host_cores(),
        "threads": {"torch": torch.get_num_threads(), "tvm": tvm_rbn.num_threads()},
        "cache_dir": str(cache.cache_root()),
    }, indent=1))
    return 0


def _demo(args) -> int:
    from tvm_rbn.demo import main

    return main(args.model, batch=args.batch, size=args.size, steps=args.steps)


def _bench(argv: list[str]) -> int:
    from tvm_rbn.benchmarks import layer

    layer.main(argv, prog="python -m tvm_rbn bench")
    return 0


def main(argv=None) -> int:
    from tvm_rbn.models import MODELS

    ap = argparse.ArgumentParser(prog="python -m tvm_rbn", description="Restructured BatchNorm kernels by Apache TVM.")
    sub = ap.add_subparsers(dest="verb", required=True)
    p = sub.add_parser("demo", help="train a restructured model next to the unchanged PyTorch model")
    p.add_argument("--model", default="resnet18", choices=sorted(MODELS))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--size", type=int, default=64, help="input height and width")
    p.add_argument("--steps", type=int, default=6)
    p.set_defaults(run=_demo)
    p = sub.add_parser("info", help="versions, detected target, thread counts, cache folder")
    p.set_defaults(run=_info)
    sub.add_parser("bench", help="one fused layer against PyTorch's conv+BN+ReLU (options: bench --help)")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["bench"]:  # the benchmark parses its own options
        return _bench(argv[1:])
    args = ap.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
