"""``load_source(name)``: one entry point for every short name, hub id or file path."""

from __future__ import annotations

from pathlib import Path

from .alpaca_eval import alpaca_eval_pairs, load_alpaca_eval_responses
from .drop_report import Loaded
from .errors import DataError
from .files import load_preference_file
from .hh_rlhf import load_hh_rlhf
from .hhh import load_hhh_alignment
from .hub import HUB_IDS, load_hub_pairs
from .lfqa import load_lfqa_expert
from .mt_bench import load_mt_bench_human_judgments, load_mt_bench_questions
from .reward_bench import load_reward_bench


def _alpaca_pairs(path=None, **kw) -> Loaded:
    """Pairs; the report holds the responses' drops and the pairs skipped as identical."""
    responses, drops = load_alpaca_eval_responses(path)
    return Loaded(alpaca_eval_pairs(responses, drops=drops, **kw), drops)


LOADERS = {
    "hh-rlhf": load_hh_rlhf,
    "alpaca_eval": load_alpaca_eval_responses,   # one row per judged response (not pairwise)
    "alpaca_eval_pairs": _alpaca_pairs,          # kwargs go to alpaca_eval_pairs
    "hhh": load_hhh_alignment,
    "lfqa": load_lfqa_expert,
    "mt_bench": load_mt_bench_human_judgments,
    "mt_bench_questions": load_mt_bench_questions,
    "reward_bench": load_reward_bench,
}
_BY_HUB_ID = {hub_id: short for short, hub_id in HUB_IDS.items()}
_FILE_SUFFIXES = (".json", ".jsonl", ".parquet", ".gz")


def load_source(name: str, **kw) -> Loaded:
    """Load a source by short name (``LOADERS`` or ``HUB_IDS`` keys), hub id, or file path.

    Hub-only message-list sources (skywork, unified_feedback, ultrafeedback-*) go through
    ``load_hub_pairs`` (kwargs: split, ...); a path goes to ``load_preference_file``.
    """
    short = _BY_HUB_ID.get(name, name)
    if short in LOADERS:
        return LOADERS[short](**kw)
    if short in HUB_IDS:
        return load_hub_pairs(HUB_IDS[short], **kw)
    p = Path(name)
    if p.exists() or p.name.lower().endswith(_FILE_SUFFIXES):
        return load_preference_file(p, **kw)
    raise DataError(name, f"unknown source; use a path, a hub id or one of {sorted(set(LOADERS) | set(HUB_IDS))}")
