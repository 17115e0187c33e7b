"""The tuning pipeline end to end on a handful of trials: tune, build from the records, run;
resume; bad logs refused; measurement through an RPC tracker and server on loopback."""
from __future__ import annotations

import json
import shutil
import socket
import time

import pytest
import torch
import torch.nn.functional as F
import tvm_ffi

import tvm_rbn
from tvm_rbn.build.compile import compile_library
from tvm_rbn.build.target import host_family
from tvm_rbn.kernels import KernelSpec
from tvm_rbn.runtime.library import KernelLibrary
from tvm_rbn.tuning import records
from tvm_rbn.tuning.records import TuningLogError
from tvm_rbn.tuning.tasks import structure_class, workload_mod
from tvm_rbn.tuning.tune import tune_specs

from conftest import assert_close

SPEC = KernelSpec.make("conv2d_fused", n=1, c=8, h=8, w=8, k=8, r=3, s=3, stride=(1, 1), padding=(1, 1),
                       dtype="float32", prologue_relu=True, stats=False)
# the same structure but for its input channels: tuned through SPEC, never on its own
SIBLING = KernelSpec.make("conv2d_fused", n=1, c=16, h=8, w=8, k=8, r=3, s=3, stride=(1, 1), padding=(1, 1),
                          dtype="float32", prologue_relu=True, stats=False)


@pytest.fixture(scope="module")
def tuned_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("logs") / host_family()
    report = tune_specs([(SPEC, 1.0), (SIBLING, 0.5)], folder, trials=2, trials_per_batch=2)
    assert report.tasks == 1, "kernels of one structure class are one tuning task"
    assert report.trials == 2
    return folder


def test_tune_then_build_applies_the_records(tuned_folder, tmp_path):
    lines = (tuned_folder / records.RECORDS).read_text().splitlines()
    db = records.load(tuned_folder, host_family())
    spec_records = [rec for rec in db.get_all_tuning_records()
                    if tvm_ffi.structural_equal(rec.workload.mod, workload_mod(SPEC))]
    assert len(spec_records) == 3  # the default template's + 2 trials (the sibling's: its own test)
    assert records.validate(tuned_folder, host_family()) == len(lines)
    from tvm_rbn.tuning.tune import REPEATS

    repeats = [json.loads(line)[1][1] for line in (tuned_folder / records.RECORDS).read_text().splitlines()]
    assert all(len(r) == REPEATS for r in repeats), f"each candidate is timed {REPEATS} times: {repeats}"
    run_secs = [t for r in repeats for t in r]
    assert all(0 < s < 1e9 for s in run_secs), f"a trial failed to build or run: {run_secs}"
    manifest = compile_library([SPEC], tmp_path, tuning_logs=tuned_folder)
    assert manifest["kernels"][0]["tuned"] is True
    _check_prologue_conv(KernelLibrary(tmp_path).function(SPEC.symbol), 8, "tuned kernel output")


def _check_prologue_conv(fn, c: int, what: str) -> None:
    """A built bn+relu>conv kernel (K=8, 8x8, 3x3, pad 1) against PyTorch."""
    x, w = torch.randn(1, c, 8, 8), torch.randn(8, c, 3, 3)
    scale, shift = torch.rand(c) + 0.5, torch.randn(c)
    y = torch.empty(1, 8, 8, 8)
    fn(x, scale, shift, w, y)
    ref = F.conv2d(torch.relu(x * scale[:, None, None] + shift[:, None, None]), w, padding=1)
    assert_close(y, ref, what)


def test_records_carry_their_knobs_and_a_sibling_builds_from_them(tuned_folder, tmp_path):
    from tvm_rbn.schedules.x86.space import knobs_of

    db = records.load(tuned_folder, host_family())
    annotations = [knobs_of(rec.trace) for rec in db.get_all_tuning_records()]
    assert all(a is not None and a["template"] == "conv" for a in annotations), annotations
    assert {a["class"] for a in annotations} == {structure_class(SPEC)} == {structure_class(SIBLING)}
    for spec in (SPEC, SIBLING):
        mod = workload_mod(spec)
        mine = [knobs_of(rec.trace) for rec in db.get_all_tuning_records()
                if tvm_ffi.structural_equal(rec.workload.mod, mod)]
        assert len({json.dumps(a["knobs"], sort_keys=True) for a in mine}) == len(mine), f"measured twice: {mine}"
    manifest = compile_library([SIBLING], tmp_path, tuning_logs=tuned_folder)
    assert manifest["kernels"][0]["schedule"] == "tuned"
    _check_prologue_conv(KernelLibrary(tmp_path).function(SIBLING.symbol), 16, "kernel built from its own records")


