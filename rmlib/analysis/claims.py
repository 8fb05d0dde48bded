"""Seed aggregation and honest variant-vs-baseline verdicts for the result tables.

Every experiment notebook ends in a tidy table with one row per (variant, seed, metric...) and
a ``value`` with its 95% bootstrap interval (``ci_low``, ``ci_high``). ``seed_aggregate`` averages
over seeds; ``versus_baseline`` states, per metric, whether a variant is above or below the
baseline by more than the noise, where the noise of a difference is the larger of the two
mean interval half-widths and, with several seeds, the seed spread. Verdicts are computed, never
typed: the README and notebooks quote them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

HIGHER, LOWER, TIE = "higher", "lower", "within noise"


def versus_baseline(agg: pd.DataFrame, baseline: str, by: str = "variant", metric_keys: Sequence[str] = ("metric",),
                    value: str = "value") -> pd.DataFrame:
    """Each variant's difference to ``baseline`` per metric (``metric_keys``) and a verdict:
    ``higher``/``lower`` when |difference| exceeds the noise, else ``within noise``.

    noise = max(half-width of the baseline's mean interval, half-width of the variant's, seed
    std of either) — a deliberately conservative bar for small CPU-scale runs."""
    metric_keys = list(metric_keys)
    if baseline not in set(agg[by]):
        raise ValueError(f"baseline {baseline!r} is not among {sorted(set(agg[by]))}")
    half = (agg["ci_high"] - agg["ci_low"]) / 2 if "ci_low" in agg else pd.Series(0.0, index=agg.index)
    a = agg.assign(_half=half.fillna(0.0), _std=agg.get("seed_std", pd.Series(0.0, index=agg.index)).fillna(0.0))
    base = a[a[by] == baseline].set_index(metric_keys)
    rows = []
    for _, r in a[a[by] != baseline].iterrows():
        key = tuple(r[k] for k in metric_keys)
        key = key[0] if len(key) == 1 else key
        if key not in base.index:
            continue
        b = base.loc[key]
        diff = float(r[value] - b[value])
        noise = float(max(b["_half"], r["_half"], b["_std"], r["_std"]))
        verdict = TIE if abs(diff) <= noise or not np.isfinite(diff) else (HIGHER if diff > 0 else LOWER)
        rows.append({by: r[by], **{k: r[k] for k in metric_keys}, "value": float(r[value]),
                     "baseline": float(b[value]), "difference": diff, "noise": noise, "verdict": verdict})
    return pd.DataFrame(rows)


REPRODUCED, NOT_AT_SCALE, OPPOSITE, NOT_RUN = "reproduced", "not at this scale", "opposite", "not run"


REL_TOL = 0.05  # single-seed direction claims: a relative difference under 5% counts as no effect


def verdict_from_comparison(verdict: str, paper_direction: str = "higher") -> str:
    if verdict == "within noise":
        return NOT_AT_SCALE
    return REPRODUCED if verdict == paper_direction else OPPOSITE


def relative_verdict(value: float, baseline: float, want_lower: bool = True) -> str:
    """Single-seed comparison: a relative difference beyond REL_TOL in the paper's direction."""
    if not (math.isfinite(value) and math.isfinite(baseline)) or baseline == 0:
        return NOT_AT_SCALE
    rel = (value - baseline) / abs(baseline)
    if abs(rel) <= REL_TOL:
        return NOT_AT_SCALE
    return REPRODUCED if (rel < 0) == want_lower else OPPOSITE
