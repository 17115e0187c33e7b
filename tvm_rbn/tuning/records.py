"""Tuning-log folders: ``<root>/<family>/`` holding MetaSchedule's JSON database
(database_workload.json, database_tuning_record.json).

The committed folders live in the project's ``tuning_logs/`` (installed as package data,
``tvm_rbn/tuning_logs``). A folder is checked before use: every line must parse, every record
must name a workload of the folder, and every record's target must belong to the folder's
family; a folder that fails is never applied, and the error names the file and the problem.
Tuning writes into a scratch copy and publishes it here with an atomic rename, so a run that
is killed leaves the last published state intact.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import statistics
import tempfile
from pathlib import Path

WORKLOADS = "database_workload.json"
RECORDS = "database_tuning_record.json"


class TuningLogError(ValueError):
    """A tuning log that cannot be applied; the message names the file and what is wrong."""


def default_root() -> Path:
    """The tuning_logs/ shipped with tvm_rbn: the package data, else the source checkout's."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here / "tuning_logs", here.parent / "tuning_logs"):
        if candidate.is_dir():
            return candidate
    return here.parent / "tuning_logs"


def folder(family: str, root: str | os.PathLike | None = None) -> Path:
    return Path(root) / family if root is not None else default_root() / family


def has_records(path: Path) -> bool:
    return (path / RECORDS).is_file() and (path / RECORDS).stat().st_size > 0


def content_hash(path: Path) -> str:
    """Changes whenever the folder's records change: part of build cache keys."""
    h = hashlib.sha256()
    for name in (WORKLOADS, RECORDS):
        f = path / name
        h.update(f.read_bytes() if f.is_file() else b"")
    return h.hexdigest()[:16]


def _family_of_target(target: dict) -> str:
    kind = target.get("kind")
    if kind == "cuda":
        arch = str(target.get("arch", "")).replace("sm_", "")
        return f"cuda-sm{arch}" if arch else "cuda"
    if kind == "llvm":
        from tvm.target import Target, codegen

        t = Target(target)
        if codegen.llvm_cpu_has_features(["avx512f"], t):
            return "x86-avx512"
        if codegen.llvm_cpu_has_features(["avx2", "fma"], t):
            return "x86-avx2"
        return "x86-64"
    return str(kind)


def _json_lines(path: Path):
    """(line number, parsed entry) for each non-empty line of a JSON-lines file."""
    for i, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield i, json.loads(line)
        except json.JSONDecodeError as exc:
            raise TuningLogError(f"{path}:{i}: not valid JSON ({exc.msg}); truncated or corrupt") from None


def validate(path: Path, family: str) -> int:
    """Check a tuning-log folder for `family`; returns the number of records."""
    workloads, records = path / WORKLOADS, path / RECORDS
    if not workloads.is_file() or not records.is_file():
        missing = WORKLOADS if not workloads.is_file() else RECORDS
        raise TuningLogError(f"{path}: {missing} is missing (a tuning-log folder holds {WORKLOADS} and {RECORDS})")
    n_workloads = 0
    for i, entry in _json_lines(workloads):
        if not (isinstance(entry, list) and len(entry) == 2):
            raise TuningLogError(f"{workloads}:{i}: not a MetaSchedule workload entry")
        n_workloads += 1
    count = 0
    seen_targets: dict[str, str] = {}
    for i, entry in _json_lines(records):
        if not (isinstance(entry, list) and len(entry) == 2 and isinstance(entry[0], int) and isinstance(entry[1], list)
                and len(entry[1]) >= 3):
            raise TuningLogError(f"{records}:{i}: not a MetaSchedule tuning record")
        if not 0 <= entry[0] < n_workloads:
            raise TuningLogError(f"{records}:{i}: refers to workload #{entry[0]}, but {workloads} has {n_workloads}")
        target = entry[1][2]
        key = json.dumps(target, sort_keys=True)
        if key not in seen_targets:
            seen_targets[key] = _family_of_target(target if isinstance(target, dict) else {})
        if seen_targets[key] != family:
            raise TuningLogError(
                f"{records}:{i}: record for target family {seen_targets[key]!r} ({target.get('kind')}, "
                f"{target.get('mcpu') or target.get('arch') or ''}) in the {family!r} folder; refusing to apply it"
            )
        count += 1
    return count


def load(path: Path, family: str):
    """The folder as a MetaSchedule database, after validation (imports tvm). Loaded once per
    process and content: a build of many kernels does not re-read a large log each time."""
    return _load(Path(path).resolve(), family, content_hash(path))


@functools.lru_cache(maxsize=8)
def _load(path: Path, family: str, _content: str):
    validate(path, family)
    from tvm.s_tir import meta_schedule as ms

    return ms.database.JSONDatabase(str(path / WORKLOADS), str(path / RECORDS), allow_missing=False)


