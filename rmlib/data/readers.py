"""Plain readers for local files (JSON, JSONL, gzip, parquet) that report line numbers.

Every failure to read a file as a whole raises DataError naming the file and line.
"""

from __future__ import annotations

import gzip
import json
import zlib
from pathlib import Path
from typing import Iterator

import pyarrow.parquet as pq

from rmlib.core.paths import data_dir

from .errors import DataError

_GZIP_MAGIC = b"\x1f\x8b"
_PARQUET_MAGIC = b"PAR1"


def display_name(path: str | Path) -> str:
    """The path relative to the data folder when inside it, else the file name (for row ids)."""

    path = Path(path)
    try:
        return path.resolve().relative_to(data_dir().resolve()).as_posix()
    except ValueError:
        return path.name


def _raw_bytes(path: Path) -> bytes:
    if not path.exists():
        raise DataError(path, "file not found")
    if path.is_dir():
        raise DataError(path, "is a folder, expected a file")
    try:
        data = path.read_bytes()
    except OSError as e:  # permissions, a broken mount, ...
        raise DataError(path, f"cannot read the file ({type(e).__name__}: {e.strerror or e})") from None
    if data[:2] == _GZIP_MAGIC:
        try:
            data = gzip.decompress(data)
        except (OSError, EOFError, zlib.error) as e:
            raise DataError(path, f"corrupt gzip file ({e})") from None
    return data


def read_text(path: str | Path) -> str:
    """The whole file as text (gunzipped if gzip); DataError if missing, empty or not UTF-8."""
    path = Path(path)
    data = _raw_bytes(path)
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise DataError(path, f"not UTF-8 text ({e.reason})", line=line) from None
    if not text.strip():
        raise DataError(path, "file is empty", line=1)
    return text


def _loads(text: str, path: Path, line: int | None = None):
    """json.loads; a value nested too deeply for the parser is a DataError, not a RecursionError."""
    try:
        return json.loads(text)
    except RecursionError:
        raise DataError(path, "JSON nested too deeply to parse", line=line) from None


def read_jsonl(path: str | Path) -> list[tuple[int, object]]:
    """[(1-based line number, parsed value)] for each non-blank line."""
    path = Path(path)
    out = []
    for n, line in enumerate(read_text(path).splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append((n, _loads(line, path, n)))
        except json.JSONDecodeError as e:
            raise DataError(path, f"broken JSON line ({e.msg} at column {e.colno})", line=n) from None
    return out


def read_json(path: str | Path) -> object:
    """The parsed JSON value of a whole file."""
    path = Path(path)
    text = read_text(path)
    try:
        return _loads(text, path)
    except json.JSONDecodeError as e:
        raise DataError(path, f"invalid JSON ({e.msg} at column {e.colno})", line=e.lineno) from None


def read_parquet(path: str | Path) -> list[dict]:
    """Rows of a parquet file as dicts."""

    path = Path(path)
    if not path.exists():
        raise DataError(path, "file not found")
    if path.stat().st_size == 0:
        raise DataError(path, "file is empty", line=1, unit="row")
    try:
        return pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises several types for a broken file
        raise DataError(path, f"unreadable parquet file ({type(e).__name__}: {e})") from None


def _starts_with(path: Path, magic: bytes) -> bool:
    if not path.is_file():
        return False
    with path.open("rb") as f:
        return f.read(len(magic)) == magic


def iter_records(path: str | Path) -> tuple[str, Iterator[tuple[int, object]]]:
    """(unit, [(1-based position, record)]) for a JSON list, JSONL or parquet file.

    unit is "line" for JSONL and "row" for JSON lists and parquet. A ``.json`` file whose
    content is JSONL is read as JSONL. A top level that is not a list raises DataError.
    """
    path = Path(path)
    name = path.name.lower()
    if name.endswith(".parquet") or _starts_with(path, _PARQUET_MAGIC):
        rows = read_parquet(path)
        return "row", list(enumerate(rows, 1))
    if ".jsonl" in name:
        return "line", read_jsonl(path)
    text = read_text(path)
    is_json = name.endswith(".json") or name.endswith(".json.gz")
    try:
        value = _loads(text, path)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data" or not is_json:
            return "line", read_jsonl(path)  # JSON lines (maybe named .json)
        raise DataError(path, f"invalid JSON ({e.msg} at column {e.colno})", line=e.lineno) from None
    if isinstance(value, list):
        return "row", list(enumerate(value, 1))
    if isinstance(value, dict) and not is_json:
        return "line", [(1, value)]  # a one-line JSONL file
    raise DataError(path, "top level is not a list of objects", line=1)
