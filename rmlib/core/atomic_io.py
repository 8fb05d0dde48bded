"""Atomic writes for results, tables and figures: write to a temp file in the same folder, then
rename, so a run that dies mid-way leaves the previous file intact (and no temp file behind)."""

from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path

import pandas as pd

logger = logging.getLogger(__name__)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_FILE_MODE = 0o666 & ~_umask()  # what open() would give a new file (mkstemp gives 0600)


def _atomic_write(path: str | os.PathLike, write) -> Path:
    """Call ``write(tmp)`` on a temp file beside ``path``, flush it to disk, rename it over ``path``.

    If ``write`` raises, the temp file is removed and ``path`` keeps its previous content.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, _FILE_MODE)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def write_text_atomic(path, text: str) -> Path:
    """Plain text (e.g. JSONL), UTF-8, written atomically."""
    return _atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def write_json_atomic(path, obj) -> Path:
    """JSON dump (indent 2, non-JSON values as str), UTF-8."""
    text = json.dumps(obj, indent=2, default=str)  # before the temp file: a failing dump touches nothing
    return write_text_atomic(path, text)


def markdown_table(frame) -> str:
    """A DataFrame as a GitHub pipe table (no index); cells via str(), NaN as "", "|" escaped."""

    def cell(v) -> str:
        text = "" if (not isinstance(v, (list, dict)) and pd.isna(v)) else str(v)
        return text.replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(cell(c) for c in frame.columns) + " |",
             "|" + "|".join("---" for _ in frame.columns) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def write_table_atomic(path, frame) -> Path:
    """A pandas DataFrame as CSV (or a Markdown pipe table when the path ends in .md)."""
    if str(path).endswith(".md"):
        return write_text_atomic(path, markdown_table(frame))
    return _atomic_write(path, lambda tmp: frame.to_csv(tmp, index=False))


def save_figure_atomic(fig, path, dpi: int = 120) -> Path:
    """Save a matplotlib figure (format from the path's suffix)."""
    fmt = Path(path).suffix.lstrip(".") or "png"
    return _atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=dpi, bbox_inches="tight"))


def read_json(path):
    return json.loads(Path(path).read_text(encoding="utf-8"))


# -- JSONL files that survive a kill ------------------------------------------------------------
def read_jsonl(path: Path, repair: bool = False) -> list[dict]:
    """Complete JSON lines of ``path`` ([] if missing). A partial last line (no newline: the
    writer was killed mid-write) is ignored with a warning, and cut off the file if ``repair``.
    A malformed complete line is an error (append-only writers never produce one)."""
    if not path.exists():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1  # bytes up to and including the last newline
    if end < len(data):
        logger.warning("%s: ignoring a partial last line (%d bytes; interrupted write), its batch is redone",
                       path, len(data) - end)
        if repair:
            os.truncate(path, end)
    rows = []
    for number, line in enumerate(data[:end].split(b"\n")[:-1], start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: line {number} is not valid JSON ({err}); the file is corrupt") from err
    return rows


def append_jsonl(path: Path, rows: list[dict]) -> None:
    """Append rows in one write and flush, so a killed process loses at most this batch (no fsync:
    it guards only against a machine crash, and costs ~0.1 s per batch on a busy shared disk)."""
    if not rows:
        return
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
        f.flush()
