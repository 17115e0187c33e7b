"""The tuning loop.

    tune(model, input_shape)  ->  records in tuning_logs/<family>/

Every convolution kernel of one training step (forward, data gradient, weight gradient) is a
MetaSchedule task, weighted by its FLOPs x the times a step calls it, so trials go where the
step's time is. Candidates are measured on the machine's own thread count (the runner's
workers inherit TVM_NUM_THREADS, set to torch's). The run stops at the trial budget or the
time budget, whichever comes first (past the time budget no batch is proposed; batches in
flight are still joined and kept, ``_clocked``); after every measured batch the records are published to
the folder (atomic rename), so a run that is interrupted loses at most its current batch, and
running the same command again resumes: trials already recorded for a workload count against
its budget, and the search starts from the best records. Before it searches, a run measures
what the database lacks of the current templates (``_seeds``): each kernel's default setting,
and its best setting carried into knobs newer than its record; with ``remeasure``, also each
kernel's fastest recorded settings again, so that records ranked under older templates are
ranked anew (their earlier times stop counting, ``records.measured_by_workload``).

x86: the search space is the designed templates' knob settings (``schedules/x86/space.py``),
searched by MetaSchedule's evolutionary search with its XGBoost cost model. Kernels of the
same structure (``structure_class``: equal but for their input channels, channel-slice
views and a running-sum output) are tuned once, as the class's heaviest kernel (as its
``tuning_twin``: on whole tensors, without the running sum)
with the class's summed weight; then each other member is measured with the class's best
setting (refitted to its channels) and with its default (``_member_seeds``), and the build
gives it the faster (``build.compile``). CUDA: MetaSchedule's own
rule-based space, every kernel a task.
"""
from __future__ import annotations

import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from ..build.target import host_cores, host_family
from ..kernels import KernelSpec
from . import records
from .tasks import flops, is_tunable, structure_class, tuning_twin, workload_mod


@dataclass
class TuningReport:
    folder: Path
    tasks: int
    trials: int
    seconds: float
    per_task: list[dict] = field(default_factory=list)
    seeds: int = 0  # settings measured before the search (new defaults, carried settings)
    member_settings: int = 0  # settings measured on class members after it (``_member_seeds``)

    @property
    def seconds_per_trial(self) -> float:
        """Wall time per measurement, the search's trials and the seeds together."""
        n = self.trials + self.seeds + self.member_settings
        return self.seconds / n if n else float("nan")


def _progress(done: int, total: int, start: float, stream) -> None:
    elapsed = time.perf_counter() - start
    eta = elapsed / done * (total - done) if done else float("nan")
    width = 30
    filled = int(width * done / total) if total else width
    stream.write(f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{total} trials, "
                 f"{elapsed:6.0f} s elapsed, ETA {eta:6.0f} s ")
    stream.flush()


class _ClockExpired(Exception):
    """Raised from the measure callback to stop MetaSchedule when --seconds and its grace for
    batches in flight have run out."""


def grace_seconds(seconds: float) -> float:
    """How long past --seconds batches already sent may still finish measuring and be kept."""
    return max(30.0, 0.1 * seconds)


# proposals in a row that may hold only settings measured before, until a task is ended
DUPLICATE_PROPOSALS = 3

# timed repeats of each candidate, each at least MIN_REPEAT_MS of calls; a record's time is
# their median (``records.record_secs``), so one disturbed repeat does not rank it. On the
# shared 2-core machines one kernel measured 43, 43 and 26 ms in three single-repeat runs in a
# row, 23-28 ms alone.
REPEATS, MIN_REPEAT_MS = 3, 100


def evaluator_config():
    from tvm.s_tir import meta_schedule as ms

    return ms.runner.EvaluatorConfig(number=1, repeat=REPEATS, min_repeat_ms=MIN_REPEAT_MS,
                                     enable_cpu_cache_flush=False)