def test_a_class_member_is_measured_with_the_class_best_and_its_default(tuned_folder):
    """The sibling was not a tuning task: after the search it was measured with its class's
    best setting (refitted to its channels) and with its own default, in the run's batch, and
    a rerun measures nothing more for it; the build takes its faster record."""
    from tvm_rbn.schedules import design_spaces
    from tvm_rbn.schedules.x86.space import apply_knobs, knob_key, knobs_of
    from tvm_rbn.tuning.tune import _member_seeds

    family = host_family()
    db = records.load(tuned_folder, family)
    mine = records.measured_by_workload(db)[tvm_ffi.structural_hash(workload_mod(SIBLING))]
    member = workload_mod(SIBLING)["main"]
    head_best = knobs_of(records.best_record(db, workload_mod(SPEC)).trace)
    fitted = knobs_of(apply_knobs(member, family, head_best, fit=True).trace)
    default = knobs_of(design_spaces(member, family, limit=1)[0].trace)
    assert {knob_key(knobs_of(rec.trace)) for _, rec in mine} == {knob_key(fitted), knob_key(default)}
    assert len({knobs_of(rec.trace)["batch"] for _, rec in mine}) == 1, "the settings were timed in one batch"
    best_sibling = records.best_record(db, workload_mod(SIBLING))
    assert knob_key(knobs_of(best_sibling.trace)) == knob_key(knobs_of(mine[0][1].trace))
    assert _member_seeds(db, [(SPEC, 1.0), (SIBLING, 0.5)], host_family(), "later") == []


def test_new_only_selects_the_kernels_the_records_do_not_cover(tuned_folder, tmp_path):
    """``tune --new-only`` tunes only the kernels a build would give the default schedule: SPEC
    has records of its own, SIBLING was measured as a class member, a third member of their
    class has the class's records; a kernel of another structure has none (nor has any kernel
    under an empty log folder)."""
    from tvm_rbn.tuning.tune import without_records

    member = KernelSpec.make("conv2d_fused", n=1, c=24, h=8, w=8, k=8, r=3, s=3, stride=(1, 1), padding=(1, 1),
                             dtype="float32", prologue_relu=True, stats=False)
    other = KernelSpec.make("conv2d_fused", n=1, c=8, h=8, w=8, k=16, r=1, s=1, stride=(1, 1), padding=(0, 0),
                            dtype="float32", prologue_relu=None, stats=False)
    weighted = [(SPEC, 1.0), (SIBLING, 0.5), (member, 0.3), (other, 0.2)]
    assert without_records(weighted, tuned_folder, host_family()) == [(other, 0.2)]
    assert without_records(weighted, tmp_path / host_family(), host_family()) == weighted


def test_new_only_cli_with_nothing_new_tunes_nothing(tmp_path, monkeypatch, capsys):
    """The CLI flag reaches the selection, and with every kernel covered no task is created."""
    from tvm_rbn import __main__ as cli
    from tvm_rbn.tuning import tune as tuning

    seen = []
    monkeypatch.setattr(tuning, "without_records", lambda weighted, folder, family: seen.append(weighted) or [])
    monkeypatch.setattr(tuning, "tune_specs", lambda *a, **k: pytest.fail("tune_specs ran with nothing to tune"))
    assert cli.main(["tune", "--model", "resnet18", "--batch", "2", "--size", "32", "--new-only",
                     "--logs", str(tmp_path)]) == 0
    assert seen and seen[0], "the model's kernels were not offered to the selection"
    assert "nothing to tune" in capsys.readouterr().out


