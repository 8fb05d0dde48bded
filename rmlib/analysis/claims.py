"""Verdicts: the one place where a measured difference becomes a statement about a paper's claim.

Every verdict rmlib prints (the notebooks' sentences, ``rmlib.analysis.bon.describe``,
``rmlib.analysis.rloo_curves.describe_runs``, ``rmlib.analysis.dispersion.dispersion_findings`` and
every line of the README's results section, ``rmlib.pipeline.report``) comes from one function
below; nothing else compares a difference with a threshold. Each returns one of

    REPRODUCED    the difference is beyond the rule's bar, in the paper's direction (``want``)
    NOT_AT_SCALE  "not at this scale": the difference is inside the bar (or cannot be told from noise)
    OPPOSITE      beyond the bar, against the paper's direction
    NOT_RUN       nothing to compare: the measurement is missing (NaN or None)

and ``mitigation_verdict`` also BT_NO_OVEROPT, "BT does not over-optimize here" (below).

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

The over-optimization regime (issue 19, fixed before the run; ``REGIME_RULES`` in one paragraph):
``bon_overoptimizes`` (Best-of-N), ``rl_overoptimizes`` (RLOO), ``overtraining_reached`` and
``spreads_hidden_states`` (notebook 01) each return a ``Regime`` (reached yes / no / not measured,
the test, the numbers); ``mitigation_verdict`` tests a claim that BSR, GRM or an ensemble mitigates
over-optimization only where BT over-optimizes, else ``BT_NO_OVEROPT``; ``mdd_claim`` gives a
notebook-03 claim its minimum detectable difference (``rmlib.analysis.power``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.stats

REPRODUCED, NOT_AT_SCALE, OPPOSITE, NOT_RUN = "reproduced", "not at this scale", "opposite", "not run"
BT_NO_OVEROPT = "BT does not over-optimize here"  # a mitigation claim where there is nothing to mitigate
VERDICTS = (REPRODUCED, NOT_AT_SCALE, OPPOSITE, NOT_RUN, BT_NO_OVEROPT)

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


# -- the over-optimization regime (issue 19): fixed before the run ----------------------------------
# Each experiment first asks whether BT over-optimizes at all; a claim that BSR, GRM or an ensemble
# MITIGATES over-optimization is tested only where it does (``mitigation_verdict``; else BT_NO_OVEROPT).
BON_DROP_SEMS = 2.0  # issue 19: gold at the largest n below its peak by more than 2 SEM (paired over prompts)
SATURATED_ACCURACY = 0.95  # training accuracy that counts as saturated ...
SATURATED_CHANGE = 0.01  # ... or a last-epoch change below 1 point
GROWTH_METRICS = ("pair_dist_mean", "h_norm_cv")  # ||h_c - h_r|| mean, ||h|| coefficient of variation

REGIME_RULES = (
    f"Best-of-N: BT over-optimizes when gold at the largest n is below its peak over n by more than "
    f"{BON_DROP_SEMS:g} SEM (paired over prompts), or the Gao fit d(alpha - beta d) has beta > 0 with its 95% "
    f"interval above 0 and its peak KL* inside the measured KL range; RL: when over the last third of the "
    f"tracked records gold falls and proxy rises (linear-fit slopes beyond {Z_95:g} SE); over-training: when "
    f"training accuracy saturates (>= {SATURATED_ACCURACY:.0%} or a last-epoch change under "
    f"{SATURATED_CHANGE * 100:g} point) and held-out accuracy or loss worsens after its best epoch by more than "
    f"{Z_95:g} SE; a mitigation claim is tested only where BT over-optimizes (else \"{BT_NO_OVEROPT}\")")


@dataclass(frozen=True)
class Regime:
    """Whether a regime is reached: ``reached`` True / False / None (not measurable), ``test`` the
    test that decided, ``numbers`` the numbers behind it."""

    reached: bool | None
    test: str
    numbers: str

    def line(self, what: str = "BT over-optimizes here") -> str:
        """``"<what>: yes (test: numbers)"``, the line each experiment's summary carries."""
        answer = {True: "yes", False: "no", None: "not measured"}[self.reached]
        return f"{what}: {answer} ({self.test}: {self.numbers})"


