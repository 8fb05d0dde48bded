"""User-supplied preference files: JSON (a list of objects), JSONL or parquet."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from .drop_report import Loaded
from .errors import DataError
from .pairs import MISSING, Collector
from .readers import display_name, iter_records

logger = logging.getLogger(__name__)

OPTIONAL = ("category", "chosen_generator", "rejected_generator", "chosen_score", "rejected_score")


def load_preference_file(path: str | Path) -> Loaded:
    """Pairs from ``path``: rows with (prompt, chosen, rejected), where prompt is a string or
    chat messages and the replies are strings (or message lists), or with (chosen, rejected)
    HH-style transcripts. Optional columns: category, chosen/rejected_generator,
    chosen/rejected_score (a tie of equal scores is dropped).

    A file that cannot be read, a row that is not an object, or a file where no row has a
    ``chosen`` (or ``rejected``) field raises DataError naming the file, line/row and field;
    odd rows are dropped and counted.
    """
    path = Path(path)
    unit, records = iter_records(path)
    if not records:
        raise DataError(path, "no records", line=1, unit=unit)
    for n, rec in records:
        if not isinstance(rec, Mapping):
            raise DataError(path, f"expected an object, got {type(rec).__name__}", line=n, unit=unit)
    for field in ("chosen", "rejected"):
        if not any(field in rec for _, rec in records):
            raise DataError(path, "required field missing from every record", line=records[0][0],
                            unit=unit, field=field)
    has_prompt = any("prompt" in rec for _, rec in records)
    name = display_name(path)
    col = Collector(f"file {name}", name)
    for n, rec in records:
        rid = f"{name}:{n - 1}"
        prompt = rec.get("prompt") if has_prompt else MISSING
        col.pair(rid, prompt, rec.get("chosen", MISSING), rec.get("rejected", MISSING),
                 **{k: rec.get(k) for k in OPTIONAL})
    return col.finish(logger)