def test_search_proposals_of_measured_settings_are_dropped():
    """The evolutionary search seeds its population from the database's records and may
    propose one of them again: the tuner measures each setting of a class once."""
    from types import SimpleNamespace

    from tvm_rbn.schedules import design_spaces
    from tvm_rbn.schedules.x86.space import knob_key, knobs_of
    from tvm_rbn.tuning.tune import unmeasured

    spaces = design_spaces(SPEC.prim_func(), host_family(), structure_class(SPEC), limit=3)
    keys = [knob_key(knobs_of(sch.trace)) for sch in spaces]
    assert len(set(keys)) == 3
    measured = {keys[0]}
    proposed = [SimpleNamespace(sch=sch) for sch in (spaces[0], spaces[1], spaces[2], spaces[1])]
    fresh = unmeasured(proposed, measured)
    assert [knob_key(knobs_of(c.sch.trace)) for c in fresh] == keys[1:]
    assert measured == set(keys)
    assert unmeasured(proposed, measured) == []


def test_tuned_kernel_is_rebuilt_from_its_knobs_with_the_current_template(tuned_folder, monkeypatch):
    """A record names a knob setting; the build applies it with this version's template (a
    template's later improvement reaches tuned kernels) rather than replaying the old trace."""
    from dataclasses import replace

    from tvm.s_tir import Schedule

    from tvm_rbn.build.compile import lower_spec
    from tvm_rbn.schedules.x86 import space

    original = space.KNOB_TEMPLATES["conv"]

    class Marked:
        @staticmethod
        def apply(func, family, knobs=None):
            sch = original.template.apply(func, family, knobs)
            sch.annotate(sch.get_sblock("root"), "test.current_template", 1)
            return sch

    monkeypatch.setitem(space.KNOB_TEMPLATES, "conv", replace(original, template=Marked))
    db = records.load(tuned_folder, host_family())
    func, how = lower_spec(SPEC, host_family(), db)
    assert how == "tuned"
    assert "test.current_template" in func.script(), "the tuned kernel replayed its recorded trace"
    sch = Schedule(func)
    built = json.loads(str(sch.get(sch.get_sblock("root")).annotations[space.KNOB_ANNOTATION]))
    assert built == space.knobs_of(records.best_record(db, workload_mod(SPEC)).trace)


OPS = {
    "conv": KernelSpec.make("conv2d_fused", n=2, c=32, h=8, w=8, k=32, r=3, s=3, stride=(1, 1), padding=(1, 1),
                            dtype="float32", prologue_relu=True, stats=True),
    "dgrad": KernelSpec.make("conv2d_dgrad", n=2, c=32, h=8, w=8, k=32, r=3, s=3, stride=(2, 2), padding=(1, 1),
                             dtype="float32", grad_prologue=True, epilogue_relu=True),
    "wgrad": KernelSpec.make("conv2d_wgrad", n=2, c=32, h=8, w=8, k=32, r=1, s=1, stride=(1, 1), padding=(0, 0),
                             dtype="float32", grad_prologue=True, prologue_relu=True),
}


@pytest.mark.parametrize("op", sorted(OPS))
def test_knob_space_is_every_valid_setting_default_first(op):
    from tvm_rbn.schedules import default_schedule, design_spaces
    from tvm_rbn.schedules.x86.space import knobs_of

    func = workload_mod(OPS[op])["main"]
    spaces = design_spaces(func, "x86-avx512", "k")
    settings = [json.dumps(knobs_of(s.trace)["knobs"], sort_keys=True) for s in spaces]
    assert len(spaces) > 2 and len(set(settings)) == len(settings)
    import tvm_ffi

    default = default_schedule(func, "x86-avx512").mod["main"].body.block
    first = spaces[0].mod["main"].body.block  # the root block, annotated with its knobs
    assert "tvm_rbn.knobs" in first.annotations
    assert tvm_ffi.structural_equal(first.body, default.body), "the first setting is the default"


def test_search_space_leaves_out_settings_already_measured():
    from tvm.s_tir import meta_schedule as ms

    from tvm_rbn.build.target import host_tvm_target
    from tvm_rbn.schedules import search_space
    from tvm_rbn.schedules.x86.space import knob_key, knobs_of

    def settings(measured):
        ctx = ms.TuneContext(mod=workload_mod(SPEC), target=host_tvm_target(), num_threads=1,
                             space_generator=search_space("x86-avx512", "k", measured), task_name="space")
        return [knob_key(knobs_of(s.trace)) for s in ctx.space_generator.generate_design_space(ctx.mod)]

    every = settings(set())
    assert len(every) > 2
    assert settings(set(every[:2])) == every[2:], "measured settings are not offered again"
    assert settings(set(every)) == every, "with every setting measured, the whole space stays searchable"