def unmeasured(candidates, measured: set) -> list:
    """The candidates whose knob setting is not in `measured` (knob keys), each setting once;
    their settings are added to `measured`. A candidate without knobs is kept."""
    from tvm_rbn.schedules.x86.space import knob_key, knobs_of

    fresh = []
    for candidate in candidates:
        annotation = knobs_of(candidate.sch.trace)
        key = knob_key(annotation) if annotation else None
        if key is None or key not in measured:
            fresh.append(candidate)
            if key is not None:
                measured.add(key)
    return fresh


def _clocked(strategy, deadline: float, measured=None):
    """`strategy`, proposing no more candidates once `deadline` has passed, and (with
    `measured`, the knob keys its structure class has recorded) no setting measured before.

    MetaSchedule's task schedulers send a batch of every task before they join the first (79
    batches for resnet50), so a clock checked only when results come back stopped a run long
    after --seconds and dropped every batch measured but not yet joined. Past the deadline a
    task's next request for candidates ends that task instead; what is in flight is joined
    and recorded (up to ``grace_seconds``, when the measure callback stops the rest).

    The design spaces leave out settings measured before the search, but the evolutionary
    search also seeds its population from the database's best records and could propose one
    of those again (a test run measured its default setting twice); such proposals are
    dropped. When DUPLICATE_PROPOSALS proposals in a row hold nothing new, the task ends."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.search_strategy import PySearchStrategy

    @derived_object
    class Clocked(PySearchStrategy):
        def __init__(self, inner):
            self.inner = inner

        def _initialize_with_tune_context(self, context) -> None:
            self.inner._initialize_with_tune_context(context)

        def pre_tuning(self, max_trials, num_trials_per_iter, design_spaces, database=None, cost_model=None):
            self.inner.pre_tuning(max_trials, num_trials_per_iter, design_spaces, database, cost_model)

        def post_tuning(self) -> None:
            self.inner.post_tuning()

        def generate_measure_candidates(self):
            for _ in range(DUPLICATE_PROPOSALS):
                if time.perf_counter() > deadline:
                    return None
                candidates = self.inner.generate_measure_candidates()
                if candidates is None or measured is None:
                    return candidates
                fresh = unmeasured(candidates, measured)
                if fresh:
                    return fresh
            return None

        def notify_runner_results(self, measure_candidates, results) -> None:
            self.inner.notify_runner_results(measure_candidates, results)

        def clone(self):
            return Clocked(self.inner.clone())

    return Clocked(strategy)


def _make_callback(scratch: Path, out: Path, budget_trials: int, deadline: float, start: float, stream):
    """(callback, state): state["expired"] tells that the callback stopped the search.

    `deadline` is the hard stop (--seconds plus the grace for batches in flight). Past it the
    callback raises rather than terminating tasks: the task schedulers check that a task they
    pick or join is not terminated, and a callback runs in the middle of their loop
    (terminating from it failed both ways in real runs)."""
    from tvm.s_tir.meta_schedule.measure_callback import PyMeasureCallback
    from tvm.ir.utils import derived_object

    state = {"expired": False}

    @derived_object
    class PublishAndReport(PyMeasureCallback):
        """After each measured batch: publish the records, show progress, enforce the clock."""

        def __init__(self):
            self.done = 0

        def apply(self, task_scheduler, task_id, measure_candidates, builder_results, runner_results):
            self.done += len(measure_candidates)
            records.publish(scratch, out)
            _progress(min(self.done, budget_trials), budget_trials, start, stream)
            if time.perf_counter() > deadline:
                state["expired"] = True
                raise _ClockExpired(f"the clock budget ran out after {self.done} trials")

    return PublishAndReport(), state


def tune_specs(
    weighted: list[tuple[KernelSpec, float]],
    out: Path,
    *,
    family: str | None = None,
    trials: int = 64,
    seconds: float | None = None,
    trials_per_batch: int = 16,
    remeasure: int = 0,
    runner=None,
    target=None,
    stream=sys.stderr,
) -> TuningReport:
    """Tune kernels (spec, weight) into the tuning-log folder `out`. `remeasure` > 0 measures
    each kernel's that many fastest recorded settings again before the search (after a
    template change: the new times decide, the old ones no longer count); those measurements
    do not count against `trials`."""
    import tvm_ffi
    from tvm.s_tir import meta_schedule as ms

    from ..build.target import host_tvm_target
    from .worker import BUILD_FUNC, register

    family = family or host_family()
    target = target or host_tvm_target()
    out = Path(out)
    if records.has_records(out):
        records.validate(out, family)  # never tune on top of a folder we would refuse to apply
    scratch = records.scratch_copy(out)
    weighted_specs = {spec.symbol: spec for spec in (tuning_twin(spec) for spec, _ in weighted)}
    start = time.perf_counter()
    batch = datetime.now(timezone.utc).isoformat(timespec="seconds")  # stamps this run's records
    deadline = start + seconds if seconds else float("inf")
    hard_deadline = deadline + grace_seconds(seconds) if seconds else deadline
    try:
        db = ms.database.JSONDatabase(str(scratch / records.WORKLOADS), str(scratch / records.RECORDS))
        tasks, weights, report_rows = [], [], []
        existing = {}
        for rec in db.get_all_tuning_records():
            key = tvm_ffi.structural_hash(rec.workload.mod)
            existing[key] = existing.get(key, 0) + 1
        knob_space = not family.startswith("cuda")
        measured_settings: dict[str, set] = {}  # class -> knob keys recorded, filled before the search
        for spec, weight, members in (by_class(weighted) if knob_space else [(s, w, 1) for s, w in weighted]):
            mod = workload_mod(spec)
            done = existing.get(tvm_ffi.structural_hash(mod), 0)
            report_rows.append({"symbol": spec.symbol, "op": spec.op, "weight": weight, "kernels": members,
                                "trials_before": done})
            klass = structure_class(spec) if knob_space else None
            measured = measured_settings.setdefault(klass, set()) if klass else ()
            tasks.append(ms.TuneContext(mod=mod, target=target, space_generator=_space(family, klass, measured, batch),
                                        search_strategy=_clocked(_strategy(family), deadline, measured if klass else None),
                                        task_name=spec.symbol,
                                        num_threads=host_cores()))
            weights.append(weight)
        already = sum(r["trials_before"] for r in report_rows)
        remaining = max(0, trials - already)

        def measure_tools():
            return (ms.builder.LocalBuilder(f_build=BUILD_FUNC, initializer=register, timeout_sec=60.0),
                    runner or ms.runner.LocalRunner(timeout_sec=60.0, evaluator_config=evaluator_config()))

        def finish(measured: int, seeded: int, tools) -> TuningReport:
            """Every path's end: measure the class members (``_member_seeds``), publish, report."""
            member_seeds = _member_seeds(db, weighted, family, batch) if knob_space and tasks else []
            members = 0
            if member_seeds:
                members = _measure_members(db, member_seeds, target, *tools(), stream)
                records.publish(scratch, out)
            return TuningReport(out, len(tasks), measured, time.perf_counter() - start, report_rows, seeded, members)

        if (remaining == 0 and not (remeasure and knob_space)) or not tasks:
            stream.write(f"nothing to tune: {already} trials already recorded for these {len(tasks)} kernels\n")
            return finish(0, 0, measure_tools)
        builder, runner = measure_tools()
        seeded = 0
        if knob_space:
            _record_measured_settings(db, measured_settings)
            seeds = _seeds(db, tasks, [structure_class(weighted_specs[t.task_name]) for t in tasks], family,
                           measured_settings, batch, remeasure)
            if seeds:
                counts = {what: sum(1 for *_, w in seeds if w == what) for what in ("default", "carried", "remeasured")}
                stream.write(f"measuring {len(seeds)} settings first: {counts['default']} new defaults, "
                             f"{counts['carried']} best settings carried into new knobs, "
                             f"{counts['remeasured']} recorded settings again\n")
                measured_ok = _measure_seeds(db, [(tasks[i].mod, sch) for i, sch, _ in seeds], target, builder,
                                             runner)
                for (i, _, what), ok in zip(seeds, measured_ok):
                    report_rows[i][f"{what}_measured"] = report_rows[i].get(f"{what}_measured", False) or ok
                    seeded += ok
        records.publish(scratch, out)
        already += seeded
        if measured_settings:
            _record_measured_settings(db, measured_settings)
        lines_before_search = sum(1 for _ in open(scratch / records.RECORDS))
        if remaining == 0:
            stream.write(f"no search: {already - seeded} trials already recorded for these {len(tasks)} kernels\n")
            return finish(0, seeded, lambda: (builder, runner))
        callbacks = list(ms.measure_callback.MeasureCallback.create("default"))
        publisher, clock = _make_callback(scratch, out, remaining, hard_deadline, start, stream)
        callbacks.append(publisher)
        try:
            ms.tune_tasks(
                tasks=tasks, task_weights=weights, work_dir=str(scratch), max_trials_global=remaining,
                num_trials_per_iter=trials_per_batch, builder=builder, runner=runner, database=db,
                cost_model="xgb", measure_callbacks=callbacks, task_scheduler="gradient",
            )
        except Exception:
            if not clock["expired"]:
                raise
        records.publish(scratch, out)
        measured = sum(1 for _ in open(scratch / records.RECORDS)) - lines_before_search
        stream.write("\n")
        return finish(measured, seeded, lambda: (builder, runner))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


