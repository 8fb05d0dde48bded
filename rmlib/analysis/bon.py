"""Best-of-N over-optimization curves (GRM paper Fig 2, after Gao et al. 2022).

``bon_expectation`` / ``bon_curve``: the EXACT expected proxy and gold score of the proxy's pick
when n of a prompt's N samples are drawn uniformly without replacement (order statistics:
the i-th smallest of N is the pick with probability C(i-1, n-1) / C(N, n)), plotted against
KL_bon = log n - (n-1)/n and normalized to start at 0 (``proxy_norm``, ``gold_norm``).
``bon_summary`` says whether gold bends down while proxy keeps rising. ``bon_curves`` /
``summary_table`` do it for every proxy of a synthetic-gold grid (``rmlib.analysis.synthetic_gold``),
with seed bands, the oracle curve (the gold picking for itself) and paired differences to BT.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import numpy as np
import pandas as pd
import scipy.stats

from rmlib.analysis import bon, claims
from rmlib.analysis.stats import per_prompt_taus
from rmlib.analysis.synthetic_gold import (
    GOLD_NAME,
    ORACLE,
    VARIANT_LABELS,
    parse_proxy_name,
)

CURVE_COLUMNS = ["n", "kl_bon", "proxy", "gold", "proxy_norm", "gold_norm", "proxy_sem", "gold_sem", "n_prompts"]


# -- 3. the exact Best-of-n estimator ------------------------------------------------------------
def kl_bon(n):
    """KL(best-of-n || policy) = log n - (n - 1) / n (analytic, Stiennon et al. 2020). n >= 1."""
    arr = np.asarray(n, dtype=np.float64)
    if np.any(~np.isfinite(arr)) or np.any(arr < 1):
        raise ValueError(f"n must be >= 1, got {n!r}")
    out = np.log(arr) - (arr - 1.0) / arr
    return float(out) if out.ndim == 0 else out


@lru_cache(maxsize=64)
def _log_factorials(N: int) -> np.ndarray:
    return np.array([math.lgamma(k + 1.0) for k in range(N + 1)])


@lru_cache(maxsize=256)
def _rank_weights(N: int, n: int) -> np.ndarray:
    """P(the i-th smallest of N is the max of a uniform n-subset) = C(i-1, n-1) / C(N, n), i = 1..N. (N,)

    Computed in log space (lgamma) so N in the thousands neither overflows nor underflows."""
    lf = _log_factorials(N)
    i = np.arange(n, N + 1)  # ranks that can be a maximum
    log_w = (lf[i - 1] - lf[n - 1] - lf[i - n]) - (lf[N] - lf[n] - lf[N - n])
    w = np.zeros(N)
    w[n - 1 :] = np.exp(log_w)
    w /= w.sum()  # sums to 1 exactly in exact arithmetic (hockey-stick identity); removes rounding drift
    w.setflags(write=False)
    return w


def _sorted_with_tie_means(proxy: np.ndarray, gold: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort by proxy ascending; each gold replaced by the mean gold of its proxy-tie group."""
    order = np.argsort(proxy, kind="stable")
    p, g = proxy[order], gold[order]
    _, group = np.unique(p, return_inverse=True)
    g = (np.bincount(group, weights=g) / np.bincount(group))[group]
    return p, g


def _as_scores(proxy, gold) -> tuple[np.ndarray, np.ndarray]:
    proxy = np.asarray(proxy, dtype=np.float64).ravel()
    gold = np.asarray(gold, dtype=np.float64).ravel()
    if proxy.shape != gold.shape:
        raise ValueError(f"proxy and gold differ in length ({proxy.size} vs {gold.size})")
    if proxy.size == 0:
        raise ValueError("proxy and gold are empty")
    if not (np.all(np.isfinite(proxy)) and np.all(np.isfinite(gold))):
        raise ValueError("proxy and gold scores must be finite (no NaN/inf)")
    return proxy, gold


def bon_expectation(proxy, gold, n: int) -> tuple[float, float]:
    """Exact (E[proxy of the pick], E[gold of the pick]) for best-of-n by proxy, n of N drawn
    uniformly WITHOUT replacement from one prompt's N samples.

    Sorted by proxy ascending, the i-th smallest (1-based) is the subset's max with probability
    C(i-1, n-1) / C(N, n). Ties in proxy: the pick is uniform among the subset's tied maxima; by
    symmetry that equals giving every member of a tie group the group's mean gold (what is done).
    n = 1: the plain means; n = N: the proxy argmax (tie group mean of gold).
    """
    proxy, gold = _as_scores(proxy, gold)
    N = proxy.size
    if not isinstance(n, (int, np.integer)) or not 1 <= n <= N:
        raise ValueError(f"n must be an integer in [1, N={N}], got {n!r}")
    p, g = _sorted_with_tie_means(proxy, gold)
    w = _rank_weights(N, int(n))
    return float(w @ p), float(w @ g)