def test_rerun_resumes_without_new_trials(tuned_folder):
    before = (tuned_folder / records.RECORDS).read_bytes()
    report = tune_specs([(SPEC, 1.0)], tuned_folder, trials=2)
    assert report.trials == 0
    assert (tuned_folder / records.RECORDS).read_bytes() == before


def test_resume_measures_a_changed_default_first(tuned_folder, tmp_path, monkeypatch):
    """When the templates' rules change a kernel's default setting, a resumed run measures the
    new default before searching, so the best record is never worse than an untuned build."""
    from dataclasses import replace

    from tvm_rbn.schedules.x86 import conv as cv
    from tvm_rbn.schedules.x86.space import knobs_of

    folder = _copy(tuned_folder, tmp_path)
    before = len((folder / records.RECORDS).read_text().splitlines())
    original = cv.default_knobs
    monkeypatch.setattr(cv, "default_knobs", lambda shape, cores=None: replace(original(shape, cores), unroll_ic=True))
    report = tune_specs([(SPEC, 1.0)], folder, trials=before + 1, trials_per_batch=1)
    assert report.per_task[0].get("default_measured") is True, report.per_task
    db = records.load(folder, host_family())
    settings = [knobs_of(rec.trace)["knobs"] for rec in db.get_all_tuning_records()]
    assert any(k.get("unroll_ic") for k in settings), "the new default was not measured"


def test_resume_carries_the_best_setting_into_each_value_of_a_newer_knob(tmp_path):
    """A best record older than a knob (here ``k_tiles``, stripped from its annotation) is
    measured again with each value the knob takes among the candidates, and once more as it
    was, in the same batch: that batch's times decide, not the old record's."""
    import re

    from tvm_rbn.schedules.x86.space import knob_key, knobs_of

    spec = OPS["wgrad"]
    folder = tmp_path / host_family()
    # the default setting alone (the clock stops the search before any trial: a trial drawn
    # at random could be a tile that takes no other k_tiles value, and nothing would carry)
    tune_specs([(spec, 1.0)], folder, trials=1, trials_per_batch=1, seconds=1e-3)
    # a run from before k_tiles existed: its records had one k tile
    lines = (folder / records.RECORDS).read_text().splitlines()
    older = [re.sub(r'\\*"k_tiles\\*": 1, ', "", line) for line in lines if re.search(r'k_tiles\\*": 1, ', line)]
    assert len(older) == len(lines) == 1, f"the default's record, with k_tiles 1 to strip: {lines}"
    assert not any("k_tiles" in line for line in older), "a record's annotation kept its k_tiles"
    (folder / records.RECORDS).write_text("".join(line + "\n" for line in older))
    older_best = knob_key(knobs_of(records.best_record(records.load(folder, host_family()), workload_mod(spec)).trace))
    report = tune_specs([(spec, 1.0)], folder, trials=10, trials_per_batch=1, seconds=1e-3)
    row = report.per_task[0]
    assert row.get("carried_measured") and row.get("remeasured_measured"), row
    db = records.load(folder, host_family())
    annotations = [knobs_of(rec.trace) for rec in db.get_all_tuning_records()]
    assert any(a["knobs"].get("k_tiles", 1) > 1 and "batch" in a for a in annotations), annotations
    assert any(knob_key(a) == older_best and "batch" in a for a in annotations), "the best was not measured again"