def scratch_copy(path: Path) -> Path:
    """A private copy of a folder (empty if it does not exist) to tune into."""
    tmp = Path(tempfile.mkdtemp(prefix="tvm_rbn_tune_"))
    for name in (WORKLOADS, RECORDS):
        src = path / name
        if src.is_file():
            shutil.copyfile(src, tmp / name)
        else:
            (tmp / name).touch()
    return tmp


def publish(scratch: Path, path: Path) -> None:
    """Replace the folder's files with the scratch copy's, each by an atomic rename.

    The records file goes last: a reader may see new workloads without their records (harmless),
    never records pointing past the workloads.
    """
    path.mkdir(parents=True, exist_ok=True)
    for name in (WORKLOADS, RECORDS):
        fd, tmp = tempfile.mkstemp(prefix=f".{name}.", dir=path)
        os.close(fd)
        shutil.copyfile(scratch / name, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path / name)


# MetaSchedule records a candidate that failed to build or run with run_secs of 1e10
FAILED_RUN_SECS = 1e9


def record_secs(rec) -> float | None:
    """A record's run time, the median of its timed repeats (a noisy repeat does not count),
    or None when it did not build and run."""
    if not rec.run_secs:
        return None
    secs = statistics.median(float(t) for t in rec.run_secs)
    return secs if secs < FAILED_RUN_SECS else None


def measured_by_workload(database) -> dict[int, list]:
    """structural hash -> [(secs, record)] of the records that built and ran, fastest first
    (read now: the tuner calls it on a database it is still adding to).

    Times of different days do not compare on a noisy machine, so a tuning run stamps its
    records with its start (the annotation's ``batch``, an ISO time; older records have none)
    and re-measures a workload's best setting in the batch that measures new settings against
    it (``tvm_rbn.tuning.tune._seeds``). Once a workload has a setting measured in two runs,
    its records from before the later of those runs no longer count (they lost, on their
    day, to a setting measured again since), and a setting counts with its latest time."""
    import tvm_ffi

    from tvm_rbn.schedules.x86.space import knob_key, knobs_of

    by_workload: dict[int, list] = {}
    for rec in database.get_all_tuning_records():
        secs = record_secs(rec)
        if secs is None:
            continue
        annotation = knobs_of(rec.trace)
        setting = knob_key(annotation) if annotation else id(rec)
        batch = annotation.get("batch", "") if annotation else ""
        by_workload.setdefault(tvm_ffi.structural_hash(rec.workload.mod), []).append((batch, setting, secs, rec))
    out = {}
    for key, entries in by_workload.items():
        batches: dict = {}
        for batch, setting, _, _ in entries:
            batches.setdefault(setting, set()).add(batch)
        since = max((max(b) for b in batches.values() if len(b) > 1), default="")
        latest: dict = {}
        for batch, setting, secs, rec in entries:
            if batch >= since and (setting not in latest or batch > latest[setting][0]):
                latest[setting] = (batch, secs, rec)
        out[key] = sorted(((secs, rec) for _, secs, rec in latest.values()), key=lambda row: row[0])
    return out


_index_memo: dict[int, tuple] = {}


def _index(database) -> tuple[dict, dict]:
    """(``measured_by_workload``; structure class -> knob annotation of its best record),
    built once per database."""
    memo = _index_memo.get(id(database))
    if memo is not None and memo[0] is database:
        return memo[1]
    from tvm_rbn.schedules.x86.space import knobs_of

    by_workload = measured_by_workload(database)
    # per class: the most-tuned workload's fastest setting (times of different workloads do not compare)
    best: dict[str, tuple[int, dict]] = {}
    for rows in by_workload.values():
        knobs = knobs_of(rows[0][1].trace)
        if knobs and "class" in knobs:
            klass = knobs["class"]
            if klass not in best or len(rows) > best[klass][0]:
                best[klass] = (len(rows), knobs)
    index = (by_workload, {klass: knobs for klass, (_, knobs) in best.items()})
    _index_memo[id(database)] = (database, index)
    return index


def best_record(database, mod):
    """The fastest record of workload `mod` that built and ran, or None."""
    import tvm_ffi

    for _, rec in _index(database)[0].get(tvm_ffi.structural_hash(mod), []):
        if tvm_ffi.structural_equal(rec.workload.mod, mod):
            return rec
    return None


def class_knobs(database) -> dict[str, dict]:
    """structure class -> the knob annotation of its best measured record."""
    return _index(database)[1]


def records_for(database, spec) -> tuple:
    """What `database` offers a kernel: (the best record of its ``tuning_twin``, or None; its
    structure class's best knob annotation, or None). The build (``build.compile.lower_spec``)
    and ``tune --new-only`` (``tuning.tune.without_records``) read a kernel's records this way."""
    from .tasks import structure_class, tuning_twin, workload_mod

    return best_record(database, workload_mod(tuning_twin(spec))), class_knobs(database).get(structure_class(spec))
