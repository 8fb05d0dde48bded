"""MT-Bench: the 80 questions (local) and the human pairwise judgments (hub only)."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path

from datasets import Features, List, Value

from rmlib.core.paths import data_dir

from .drop_report import Loaded
from .errors import DataError, Drop
from .hub import HUB_IDS, load_hub
from .pairs import (
    Collector,
    check_encodable,
    check_label,
    check_messages,
    check_text,
    opt_text,
)
from .readers import display_name, read_jsonl

logger = logging.getLogger(__name__)

QUESTION_FEATURES = Features({
    "question_id": Value("int64"),
    "category": Value("string"),
    "turns": List(Value("string")),
    "reference": List(Value("string")),         # short reference in question.jsonl ([] if none)
    "reference_answer": List(Value("string")),  # GPT-4 reference answer turns ([] if none)
})
WINNERS = {"model_a": "a", "model_b": "b"}


def load_mt_bench_questions(path: str | Path | None = None) -> Loaded:
    """``question.jsonl`` (+ ``reference_answer_gpt-4.jsonl`` if present) in ``path``
    (default ``<data>/mt_bench``) as a prompt table."""
    folder = Path(path) if path is not None else data_dir() / "mt_bench"
    qfile, rfile = folder / "question.jsonl", folder / "reference_answer_gpt-4.jsonl"
    refs: dict[int, list[str]] = {}
    if rfile.exists():
        for n, rec in read_jsonl(rfile):
            try:
                qid, turns = _question_id(rec["question_id"]), rec["choices"][0]["turns"]
            except (TypeError, KeyError, IndexError, ValueError, Drop):
                raise DataError(rfile, "expected an integer question_id and choices[0].turns", line=n,
                                field="choices") from None
            if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
                raise DataError(rfile, "choices[0].turns must be a list of strings", line=n, field="choices")
            try:
                turns = [check_encodable(t, "choices") for t in turns]
            except Drop:
                raise DataError(rfile, "choices[0].turns holds text with no UTF-8 form", line=n, field="choices") from None
            refs[qid] = list(turns)
    col = Collector("mt_bench questions", "mt_bench", QUESTION_FEATURES)
    name = display_name(qfile)
    seen: set[int] = set()
    for n, rec in read_jsonl(qfile):
        if not isinstance(rec, Mapping):
            raise DataError(qfile, f"expected a JSON object, got {type(rec).__name__}", line=n)
        with col.row(f"{name}:{n - 1}"):
            qid = _question_id(rec.get("question_id"))
            turns = rec.get("turns")
            if not isinstance(turns, list) or not turns:
                raise Drop("missing turns" if turns is None else "bad turns")
            reference = rec.get("reference")  # short reference answers; "" for a turn without one
            if reference is not None and not isinstance(reference, list):
                raise Drop("bad reference")
            if not all(isinstance(t, str) for t in reference or []):
                raise Drop("non-string reference")
            row = {"question_id": qid, "category": opt_text(rec.get("category"), "category"),
                   "turns": [check_text(t, "turns") for t in turns],
                   "reference": [check_encodable(t, "reference") for t in reference or []],
                   "reference_answer": refs.get(qid, [])}
            if qid in seen:
                raise Drop("duplicate question_id")
            seen.add(qid)
            col.rows.append(row)
    return col.finish(logger)


def _question_id(value) -> int:
    """An integer id (int, integral float or numeric string) that fits int64, else Drop."""
    x = check_label(value, "question_id")
    if not x.is_integer():
        raise Drop("unparsable question_id")
    if abs(x) >= 2**63:
        raise Drop("question_id out of range")
    return int(x)


def _question_categories() -> dict[int, str]:
    try:
        qs = load_mt_bench_questions().dataset
    except DataError:
        return {}
    return dict(zip(qs["question_id"], qs["category"]))


def load_mt_bench_human_judgments(source: Iterable[Mapping] | None = None, split: str = "human") -> Loaded:
    """``lmsys/mt_bench_human_judgments`` (hub only; or rows in its schema as ``source``).

    The judged turn's reply (turn 1 or 2) is chosen/rejected; the prompt is the conversation
    before it. Ties are DROPPED ("tie"); turn-2 rows whose first-turn answers differ between
    the two models have no shared prompt and are dropped ("turn-2 history differs").
    category = the question's MT-Bench category when the local question file is there.
    """
    hub_id = HUB_IDS["mt_bench"]
    rows = load_hub(hub_id, split=split) if source is None else source
    cats = _question_categories()
    col = Collector(f"mt_bench_human_judgments/{split}", "mt_bench_human")
    for i, rec in enumerate(rows):
        rid = f"{hub_id}:{split}:{i}"
        with col.row(rid):
            if not isinstance(rec, Mapping):
                raise Drop("not an object")
            winner = rec.get("winner")
            if isinstance(winner, str) and winner.startswith("tie"):
                raise Drop("tie")
            if winner not in WINNERS:
                raise Drop("unknown winner")
            turn = check_label(rec.get("turn"), "turn")
            if turn not in (1, 2):
                raise Drop("unexpected turn")
            k = 2 * int(turn)
            conv = {}
            for side in "ab":
                msgs = check_messages(rec.get(f"conversation_{side}"), f"conversation_{side}", check_empty=False)
                if len(msgs) < k or msgs[k - 1]["role"] != "assistant":
                    raise Drop("conversation too short")
                conv[side] = msgs[:k]
            if conv["a"][: k - 1] != conv["b"][: k - 1]:
                raise Drop("turn-2 history differs" if k == 4 else "prefix differs")
            w = WINNERS[winner]
            l = "b" if w == "a" else "a"
            qid = rec.get("question_id")
            col.pair(rid, conv[w][: k - 1], conv[w][k - 1]["content"], conv[l][k - 1]["content"],
                     category=cats.get(qid, "") if isinstance(qid, int) else "",
                     chosen_generator=rec.get(f"model_{w}"), rejected_generator=rec.get(f"model_{l}"))
    return col.finish(logger)
