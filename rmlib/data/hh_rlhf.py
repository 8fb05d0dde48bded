"""Anthropic HH-RLHF: pairs of whole transcripts -> shared prompt + two final replies."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from rmlib.core.paths import data_dir

from .drop_report import Loaded
from .errors import DataError
from .hub import HUB_IDS, load_hub
from .pairs import MISSING, Collector
from .readers import display_name, read_jsonl

logger = logging.getLogger(__name__)


def load_hh_rlhf(subset: str = "harmless-base", split: str = "test", path: str | Path | None = None) -> Loaded:
    """HH-RLHF ``subset``/``split`` from ``<data>/hh-rlhf/<subset>/<split>.jsonl.gz``.

    Without a local copy (and no ``path``) it falls back to the hub (``Anthropic/hh-rlhf``,
    data_dir=subset). Pairs whose transcripts differ before the final Assistant turn are
    dropped as "prefix differs"; identical and empty final replies are dropped too.
    """
    source = f"hh-rlhf/{subset}"
    col = Collector(f"hh-rlhf {subset}/{split}", source)
    local = Path(path) if path is not None else data_dir() / "hh-rlhf" / subset / f"{split}.jsonl.gz"
    if path is None and not local.exists():
        ds = load_hub(HUB_IDS["hh-rlhf"], local, data_dir=subset, split=split)
        records = ((i, f"{HUB_IDS['hh-rlhf']}/{subset}:{split}:{i}", r) for i, r in enumerate(ds))
    else:
        name = display_name(local)
        records = ((n, f"{name}:{n - 1}", r) for n, r in read_jsonl(local))
    for n, rid, rec in records:
        if not isinstance(rec, Mapping):
            raise DataError(local, f"expected a JSON object, got {type(rec).__name__}", line=n)
        col.pair(rid, MISSING, rec.get("chosen"), rec.get("rejected"))
    return col.finish(logger)

