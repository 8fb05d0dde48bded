"""Run folders of the resumable training loops (reward models, RLOO): which checkpoint to resume,
what to set aside as another run's, whether a finished run is there.

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