def _seeds(db, tasks, classes: list, family: str, measured: dict[str, set],
           batch: str, remeasure: int = 0) -> list[tuple[int, object, str]]:
    """Settings to measure before the search, as (task index, schedule, "default" | "carried"
    | "remeasured"):

    - the kernel's default setting under the current templates, unless its class measured it
      (a new kernel, or rules changed since its records): the best record is then never worse
      than what an untuned build would use;
    - the best record's setting carried into knobs it predates, once with each value those
      knobs take among the template's candidates (a record older than ``k_tiles`` measured
      one k tile per task; its tuned tiles may be faster with more);
    - the best setting itself again, when any carried setting is measured: this batch's
      times compare with each other, not with a record of another day, and a setting's
      latest time is the one that counts (``records.measured_by_workload``);
    - the `remeasure` fastest recorded settings again (each once, the best among them), and
      the default setting with them: a single time on a noisy machine can be 2x off, and a
      default that drew one would otherwise never compete again.

    Every seed is stamped with the run's `batch`. A kernel without a knob template: its
    default schedule, when it has no records."""
    import tvm_ffi

    from tvm_rbn.schedules import default_schedule, design_spaces
    from tvm_rbn.schedules.x86.space import apply_knobs, knob_key, knobs_of

    by_workload = records.measured_by_workload(db)  # hash -> [(secs, record)], fastest first
    out = []
    for i, (task, klass) in enumerate(zip(tasks, classes)):
        func = task.mod["main"]
        done = measured.get(klass, set())
        rows = by_workload.get(tvm_ffi.structural_hash(task.mod), [])
        found = rows[0] if rows else None
        spaces = design_spaces(func, family, klass, limit=1, batch=batch)
        if not spaces:
            if found is None:
                out.append((i, default_schedule(func, family), "default"))
            continue
        default = knobs_of(spaces[0].trace)
        again = [row[1] for row in rows[:remeasure]]
        if knob_key(default) not in done:
            out.append((i, spaces[0], "default"))
        elif remeasure and knob_key(default) not in {knob_key(k) for k in (knobs_of(rec.trace) for rec in again) if k}:
            out.append((i, spaces[0], "remeasured"))  # the default competes in the same batch
        annotation = knobs_of(found[1].trace) if found else None
        newer = sorted(set(default["knobs"]) - set(annotation["knobs"])) if annotation else []
        if newer:
            carried = _carried(func, family, klass, annotation, newer, default, done, batch)
            out.extend((i, sch, "carried") for sch in carried)
            if carried:
                again.insert(0, found[1])
        seen = set()
        for rec in again:
            recorded = knobs_of(rec.trace)
            if recorded is None or knob_key(recorded) in seen:
                continue
            seen.add(knob_key(recorded))
            sch = apply_knobs(func, family, {**recorded, "class": klass, "batch": batch})
            if sch is not None:
                out.append((i, sch, "remeasured"))
    return out


