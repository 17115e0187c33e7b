"""The PyTorch bridge: ``restructure(model)`` and ``report(model)``."""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from torch import fx, nn

from .graph import BNDecision, rewrite

_REPORT_ATTR = "_tvm_rbn_report"


@dataclass
class BNReport:
    """One BatchNorm layer of the original model.

    fused: "full" (statistics in a convolution's epilogue, or shared block statistics, and
    every apply inside a consumer's kernel: a conv prologue, the residual add+ReLU, the
    stem's max pool or a transition's average pool),
    "statistics" (the apply is a standalone kernel: the chain ends in a pool or the
    classifier), "apply" (standalone statistics: the input is no conv output), "none".
    """

    name: str
    restructured: bool
    reason: str
    tuned: bool
    stats: str
    apply: str
    fused: str = ""


_FUSED_STATS = ("epilogue of", "shared block statistics of")
_FUSED_APPLY = ("prologue of", "add+ReLU kernel", "max-pool kernel", "average-pool kernel")


def _fusion(d: BNDecision) -> str:
    if not d.restructured:
        return "none"
    stats = d.stats.startswith(_FUSED_STATS)
    apply = bool(d.apply) and all(a.startswith(_FUSED_APPLY) for a in d.apply)
    return {(True, True): "full", (True, False): "statistics", (False, True): "apply"}.get((stats, apply), "none")


def _is_tunable_symbol(symbol: str) -> bool:
    from ..tuning.tasks import TUNABLE_OPS

    return any(symbol.startswith(f"rbn_{op}_") for op in TUNABLE_OPS)


class Report(list):
    """A list of BNReport, printed as a table."""

    def __str__(self) -> str:
        rows = [("name", "restructured", "fused", "tuned", "statistics", "apply", "reason")]
        rows += [(r.name, "yes" if r.restructured else "no", r.fused, "yes" if r.tuned else "no", r.stats, r.apply,
                  r.reason) for r in self]
        widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
        done = sum(r.restructured for r in self)
        percent = f" ({100 * done / len(self):.0f}%)" if self else ""
        kinds = {k: sum(r.fused == k for r in self) for k in ("full", "statistics", "apply", "none")}
        lines.append(f"{done}/{len(self)} BatchNorm layers restructured{percent}; fused: "
                     + ", ".join(f"{v} {k}" for k, v in kinds.items() if v))
        return "\n".join(lines)

    __repr__ = __str__


def _trace(module: nn.Module):
    try:
        return fx.symbolic_trace(module), ""
    except Exception as exc:  # noqa: BLE001  (any tracing failure means: try the children)
        return None, f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"


def _restructure(module: nn.Module, prefix: str, fallback: dict[str, str]) -> tuple[nn.Module, list[BNDecision]]:
    gm, why = _trace(module)
    if gm is not None:
        return gm, rewrite(gm, prefix, fallback)
    if isinstance(module, nn.modules.batchnorm._BatchNorm):
        return module, [BNDecision(prefix.rstrip("."), False, f"inside a module that torch.fx cannot trace ({why})")]
    if not list(module.children()):
        return module, []
    # Not traceable as a whole: keep this module, restructure each child on its own.
    shell = copy.copy(module)
    shell._modules = dict(module._modules)
    decisions = []
    for name, child in module.named_children():
        new, child_decisions = _restructure(child, f"{prefix}{name}.", fallback)
        shell._modules[name] = new
        decisions += child_decisions
    return shell, decisions