def _get(row: Mapping, key: str) -> float:
    value = row.get(key, math.nan) if hasattr(row, "get") else math.nan
    return math.nan if value is None else float(value)


def bon_overoptimizes(fit: Mapping) -> Regime:
    """Best-of-N: does this proxy over-optimize? ``fit``: a row of ``rmlib.analysis.gao_fit.fit_table``
    (gold_drop, gold_drop_sem, n_peak, beta, beta_low, kl_star, kl_max).

    Yes iff EITHER (a) gold at the largest n is below its peak over the n grid by more than
    ``BON_DROP_SEMS`` = 2 SEM, the drop and its SEM taken over prompts, paired (a zero SEM with a
    positive drop counts; a peak at n = 1 counts too: the proxy's picks only lose gold), OR (b) the
    Gao fit gold(d) = d (alpha - beta d), d = sqrt(KL_bon), has beta > 0 with its 95% bootstrap
    interval above 0 (beta_low > 0) and its peak KL* = (alpha / 2 beta)^2 inside the measured range
    (0 < KL* < kl_max). Not measured (None) when neither test has its numbers."""
    drop, sem, beta, beta_low = (_get(fit, k) for k in ("gold_drop", "gold_drop_sem", "beta", "beta_low"))
    kl_star, kl_max, n_peak = _get(fit, "kl_star"), _get(fit, "kl_max"), _get(fit, "n_peak")
    drop_known = not _missing(drop) and not _missing(sem)
    fit_known = not (_missing(beta) or _missing(beta_low) or math.isnan(kl_star) or _missing(kl_max))
    by_drop = drop_known and drop > BON_DROP_SEMS * sem
    by_fit = fit_known and beta > 0 and beta_low > 0 and 0 < kl_star < kl_max
    peak = f"n = {n_peak:g}" if not _missing(n_peak) else "n = ?"
    drop_text = (f"gold at the largest n {drop:.3f} below its peak at {peak} (SEM {sem:.3f}, bar "
                 f"{BON_DROP_SEMS:g} SEM)" if drop_known else "no paired drop")
    fit_text = (f"Gao fit beta {beta:.3f} (95% low {beta_low:.3f}), peak KL* {kl_star:.2f} vs KL range 0-{kl_max:.2f}"
                if fit_known else "no Gao fit")
    if not (drop_known or fit_known):
        return Regime(None, "Best-of-N drop from the peak / Gao fit", "nothing measured")
    test = ("drop from the peak and Gao fit" if by_drop and by_fit else "drop from the peak" if by_drop
            else "Gao fit" if by_fit else "neither the drop from the peak nor the Gao fit")
    return Regime(bool(by_drop or by_fit), test, f"{drop_text}; {fit_text}")


def _last_third_slope(steps, values) -> tuple[float, float]:
    """Slope and its standard error (``scipy.stats.linregress``) over the last third of the records."""
    k = max(3, math.ceil(len(steps) / 3))
    fit = scipy.stats.linregress(steps[-k:], values[-k:])
    return float(fit.slope), float(fit.stderr)


