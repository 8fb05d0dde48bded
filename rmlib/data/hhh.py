"""BIG-bench HHH alignment: four json tasks (harmless, helpful, honest, other), two answers each."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

from rmlib.core.paths import data_dir

from .drop_report import Loaded
from .errors import DataError, Drop
from .hub import HUB_IDS, load_hub
from .pairs import Collector, check_label, check_text
from .readers import display_name, read_json
from .transcript import parse_transcript

logger = logging.getLogger(__name__)

CATEGORIES = ("harmless", "helpful", "honest", "other")


def _pair(input_text, target_scores) -> tuple[list[dict], str, str]:
    """(prompt, chosen, rejected) from an example's input and {answer: 1 or 0}."""
    text = check_text(input_text, "input")
    if not isinstance(target_scores, Mapping):
        raise Drop("missing target_scores" if target_scores is None else "bad target_scores")
    if len(target_scores) != 2:
        raise Drop("not two answers")
    scores = {answer: check_label(s, "target_scores") for answer, s in target_scores.items()}
    good = [a for a, s in scores.items() if s == 1]
    bad = [a for a, s in scores.items() if s == 0]
    if len(good) == 2 or len(bad) == 2:
        raise Drop("tie")
    if len(good) != 1 or len(bad) != 1:
        raise Drop("unparsable target_scores")
    # the first human turn has no marker; later turns are "\n\nAssistant:" / "\n\nHuman:"
    return parse_transcript("\n\nHuman: " + text), good[0], bad[0]


def load_hhh_alignment(path: str | Path | None = None) -> Loaded:
    """HHH from ``<path>/{harmless,helpful,honest,other}.json`` (default ``<data>/hhh_alignment``).

    chosen = the answer with target score 1, rejected = the one with 0, category = the file
    stem. Without a local folder it falls back to the hub (``HuggingFaceH4/hhh_alignment``).
    """
    folder = Path(path) if path is not None else data_dir() / "hhh_alignment"
    col = Collector("hhh_alignment", "hhh_alignment")
    for cat in CATEGORIES:
        for rid, inp, ts in _examples(folder, cat, hub=path is None and not folder.exists()):
            with col.row(rid):
                prompt, chosen, rejected = _pair(inp, ts)
                col.pair(rid, prompt, chosen, rejected, category=cat)
    return col.finish(logger)


def _examples(folder: Path, cat: str, hub: bool):
    """(row id, input, target_scores) for one category, from the local json or the hub."""
    if hub:
        ds = load_hub(HUB_IDS["hhh"], folder, name=cat, split="test")
        for i, r in enumerate(ds):
            t = r.get("targets") or {}
            yield f"{HUB_IDS['hhh']}/{cat}:test:{i}", r.get("input"), dict(zip(t.get("choices", []), t.get("labels", [])))
        return
    f = folder / f"{cat}.json"
    task = read_json(f)
    if not isinstance(task, Mapping) or not isinstance(task.get("examples"), list):
        raise DataError(f, "expected a BIG-bench task object with an 'examples' list", line=1, field="examples")
    if not task["examples"]:
        raise DataError(f, "the 'examples' list is empty", line=1, field="examples")
    name = display_name(f)
    for i, ex in enumerate(task["examples"]):
        if not isinstance(ex, Mapping):
            raise DataError(f, f"example is a {type(ex).__name__}, expected an object", line=i + 1,
                            unit="example", field="examples")
        yield f"{name}:{i}", ex.get("input"), ex.get("target_scores")