def restructure(model: nn.Module, *, target=None, tuning_logs=None, library=None, fallback=None) -> nn.Module:
    """Return `model` with its BatchNorm2d layers restructured onto tvm_rbn's fused kernels.

    The result shares parameters and buffers with `model` (same names, same tensors), so
    state_dicts load both ways and optimizers built on either keep working. `target=None`
    means the device of the model's parameters (the host CPU); `tuning_logs` is a tuning-log
    folder (or a root holding one per target family) whose records kernels are built from,
    instead of the records committed with tvm_rbn; `library` is a prebuilt kernel library
    folder, used as is, including its per-layer decisions: the BatchNorms that its build
    measured slower than PyTorch (``build_for_model(..., measure=True)``) stay in PyTorch
    with the convs that produce their inputs.

    `fallback`: BatchNorms to leave in PyTorch the same way, by qualified name (as in
    ``model.named_modules()``): an iterable of names, or {name: reason} for the report. A name
    inside a DenseNet block leaves the whole block in PyTorch (its buffer holds all layers
    or none).
    """
    from .._threads import warn_if_spinning

    warn_if_spinning()
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    if target not in (None, "cpu", "llvm") or device.type != "cpu":
        raise NotImplementedError(f"tvm_rbn kernels are built for the host CPU; got target={target!r}, model on {device}")
    from ..build import provider

    if tuning_logs is not None:
        from ..build.target import host_family
        from ..tuning import records

        root = Path(tuning_logs)
        folder = root / host_family() if (root / host_family()).is_dir() else root
        if records.has_records(folder):
            records.validate(folder, host_family())  # a bad log is refused before anything runs
        provider.set_tuning_logs(folder)
    pytorch: dict[str, str] = {}  # BatchNorm name -> why it stays in PyTorch
    if library is not None:
        pytorch.update(measured_fallback(provider.add_library(library).manifest))
    pytorch.update(_forced(model, fallback))
    new, decisions = _restructure(model, "", pytorch)
    new.train(model.training)
    by_name = {d.name: d for d in decisions}
    entries = Report()
    for name, m in model.named_modules():
        if not isinstance(m, nn.modules.batchnorm._BatchNorm):
            continue
        d = by_name.get(name) or BNDecision(name, False, "not reached by tracing (not called in forward?)")
        entries.append((BNReport(d.name, d.restructured, d.reason, False, d.stats, ", ".join(d.apply), _fusion(d)),
                        d.kernels))
    object.__setattr__(new, _REPORT_ATTR, entries)
    new.register_forward_hook(_warn_untuned)
    return new


FORCED = "left in PyTorch by restructure(fallback=...)"


def _forced(model: nn.Module, fallback) -> dict[str, str]:
    if fallback is None:
        return {}
    if isinstance(fallback, str):
        raise TypeError("fallback: an iterable of BatchNorm names (or {name: reason}), not one string")
    reasons = dict(fallback) if isinstance(fallback, dict) else dict.fromkeys(fallback, FORCED)
    names = {n for n, m in model.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)}
    unknown = sorted(set(reasons) - names)
    if unknown:
        raise ValueError(f"fallback names no BatchNorm of this model: {', '.join(unknown)}")
    return reasons


def _ms(value: float) -> str:
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def measured_fallback(manifest: dict) -> dict[str, str]:
    """{BatchNorm name: reason} for the layers a library's build measured slower than PyTorch
    (the manifest's "layers" rows with choice "pytorch"; see tvm_rbn.build.measure)."""
    out = {}
    for name, row in manifest.get("layers", {}).items():
        if row.get("choice") != "pytorch":
            continue
        per = f" (decided per dense block {row['dense_block']})" if row.get("dense_block") else ""
        out[name] = (f"measured slower at build{per}: ours {_ms(row['ours_ms'])} ms vs PyTorch "
                     f"{_ms(row['torch_ms'])} ms")
    return out


def report(model: nn.Module) -> Report:
    """What `restructure` did to each BatchNorm layer of the original model.

    `tuned`: every convolution kernel run so far for the BatchNorm (its producer conv with the
    statistics epilogue, the convs carrying its apply prologue, forward and backward) was built
    from tuning records; False before the model has run.
    """
    from ..build.provider import is_tuned

    entries = getattr(model, _REPORT_ATTR, None)
    if entries is None:
        raise ValueError("this model was not returned by tvm_rbn.restructure")
    out = Report()
    for row, kernels in entries:
        tunable = [s for s in kernels if _is_tunable_symbol(s)]
        out.append(replace(row, tuned=bool(tunable) and all(is_tuned(s) for s in tunable)))
    return out


def _warn_untuned(module, inputs, output) -> None:
    """Forward hook of a restructured model: one warning per call that loaded untuned kernels."""
    from ..build.provider import take_built_untuned

    specs = take_built_untuned()
    if specs:
        import warnings

        ops = sorted({s.op for s in specs})
        warnings.warn(
            f"tvm_rbn: {len(specs)} kernel(s) run with untuned default schedules ({', '.join(ops)}); "
            f"first: {specs[0].key}",
            UntunedKernelWarning,
            stacklevel=2,
        )


class UntunedKernelWarning(UserWarning):
    """Kernels without tuning records run with the default schedules (correct, slower)."""