def test_records_from_before_a_remeasurement_no_longer_count(tmp_path):
    """A setting measured in two runs counts with its later time, and the workload's records
    from before that run no longer count: a setting that won in the same batch as the
    re-measured best is chosen, not one timed on a quieter day."""
    from tvm.s_tir import meta_schedule as ms

    from tvm_rbn.build.target import host_tvm_target
    from tvm_rbn.schedules import design_spaces
    from tvm_rbn.schedules.x86.space import apply_knobs, knob_key, knobs_of

    family = host_family()
    mod = workload_mod(SPEC)
    first, second, third = (knobs_of(s.trace)
                            for s in design_spaces(mod["main"], family, structure_class(SPEC), limit=3))
    folder = tmp_path / family
    folder.mkdir()
    db = ms.database.JSONDatabase(str(folder / records.WORKLOADS), str(folder / records.RECORDS))
    workload = db.commit_workload(mod)
    args = ms.arg_info.ArgInfo.from_prim_func(mod["main"])
    today = "2026-11-25T00:00:00+00:00"
    for annotation, secs in ((first, 1e-3), (third, 1.5e-3), ({**first, "batch": today}, 3e-3),
                             ({**second, "batch": today}, 2e-3)):
        sch = apply_knobs(mod["main"], family, annotation)
        db.commit_tuning_record(ms.database.TuningRecord(sch.trace, workload, [secs], host_tvm_target(), args))
    best = records.best_record(records.load(folder, family), mod)
    assert knob_key(knobs_of(best.trace)) == knob_key(second), knobs_of(best.trace)


def test_a_records_time_is_the_median_of_its_repeats():
    """One disturbed repeat (another process on the core) does not rank a record."""
    from types import SimpleNamespace

    assert records.record_secs(SimpleNamespace(run_secs=[0.020, 0.043, 0.021])) == 0.021
    assert records.record_secs(SimpleNamespace(run_secs=[0.030])) == 0.030
    assert records.record_secs(SimpleNamespace(run_secs=[1e10])) is None, "a failed run has no time"
    assert records.record_secs(SimpleNamespace(run_secs=[])) is None


def test_remeasure_ranks_the_fastest_recorded_settings_by_new_times(tuned_folder, tmp_path):
    """--remeasure N (after a template change) measures a kernel's N fastest settings and its
    default again in one batch, outside the trial budget: the kernel's best is then chosen
    among those times alone, and nothing recorded is deleted."""
    import tvm_ffi

    from tvm_rbn.schedules import design_spaces
    from tvm_rbn.schedules.x86.space import knob_key, knobs_of

    folder = _copy(tuned_folder, tmp_path)
    lines_before = (folder / records.RECORDS).read_text().splitlines()
    workload = tvm_ffi.structural_hash(workload_mod(SPEC))
    ranked = records.measured_by_workload(records.load(folder, host_family()))[workload]
    assert len(ranked) == 3, "the fixture should hold three measured settings"
    default = knob_key(knobs_of(design_spaces(workload_mod(SPEC)["main"], host_family(), limit=1)[0].trace))
    fastest = sorted({knob_key(knobs_of(rec.trace)) for _, rec in ranked[:2]} | {default})
    report = tune_specs([(SPEC, 1.0)], folder, trials=len(ranked), remeasure=2)  # no trials left to search
    assert (report.trials, report.seeds) == (0, len(fastest)), report
    lines_after = (folder / records.RECORDS).read_text().splitlines()
    assert lines_after[:len(lines_before)] == lines_before, "a record was changed or lost"
    now = records.measured_by_workload(records.load(folder, host_family()))[workload]
    assert sorted(knob_key(knobs_of(rec.trace)) for _, rec in now) == fastest, \
        "the ranking still counts a setting that was not measured again"
    batches = {knobs_of(rec.trace).get("batch") for _, rec in now}
    assert len(batches) == 1 and None not in batches, f"not one batch's times: {batches}"


def test_clock_budget_stops_the_search_cleanly(tmp_path):
    """Past --seconds no task proposes another batch, and the run ends without an error (the
    clock ran out while the defaults were measured: the search measures nothing)."""
    folder = tmp_path / host_family()
    specs = [(SPEC, 1.0), (OPS["wgrad"], 1.0), (OPS["dgrad"], 1.0)]
    report = tune_specs(specs, folder, trials=16, trials_per_batch=1, seconds=1e-3)
    assert report.tasks == 3
    assert report.trials == 0, "a batch was proposed after the clock ran out"
    assert report.seeds == 3
    assert records.validate(folder, host_family()) == 3  # the default schedules were measured and kept