def default_ns(N: int, num: int = 20) -> list[int]:
    """About ``num`` roughly log-spaced integers from 1 to N (both included), increasing.
    Log spacing in n is close to even spacing in KL_bon ~ log n - 1."""
    if not isinstance(N, (int, np.integer)) or N < 1:
        raise ValueError(f"N must be an integer >= 1, got {N!r}")
    if num < 2:
        raise ValueError(f"num must be >= 2, got {num!r}")
    grid = np.unique(np.round(np.geomspace(1, N, num)).astype(int))
    return sorted({1, int(N), *map(int, grid)})


PER_PROMPT_COLUMNS = ["prompt_id", "n", "proxy", "gold", "proxy_base", "gold_base"]


def bon_per_prompt(df: pd.DataFrame, ns=None, prompt_col: str = "prompt_id", proxy_col: str = "proxy",
                   gold_col: str = "gold") -> pd.DataFrame:
    """Exact per-prompt Best-of-n expectations: one row per (prompt, n), ``PER_PROMPT_COLUMNS``.

    proxy / gold: E[score of the proxy's pick] among n of the prompt's N samples (``bon_expectation``);
    proxy_base / gold_base: the prompt's n = 1 values (its mean scores). Prompts sorted by id; every
    n must be <= the smallest N. ns: default ``default_ns(smallest N)``.
    """
    for col in (prompt_col, proxy_col, gold_col):
        if col not in df.columns:
            raise ValueError(f"df needs a {col!r} column")
    groups = [(pid, *_as_scores(g[proxy_col], g[gold_col])) for pid, g in df.groupby(prompt_col, sort=True)]
    if not groups:
        raise ValueError("df has no rows")
    sizes = {pid: p.size for pid, p, _ in groups}
    n_min = min(sizes.values())
    ns = default_ns(n_min) if ns is None else [int(x) for x in ns]
    if not ns or min(ns) < 1:
        raise ValueError(f"ns must be non-empty integers >= 1, got {ns!r}")
    if max(ns) > n_min:
        short = [pid for pid, size in sizes.items() if size < max(ns)]
        raise ValueError(f"ns goes up to {max(ns)} but {len(short)} prompt(s) have fewer samples "
                         f"(smallest N = {n_min}; e.g. {short[:5]})")
    parts = []
    for pid, proxy, gold in groups:
        p, g = _sorted_with_tie_means(proxy, gold)
        weights = np.stack([_rank_weights(p.size, n) for n in ns])  # (ns, N)
        parts.append(pd.DataFrame({"prompt_id": pid, "n": ns, "proxy": weights @ p, "gold": weights @ g,
                                   "proxy_base": proxy.mean(), "gold_base": gold.mean()}))
    return pd.concat(parts, ignore_index=True)[PER_PROMPT_COLUMNS]


