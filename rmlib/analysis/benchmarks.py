"""Evaluation: pairwise accuracy with bootstrap intervals, Kendall tau-b, and the benchmark registry.

Conventions used everywhere in this module:

- Pairwise accuracy = mean(r_c > r_r). A TIE (r_c == r_r) COUNTS AS WRONG: a reward model
  that cannot tell two replies apart has not ranked them (a NaN reward is wrong too).
- Intervals are 95% bootstrap percentile intervals, deterministic given ``seed``. Accuracy is
  resampled over pairs; since resampling n 0/1 outcomes with replacement and averaging is
  distributed exactly as Binomial(n, p_hat) / n, the draws are taken from that binomial
  (same distribution as resampling indices, O(n_boot) instead of O(n_boot * n)).
- Every benchmark is scored the way its authors define it (``BENCHMARKS``); the headline
  number of each benchmark is its ``category == "overall"`` row.

Scoring is injectable: a *pair scorer* is any function ``(pairs Dataset) -> (r_c, r_r)``
returning one reward per pair and side, in input order. ``model_pair_scorer`` builds one
from a reward model; tests pass stubs to check the bookkeeping without a model.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from rmlib.analysis.stats import (
    OVERALL,
    SKIPPED,
    TABLE_COLUMNS,
    _accuracy_row,
    bootstrap_accuracy,
    correct_pairs,
    group_rng,
    pairwise_accuracy_table,
    percentile_interval,
)
from rmlib.data import (
    SUBSET_MAPPING,
    SUBSET_TO_SECTION,
    DataError,
    Loaded,
    load_hh_rlhf,
    load_hhh_alignment,
    load_lfqa_expert,
    load_mt_bench_human_judgments,
    load_reward_bench,
    section_scores,
)
from rmlib.model.encoding import encode_pairs
from rmlib.model.scoring import score_pairs

logger = logging.getLogger(__name__)


BENCHMARK_COLUMNS = ["benchmark", *TABLE_COLUMNS, "note"]


PairScorer = Callable[..., tuple[np.ndarray, np.ndarray]]


# ---- scoring pairs with a model ------------------------------------------------------------
def model_pair_scorer(model, tokenizer, max_length: int = 256, batch_size: int = 8, bf16: bool | str = "auto",
                      progress: bool = True) -> PairScorer:
    """A pair scorer backed by ``encode_pairs`` + ``score_pairs`` (prompt cut from the left).

    Pairs whose two replies are identical after truncation to ``max_length`` cannot be told
    apart by the model: they get NaN rewards (so they count as wrong) and are logged.
    """

    def score(pairs) -> tuple[np.ndarray, np.ndarray]:
        n = len(pairs)
        c, r = np.full(n, np.nan), np.full(n, np.nan)
        if n == 0:
            return c, r
        keep = [k for k in ("id", "prompt", "chosen", "rejected") if k in pairs.column_names]
        ds = pairs.select_columns(keep).add_column("_row", list(range(n)))
        enc, stats = encode_pairs(ds, tokenizer, max_length)
        if stats.dropped_identical_after_truncation:
            logger.warning("%d of %d pairs have identical replies after truncation to %d tokens; they count as "
                           "wrong (e.g. %s)", len(stats.dropped_identical_after_truncation), n, max_length,
                           stats.dropped_identical_after_truncation[:3])
        if len(enc):
            out = score_pairs(model, enc, batch_size=batch_size, bf16=bf16, progress=progress)
            rows = np.asarray(enc["_row"])
            c[rows], r[rows] = out["chosen"], out["rejected"]
        return c, r

    return score


def pair_scores_frame(pairs, chosen_rewards, rejected_rewards, benchmark: str) -> pd.DataFrame:
    """Per-pair rewards: benchmark, id, category, reward_chosen, reward_rejected, correct."""
    c, r = np.asarray(chosen_rewards, float), np.asarray(rejected_rewards, float)
    if len(c) != len(pairs) or len(r) != len(pairs):
        raise ValueError(f"scorer returned {len(c)}/{len(r)} rewards for {len(pairs)} pairs")
    cats = pairs["category"] if "category" in pairs.column_names else [""] * len(pairs)
    ids = pairs["id"] if "id" in pairs.column_names else [str(i) for i in range(len(pairs))]
    return pd.DataFrame({"benchmark": benchmark, "id": ids, "category": cats, "reward_chosen": c,
                         "reward_rejected": r, "correct": correct_pairs(c, r)})


def evaluate_pairs(model, tokenizer, pairs_dataset, name: str, max_length: int = 256, batch_size: int = 8,
                   bf16: bool | str = "auto", n_boot: int = 1000, seed: int = 0, scorer: PairScorer | None = None,
                   progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Encode, score and tabulate a pair dataset (normalized schema).

    Returns (per-pair scores, accuracy table): the first from ``pair_scores_frame``, the second
    ``pairwise_accuracy_table`` by category with a leading ``benchmark`` column = ``name``.
    ``scorer`` replaces the model (``model``/``tokenizer`` may then be None).
    """
    scorer = scorer or model_pair_scorer(model, tokenizer, max_length, batch_size, bf16, progress)
    c, r = scorer(pairs_dataset)
    scores = pair_scores_frame(pairs_dataset, c, r, name)
    table = pairwise_accuracy_table(scores["reward_chosen"], scores["reward_rejected"], scores["category"],
                                    n_boot=n_boot, seed=seed)
    table.insert(0, "benchmark", name)
    return scores, table


