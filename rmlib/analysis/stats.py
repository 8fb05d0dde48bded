"""Statistics shared by the analyses: bootstrap intervals (percentile, seeded per group),
pairwise accuracy tables, Kendall tau-b per prompt (``scipy.stats.kendalltau``), seed
aggregation. Numbers only; verdicts are ``rmlib.analysis.claims``.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import numpy as np
import pandas as pd
import scipy.stats

OVERALL = "overall"


SKIPPED = "skipped"


TABLE_COLUMNS = ["category", "n", "accuracy", "ci_low", "ci_high"]


CI_LEVEL = 0.95




# ---- bootstrap helpers ---------------------------------------------------------------------
def group_rng(seed: int, key: str) -> np.random.Generator:
    """A generator fixed by (seed, key): a group's interval does not depend on the other groups."""
    return np.random.default_rng([int(seed), zlib.crc32(str(key).encode())])


def bootstrap_accuracy(correct, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """``n_boot`` bootstrap draws of the accuracy of ``correct`` (0/1 per pair), pairs resampled
    with replacement (drawn as Binomial(n, p_hat) / n, the exact same distribution)."""
    correct = np.asarray(correct, dtype=float)
    n = len(correct)
    if n == 0 or n_boot <= 0:
        return np.empty(0)
    return rng.binomial(n, correct.mean(), size=n_boot) / n


def bootstrap_mean(values, n_boot: int, rng: np.random.Generator, chunk: int = 256) -> np.ndarray:
    """``n_boot`` bootstrap draws of the mean of ``values`` (resampled with replacement)."""
    values = np.asarray(values, dtype=float)
    n = len(values)
    if n == 0 or n_boot <= 0:
        return np.empty(0)
    out = np.empty(n_boot)
    for start in range(0, n_boot, chunk):  # (chunk, n) index blocks keep memory bounded
        k = min(chunk, n_boot - start)
        out[start : start + k] = values[rng.integers(0, n, size=(k, n))].mean(axis=1)
    return out


def percentile_interval(draws, level: float = CI_LEVEL) -> tuple[float, float]:
    """(low, high) percentile interval of bootstrap draws; NaNs when there are none."""
    draws = np.asarray(draws, dtype=float)
    if draws.size == 0:
        return math.nan, math.nan
    lo, hi = np.percentile(draws, [50 * (1 - level), 50 * (1 + level)])
    return float(lo), float(hi)


# ---- pairwise accuracy ---------------------------------------------------------------------
def correct_pairs(chosen_scores, rejected_scores) -> np.ndarray:
    """r_c > r_r per pair (bool); ties and NaNs are wrong."""
    c = np.asarray(chosen_scores, dtype=float)
    r = np.asarray(rejected_scores, dtype=float)
    if c.shape != r.shape or c.ndim != 1:
        raise ValueError(f"chosen and rejected scores must be 1-d of equal length, got {c.shape} and {r.shape}")
    with np.errstate(invalid="ignore"):
        return c > r


def _accuracy_row(category: str, correct: np.ndarray, n_boot: int, seed: int) -> dict:
    n = len(correct)
    acc = float(correct.mean()) if n else math.nan
    lo, hi = percentile_interval(bootstrap_accuracy(correct, n_boot, group_rng(seed, category)))
    return {"category": category, "n": n, "accuracy": acc, "ci_low": lo, "ci_high": hi}


def pairwise_accuracy_table(chosen_scores, rejected_scores, categories: Sequence[str] | None = None,
                            n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Tidy accuracy table: one row per category (sorted) and one "overall" row.

    Columns: category, n, accuracy, ci_low, ci_high. accuracy = mean(r_c > r_r) with TIES
    COUNTED AS WRONG; the interval is the 95% bootstrap percentile interval over pairs
    (within the category), deterministic given ``seed``. With ``categories=None`` or a single
    distinct category only the overall row is returned. ``n_boot=0``: no interval (NaN).
    """
    correct = correct_pairs(chosen_scores, rejected_scores)
    rows = []
    if categories is not None:
        cats = np.asarray(list(categories), dtype=object)
        if len(cats) != len(correct):
            raise ValueError(f"{len(cats)} categories for {len(correct)} pairs")
        distinct = sorted(set(cats.tolist()), key=str)
        if len(distinct) > 1:
            rows = [_accuracy_row(str(c), correct[cats == c], n_boot, seed) for c in distinct]
    rows.append(_accuracy_row(OVERALL, correct, n_boot, seed))
    return pd.DataFrame(rows, columns=TABLE_COLUMNS)


# ---- Kendall tau-b -------------------------------------------------------------------------
def kendall_tau_b(x, y) -> float:
    """Kendall's tau-b with the tie correction (``scipy.stats.kendalltau``, variant "b").

    tau_b = (n_c - n_d) / sqrt((n_0 - n_1) (n_0 - n_2)), n_0 = n(n-1)/2 pairs, n_1 / n_2 =
    pairs tied in x / in y. NaN when undefined: fewer than 2 items, or x or y constant. A NaN
    in the input raises (scipy would return NaN); O(n log n).
    """
    x = np.asarray(x, dtype=float).ravel()
    y = np.asarray(y, dtype=float).ravel()
    if len(x) != len(y):
        raise ValueError(f"x and y must have the same length, got {len(x)} and {len(y)}")
    if np.isnan(x).any() or np.isnan(y).any():
        raise ValueError("kendall_tau_b: NaN in the input")
    if len(x) < 2:
        return math.nan  # scipy returns NaN too, with a SmallSampleWarning
    return float(scipy.stats.kendalltau(x, y, variant="b").statistic)  # NaN when x or y is constant


def per_prompt_taus(df: pd.DataFrame, prompt_col: str, score_col: str, gold_col: str) -> pd.Series:
    """tau-b of ``score_col`` vs ``gold_col`` over each prompt's rows (index: prompt, sorted);
    NaN where undefined (one row, gold constant, or scores constant)."""
    taus = {p: kendall_tau_b(g[score_col].to_numpy(float), g[gold_col].to_numpy(float))
            for p, g in df.groupby(prompt_col, sort=True)}
    return pd.Series(taus, dtype=float, name="kendall_tau_b")


def seed_aggregate(table: pd.DataFrame, keys: Sequence[str], value: str = "value") -> pd.DataFrame:
    """Mean over seeds of ``value`` (and of ``ci_low``/``ci_high`` when present) per ``keys``;
    ``seed_std`` (ddof=1; NaN for one seed) and ``n_seeds``."""
    keys = list(keys)
    missing = [c for c in [*keys, value] if c not in table.columns]
    if missing:
        raise ValueError(f"table lacks columns {missing}; has {list(table.columns)}")
    agg = {value: "mean"}
    if "ci_low" in table and "ci_high" in table:
        agg.update(ci_low="mean", ci_high="mean")
    grouped = table.groupby(keys, sort=False)
    out = grouped.agg(agg)
    out["seed_std"] = grouped[value].std(ddof=1)
    out["n_seeds"] = grouped[value].count()
    return out.reset_index()