def rl_overoptimizes(steps: Sequence[float], gold: Sequence[float], proxy: Sequence[float]) -> Regime:
    """RL: does the policy over-optimize its proxy? Over the last third of the tracked records
    (the last max(3, ceil(R / 3)) of R records, sorted by step: a slope needs 3 points for a
    standard error), fit gold and proxy linearly against the step (least squares,
    ``scipy.stats.linregress``, SE from the residuals). Yes iff the gold slope is negative beyond
    ``Z_95`` = 1.96 SE (``z_verdict(slope, se, "lower")``) while the proxy slope is positive beyond
    1.96 SE. Not measured with fewer than 3 records or non-finite values."""
    s = np.asarray(steps, dtype=float)
    g, p = np.asarray(gold, dtype=float), np.asarray(proxy, dtype=float)
    if not (s.shape == g.shape == p.shape) or s.ndim != 1:
        raise ValueError(f"steps, gold and proxy must be 1-d of one length, got {s.shape}, {g.shape}, {p.shape}")
    if len(s) < 3 or not (np.isfinite(s).all() and np.isfinite(g).all() and np.isfinite(p).all()):
        return Regime(None, "slopes over the last third of the records", f"{len(s)} record(s), need 3 finite")
    order = np.argsort(s, kind="stable")
    s, g, p = s[order], g[order], p[order]
    if len(np.unique(s)) != len(s):
        raise ValueError("steps repeat: one record per step")
    (gs, gse), (ps, pse) = _last_third_slope(s, g), _last_third_slope(s, p)
    k = max(3, math.ceil(len(s) / 3))
    falls = z_verdict(gs, gse, want="lower") == REPRODUCED
    rises = z_verdict(ps, pse, want="higher") == REPRODUCED
    numbers = (f"steps {s[-k]:g}-{s[-1]:g} ({k} records): gold slope {gs:+.3g} per step (SE {gse:.2g}), "
               f"proxy slope {ps:+.3g} (SE {pse:.2g}); bar {Z_95:g} SE")
    test = "gold falls while proxy rises over the last third"
    return Regime(bool(falls and rises), test if falls and rises else
                  f"not ({'gold does not fall' if not falls else 'proxy does not rise'})", numbers)


def overtraining_reached(train_accuracy: Sequence[float], heldout_accuracy: Sequence[float], n_heldout: int,
                         heldout_loss: Sequence[float] | None = None,
                         heldout_loss_sem: Sequence[float] | None = None) -> Regime:
    """Notebook 01: is training in the over-training regime? Values per EPOCH END, in order.

    Yes iff (1) training accuracy saturates: its last value >= ``SATURATED_ACCURACY`` = 0.95, or it
    changed by less than ``SATURATED_CHANGE`` = 1 point over the last epoch; AND (2) held-out
    accuracy or held-out loss worsens after its best epoch by more than its noise: the best epoch
    (first maximum of accuracy / minimum of loss) is not the last and the final value is worse by
    more than ``Z_95`` = 1.96 standard errors of the best one (accuracy: the binomial SE
    sqrt(p (1 - p) / n_heldout); loss: ``heldout_loss_sem`` at that epoch, the SEM of the per-pair
    losses). Not measured with no epoch."""
    train = np.asarray(train_accuracy, dtype=float)
    held = np.asarray(heldout_accuracy, dtype=float)
    if train.size == 0 or held.size == 0:
        return Regime(None, "saturation and held-out worsening", "no epoch recorded")
    if train.shape != held.shape:
        raise ValueError(f"one train and one held-out accuracy per epoch, got {train.size} and {held.size}")
    if not isinstance(n_heldout, (int, np.integer)) or n_heldout < 1:
        raise ValueError(f"n_heldout must be an integer >= 1, got {n_heldout!r}")
    change = abs(train[-1] - train[-2]) if train.size > 1 else math.nan
    saturated = bool(train[-1] >= SATURATED_ACCURACY or (train.size > 1 and change < SATURATED_CHANGE))
    best = int(np.argmax(held))
    acc_se = math.sqrt(held[best] * (1 - held[best]) / n_heldout)
    acc_drop = float(held[best] - held[-1])
    acc_worse = best < held.size - 1 and acc_drop > z_noise(acc_se)
    parts = [f"train accuracy {train[-1]:.3f} (last-epoch change {change:+.3f})" if train.size > 1 else
             f"train accuracy {train[-1]:.3f}",
             f"held-out accuracy best {held[best]:.3f} at epoch {best + 1}, last {held[-1]:.3f} (noise "
             f"{z_noise(acc_se):.3f})"]
    loss_worse = False
    if heldout_loss is not None:
        loss = np.asarray(heldout_loss, dtype=float)
        loss_sem = np.asarray(heldout_loss_sem if heldout_loss_sem is not None else np.full(loss.size, np.nan),
                              dtype=float)
        if loss.shape != held.shape or loss_sem.shape != held.shape:
            raise ValueError("one held-out loss and loss SEM per epoch")
        lbest = int(np.argmin(loss))
        rise = float(loss[-1] - loss[lbest])
        loss_worse = bool(lbest < loss.size - 1 and not _missing(loss_sem[lbest]) and rise > z_noise(loss_sem[lbest]))
        parts.append(f"held-out loss best {loss[lbest]:.3f} at epoch {lbest + 1}, last {loss[-1]:.3f} (noise "
                     f"{z_noise(loss_sem[lbest]):.3f})")
    worse = "accuracy and loss" if acc_worse and loss_worse else "accuracy" if acc_worse else "loss" if loss_worse else ""
    test = (f"training saturated, held-out {worse} worsened" if saturated and worse else
            "training not saturated" if not saturated else "held-out accuracy and loss did not worsen")
    return Regime(bool(saturated and worse), test, "; ".join(parts))