def test_clocked_strategy_delegates_until_the_deadline():
    """The clock wraps the search strategy: before the deadline every call reaches the inner
    strategy; after it, a request for candidates ends the task (None) without searching."""
    from tvm.ir.utils import derived_object
    from tvm.s_tir.meta_schedule.search_strategy import PySearchStrategy

    from tvm_rbn.tuning.tune import _clocked

    calls = []

    @derived_object
    class Counting(PySearchStrategy):
        def _initialize_with_tune_context(self, context):
            calls.append("init")

        def pre_tuning(self, max_trials, num_trials_per_iter, design_spaces, database=None, cost_model=None):
            calls.append("pre")

        def post_tuning(self):
            calls.append("post")

        def generate_measure_candidates(self):
            calls.append("generate")
            return []

        def notify_runner_results(self, measure_candidates, results):
            calls.append("notify")

        def clone(self):
            return Counting()

    running = _clocked(Counting(), deadline=time.perf_counter() + 3600)
    running.pre_tuning(4, 1, [], None, None)
    assert running.generate_measure_candidates() is not None
    running.notify_runner_results([], [])
    running.post_tuning()
    assert calls == ["pre", "generate", "notify", "post"], calls
    calls.clear()
    expired = _clocked(Counting(), deadline=time.perf_counter() - 1)
    assert expired.generate_measure_candidates() is None
    assert calls == [], f"the inner strategy searched past the deadline: {calls}"


def _copy(folder, tmp_path):
    bad = tmp_path / host_family()
    shutil.copytree(folder, bad)
    return bad


def test_truncated_log_is_refused_and_names_the_file(tuned_folder, tmp_path):
    bad = _copy(tuned_folder, tmp_path)
    text = (bad / records.RECORDS).read_text()
    (bad / records.RECORDS).write_text(text[: len(text) - 40])
    last = len(text.splitlines())
    with pytest.raises(TuningLogError, match=rf"{records.RECORDS}:{last}: not valid JSON"):
        records.validate(bad, host_family())
    with pytest.raises(TuningLogError, match=records.RECORDS):
        compile_library([SPEC], tmp_path, tuning_logs=bad)
    with pytest.raises(TuningLogError, match=records.RECORDS):
        tvm_rbn.restructure(torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, bias=False), torch.nn.BatchNorm2d(4)),
                            tuning_logs=bad)


def test_tuning_refuses_to_touch_a_corrupt_folder(tuned_folder, tmp_path):
    bad = _copy(tuned_folder, tmp_path)
    (bad / records.WORKLOADS).write_text("{not json\n")
    before = {n: (bad / n).read_bytes() for n in (records.WORKLOADS, records.RECORDS)}
    with pytest.raises(TuningLogError, match=rf"{records.WORKLOADS}:1"):
        tune_specs([(SPEC, 1.0)], bad, trials=4)
    assert before == {n: (bad / n).read_bytes() for n in (records.WORKLOADS, records.RECORDS)}


def test_foreign_target_log_is_refused(tuned_folder, tmp_path):
    bad = _copy(tuned_folder, tmp_path)
    lines = (bad / records.RECORDS).read_text().splitlines()
    entry = json.loads(lines[0])
    entry[1][2] = {"kind": "cuda", "arch": "sm_90", "keys": ["cuda", "gpu"], "tag": ""}
    (bad / records.RECORDS).write_text("\n".join([json.dumps(entry)] + lines[1:]) + "\n")
    with pytest.raises(TuningLogError, match=r"cuda-sm90.*refusing"):
        records.validate(bad, host_family())
    other = "x86-avx2" if host_family() == "x86-avx512" else "x86-avx512"
    with pytest.raises(TuningLogError, match="refusing"):
        records.validate(tuned_folder, other)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_measurement_through_rpc_tracker_and_server(tmp_path):
    from tvm import rpc
    from tvm.rpc.tracker import Tracker
    from tvm.s_tir import meta_schedule as ms

    tracker = Tracker(host="127.0.0.1", port=_free_port(), port_end=65000, silent=True)
    server = rpc.Server(host="127.0.0.1", port=_free_port(), port_end=65000, key="tvm_rbn_test",
                        tracker_addr=("127.0.0.1", tracker.port), silent=True)
    try:
        deadline = time.time() + 60
        while "tvm_rbn_test" not in str(rpc.connect_tracker("127.0.0.1", tracker.port).text_summary()):
            assert time.time() < deadline, "the RPC server did not register with the tracker"
            time.sleep(0.5)
        runner = ms.runner.RPCRunner(ms.runner.RPCConfig(tracker_host="127.0.0.1", tracker_port=tracker.port,
                                                         tracker_key="tvm_rbn_test", session_timeout_sec=120))
        folder = tmp_path / host_family()
        report = tune_specs([(SPEC, 1.0)], folder, trials=2, trials_per_batch=2, runner=runner)
        assert report.trials == 2
        run_secs = [json.loads(line)[1][1][0] for line in (folder / records.RECORDS).read_text().splitlines()]
        assert all(0 < s < 1e9 for s in run_secs), f"RPC measurement failed: {run_secs}"
    finally:
        server.terminate()
        tracker.terminate()