def _carried(func, family: str, klass: str, annotation: dict, newer: list[str], default: dict, done: set,
             batch: str) -> list:
    """The recorded setting `annotation` with each combination of values its `newer` knobs
    take among the template's candidates, leaving out settings measured before and the
    default."""
    import itertools

    from tvm_rbn.schedules.x86.space import apply_knobs, knob_key, knob_settings

    settings = knob_settings(func, family)
    values = [sorted({getattr(kn, name) for kn in settings} | {default["knobs"][name]}, key=repr)
              for name in newer]
    carried = []
    for combo in itertools.product(*values):
        setting = {**annotation, "knobs": {**annotation["knobs"], **dict(zip(newer, combo))}, "class": klass,
                   "batch": batch}
        key = knob_key(setting)
        if key not in done and key != knob_key(default):
            sch = apply_knobs(func, family, setting)
            if sch is not None:
                carried.append(sch)
    return carried


def _measure_members(db, seeds: list, target, builder, runner, stream) -> int:
    """Measure ``_member_seeds`` in one batch; how many built and ran."""
    if not seeds:
        return 0
    members = len({id(mod) for mod, _ in seeds})
    stream.write(f"measuring {len(seeds)} settings on {members} class members: their class's best and their default\n")
    return sum(_measure_seeds(db, seeds, target, builder, runner))


