"""Gao et al.'s functional form fitted to Best-of-N gold curves, with bootstrap intervals over prompts.

Gao, Schulman, Hilton 2022 ("Scaling Laws for Reward Model Overoptimization"), Best-of-N:

    gold(d) - gold(0) = d (alpha - beta d),   d = sqrt(KL_bon),   KL_bon = ln n - (n - 1)/n

fitted by least squares THROUGH THE ORIGIN (n = 1 has d = 0 and gold change 0) on the curve of
(KL_bon, gold at n - gold at n = 1), the mean over prompts of the exact per-prompt Best-of-n
expectations (``rmlib.analysis.bon.bon_per_prompt``). With beta > 0 the curve peaks at

    d* = alpha / (2 beta),   KL* = d*^2,   gold(d*) - gold(0) = alpha^2 / (4 beta);

with beta <= 0 it never turns down (d* = KL* = inf). "Peak inside the KL range": beta > 0 and
0 < KL* < the largest KL_bon measured (the turn is seen, not extrapolated).

Intervals: prompts are resampled with replacement (the same ``n_boot`` resamples for every proxy
of a table, fixed by ``seed``), the curve is recomputed from the resampled prompts and refitted;
95% percentile intervals of alpha, beta, d* and KL*, and the share of resamples whose peak is
inside the range. ``peak_drop``: where the mean curve peaks over the n grid and how far its last
point lies below, paired over prompts (mean and SEM of per-prompt differences): the other half of
``rmlib.analysis.claims.bon_overoptimizes``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from rmlib.analysis import bon
from rmlib.analysis.stats import CI_LEVEL
from rmlib.analysis.synthetic_gold import GOLD_NAME, parse_proxy_name

FIT_COLUMNS = ["rm", "variant", "seed", "n_members", "n_prompts", "n_max", "kl_max", "alpha", "alpha_low", "alpha_high",
               "beta", "beta_low", "beta_high", "d_star", "d_star_low", "d_star_high", "kl_star", "kl_star_low",
               "kl_star_high", "gold_at_peak", "peak_inside", "peak_inside_share", "r2", "n_peak", "kl_peak",
               "gold_drop", "gold_drop_sem", "n_boot"]


def _design(kl) -> np.ndarray:
    kl = np.asarray(kl, dtype=np.float64)
    if kl.ndim != 1 or np.any(~np.isfinite(kl)) or np.any(kl < 0):
        raise ValueError(f"kl must be a 1-d array of finite values >= 0, got {kl!r}")
    d = np.sqrt(kl)
    return np.stack([d, -(d ** 2)], axis=1)  # gold = alpha * d + beta * (-d^2)


def _coefficients(x: np.ndarray, gold: np.ndarray) -> np.ndarray:
    """Least squares through the origin for one curve (len(kl),) or many (B, len(kl)): (..., 2)."""
    if np.linalg.matrix_rank(x) < 2:
        raise ValueError("the Gao fit needs at least two distinct KL values above 0")
    return gold @ np.linalg.pinv(x).T


def peak_of(alpha, beta):
    """(d*, KL*) of gold = d (alpha - beta d): alpha / (2 beta) and its square; inf where beta <= 0
    (no turn) and 0 where beta > 0 but alpha <= 0 (the curve falls from the start)."""
    alpha, beta = np.asarray(alpha, dtype=np.float64), np.asarray(beta, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        d = np.where(beta > 0, np.maximum(alpha, 0.0) / (2 * beta), np.inf)
    return d, d ** 2


def gao_fit(kl, gold_norm) -> dict:
    """Point fit of one curve: alpha, beta, d_star, kl_star, gold_at_peak (alpha^2 / 4 beta; NaN
    without a turn), r2 (uncentered: 1 - SS_res / sum gold^2, as the fit has no intercept) and
    peak_inside (beta > 0 and 0 < KL* < max kl)."""
    x = _design(kl)
    g = np.asarray(gold_norm, dtype=np.float64)
    if g.shape != (len(x),) or not np.all(np.isfinite(g)):
        raise ValueError(f"gold_norm must be {len(x)} finite values, got shape {g.shape}")
    alpha, beta = _coefficients(x, g)
    d_star, kl_star = peak_of(alpha, beta)
    resid = g - x @ np.array([alpha, beta])
    total = float(g @ g)
    kl_max = float(np.max(kl))
    return {"alpha": float(alpha), "beta": float(beta), "d_star": float(d_star), "kl_star": float(kl_star),
            "gold_at_peak": float(alpha ** 2 / (4 * beta)) if beta > 0 and alpha > 0 else math.nan,
            "r2": 1 - float(resid @ resid) / total if total > 0 else math.nan,
            "peak_inside": bool(beta > 0 and 0 < kl_star < kl_max), "kl_max": kl_max}


def per_prompt_gold(scores: pd.DataFrame, members: Sequence[str], gold: str = GOLD_NAME, ns=None
                    ) -> tuple[np.ndarray, list[int]]:
    """(G, ns): G[p, j] = gold of the best-of-ns[j] pick minus the prompt's mean gold (its n = 1
    value), for prompt p (sorted by id), averaged over the ``members`` proxy columns (one column: a
    single proxy; several: the seeds of one variant, averaged per prompt before any resampling)."""
    members = list(members)
    if not members:
        raise ValueError("members is empty")
    mats = []
    for rm in members:
        per = bon.bon_per_prompt(scores, ns, proxy_col=rm, gold_col=gold)
        grid = per["n"].tolist()[: len(per) // per["prompt_id"].nunique()]
        mats.append((per["gold"] - per["gold_base"]).to_numpy().reshape(-1, len(grid)))
    return np.mean(mats, axis=0), [int(n) for n in grid]


def peak_drop(G: np.ndarray, ns: Sequence[int]) -> dict:
    """Where the mean curve of G (prompts x ns) peaks over n (first maximum) and how far its value at
    the largest n lies below, paired over prompts: gold_drop = mean_p(G[p, peak] - G[p, last]),
    gold_drop_sem = their sd (ddof=1) / sqrt(P) (NaN with one prompt). Zero drop when the peak is
    the last n."""
    G = np.asarray(G, dtype=np.float64)
    curve = G.mean(axis=0)
    j = int(np.argmax(curve))
    diff = G[:, j] - G[:, -1]
    P = G.shape[0]
    return {"n_peak": int(ns[j]), "kl_peak": float(bon.kl_bon(int(ns[j]))), "gold_drop": float(diff.mean()),
            "gold_drop_sem": float(diff.std(ddof=1) / math.sqrt(P)) if P > 1 else math.nan}


def fit_with_intervals(G: np.ndarray, ns: Sequence[int], n_boot: int = 1000, seed: int = 0,
                       level: float = CI_LEVEL) -> dict:
    """``gao_fit`` of the mean curve of G (prompts x ns) plus bootstrap intervals over prompts
    (``<name>_low`` / ``<name>_high`` for alpha, beta, d_star, kl_star; ``peak_inside_share``) and
    ``peak_drop``. The resamples are ``np.random.default_rng(seed)``'s, the same for every G with
    the same number of prompts, so proxies of one table are compared on the same resamples."""
    G = np.asarray(G, dtype=np.float64)
    if G.ndim != 2 or G.shape[1] != len(ns):
        raise ValueError(f"G must be (prompts, {len(ns)}), got {G.shape}")
    kl = bon.kl_bon(np.asarray(ns))
    x = _design(kl)
    out = gao_fit(kl, G.mean(axis=0))
    P = G.shape[0]
    if n_boot > 0 and P > 1:
        idx = np.random.default_rng(seed).integers(0, P, size=(n_boot, P))
        coef = _coefficients(x, G[idx].mean(axis=1))  # (n_boot, 2)
        d, k = peak_of(coef[:, 0], coef[:, 1])
        lo, hi = round(50 * (1 - level), 9), round(50 * (1 + level), 9)  # 2.5, not 2.5000000000000004
        for name, draws in (("alpha", coef[:, 0]), ("beta", coef[:, 1]), ("d_star", d), ("kl_star", k)):
            # "inverted_cdf" takes order statistics: no interpolation between a finite value and inf
            out[f"{name}_low"], out[f"{name}_high"] = (float(v) for v in
                                                      np.percentile(draws, [lo, hi], method="inverted_cdf"))
        out["peak_inside_share"] = float(np.mean((coef[:, 1] > 0) & (k > 0) & (k < out["kl_max"])))
    else:
        for name in ("alpha", "beta", "d_star", "kl_star"):
            out[f"{name}_low"] = out[f"{name}_high"] = math.nan
        out["peak_inside_share"] = math.nan
    out.update(peak_drop(G, ns))
    out.update(n_prompts=P, n_max=int(max(ns)), n_boot=int(n_boot) if P > 1 else 0)
    return out


def fit_table(scores: pd.DataFrame, proxies: Sequence[str], gold: str = GOLD_NAME, ns=None, by: str = "rm",
              n_boot: int = 1000, seed: int = 0) -> pd.DataFrame:
    """Gao fits with bootstrap intervals, one row per proxy column (``by="rm"``) or per variant with
    its seeds' per-prompt curves averaged (``by="variant"``; ensembles, ``bon_ens_*``, are variants of
    their own). ``FIT_COLUMNS``; ``seed`` is the proxy's (-1 for a variant row or an ensemble)."""
    if by not in ("rm", "variant"):
        raise ValueError(f"by must be 'rm' or 'variant', got {by!r}")
    missing = [c for c in [*proxies, gold] if c not in scores.columns]
    if missing:
        raise ValueError(f"scores has no column(s) {missing}")
    groups: dict[str, list[str]] = {}
    for rm in proxies:
        variant, _ = parse_proxy_name(rm)
        groups.setdefault(rm if by == "rm" else variant, []).append(rm)
    rows = []
    for key, members in groups.items():
        G, grid = per_prompt_gold(scores, members, gold, ns)
        variant, proxy_seed = parse_proxy_name(members[0])
        rows.append({"rm": key if by == "rm" else "", "variant": variant,
                     "seed": proxy_seed if by == "rm" else -1, "n_members": len(members),
                     **fit_with_intervals(G, grid, n_boot, seed)})
    return pd.DataFrame(rows)[FIT_COLUMNS]


def fitted_curve(alpha: float, beta: float, kl) -> np.ndarray:
    """gold(d) - gold(0) = d (alpha - beta d) at d = sqrt(kl), for plotting the fit over the points."""
    d = np.sqrt(np.asarray(kl, dtype=np.float64))
    return d * (alpha - beta * d)