@pytest.mark.parametrize("op", ["conv2d_fused", "conv2d_dgrad", "conv2d_wgrad"])
def test_cuda_search_space_yields_kernels_that_compile(op):
    """No GPU here: check that the CUDA space samples valid schedules that nvcc compiles."""
    import tvm
    from tvm.s_tir import meta_schedule as ms

    from tvm_rbn.schedules import cuda_target, search_space
    from tvm_rbn.tuning.tasks import workload_mod

    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not installed")
    geometry = dict(n=2, c=16, h=14, w=14, k=32, r=3, s=3, stride=(1, 1), padding=(1, 1), dtype="float32")
    spec = {
        "conv2d_fused": KernelSpec.make(op, **geometry, prologue_relu=True, stats=True),
        "conv2d_dgrad": KernelSpec.make(op, **geometry, grad_prologue=True, epilogue_relu=True),
        "conv2d_wgrad": KernelSpec.make(op, **geometry, grad_prologue=True, prologue_relu=True),
    }[op]
    target = cuda_target("sm_90")
    ctx = ms.TuneContext(mod=workload_mod(spec), target=target, space_generator=search_space("cuda-sm90"),
                         search_strategy="evolutionary", task_name=op, num_threads=1, rand_state=0)
    compiled = 0
    for _ in range(20):
        for space in ctx.space_generator.generate_design_space(ctx.mod):
            if all(pp.apply(space) for pp in ctx.space_generator.postprocs):
                tvm.compile(space.mod, target=target)
                compiled += 1
                break
        if compiled:
            break
    assert compiled, f"no valid CUDA schedule sampled for {op}"


@pytest.mark.parametrize("op", ["conv2d_fused", "conv2d_dgrad"], ids=["forward-slices", "dgrad-slices-running-sum"])
def test_slice_reading_kernels_tune_on_whole_tensors_and_build_from_their_records(tmp_path, op):
    """DenseNet's block-buffer kernels read and write channel slices, which MetaSchedule's
    runner cannot allocate, and conv1's data gradient adds to the block's running gradient sum:
    they are tuned as their twin (whole tensors, no running sum), every trial measured, and
    built from the twin's records."""
    from tvm_rbn.build.workloads import extract
    from tvm_rbn.models import MODELS
    from tvm_rbn.tuning.tasks import structure_class, tuning_twin

    sliced = next(s for s, _ in extract(MODELS["densenet121"](), (2, 3, 64, 64))
                  if s.op == op and "views" in s.kwargs and s.kwargs["r"] == 1
                  and (op != "conv2d_dgrad" or s.kwargs.get("accumulate")))
    twin = tuning_twin(sliced)
    assert "views" not in twin.kwargs and "accumulate" not in twin.kwargs
    assert structure_class(twin) == structure_class(sliced)
    folder = tmp_path / host_family()
    report = tune_specs([(sliced, 1.0)], folder, trials=2, trials_per_batch=1)
    assert report.trials >= 1
    db = records.load(folder, host_family())
    secs = [records.record_secs(rec) for rec in db.get_all_tuning_records()]
    assert secs and all(s is not None for s in secs), f"a trial failed to build or run: {secs}"
    manifest = compile_library([sliced], tmp_path, tuning_logs=folder)
    assert manifest["kernels"][0]["schedule"] == "tuned"