def _member_seeds(db, weighted, family: str, batch: str) -> list[tuple[object, object]]:
    """(workload, schedule) pairs to measure on the members of a structure class other than
    its tuning task: the class's best setting refitted to the member, and the member's
    default setting beside it in the same batch, unless the member has that best setting
    recorded. A class is tuned as its heaviest member, and a setting's rank can change with
    the input channels: densenet121's 56x56 1x1 weight-gradient class measured its best
    setting 5% faster than the default at 224 channels, and in one alternating comparison the
    same setting ran up to 1.37x slower at 64-192 (timings on this machine swing as much). The
    build takes a member's own fastest record (``build.compile.lower_spec``) before the class's."""
    import tvm_ffi

    from tvm_rbn.schedules import design_spaces
    from tvm_rbn.schedules.x86.space import apply_knobs, knob_key, knobs_of

    by_workload = records.measured_by_workload(db)
    out = []
    for klass, members in _classes(weighted).items():
        head = _head(members)
        specs = {whole.symbol: whole for whole in (tuning_twin(spec) for spec, _ in members)}
        head_rows = by_workload.get(tvm_ffi.structural_hash(workload_mod(head)))
        if len(specs) < 2 or not head_rows:
            continue
        best = knobs_of(head_rows[0][1].trace)
        if best is None:
            continue
        for symbol, member in sorted(specs.items()):
            if symbol == head.symbol:
                continue
            mod = workload_mod(member)
            recorded = {knob_key(a) for a in (knobs_of(r.trace) for _, r in by_workload.get(
                tvm_ffi.structural_hash(mod), [])) if a}
            fitted = apply_knobs(mod["main"], family, {**best, "class": klass, "batch": batch}, fit=True)
            if fitted is None or knob_key(knobs_of(fitted.trace)) in recorded:
                continue
            out.append((mod, fitted))
            default = design_spaces(mod["main"], family, klass, limit=1, batch=batch)
            if default and knob_key(knobs_of(default[0].trace)) != knob_key(knobs_of(fitted.trace)):
                out.append((mod, default[0]))
    return out


def _measure_seeds(db, seeds: list, target, builder, runner) -> list[bool]:
    """Measure (workload, schedule) pairs in one builder and one runner batch and record them;
    per pair, False if it failed to build or run."""
    from tvm.s_tir import meta_schedule as ms

    built = builder.build([ms.builder.BuilderInput(sch.mod, target) for _, sch in seeds])
    device = "cpu" if target.kind.name == "llvm" else target.kind.name
    args_infos = [ms.arg_info.ArgInfo.from_prim_func(mod["main"]) for mod, _ in seeds]
    runnable = [i for i, b in enumerate(built) if not b.error_msg]
    futures = runner.run([ms.runner.RunnerInput(built[i].artifact_path, device, args_infos[i]) for i in runnable])
    ok = [False] * len(seeds)
    for i, future in zip(runnable, futures):
        result = future.result()
        if result.error_msg or not result.run_secs:
            continue
        mod, sch = seeds[i]
        db.commit_tuning_record(ms.database.TuningRecord(
            sch.trace, db.commit_workload(mod), [float(t) for t in result.run_secs], target, args_infos[i]))
        ok[i] = True
    return ok


