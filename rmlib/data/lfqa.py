"""Expert long-form QA preferences (bcdnlp/PRD): answer_a vs answer_b, overall_preference -1/1."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from rmlib.core.paths import data_dir

from .drop_report import Loaded
from .errors import DataError, Drop
from .pairs import Collector, check_label
from .readers import display_name, read_jsonl

logger = logging.getLogger(__name__)

FILE = Path("lfqa_expert") / "experts_pairwise_human_preferences.jsonl"


def _winner(value) -> str:
    """"a" for -1, "b" for 1 (int, float or string); 0 is a tie; anything else a drop."""
    x = check_label(value, "overall_preference")
    if x == 0:
        raise Drop("tie")
    if x not in (-1, 1):
        raise Drop("unexpected overall_preference")
    return "a" if x == -1 else "b"


def load_lfqa_expert(path: str | Path | None = None) -> Loaded:
    """LFQA expert pairs; chosen_generator/rejected_generator = answer type (human/machine)."""
    f = Path(path) if path is not None else data_dir() / FILE
    if path is None and not f.exists():
        raise DataError(f, "LFQA expert preferences not found (github bcdnlp/PRD data/lfqa/; no hub copy)")
    col = Collector("lfqa_expert", "lfqa_expert")
    name = display_name(f)
    for n, rec in read_jsonl(f):
        if not isinstance(rec, Mapping):
            raise DataError(f, f"expected a JSON object, got {type(rec).__name__}", line=n)
        rid = f"{name}:{n - 1}"
        with col.row(rid):
            w = _winner(rec.get("overall_preference"))
            l = "b" if w == "a" else "a"
            col.pair(rid, rec.get("question"), rec.get(f"answer_{w}"), rec.get(f"answer_{l}"),
                     chosen_generator=rec.get(f"answer_{w}_type"), rejected_generator=rec.get(f"answer_{l}_type"))
    return col.finish(logger)