def bon_curve(df: pd.DataFrame, ns=None, prompt_col: str = "prompt_id", proxy_col: str = "proxy",
              gold_col: str = "gold") -> pd.DataFrame:
    """Best-of-n curve over prompts: one row per n (``CURVE_COLUMNS``).

    proxy / gold: mean over prompts of the exact per-prompt expectations (``bon_per_prompt``);
    *_sem: their standard error across prompts (NaN with one prompt); kl_bon = log n - (n-1)/n;
    proxy_norm / gold_norm: minus the value at n = 1 (computed even when 1 is not in ``ns``), so
    curves start at 0 as in the GRM paper. Prompts may have different N; every n must be <= the
    smallest N. ns: default ``default_ns(smallest N)``.
    """
    per = bon_per_prompt(df, ns, prompt_col, proxy_col, gold_col)
    ns = per["n"].tolist()[: len(per) // per["prompt_id"].nunique()]  # the grid, as given (per prompt)
    exp_p = per["proxy"].to_numpy().reshape(-1, len(ns))  # (prompts, ns)
    exp_g = per["gold"].to_numpy().reshape(-1, len(ns))
    base_p = per["proxy_base"].to_numpy()[:: len(ns)]  # (prompts,)
    base_g = per["gold_base"].to_numpy()[:: len(ns)]
    P = exp_p.shape[0]

    def sem(x):
        return scipy.stats.sem(x, axis=0, ddof=1) if P > 1 else np.full(x.shape[1], np.nan)

    proxy_mean, gold_mean = exp_p.mean(axis=0), exp_g.mean(axis=0)
    return pd.DataFrame({
        "n": ns, "kl_bon": kl_bon(np.asarray(ns)), "proxy": proxy_mean, "gold": gold_mean,
        "proxy_norm": proxy_mean - base_p.mean(), "gold_norm": gold_mean - base_g.mean(),
        "proxy_sem": sem(exp_p), "gold_sem": sem(exp_g), "n_prompts": P,
    }, columns=CURVE_COLUMNS)


def bon_summary(curve: pd.DataFrame, tol: float | None = None) -> dict:
    """What a curve shows: final gold/proxy (at the largest n), where gold peaks, and whether it bends down.

    ``gold_bends_down``: the gold peak comes before the largest n AND the drop from the peak to
    the end exceeds ``tol`` (default: 5% of the curve's gold range, so flat noise does not count).
    """
    if curve.empty:
        raise ValueError("curve is empty")
    c = curve.sort_values("n").reset_index(drop=True)
    last = c.iloc[-1]
    peak = c.iloc[int(np.argmax(c["gold"].to_numpy()))]  # first maximum
    drop = float(peak["gold"] - last["gold"])
    if tol is None:
        tol = 0.05 * float(c["gold"].max() - c["gold"].min())
    return {
        "n_final": int(last["n"]), "kl_final": float(last["kl_bon"]),
        "gold_final": float(last["gold"]), "gold_norm_final": float(last["gold_norm"]),
        "proxy_final": float(last["proxy"]), "proxy_norm_final": float(last["proxy_norm"]),
        "n_gold_peak": int(peak["n"]), "kl_gold_peak": float(peak["kl_bon"]),
        "gold_peak": float(peak["gold"]), "gold_drop_from_peak": drop, "tol": float(tol),
        "gold_bends_down": bool(int(peak["n"]) < int(last["n"]) and drop > tol),
    }


# -- curves, summary, text ----------------------------------------------------------------------------
CURVES_COLUMNS = ["policy", "rm", "variant", "seed", *bon.CURVE_COLUMNS]


def bon_curves(scores: pd.DataFrame, proxies: Sequence[str], gold: str = GOLD_NAME, ns=None, policy: str = "",
               include_oracle: bool = True) -> pd.DataFrame:
    """Best-of-n curves (``bon.bon_curve``) of every proxy column of ``scores`` against the gold
    column: one row per (proxy, n), ``CURVES_COLUMNS``. With ``include_oracle`` also the curve of the
    gold picking for itself (rm = gold, variant "oracle", seed -1): the most gold any pick can get."""
    missing = [c for c in [*proxies, gold] if c not in scores.columns]
    if missing:
        raise ValueError(f"scores has no column(s) {missing}")
    parts = []
    for rm in proxies:
        variant, seed = parse_proxy_name(rm)
        curve = bon.bon_curve(scores, ns, proxy_col=rm, gold_col=gold)
        parts.append(curve.assign(policy=policy, rm=rm, variant=variant, seed=seed))
    if include_oracle:
        parts.append(bon.bon_curve(scores, ns, proxy_col=gold, gold_col=gold).assign(policy=policy, rm=gold,
                                                                                     variant=ORACLE, seed=-1))
    return pd.concat(parts, ignore_index=True)[CURVES_COLUMNS]


def variant_curves(curves: pd.DataFrame) -> pd.DataFrame:
    """Seed-mean curves per (policy, variant, n): mean and across-seed sd of proxy_norm / gold_norm
    (sd NaN with one seed), the mean across-prompt SEMs, and n_seeds."""
    g = curves.groupby(["policy", "variant", "n"], sort=False)
    out = g.agg(kl_bon=("kl_bon", "first"), proxy=("proxy", "mean"), gold=("gold", "mean"),
                proxy_norm=("proxy_norm", "mean"), gold_norm=("gold_norm", "mean"),
                proxy_norm_sd=("proxy_norm", "std"), gold_norm_sd=("gold_norm", "std"),
                proxy_sem=("proxy_sem", "mean"), gold_sem=("gold_sem", "mean"), n_seeds=("seed", "nunique"))
    return out.reset_index()


def paired_gold_difference(scores: pd.DataFrame, proxies: Sequence[str], baseline: str = "bt", n: int | None = None,
                           gold: str = GOLD_NAME) -> pd.DataFrame:
    """Per variant: mean over prompts of [gold of its best-of-n pick - gold of the baseline's pick]
    (each averaged over seeds), at n (default: the smallest N), with its SEM across prompts.
    Paired: the same prompts and samples, so prompt difficulty cancels. One row per variant."""
    by_variant: dict[str, list[str]] = {}
    for rm in proxies:
        by_variant.setdefault(parse_proxy_name(rm)[0], []).append(rm)
    if baseline not in by_variant:
        raise ValueError(f"baseline={baseline!r} has no proxy among {list(proxies)}")
    n = int(scores.groupby("prompt_id").size().min()) if n is None else int(n)
    per_variant = {}
    for variant, rms in by_variant.items():
        per = [bon.bon_per_prompt(scores, [n], proxy_col=rm, gold_col=gold).set_index("prompt_id")["gold"]
               for rm in rms]
        per_variant[variant] = pd.concat(per, axis=1).mean(axis=1)  # (prompts,) seed-mean
    base = per_variant[baseline]
    rows = []
    for variant, values in per_variant.items():
        d = values - base
        rows.append({"variant": variant, "n": n, "gold_minus_baseline": float(d.mean()),
                     "sem": float(d.std(ddof=1) / math.sqrt(len(d))) if len(d) > 1 else math.nan,
                     "n_prompts": len(d), "baseline": baseline})
    return pd.DataFrame(rows)


def proxy_gold_tau(scores: pd.DataFrame, proxies: Sequence[str], gold: str = GOLD_NAME) -> pd.DataFrame:
    """Mean per-prompt Kendall tau-b between each proxy and the gold over the policy's samples
    (how well the proxy ranks what it will pick from); prompts without variation skipped."""

    rows = []
    for rm in proxies:
        variant, seed = parse_proxy_name(rm)
        taus = per_prompt_taus(scores, "prompt_id", rm, gold).dropna()
        rows.append({"rm": rm, "variant": variant, "seed": seed, "tau_proxy_gold": float(taus.mean())
                     if len(taus) else math.nan, "n_prompts": len(taus)})
    return pd.DataFrame(rows)


SUMMARY_COLUMNS = ["policy", "variant", "n_seeds", "n_final", "kl_final", "proxy_norm_final", "gold_norm_final",
                   "gold_norm_final_sd", "n_gold_peak", "kl_gold_peak", "gold_drop_from_peak", "gold_bends_down",
                   "seeds_bending", "tau_proxy_gold", "gold_minus_bt", "gold_minus_bt_sem"]


def summary_table(curves: pd.DataFrame, scores: pd.DataFrame | None = None, baseline: str = "bt") -> pd.DataFrame:
    """One row per (policy, variant): the seed-mean curve's ``bon.bon_summary`` (gold and proxy at the
    largest n, the n where gold peaks, whether it bends down), across-seed sd of the final gold,
    how many seeds bend down on their own; with ``scores`` (one policy) also the proxy-gold tau on
    the samples and the paired gold difference to ``baseline`` at the largest n (with its SEM)."""
    rows = []
    mean = variant_curves(curves)
    for (policy, variant), g in mean.groupby(["policy", "variant"], sort=False):
        s = bon.bon_summary(g)
        seeds = curves[(curves["policy"] == policy) & (curves["variant"] == variant)]
        bending = sum(bon.bon_summary(c)["gold_bends_down"] for _, c in seeds.groupby("seed"))
        last = g.sort_values("n").iloc[-1]
        rows.append({"policy": policy, "variant": variant, "n_seeds": int(last["n_seeds"]), "n_final": s["n_final"],
                     "kl_final": s["kl_final"], "proxy_norm_final": s["proxy_norm_final"],
                     "gold_norm_final": s["gold_norm_final"], "gold_norm_final_sd": float(last["gold_norm_sd"]),
                     "n_gold_peak": s["n_gold_peak"], "kl_gold_peak": s["kl_gold_peak"],
                     "gold_drop_from_peak": s["gold_drop_from_peak"], "gold_bends_down": s["gold_bends_down"],
                     "seeds_bending": int(bending)})
    out = pd.DataFrame(rows)
    out["tau_proxy_gold"] = math.nan
    out["gold_minus_bt"] = math.nan
    out["gold_minus_bt_sem"] = math.nan
    if scores is not None:
        if out["policy"].nunique() > 1:
            raise ValueError("pass scores only with the curves of one policy")
        proxies = sorted(set(curves.loc[curves["variant"] != ORACLE, "rm"]))
        tau = proxy_gold_tau(scores, proxies).groupby("variant")["tau_proxy_gold"].mean()
        out["tau_proxy_gold"] = out["variant"].map(tau)
        if baseline in set(out["variant"]):
            diff = paired_gold_difference(scores, proxies, baseline, int(out["n_final"].max())).set_index("variant")
            out["gold_minus_bt"] = out["variant"].map(diff["gold_minus_baseline"])
            out["gold_minus_bt_sem"] = out["variant"].map(diff["sem"])
    return out[SUMMARY_COLUMNS]


def describe(summary: pd.DataFrame, baseline: str = "bt") -> str:
    """Markdown sentences computed from ``summary_table`` (nothing typed in): for each policy, whether
    the baseline's gold curve bends down while its proxy rises, and whether each other variant ends
    above / below / indistinguishable from the baseline (``claims.z_verdict``: the paired difference
    against Z_95 = 1.96 SEM over prompts)."""
    lines = []
    for policy, g in summary.groupby("policy", sort=False):
        rows = g.set_index("variant")
        head = f"**{policy}**" if policy else "**policy**"
        if baseline in rows.index:
            b = rows.loc[baseline]
            label = VARIANT_LABELS.get(baseline, baseline)
            if b["gold_bends_down"] and b["n_gold_peak"] > 1:
                lines.append(f"- {head}: {label}'s gold curve BENDS DOWN: it rises to its peak at n = "
                             f"{b['n_gold_peak']} (KL {b['kl_gold_peak']:.2f}) and ends {b['gold_drop_from_peak']:.3f} "
                             f"below the peak at n = {b['n_final']} while its proxy keeps rising "
                             f"({b['proxy_norm_final']:+.3f}): over-optimization; {b['seeds_bending']} of "
                             f"{b['n_seeds']} seed(s) bend on their own.")
            elif b["gold_bends_down"]:
                lines.append(f"- {head}: {label}'s gold curve FALLS FROM THE START: the gold of its pick is highest "
                             f"at n = 1 and ends {b['gold_drop_from_peak']:.3f} lower at n = {b['n_final']} while its "
                             f"proxy rises ({b['proxy_norm_final']:+.3f}): on these samples the proxy ranks against "
                             "the gold (no rise-then-fall to speak of).")
            else:
                where = ("still rising at the largest n" if b["n_gold_peak"] == b["n_final"]
                         else f"flat within noise after n = {b['n_gold_peak']}")
                lines.append(f"- {head}: {label}'s gold curve does NOT bend down up to n = {b['n_final']} "
                             f"(KL {b['kl_final']:.2f}): gold {b['gold_norm_final']:+.3f}, {where}; proxy "
                             f"{b['proxy_norm_final']:+.3f}. No over-optimization visible in this KL range "
                             f"({b['seeds_bending']} of {b['n_seeds']} seed(s) bend on their own).")
        for variant, r in rows.iterrows():
            if variant in (baseline, ORACLE):
                continue
            label = VARIANT_LABELS.get(variant, variant)
            d, sem = r["gold_minus_bt"], r["gold_minus_bt_sem"]
            shape = ("does not bend down" if not r["gold_bends_down"] else "bends down" if r["n_gold_peak"] > 1
                     else "falls from the start")
            base_label = VARIANT_LABELS.get(baseline, baseline)
            verdict = {claims.NOT_RUN: "no paired comparison with the baseline",
                       claims.REPRODUCED: f"holds up BETTER than {base_label}",
                       claims.OPPOSITE: f"does WORSE than {base_label}",
                       claims.NOT_AT_SCALE: f"is indistinguishable from {base_label} at this scale",
                       }[claims.z_verdict(d, sem, want="higher")]
            lines.append(f"  - {label}: gold {r['gold_norm_final']:+.3f} at n = {r['n_final']}, {shape}; paired gold "
                         f"difference to {VARIANT_LABELS.get(baseline, baseline)} {d:+.3f} (SEM {sem:.3f}): {verdict}.")
        if ORACLE in rows.index:
            o = rows.loc[ORACLE]
            lines.append(f"  - reference: the gold picking for itself reaches {o['gold_norm_final']:+.3f} at "
                         f"n = {o['n_final']} (the ceiling for any proxy).")
    return "\n".join(lines)
