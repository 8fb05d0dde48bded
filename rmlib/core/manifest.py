"""The results manifest: which notebook wrote which table or figure, by role.

Each notebook records every table and figure it writes::

    manifest.record_result(run_dir, "01_norm_dispersion", "findings",
                           results.write_table_atomic(run_dir / "results" / "01_findings.csv", findings))

and readers (``rmlib.pipeline.report``) look files up by (notebook, role), never by file name.
``<run_dir>/results/manifest.json`` maps notebook -> role -> list of paths, relative to ``run_dir``
(a figure outside it as ``../figures/x.png``), in the order they were first recorded::

    {"01_norm_dispersion": {"findings": ["results/01_findings.csv"],
                            "figure": ["../../figures/01_head_norm.png", ...]}}

A role may hold several files (one figure per policy, one training row per run); recording a path
again keeps its place. Updates are atomic (temp file + rename) and, where ``fcntl`` exists, under
a lock, so two writers do not lose each other's entries.
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path

from rmlib.core.atomic_io import write_json_atomic

MANIFEST_NAME = "manifest.json"


def manifest_path(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "results" / MANIFEST_NAME


@contextlib.contextmanager
def _locked(path: Path):
    try:
        import fcntl
    except ImportError:  # not POSIX: atomic replace only
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_name(f".{path.name}.lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def read_manifest(run_dir: str | os.PathLike) -> dict[str, dict[str, list[str]]]:
    """The manifest as written ({} when there is none); a malformed one raises ValueError naming it."""
    path = manifest_path(run_dir)
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from err
    ok = isinstance(data, dict) and all(
        isinstance(roles, dict) and all(isinstance(v, list) and all(isinstance(p, str) for p in v)
                                        for v in roles.values())
        for roles in data.values())
    if not ok:
        raise ValueError(f"{path} is not a results manifest (notebook -> role -> list of paths)")
    return data


def _relative(path: Path, run_dir: Path) -> str:
    try:
        return Path(os.path.relpath(path.resolve(), run_dir.resolve())).as_posix()
    except ValueError:  # another drive (Windows): no relative form
        return path.resolve().as_posix()


def record_result(run_dir: str | os.PathLike, notebook: str, role: str, path: str | os.PathLike) -> Path:
    """Record that ``notebook`` wrote ``path`` as its ``role`` (e.g. "findings", "table5",
    "bon_summary", "figure") in ``<run_dir>/results/manifest.json``; returns ``path``.

    A relative ``path`` is taken as given (from the current directory), like the write it records."""
    if not notebook or not role:
        raise ValueError(f"notebook and role must be non-empty, got {notebook!r}, {role!r}")
    run_dir, path = Path(run_dir), Path(path)
    target = manifest_path(run_dir)
    with _locked(target):
        data = read_manifest(run_dir)
        entries = data.setdefault(notebook, {}).setdefault(role, [])
        rel = _relative(path, run_dir)
        if rel not in entries:
            entries.append(rel)
            write_json_atomic(target, data)
    return path


def recorded(run_dir: str | os.PathLike, notebook: str, role: str, manifest: dict | None = None) -> list[Path]:
    """The files recorded for (notebook, role) that exist, in recording order (``manifest``: an
    already read manifest, to read the file once)."""
    data = read_manifest(run_dir) if manifest is None else manifest
    run_dir = Path(run_dir)
    paths = [Path(os.path.normpath(run_dir / p)) for p in data.get(notebook, {}).get(role, [])]
    return [p for p in paths if p.is_file()]


def recorded_one(run_dir: str | os.PathLike, notebook: str, role: str, manifest: dict | None = None) -> Path | None:
    """The file last recorded for (notebook, role) that exists, or None."""
    paths = recorded(run_dir, notebook, role, manifest)
    return paths[-1] if paths else None