# ---- benchmark-specific summaries ----------------------------------------------------------
def _overall_only(scores: pd.DataFrame, n_boot: int, seed: int) -> pd.DataFrame:
    return pairwise_accuracy_table(scores["reward_chosen"], scores["reward_rejected"], None, n_boot, seed)


def _by_category(scores: pd.DataFrame, n_boot: int, seed: int) -> pd.DataFrame:
    return pairwise_accuracy_table(scores["reward_chosen"], scores["reward_rejected"], scores["category"],
                                   n_boot, seed)


def reward_bench_table(scores: pd.DataFrame, n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """RewardBench as published: accuracy per subset; per section (Chat, Chat Hard, Safety,
    Reasoning) the EXAMPLE_COUNTS-weighted mean of its subsets (``section_scores``); and the
    leaderboard score, the plain mean of the sections, in the ``overall`` row.

    Section and overall intervals propagate the per-subset bootstrap draws through the same
    weighting. The pooled accuracy over all pairs is NOT reported: it is not RewardBench's
    metric. Subsets outside the published mapping get a row but count in no section.
    """
    correct = correct_pairs(scores["reward_chosen"], scores["reward_rejected"])
    cats = scores["category"].to_numpy(object)
    known = [s for subsets in SUBSET_MAPPING.values() for s in subsets]
    present = [s for s in known if (cats == s).any()] + sorted({c for c in cats if c not in SUBSET_TO_SECTION})
    rows, acc, draws, n_of = [], {}, {}, {}
    for s in present:
        row = _accuracy_row(s, correct[cats == s], n_boot, seed)
        rows.append(row)
        if s in SUBSET_TO_SECTION:
            acc[s], n_of[s] = row["accuracy"], row["n"]
            draws[s] = bootstrap_accuracy(correct[cats == s], n_boot, group_rng(seed, s))
    point = section_scores(acc)
    boot = [section_scores({s: d[b] for s, d in draws.items()}) for b in range(n_boot if draws else 0)]
    for sec in [*SUBSET_MAPPING, "Score"]:
        if sec not in point:
            continue
        lo, hi = percentile_interval([b[sec] for b in boot])
        n = sum(n_of[s] for s in acc if sec == "Score" or SUBSET_TO_SECTION[s] == sec)
        rows.append({"category": OVERALL if sec == "Score" else sec, "n": n, "accuracy": point[sec],
                     "ci_low": lo, "ci_high": hi})
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


# ---- the registry --------------------------------------------------------------------------
@dataclass(frozen=True)
class Benchmark:
    """How to load a benchmark and turn per-pair scores into its published metric(s).

    ``load(source)``: ``source`` None = the default location (local copy or hub); for hub-only
    benchmarks it may be rows in the published hub schema, for local ones a path.
    ``summarize(per_pair_scores, n_boot, seed)`` -> rows (category, n, accuracy, ci_low, ci_high).
    """

    name: str
    load: Callable[..., Loaded]
    summarize: Callable[[pd.DataFrame, int, int], pd.DataFrame]
    hub_only: bool
    description: str


BENCHMARKS: dict[str, Benchmark] = {b.name: b for b in [
    Benchmark("hh_harmless", lambda source=None: load_hh_rlhf("harmless-base", "test", path=source), _overall_only,
              False, "Anthropic HH-RLHF harmless-base test pairs (local copy); accuracy"),
    Benchmark("hhh", lambda source=None: load_hhh_alignment(source), _by_category, False,
              "BIG-bench HHH alignment (GRM's OOD set); accuracy per harmless/helpful/honest/other + overall"),
    Benchmark("lfqa", lambda source=None: load_lfqa_expert(source), _overall_only, False,
              "expert long-form QA preferences (bcdnlp/PRD); accuracy"),
    Benchmark("mt_bench", lambda source=None: load_mt_bench_human_judgments(source), _by_category, True,
              "lmsys/mt_bench_human_judgments, human split only (hub only); accuracy with TIES DROPPED; turn-2 "
              "judgments whose two conversations differ before the judged turn are dropped by the loader; per "
              "MT-Bench category + overall. The official GRM code (rm_eval/load_eval_datasets.py, "
              "build_ood_eval_dataset) differs: it concatenates the human AND gpt4_pair splits, and it makes "
              "conversation_a chosen only if winner == 'model_a', so a tie ('tie', 'tie (bothbad)') counts as a "
              "model_b win (conversation_b chosen); it scores the whole conversations, not cut at the judged turn"),
    Benchmark("reward_bench", lambda source=None: load_reward_bench(source), reward_bench_table, True,
              "allenai/reward-bench, filtered split (hub only); accuracy per subset, sections Chat / Chat Hard / "
              "Safety / Reasoning with the published EXAMPLE_COUNTS weights; overall = mean of the sections"),
]}


def stratified_sample(labels: Sequence, k: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of a size-``k`` sample without replacement, allocated to the label groups
    in proportion to their sizes (largest remainder; ties broken at random)."""
    labels = np.asarray(list(labels), dtype=object)
    n = len(labels)
    if not 0 <= k <= n:
        raise ValueError(f"cannot sample {k} of {n}")
    groups = sorted(set(labels.tolist()), key=str)
    members = [np.flatnonzero(labels == g) for g in groups]
    quota = np.array([k * len(m) / n for m in members]) if n else np.zeros(0)
    base = np.floor(quota).astype(int)
    extra = k - int(base.sum())
    if extra:
        order = np.lexsort((rng.random(len(groups)), -(quota - base)))  # largest remainder first
        base[order[:extra]] += 1
    picked = [rng.choice(m, size=b, replace=False) for m, b in zip(members, base) if b]
    return np.sort(np.concatenate(picked)) if picked else np.zeros(0, dtype=int)


def subsample_pairs(pairs, max_pairs: int | None, seed: int = 0):
    """At most ``max_pairs`` pairs, chosen with ``seed``, stratified by category (proportional)."""
    if max_pairs is None or len(pairs) <= max_pairs:
        return pairs
    if max_pairs < 1:
        raise ValueError(f"max_pairs={max_pairs} must be >= 1 or None")
    cats = pairs["category"] if "category" in pairs.column_names else [""] * len(pairs)
    return pairs.select(stratified_sample(cats, max_pairs, np.random.default_rng(seed)).tolist())


def _skipped_row(name: str, reason: str) -> pd.DataFrame:
    return pd.DataFrame([{"benchmark": name, "category": SKIPPED, "n": 0, "accuracy": math.nan,
                          "ci_low": math.nan, "ci_high": math.nan, "note": reason}])


def evaluate_benchmarks(model, tokenizer, names: Sequence[str] | None = None, max_pairs: int | None = None,
                        seed: int = 0, max_length: int = 256, batch_size: int = 8, bf16: bool | str = "auto",
                        n_boot: int = 1000, sources: Mapping[str, object] | None = None,
                        scorer: PairScorer | None = None, progress: bool = True, return_scores: bool = False):
    """Score ``names`` (default: all of ``BENCHMARKS``) and return one tidy DataFrame.

    Columns: benchmark, category, n, accuracy, ci_low, ci_high, note. The headline of each
    benchmark is its ``overall`` row. A benchmark whose data cannot be loaded (hub-only data
    offline, a missing local copy) is NOT an error: it gets one row with category "skipped",
    n 0, NaN values and the reason in ``note``, and a logged warning. ``max_pairs`` keeps a
    deterministic (``seed``), category-stratified subsample per benchmark (smoke/cpu presets).
    ``sources`` maps a name to what its loader takes (hub rows, a path). With
    ``return_scores`` also the per-pair scores: (table, scores).
    """
    names = list(BENCHMARKS) if names is None else list(names)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise ValueError(f"unknown benchmark(s) {unknown}; known: {', '.join(BENCHMARKS)}")
    sources = sources or {}
    scorer = scorer or model_pair_scorer(model, tokenizer, max_length, batch_size, bf16, progress)
    tables, all_scores = [], []
    for name in names:
        bench = BENCHMARKS[name]
        try:
            pairs = bench.load(sources.get(name)).dataset
        except DataError as e:
            reason = f"data unavailable: {e}"
            logger.warning("benchmark %s skipped: %s", name, reason)
            tables.append(_skipped_row(name, reason))
            continue
        if len(pairs) == 0:
            logger.warning("benchmark %s skipped: no pairs after loading", name)
            tables.append(_skipped_row(name, "no pairs after loading"))
            continue
        n_all = len(pairs)
        pairs = subsample_pairs(pairs, max_pairs, seed)
        c, r = scorer(pairs)
        scores = pair_scores_frame(pairs, c, r, name)
        table = bench.summarize(scores, n_boot, seed)
        table.insert(0, "benchmark", name)
        table["note"] = f"subsample of {len(pairs)} of {n_all} pairs (seed {seed})" if len(pairs) < n_all else ""
        tables.append(table)
        all_scores.append(scores)
        logger.info("benchmark %s: %d pairs scored", name, len(pairs))
    out = pd.concat(tables, ignore_index=True)[BENCHMARK_COLUMNS] if tables else pd.DataFrame(columns=BENCHMARK_COLUMNS)
    if return_scores:
        return out, (pd.concat(all_scores, ignore_index=True) if all_scores else pd.DataFrame())
    return out


def ood_pairs(names: Sequence[str], max_pairs_each: int | None, seed: int = 0):
    """One out-of-distribution pair set: ``subsample_pairs`` of each named benchmark (at most
    ``max_pairs_each`` pairs, category-stratified, ``seed``) concatenated, with the columns they share.
    The OOD probe of the reward-model zoo (``rmlib.analysis.zoo``: HHH + LFQA)."""
    from datasets import concatenate_datasets

    if not names:
        raise ValueError("names is empty: give at least one benchmark")
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise ValueError(f"unknown benchmark(s) {unknown}; known: {', '.join(BENCHMARKS)}")
    parts = [subsample_pairs(BENCHMARKS[n].load().dataset, max_pairs_each, seed=seed) for n in names]
    shared = [c for c in parts[0].column_names if all(c in p.column_names for p in parts)]
    parts = [p.select_columns(shared) for p in parts]
    return concatenate_datasets([p.cast(parts[0].features) for p in parts])
