"""Run folders of the resumable training loops (reward models, RLOO): which checkpoint to resume,
what to set aside as another run's, whether a finished run is there, and records that survive a resume.

A run folder holds ``checkpoint-N/`` folders (the HF Trainer's), the run's outputs (``final/``, a
result file) and an identity (a JSON-able dict: what makes two runs the same run) written into
every checkpoint and into the result file.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
from collections.abc import Iterable
from pathlib import Path

from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from rmlib.core.atomic_io import read_json, write_text_atomic

logger = logging.getLogger(__name__)


TRAINER_STATE = "trainer_state.json"  # the HF Trainer's last, non-atomic write into a checkpoint


# -- checkpoints ------------------------------------------------------------------------------------
def checkpoint_step(path: str | os.PathLike) -> int | None:
    """N of a ``checkpoint-N`` folder; None for any other path (a file of that name included)."""
    path = Path(path)
    m = re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", path.name)
    return int(m.group(1)) if m and path.is_dir() else None


def checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """The ``checkpoint-N`` folders of ``output_dir``, newest (largest N) first; [] if it does not exist."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [(s, p) for p in out.iterdir() if (s := checkpoint_step(p)) is not None]
    return [p for _, p in sorted(found, reverse=True)]


def checkpoint_gaps(ckpt: str | os.PathLike, files: Iterable[str | tuple[str, ...]]) -> list[str]:
    """What keeps ``ckpt`` from being complete, [] if nothing: an unreadable ``trainer_state.json``,
    and each entry of ``files`` not present (an entry that is a tuple of names: none of them present)."""
    ckpt = Path(ckpt)
    gaps = []
    try:
        json.loads((ckpt / TRAINER_STATE).read_text())
    except (OSError, ValueError):
        gaps.append(f"{TRAINER_STATE} missing or unreadable")
    for entry in files:
        names = (entry,) if isinstance(entry, str) else tuple(entry)
        if not any((ckpt / name).is_file() for name in names):
            gaps.append("no " + " or ".join(names))
    return gaps


def last_checkpoint(output_dir: str | os.PathLike, files: Iterable[str | tuple[str, ...]]) -> str | None:
    """The newest complete ``checkpoint-N`` in ``output_dir`` (see ``checkpoint_gaps``), or None.

    ``transformers.trainer_utils.get_last_checkpoint`` returns the newest folder whatever it holds;
    here newer folders cut short by a kill are skipped, each with a warning."""
    files = list(files)
    for ckpt in checkpoints(output_dir):
        gaps = checkpoint_gaps(ckpt, files)
        if not gaps:
            return str(ckpt)
        logger.warning("%s is incomplete (%s; interrupted while saving?): resuming from an earlier checkpoint",
                       ckpt, ", ".join(gaps))
    return None


# -- identity: stale folders, finished runs -----------------------------------------------------------
def _json_or_none(path: Path):
    try:
        return read_json(path)
    except (OSError, ValueError):
        return None


def set_aside_stale(output_dir: str | os.PathLike, identity: dict, identity_file: str,
                    result: tuple[str, str] | None = None, outputs: Iterable[str] = ()) -> Path | None:
    """Move what another run left in ``output_dir`` to ``stale-<time>/`` beside it, deleting nothing.

    Stale: each ``checkpoint-N`` whose ``identity_file`` is missing, unreadable or not ``identity``
    (a checkpoint cut short before that file counts too), and the ``result = (file, key)`` whose
    ``key`` is not ``identity``. When anything is stale, the ``outputs`` present (names in
    ``output_dir``: ``final``, result files) move with it. Returns the stale folder, or None."""
    out = Path(output_dir)
    stale = [p for p in checkpoints(out) if _json_or_none(p / identity_file) != identity]
    if result is not None and (out / result[0]).exists():
        meta = _json_or_none(out / result[0])
        if not isinstance(meta, dict) or meta.get(result[1]) != identity:
            stale.append(out / result[0])
    if not stale:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S")
    target, n = out / f"stale-{stamp}", 1
    while target.exists():  # a second set-aside within the same second
        target, n = out / f"stale-{stamp}-{n}", n + 1
    target.mkdir(parents=True)
    moving = stale + [out / name for name in outputs if (out / name).exists() and out / name not in stale]
    for path in moving:
        os.replace(path, target / path.name)
    logger.warning("%d item(s) in %s are another run's (other identity, or a save cut short before the "
                   "identity file): moved %s to %s", len(stale), out, ", ".join(p.name for p in moving), target)
    return target


def finished_result(output_dir: str | os.PathLike, result_file: str, expected: dict,
                    needs: Iterable[str] = ()) -> dict | None:
    """The content of ``<output_dir>/<result_file>`` when it and each of ``needs`` (paths in
    ``output_dir``) exist and its value at every key of ``expected`` equals the expected one; else None."""
    out = Path(output_dir)
    if not all((out / name).exists() for name in (result_file, *needs)):
        return None
    meta = read_json(out / result_file)
    if any(meta.get(key) != value for key, value in expected.items()):
        return None
    return meta


# -- records taken during training ------------------------------------------------------------------
def read_records(path: str | os.PathLike) -> list[dict]:
    """The records of a JSONL records file (one JSON object per line)."""
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def write_records(path: str | os.PathLike, records: list[dict]) -> Path:
    """Rewrite ``path`` with all records, one JSON object per line, atomically."""
    return write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


class RecordsCallback(TrainerCallback):
    """Records (dicts with a ``step``) taken during training, kept so that a resumed run ends with
    the records of an uninterrupted one.

    Each new record rewrites ``<output_dir>/<filename>`` (``_record`` calls ``_write``); ``on_save``
    writes the records into the checkpoint folder. On a resumed run (``global_step > 0`` at train
    begin) they are reloaded from the newest ``checkpoint-N`` with N <= global_step (else from the
    output-dir file) and records past global_step are dropped. At step 0 ``_record`` takes the first.

    Subclasses set ``filename`` and ``label`` (for the log) and implement ``_record(args, state,
    model)``: measure, append to ``self.records``, ``self._write(args, state, self._path(args))``.
    Only the main process writes files.
    """

    filename = "records.jsonl"
    label = "records"

    def __init__(self):
        self.records: list[dict] = []

    def _record(self, args, state, model) -> None:
        raise NotImplementedError

    def _path(self, args) -> Path:
        return Path(args.output_dir) / self.filename

    def _write(self, args, state, path: Path) -> None:
        if state.is_world_process_zero:
            write_records(path, self.records)

    def _has(self, step: int) -> bool:
        return bool(self.records) and self.records[-1]["step"] == step

    def _resumed_records(self, output_dir: Path, step: int) -> list[dict]:
        ckpts = [p for p in checkpoints(output_dir) if checkpoint_step(p) <= step]
        for path in ([ckpts[0] / self.filename] if ckpts else []) + [output_dir / self.filename]:
            if path.exists():
                logger.info("%s: resuming from %s", self.label, path)
                return [r for r in read_records(path) if r["step"] <= step]
        logger.warning("%s: resuming at step %d but no %s found; earlier records are lost", self.label, step,
                       self.filename)
        return []

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step > 0:
            self.records = self._resumed_records(Path(args.output_dir), state.global_step)
            self._write(args, state, self._path(args))
        else:
            self.records = []
            self._record(args, state, model)

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if folder.is_dir():
            self._write(args, state, folder / self.filename)

    def on_train_end(self, args, state, control, **kwargs):
        self._write(args, state, self._path(args))
