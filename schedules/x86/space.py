"""The x86 MetaSchedule search space: every knob setting of the designed templates.

A convolution kernel's design spaces are its template (``conv``, ``dgrad`` or ``wgrad``)
applied once per valid knob setting (``*_knob_candidates``: the default first). The space
generator is a ``ScheduleFn`` returning that list; MetaSchedule's evolutionary search samples
it, ranks the unmeasured settings with its XGBoost cost model, measures the best predicted
(plus an epsilon of random ones) and learns from the results. The templates have no
sampling instructions of their own, so there is nothing to mutate: the search is a
cost-model-guided walk over the knob settings, none measured twice.

Every design space carries its knobs as a ``tvm_rbn.knobs`` annotation on the root block, so
a tuning record says which setting it measured (``knobs_of``), and a kernel that was never
tuned can reuse the best setting of a tuned kernel of the same structure
(``apply_knobs``; e.g. DenseNet's 1x1 convolutions that differ only in input channels).
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from typing import Callable

from tvm.s_tir import Schedule

from . import backward as bw
from . import common as cm
from . import conv as cv

KNOB_ANNOTATION = "tvm_rbn.knobs"


@dataclass(frozen=True)
class KnobTemplate:
    """A template with knobs: how to read its shape, list its settings and apply one."""

    name: str
    template: type
    shape: Callable
    candidates: Callable
    knobs: type
    fit: Callable  # (knobs, input channels) -> the setting for a class member with those channels


KNOB_TEMPLATES = {
    "conv": KnobTemplate("conv", cv.ConvTemplate, cv.conv_shape, cv.knob_candidates, cv.ConvKnobs,
                         cv.fit_conv_knobs),
    "dgrad": KnobTemplate("dgrad", bw.DgradTemplate, bw.dgrad_shape, bw.dgrad_knob_candidates, bw.DgradKnobs,
                          bw.fit_dgrad_knobs),
    "wgrad": KnobTemplate("wgrad", bw.WgradTemplate, bw.wgrad_shape, bw.wgrad_knob_candidates, bw.WgradKnobs,
                          bw.fit_wgrad_knobs),
}


def template_of(func) -> KnobTemplate | None:
    """The knob template that schedules this kernel, or None (not a convolution kernel)."""
    names = set(cm.blocks(Schedule(func)))
    if "conv" in names:
        return KNOB_TEMPLATES["conv"]
    if "wgrad" in names:
        return KNOB_TEMPLATES["wgrad"]
    if "dgrad" in names or any(n.startswith("dgrad_") for n in names):
        return KNOB_TEMPLATES["dgrad"]
    return None


def annotated(sch: Schedule, template: str, knobs, klass: str | None = None, batch: str | None = None) -> Schedule:
    """The schedule with its ``tvm_rbn.knobs`` annotation: template, knobs, class, and the
    measurement batch (see ``tvm_rbn.tuning.records.measured_by_workload``) when given."""
    value = {"template": template, "knobs": asdict(knobs)}
    if klass is not None:
        value["class"] = klass
    if batch is not None:
        value["batch"] = batch
    sch.annotate(sch.get_sblock("root"), KNOB_ANNOTATION, json.dumps(value, sort_keys=True))
    return sch


def knob_settings(func, family: str) -> list:
    """The valid knob settings of the kernel's template (default first); [] without one."""
    kt = template_of(func)
    return kt.candidates(kt.shape(Schedule(func), family)) if kt is not None else []


def design_spaces(func, family: str, klass: str | None = None, limit: int | None = None,
                  batch: str | None = None) -> list[Schedule]:
    """One annotated schedule per valid knob setting of the kernel's template (default first);
    [] when no knob template applies. `klass` (the kernel's structure class) and `batch` (the
    tuning run's stamp) are recorded too."""
    kt = template_of(func)
    settings = knob_settings(func, family)
    out = []
    for knobs in settings[:limit] if limit else settings:
        try:
            sch = kt.template.apply(func, family, knobs)
        except ValueError:  # a setting this shape cannot take
            continue
        if sch is not None:
            out.append(annotated(sch, kt.name, knobs, klass, batch))
    return out


def apply_knobs(func, family: str, annotation: dict, fit: bool = False) -> Schedule | None:
    """The kernel scheduled with another kernel's knob setting; None when it does not fit.

    fit: the setting was tuned on another member of the kernel's structure class (equal but
    for the input channels C): blocks of C that do not divide this kernel's are refitted
    (``KnobTemplate.fit``) instead of the setting being refused. Without it, densenet121's
    block-buffer kernels, tuned as the class's largest C, mostly fell back to default knobs.
    """
    kt = KNOB_TEMPLATES.get(annotation.get("template"))
    if kt is None or template_of(func) is not kt:
        return None
    try:
        knobs = kt.knobs(**annotation["knobs"])
    except TypeError:
        return None
    try:
        sch = kt.template.apply(func, family, knobs)
    except ValueError:
        if not fit:
            return None
        knobs = kt.fit(knobs, kt.shape(Schedule(func), family).c)
        try:
            sch = kt.template.apply(func, family, knobs)
        except ValueError:
            return None
    if sch is None:
        return None
    return annotated(sch, kt.name, knobs, annotation.get("class"), annotation.get("batch"))


def knobs_of(trace) -> dict | None:
    """The ``tvm_rbn.knobs`` annotation a tuning record's trace carries, or None."""
    for inst in trace.insts:
        if inst.kind.name == "Annotate" and inst.attrs and str(inst.attrs[0]) == KNOB_ANNOTATION:
            return json.loads(str(inst.inputs[1]))
    return None


def knob_key(annotation: dict) -> str:
    """A ``tvm_rbn.knobs`` annotation's setting as a canonical string, to compare settings:
    knobs a record predates take their template's dataclass default (what it measured)."""
    knobs = dict(annotation["knobs"])
    kt = KNOB_TEMPLATES.get(annotation.get("template"))
    if kt is not None:
        try:
            knobs = asdict(kt.knobs(**knobs))
        except TypeError:  # a knob this version does not have: a setting of its own
            pass
    return json.dumps(knobs, sort_keys=True)


def schedule_fn(family: str, klass: str | None = None, measured=(), batch: str | None = None):
    """The MetaSchedule space generator: the knob settings as design spaces, no extra rules,
    post-processors or mutators (the templates produce complete schedules). Settings whose
    ``knob_key`` is in `measured` (read when the search starts) are left out while others
    remain, so that no trial goes to a setting the database already has (the measured
    default, or an earlier run's)."""
    from tvm.s_tir.meta_schedule.space_generator import ScheduleFn

    def spaces(sch: Schedule):
        out = design_spaces(sch.mod["main"], family, klass, batch=batch)
        if not out:
            raise ValueError("not a convolution kernel: the x86 knob space has no template for it")
        fresh = [s for s in out if knob_key(knobs_of(s.trace)) not in measured]
        return fresh or out

    return ScheduleFn(spaces, sch_rules=[], postprocs=[], mutator_probs={})