def _classes(weighted: list[tuple[KernelSpec, float]]) -> dict[str, list[tuple[KernelSpec, float]]]:
    """The (spec, weight) pairs grouped by structure class."""
    classes: dict[str, list[tuple[KernelSpec, float]]] = {}
    for spec, weight in weighted:
        classes.setdefault(structure_class(spec), []).append((spec, weight))
    return classes


def _head(members: list[tuple[KernelSpec, float]]) -> KernelSpec:
    """A class's tuning task: its heaviest kernel, on whole tensors."""
    return tuning_twin(max(members, key=lambda m: (m[1], m[0].symbol))[0])


def by_class(weighted: list[tuple[KernelSpec, float]]) -> list[tuple[KernelSpec, float, int]]:
    """One task per structure class: (its heaviest kernel, the class's total weight, members)."""
    return [(_head(members), sum(w for _, w in members), len(members)) for members in _classes(weighted).values()]


def _space(family: str, klass: str | None, measured=(), batch: str | None = None):
    from tvm_rbn.schedules import search_space

    return search_space(family, klass, measured, batch)


def _record_measured_settings(db, by_class: dict[str, set]) -> None:
    """Add the knob setting of every record of these classes to by_class[class]."""
    from tvm_rbn.schedules.x86.space import knob_key, knobs_of

    for rec in db.get_all_tuning_records():
        annotation = knobs_of(rec.trace)
        if annotation and annotation.get("class") in by_class:
            by_class[annotation["class"]].add(knob_key(annotation))


def _strategy(family: str):
    """x86: the knob space has no decisions to mutate, so no genetic rounds: each batch samples
    the settings, the cost model ranks the unmeasured ones, the best (and 10% random) are
    measured. CUDA: MetaSchedule's evolutionary search with smaller populations than its
    default (2048 candidates per batch starve a 2-core machine)."""
    from tvm.s_tir import meta_schedule as ms

    if family.startswith("cuda"):
        return ms.search_strategy.EvolutionarySearch(population_size=256, init_min_unmeasured=32,
                                                     genetic_num_iters=2)
    return ms.search_strategy.EvolutionarySearch(population_size=160, init_measured_ratio=0.1,
                                                 init_min_unmeasured=1, genetic_num_iters=0, eps_greedy=0.1)


def without_records(weighted: list[tuple[KernelSpec, float]], folder: Path, family: str) -> list:
    """The (spec, weight) pairs that a build from `folder` would give the default schedule:
    no record of their own (or of their ``tuning_twin``) and none of their structure class."""
    if not records.has_records(folder):
        return list(weighted)
    db = records.load(folder, family)
    return [(spec, w) for spec, w in weighted if records.records_for(db, spec) == (None, None)]


def tune(model, input_shape, *, out: str | os.PathLike | None = None, family: str | None = None,
         trials: int = 64, seconds: float | None = None, new_only: bool = False, **kwargs) -> TuningReport:
    """Tune every convolution kernel of one training step of `model` at `input_shape`; with
    `new_only`, only those the records do not cover yet (``without_records``: kernels a model
    change added), the others' records left as they are."""
    from ..build.workloads import extract

    family = family or host_family()
    folder = Path(out) if out else records.folder(family)
    tunable = [(spec, count) for spec, count in extract(model, input_shape) if is_tunable(spec)]
    weighted = [(spec, count * flops(spec)) for spec, count in tunable]
    weighted = [(s, w if w > 0 else flops(s)) for s, w in weighted]  # eval-only kernels: weight of one call
    if new_only:
        weighted = without_records(weighted, folder, family)
        if not weighted:
            return TuningReport(folder, 0, 0, 0.0)
    return tune_specs(weighted, folder, family=family, trials=trials, seconds=seconds, **kwargs)
