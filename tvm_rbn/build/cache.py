"""Versioned, target-keyed on-disk cache of exported libraries, written atomically under a lock.

Layout: <root>/v<FORMAT>/<family>/<key>/{kernels.so, manifest.json}. An entry appears by
renaming a complete temporary folder into place, so readers never see half an entry; builders
of the same key serialise on <key>.lock, and the second finds the first's result.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from ..runtime.library import LIBRARY_FILE, MANIFEST_FILE

FORMAT = 1


def cache_root() -> Path:
    root = os.environ.get("TVM_RBN_CACHE_DIR")
    if root:
        return Path(root)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "tvm_rbn"


def versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for dist in ("apache-tvm", "apache-tvm-ffi", "tvm_rbn"):
        try:
            out[dist] = version(dist)
        except PackageNotFoundError:
            out[dist] = "unknown"
    return out


def entry_key(spec_keys: list[str], target: dict, schedule_version: str) -> str:
    material = json.dumps(
        {"specs": sorted(spec_keys), "target": target, "versions": versions(), "schedules": schedule_version},
        sort_keys=True,
    )
    return hashlib.sha256(material.encode()).hexdigest()[:24]


def entry_dir(family: str, key: str) -> Path:
    return cache_root() / f"v{FORMAT}" / family / key


@contextlib.contextmanager
def locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def is_complete(entry: Path) -> bool:
    return (entry / LIBRARY_FILE).is_file() and (entry / MANIFEST_FILE).is_file()


def publish(entry: Path, write) -> Path:
    """Create `entry` by calling write(tmpdir) and renaming tmpdir into place.

    Callers hold the entry's lock; a complete entry already there is kept as is.
    """
    if is_complete(entry):
        return entry
    entry.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    try:
        write(tmp)
        if entry.exists():  # a partial entry left by a killed process
            shutil.rmtree(entry)
        os.rename(tmp, entry)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return entry