def spreads_hidden_states(per_epoch: Mapping[str, Sequence[float]], metrics: Sequence[str] = GROWTH_METRICS) -> Regime:
    """Notebook 01: does training spread the hidden states (BSR paper Fig 2)? ``per_epoch``: statistic
    name -> its values at the epoch ends, in order (``pair_dist_mean`` = mean ||h_c - h_r||,
    ``h_norm_cv`` = CV of ||h||).

    A statistic GROWS EPOCH OVER EPOCH when, by rule 3 (``relative_verdict``, 5%), its last epoch is
    above its first (REPRODUCED with want="higher") and no epoch falls from the one before by more
    than 5% (no OPPOSITE step): a net rise beyond 5% with no real fall on the way. Yes iff any of
    ``metrics`` grows; not measured with fewer than two epochs of any of them."""
    seen, grows, parts = False, [], []
    for name in metrics:
        v = [float(x) for x in per_epoch.get(name, [])]
        if len(v) < 2:
            continue
        seen = True
        net = relative_verdict(v[-1], v[0], want="higher")
        falls = [i + 2 for i in range(len(v) - 1) if relative_verdict(v[i + 1], v[i], want="higher") == OPPOSITE]
        if net == REPRODUCED and not falls:
            grows.append(name)
        ratio = v[-1] / v[0] if v[0] else math.nan
        parts.append(f"{name} x{ratio:.2f} from epoch 1 to {len(v)}" + (f", falls at epoch(s) {falls}" if falls else ""))
    if not seen:
        return Regime(None, "growth of the hidden-state spread", "fewer than two epochs")
    test = f"{' and '.join(grows)} grow(s) epoch over epoch" if grows else "no statistic grows beyond 5% without a fall"
    return Regime(bool(grows), test, "; ".join(parts) + f" (rule: > {REL_TOL:.0%} relative)")


def mitigation_verdict(bt: Regime, verdict: str) -> str:
    """A claim that BSR, GRM or an ensemble mitigates over-optimization: its rule's ``verdict``
    (e.g. ``z_verdict`` of the paired gold difference to BT) only where BT over-optimizes
    (``bt.reached``); ``BT_NO_OVEROPT`` where it does not; NOT_RUN where that was not measured."""
    if bt.reached is None:
        return NOT_RUN
    return verdict if bt.reached else BT_NO_OVEROPT


def mdd_claim(difference: float, noise: float, mdd: float, paper_effect: float | None = None,
              want: str = "higher") -> dict:
    """A claim about OOD accuracy or tau (notebook 03) with its power: rule 2's verdict
    (``noise_verdict``), the minimum detectable difference ``mdd`` (``rmlib.analysis.power``), the
    paper's effect, and ``detectable`` = |paper_effect| > mdd (None where either is unknown)."""
    detectable = None if _missing(mdd) or _missing(paper_effect) else bool(abs(float(paper_effect)) > float(mdd))
    return {"verdict": noise_verdict(difference, noise, want), "difference": difference, "noise": noise,
            "mdd": mdd, "paper_effect": paper_effect, "detectable": detectable}
