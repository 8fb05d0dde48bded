"""Loaders for every preference source into one normalized pairwise schema.

Every loader returns ``Loaded(dataset, drops)``: a ``datasets.Dataset`` (``PAIR_FEATURES``
unless stated) and a ``DropReport`` counting each dropped row by reason. Odd rows are
dropped and counted; a file that cannot be read raises ``DataError`` (a ValueError) naming
the file, the 1-based line/row and, for field problems, the field. Local copies are read
from ``rmlib.core.paths.data_dir()``; without one, sources with a hub id fall back to
``datasets.load_dataset``.
"""

from .alpaca_eval import (
    RESPONSE_FEATURES,
    alpaca_eval_pairs,
    load_alpaca_eval_responses,
)
from .drop_report import DropReport, Loaded
from .errors import DataError
from .files import load_preference_file
from .hh_rlhf import load_hh_rlhf
from .hhh import load_hhh_alignment
from .hub import HUB_IDS, from_message_pairs, load_hub_pairs
from .lfqa import load_lfqa_expert
from .mt_bench import (
    QUESTION_FEATURES,
    load_mt_bench_human_judgments,
    load_mt_bench_questions,
)
from .reward_bench import (
    EXAMPLE_COUNTS,
    SUBSET_MAPPING,
    SUBSET_TO_SECTION,
    load_reward_bench,
    section_scores,
)
from .schema import PAIR_COLUMNS, PAIR_FEATURES, pair_row, to_dataset
from .sources import LOADERS, load_source
from .splits import train_eval_split
from .transcript import parse_transcript

__all__ = [
    "DataError", "DropReport", "Loaded", "PAIR_FEATURES", "PAIR_COLUMNS", "RESPONSE_FEATURES",
    "QUESTION_FEATURES", "pair_row", "to_dataset", "parse_transcript",
    "load_hh_rlhf", "load_alpaca_eval_responses", "alpaca_eval_pairs", "load_hhh_alignment",
    "load_lfqa_expert", "load_mt_bench_questions", "load_mt_bench_human_judgments",
    "load_reward_bench", "SUBSET_MAPPING", "SUBSET_TO_SECTION", "EXAMPLE_COUNTS", "section_scores",
    "load_preference_file", "from_message_pairs", "load_hub_pairs", "HUB_IDS", "LOADERS", "load_source", "train_eval_split",
]
