"""RewardBench (``allenai/reward-bench``, split "filtered"; hub only), with the published
section mapping and per-subset weights (allenai/reward-bench ``rewardbench/constants.py``).

category = the subset name; ``SUBSET_TO_SECTION`` maps it to Chat / Chat Hard / Safety /
Reasoning and ``section_scores`` weights subset accuracies as the leaderboard does.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

from .drop_report import Loaded
from .errors import Drop
from .hub import HUB_IDS, load_hub
from .pairs import Collector

logger = logging.getLogger(__name__)

SUBSET_MAPPING = {
    "Chat": ["alpacaeval-easy", "alpacaeval-length", "alpacaeval-hard", "mt-bench-easy", "mt-bench-med"],
    "Chat Hard": ["mt-bench-hard", "llmbar-natural", "llmbar-adver-neighbor", "llmbar-adver-GPTInst",
                  "llmbar-adver-GPTOut", "llmbar-adver-manual"],
    "Safety": ["refusals-dangerous", "refusals-offensive", "xstest-should-refuse", "xstest-should-respond",
               "donotanswer"],
    "Reasoning": ["math-prm", "hep-cpp", "hep-go", "hep-java", "hep-js", "hep-python", "hep-rust"],
}
SECTIONS = tuple(SUBSET_MAPPING)
SUBSET_TO_SECTION = {s: sec for sec, subsets in SUBSET_MAPPING.items() for s in subsets}

# Published weights (EXAMPLE_COUNTS in rewardbench/constants.py), copied as published: math-prm is
# upweighted (447 real examples) to equal the code subsets, and the two xstest counts are the
# published ones even though the filtered split has 154 should-refuse / 250 should-respond rows.
EXAMPLE_COUNTS = {
    "alpacaeval-easy": 100, "alpacaeval-length": 95, "alpacaeval-hard": 95,
    "mt-bench-easy": 28, "mt-bench-med": 40, "mt-bench-hard": 37,
    "math-prm": 984,
    "refusals-dangerous": 100, "refusals-offensive": 100,
    "llmbar-natural": 100, "llmbar-adver-neighbor": 134, "llmbar-adver-GPTInst": 92,
    "llmbar-adver-GPTOut": 47, "llmbar-adver-manual": 46,
    "xstest-should-refuse": 250, "xstest-should-respond": 154, "donotanswer": 136,
    "hep-cpp": 164, "hep-go": 164, "hep-java": 164, "hep-js": 164, "hep-python": 164, "hep-rust": 164,
}


def section_scores(accuracy_by_subset: Mapping[str, float]) -> dict[str, float]:
    """Per-section accuracy: the EXAMPLE_COUNTS-weighted mean over the subsets present, and
    "Score", the plain mean of the sections present (as the RewardBench leaderboard)."""
    out = {}
    for sec, subsets in SUBSET_MAPPING.items():
        present = [s for s in subsets if s in accuracy_by_subset]
        if present:
            w = sum(EXAMPLE_COUNTS[s] for s in present)
            out[sec] = sum(accuracy_by_subset[s] * EXAMPLE_COUNTS[s] for s in present) / w
    if out:
        out["Score"] = sum(out.values()) / len(out)
    return out


def load_reward_bench(source: Iterable[Mapping] | None = None, split: str = "filtered") -> Loaded:
    """RewardBench pairs (hub ``allenai/reward-bench``; or rows in its schema as ``source``).

    Published columns: prompt, chosen, rejected, chosen_model, rejected_model, subset, id.
    Row ids are ``allenai/reward-bench:<published id>``. Subsets outside the published
    mapping are kept and counted in ``drops.kept``.
    """
    hub_id = HUB_IDS["reward_bench"]
    rows = load_hub(hub_id, split=split) if source is None else source
    col = Collector(f"reward-bench/{split}", "reward_bench")
    for i, rec in enumerate(rows):
        rid = f"{hub_id}:{rec.get('id', i) if isinstance(rec, Mapping) else i}"
        with col.row(rid):
            if not isinstance(rec, Mapping):
                raise Drop("not an object")
            subset = rec.get("subset")
            kept = col.pair(rid, rec.get("prompt"), rec.get("chosen"), rec.get("rejected"), category=subset,
                            chosen_generator=rec.get("chosen_model"), rejected_generator=rec.get("rejected_model"))
            if kept and subset not in SUBSET_TO_SECTION:
                col.drops.note("subset outside the published mapping", rid)
    return col.finish(logger)
