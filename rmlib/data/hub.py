"""Hub ids, the hub fallback, and a converter for message-list preference datasets."""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from pathlib import Path

from .drop_report import Loaded
from .errors import DataError, Drop
from .pairs import MISSING, Collector, check_score

logger = logging.getLogger(__name__)

HUB_IDS = {
    "hh-rlhf": "Anthropic/hh-rlhf",
    "hhh": "HuggingFaceH4/hhh_alignment",
    "mt_bench": "lmsys/mt_bench_human_judgments",
    "reward_bench": "allenai/reward-bench",
    "skywork": "Skywork/Skywork-Reward-Preference-80K-v0.2",
    "unified_feedback": "llm-blender/Unified-Feedback",
    "ultrafeedback-train": "rm-robustness/ultrafeedback-train",
    "ultrafeedback-valid-1-in-domain": "rm-robustness/ultrafeedback-valid-1-in-domain",
    "ultrafeedback-valid-2-prompt-ood": "rm-robustness/ultrafeedback-valid-2-prompt-ood",
    "ultrafeedback-valid-3-response-ood": "rm-robustness/ultrafeedback-valid-3-response-ood",
    "ultrafeedback-valid-4-mutual-ood": "rm-robustness/ultrafeedback-valid-4-mutual-ood",
}

# optional score / generator columns seen in message-list preference datasets
_SCORE_KEYS = (("chosen_score", "rejected_score"), ("score_chosen", "score_rejected"),
               ("chosen-rating", "rejected-rating"), ("chosen_rating", "rejected_rating"))
_MODEL_KEYS = (("chosen_generator", "rejected_generator"), ("chosen_model", "rejected_model"),
               ("chosen-model", "rejected-model"))


def load_hub(hub_id: str, local: str | Path | None = None, **kwargs):
    """``datasets.load_dataset(hub_id, **kwargs)``; DataError naming the local path and hub id."""
    try:
        import datasets  # lazy: only the hub fallback needs it

        return datasets.load_dataset(hub_id, **kwargs)
    except Exception as e:
        where = f"no local copy at {local}, and " if local is not None else ""
        raise DataError(local if local is not None else hub_id,
                        f"{where}loading hub dataset {hub_id!r} ({kwargs}) failed: {type(e).__name__}: {e}") from e


def _first(row: Mapping, pairs) -> tuple:
    for a, b in pairs:
        if a in row or b in row:
            return row.get(a), row.get(b)
    return None, None


def from_message_pairs(rows: Iterable[Mapping], name: str, source: str | None = None) -> Loaded:
    """Convert rows with ``chosen``/``rejected`` message lists (Skywork, rm-robustness
    UltraFeedback; an optional ``prompt``) or ``conv_A``/``conv_B`` with ratings
    (Unified-Feedback) to the schema. Prompt = all but the last message, replies = the
    last assistant message; a ``source`` column becomes ``category``.
    """
    col = Collector(name, source or name)
    for i, row in enumerate(rows):
        rid = f"{name}:{i}"
        with col.row(rid):
            if not isinstance(row, Mapping):
                raise Drop("not an object")
            if "conv_A" in row:  # Unified-Feedback: the higher-rated conversation is chosen
                a = check_score(row.get("conv_A_rating"), "conv_A_rating")
                b = check_score(row.get("conv_B_rating"), "conv_B_rating")
                if a != a or b != b:
                    raise Drop("missing rating")
                if a == b:
                    raise Drop("tie")
                (c, cs), (r, rs) = sorted([(row["conv_A"], a), (row.get("conv_B"), b)], key=lambda t: -t[1])
            else:
                (c, r), (cs, rs) = (row.get("chosen", MISSING), row.get("rejected", MISSING)), _first(row, _SCORE_KEYS)
            cg, rg = _first(row, _MODEL_KEYS)
            col.pair(rid, row.get("prompt", MISSING), c, r, category=row.get("source"),
                     chosen_generator=cg, rejected_generator=rg, chosen_score=cs, rejected_score=rs)
    return col.finish(logger)


def load_hub_pairs(hub_id: str, split: str = "train", **kwargs) -> Loaded:
    """Load a message-list preference dataset from the hub and convert it."""
    ds = load_hub(hub_id, split=split, **kwargs)
    return from_message_pairs(ds, name=f"{hub_id}:{split}", source=hub_id)
