"""Verdicts: the one place where a measured difference becomes a statement about a paper's claim.

Every verdict rmlib prints (the notebooks' sentences, ``rmlib.analysis.bon.describe``,
``rmlib.analysis.rloo_curves.describe_runs``, ``rmlib.analysis.dispersion.dispersion_findings`` and
every line of the README's results section, ``rmlib.pipeline.report``) comes from one function
below; nothing else compares a difference with a threshold. Each returns one of

    REPRODUCED    the difference is beyond the rule's bar, in the paper's direction (``want``)
    NOT_AT_SCALE  "not at this scale": the difference is inside the bar (or cannot be told from noise)
    OPPOSITE      beyond the bar, against the paper's direction
    NOT_RUN       nothing to compare: the measurement is missing (NaN or None)

The rules (``want`` is the paper's direction, "higher" or "lower"):

1. ``z_verdict`` -- difference with a standard error (a paired difference across prompts, a change
   tracked against step 0, or two independent means, whose SEs combine as ``combined_sem``):
   beyond the bar when ``|d| > Z_95 * sem``. ``Z_95 = 1.96``, the two-sided 95% quantile of the
   standard normal, is the one z of the package. A non-finite sem cannot bound the noise: NOT_AT_SCALE.
2. ``noise_verdict`` -- seeded means with 95% bootstrap intervals (``versus_baseline``): beyond the
   bar when ``|d| > noise_bar(...)``, the largest of the two intervals' half-widths and the two seed
   standard deviations (a deliberately conservative bar for small CPU-scale runs).
3. ``relative_verdict`` -- one seed, no interval: beyond the bar when the relative difference
   ``|value - baseline| / |baseline|`` exceeds ``REL_TOL = 5%``.
4. ``bar_verdict`` -- a fixed bar a value must reach (the issue's sanity bar): REPRODUCED when
   ``value >= bar``, else NOT_AT_SCALE (falling short is no evidence of the opposite).
5. ``observed_verdict`` -- a yes/no shape the paper reports (a gold curve bending down): REPRODUCED
   when seen, else NOT_AT_SCALE.

``RULES`` states them in one line each; the README's results section quotes it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import pandas as pd

REPRODUCED, NOT_AT_SCALE, OPPOSITE, NOT_RUN = "reproduced", "not at this scale", "opposite", "not run"
VERDICTS = (REPRODUCED, NOT_AT_SCALE, OPPOSITE, NOT_RUN)

Z_95 = 1.96  # two-sided 95% quantile of the standard normal (scipy.stats.norm.ppf(0.975) = 1.95996)
REL_TOL = 0.05  # single-seed direction claims: a relative difference up to 5% counts as no effect

RULES = ("seeded comparisons use the noise bar of `rmlib.analysis.claims` (95% intervals and seed spread); "
         f"single-seed direction claims need a relative difference above {REL_TOL:.0%}; differences with a "
         f"standard error (Best-of-N, RLOO) must exceed {Z_95:g} SEM (95%, two-sided)")

# direction of a seeded comparison (``versus_baseline``'s verdict column), no paper direction implied
HIGHER, LOWER, TIE = "higher", "lower", "within noise"


def _missing(x) -> bool:
    return x is None or not math.isfinite(float(x))


def _direction(difference: float, want: str) -> str:
    if want not in ("higher", "lower"):
        raise ValueError(f"want must be 'higher' or 'lower', got {want!r}")
    return REPRODUCED if (difference > 0) == (want == "higher") else OPPOSITE


# -- rule 1: a difference and its standard error -------------------------------------------------
def combined_sem(*sems: float) -> float:
    """Standard error of a sum or difference of independent estimates: sqrt(sum of squares)."""
    return math.hypot(*(float(s) for s in sems))


def z_noise(sem: float) -> float:
    """The bar of ``z_verdict``: Z_95 standard errors."""
    return Z_95 * float(sem)


def z_verdict(difference: float, sem: float, want: str = "higher") -> str:
    """Rule 1: ``difference`` counts when ``|difference| > Z_95 * sem`` (two-sided 95%).

    A zero sem with a nonzero difference counts (every sample moved alike); a non-finite sem
    cannot bound the noise (NOT_AT_SCALE); a non-finite difference is NOT_RUN."""
    if _missing(difference):
        return NOT_RUN
    if _missing(sem) or abs(difference) <= z_noise(sem):
        return NOT_AT_SCALE
    return _direction(difference, want)


# -- rule 2: seeded means with 95% intervals -----------------------------------------------------
def noise_bar(half_widths: Sequence[float] = (), seed_stds: Sequence[float] = ()) -> float:
    """The noise of a difference between two seeded means: the largest of their 95% interval
    half-widths and seed standard deviations (missing ones count as 0)."""
    parts = [float(x) for x in (*half_widths, *seed_stds) if not _missing(x)]
    return max(parts, default=0.0)


def noise_verdict(difference: float, noise: float, want: str = "higher") -> str:
    """Rule 2: ``difference`` counts when ``|difference| > noise`` (``noise_bar``)."""
    if _missing(difference):
        return NOT_RUN
    if _missing(noise) or abs(difference) <= noise:
        return NOT_AT_SCALE
    return _direction(difference, want)


def versus_baseline(agg: pd.DataFrame, baseline: str, by: str = "variant", metric_keys: Sequence[str] = ("metric",),
                    value: str = "value") -> pd.DataFrame:
    """Each variant's difference to ``baseline`` per metric (``metric_keys``) with rule 2's bar
    (``noise``) and a direction: ``higher``/``lower`` when |difference| exceeds the noise, else
    ``within noise``. ``agg`` is ``rmlib.analysis.stats.seed_aggregate``'s table (``ci_low``,
    ``ci_high`` and ``seed_std`` are used when present)."""
    metric_keys = list(metric_keys)
    if baseline not in set(agg[by]):
        raise ValueError(f"baseline {baseline!r} is not among {sorted(set(agg[by]))}")
    half = (agg["ci_high"] - agg["ci_low"]) / 2 if "ci_low" in agg else pd.Series(math.nan, index=agg.index)
    a = agg.assign(_half=half, _std=agg.get("seed_std", pd.Series(math.nan, index=agg.index)))
    base = a[a[by] == baseline].set_index(metric_keys)
    direction = {REPRODUCED: HIGHER, OPPOSITE: LOWER, NOT_AT_SCALE: TIE, NOT_RUN: TIE}
    rows = []
    for _, r in a[a[by] != baseline].iterrows():
        key = tuple(r[k] for k in metric_keys)
        key = key[0] if len(key) == 1 else key
        if key not in base.index:
            continue
        b = base.loc[key]
        diff = float(r[value] - b[value])
        noise = noise_bar([b["_half"], r["_half"]], [b["_std"], r["_std"]])
        rows.append({by: r[by], **{k: r[k] for k in metric_keys}, "value": float(r[value]),
                     "baseline": float(b[value]), "difference": diff, "noise": noise,
                     "verdict": direction[noise_verdict(diff, noise, "higher")]})
    return pd.DataFrame(rows)


# -- rule 3: one seed, no interval ---------------------------------------------------------------
def relative_verdict(value: float, baseline: float, want: str) -> str:
    """Rule 3: ``value`` differs from ``baseline`` when ``|value - baseline| / |baseline| > REL_TOL``.

    A zero baseline has no relative scale (NOT_AT_SCALE); a missing value or baseline is NOT_RUN."""
    if _missing(value) or _missing(baseline):
        return NOT_RUN
    if baseline == 0:
        return NOT_AT_SCALE
    rel = (value - baseline) / abs(baseline)
    if abs(rel) <= REL_TOL:
        return NOT_AT_SCALE
    return _direction(rel, want)


# -- rules 4 and 5: a fixed bar, a shape ---------------------------------------------------------
def bar_verdict(value: float, bar: float) -> str:
    """Rule 4: REPRODUCED when ``value >= bar``, else NOT_AT_SCALE; a missing value is NOT_RUN."""
    if _missing(value):
        return NOT_RUN
    return REPRODUCED if value >= bar else NOT_AT_SCALE


def observed_verdict(observed: bool | None) -> str:
    """Rule 5: a shape the paper reports, REPRODUCED when ``observed``, else NOT_AT_SCALE (not
    seeing it is no evidence of the opposite); None is NOT_RUN."""
    if observed is None:
        return NOT_RUN
    return REPRODUCED if bool(observed) else NOT_AT_SCALE
