"""Power: the smallest difference a comparison can detect, stated beside the paper's effect size.

For a difference with standard error SE, tested two-sided at 95% (|d| > Z_95 SE, ``claims``), a
true difference of

    MDD = (Z_95 + Z_POWER) * SE = (1.96 + 0.84) * SE

is detected with 80% power (Z_POWER = 0.84 = Phi^-1(0.80); the standard minimum detectable
difference). SE of a difference between two variants' seed means, each evaluated on the same
kind of evaluation set:

    SE_variant^2 = SE_eval^2 + sd_seed^2 / n_seeds      (the eval set is shared by the seeds:
                                                          its sampling noise does not average out)
    SE_diff      = sqrt(SE_a^2 + SE_b^2)                 (conservative: ignores the pairing on the
                                                          same items, which can only lower it)

SE_eval of an accuracy is the binomial sqrt(p (1 - p) / n_pairs); of a mean per-prompt Kendall tau
sd_tau / sqrt(n_prompts); from a result table, half the 95% bootstrap interval / 1.96. With one
seed sd_seed is unknown and MDD is NaN (the seed spread cannot be left out silently).
``paired_se`` gives the sharper SE when per-item differences of the two models are at hand.

``PAPER_EFFECTS``: the effect each paper reports for the columns of notebook 03's tables
(BSR Table 5, BSR - BT; GRM Table 1, GRM-SFT - baseline, 40K pairs), from
/work/shared/docs/papers.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd

from rmlib.analysis import claims
from rmlib.analysis.claims import Z_95, combined_sem

Z_POWER = 0.84  # one-sided quantile for 80% power: scipy.stats.norm.ppf(0.80) = 0.8416

# (variant, column of notebook 03's tables) -> (the paper's effect, where it is from)
PAPER_EFFECTS = {
    ("bsr", "val1_in_domain"): (0.8541 - 0.8496, "BSR Table 5, Qwen2.5-3B accuracy (Llama-3.2-3B: +0.0013)"),
    ("bsr", "val2_prompt_ood"): (0.7202 - 0.7050, "BSR Table 5, Qwen2.5-3B tau (Llama-3.2-3B: +0.0230)"),
    ("bsr", "val3_response_ood"): (0.5991 - 0.5917, "BSR Table 5, Qwen2.5-3B tau (Llama-3.2-3B: +0.0207)"),
    ("bsr", "val4_mutual_ood"): (0.6106 - 0.5870, "BSR Table 5, Qwen2.5-3B tau (Llama-3.2-3B: +0.0216)"),
    ("grm", "ID (Val1)"): (0.715 - 0.688, "GRM Table 1, Gemma-2B 40K, in-domain accuracy"),
    ("grm", "hhh"): (0.787 - 0.703, "GRM Table 1, Gemma-2B 40K, HHH-Alignment accuracy"),
    ("grm", "mt_bench"): (0.730 - 0.691, "GRM Table 1, Gemma-2B 40K, MT-Bench accuracy"),
}


def _finite(*xs) -> bool:
    return all(x is not None and math.isfinite(float(x)) for x in xs)


def mdd(se: float) -> float:
    """Minimum detectable difference at 95% two-sided with 80% power: (Z_95 + Z_POWER) * se."""
    return (Z_95 + Z_POWER) * float(se) if _finite(se) else math.nan


def accuracy_se(p: float, n_pairs: int) -> float:
    """Binomial standard error of an accuracy p on n_pairs pairs: sqrt(p (1 - p) / n)."""
    if not (0 <= p <= 1) or n_pairs < 1:
        raise ValueError(f"need 0 <= p <= 1 and n_pairs >= 1, got p={p!r}, n_pairs={n_pairs!r}")
    return math.sqrt(p * (1 - p) / n_pairs)


def mean_se(sd: float, n: int) -> float:
    """Standard error of a mean of n items with standard deviation sd (e.g. per-prompt taus)."""
    if sd < 0 or n < 1:
        raise ValueError(f"need sd >= 0 and n >= 1, got sd={sd!r}, n={n!r}")
    return sd / math.sqrt(n)


def seed_mean_se(eval_se: float, seed_sd: float, n_seeds: int) -> float:
    """SE of a variant's mean over n_seeds seeds evaluated on one shared evaluation set:
    sqrt(eval_se^2 + seed_sd^2 / n_seeds). NaN when seed_sd is unknown (one seed)."""
    if n_seeds < 1:
        raise ValueError(f"n_seeds must be >= 1, got {n_seeds!r}")
    if not _finite(eval_se, seed_sd):
        return math.nan
    return math.sqrt(eval_se ** 2 + seed_sd ** 2 / n_seeds)


def paired_se(differences) -> float:
    """SE of the mean of per-item paired differences (same prompts or pairs, two models): sd / sqrt(n)."""
    d = np.asarray(differences, dtype=np.float64)
    d = d[np.isfinite(d)]
    return float(d.std(ddof=1) / math.sqrt(d.size)) if d.size > 1 else math.nan


def design_mdd(eval_se: float, seed_sd: float, n_seeds: int) -> float:
    """MDD of a difference between two variants with the same design (eval SE, seed sd, seeds)."""
    one = seed_mean_se(eval_se, seed_sd, n_seeds)
    return mdd(combined_sem(one, one))


def design_table(p_accuracy: float, n_pairs: Sequence[int], tau_sd: float, n_prompts: Sequence[int],
                 seed_sd: float, seeds: Sequence[int]) -> pd.DataFrame:
    """Before a run: MDD of an accuracy and a tau difference for each design (eval size x seeds),
    to size notebook 03. Columns: metric, n_items, n_seeds, eval_se, mdd."""
    rows = []
    for k in seeds:
        for n in n_pairs:
            se = accuracy_se(p_accuracy, n)
            rows.append({"metric": "accuracy", "n_items": n, "n_seeds": k, "eval_se": se,
                         "mdd": design_mdd(se, seed_sd, k)})
        for n in n_prompts:
            se = mean_se(tau_sd, n)
            rows.append({"metric": "kendall_tau_b", "n_items": n, "n_seeds": k, "eval_se": se,
                         "mdd": design_mdd(se, seed_sd, k)})
    return pd.DataFrame(rows)


def interval_se(ci_low: float, ci_high: float) -> float:
    """SE implied by a 95% interval: half its width / Z_95."""
    return (float(ci_high) - float(ci_low)) / (2 * Z_95) if _finite(ci_low, ci_high) else math.nan


def mdd_table(agg: pd.DataFrame, baseline: str = "bt", by: str = "variant", column: str = "scenario",
              value: str = "value") -> pd.DataFrame:
    """From a seed-aggregated result table (``stats.seed_aggregate``: value, ci_low, ci_high,
    seed_std, n_seeds per variant and column), per (variant, column) against ``baseline``: the
    difference, its SE (each side ``seed_mean_se(interval_se(ci), seed_std, n_seeds)``), the MDD,
    the paper's effect (``PAPER_EFFECTS``; NaN where the paper has none) and whether that effect is
    detectable here (|paper_effect| > mdd; None where either is unknown)."""
    need = {by, column, value, "ci_low", "ci_high", "seed_std", "n_seeds"}
    missing = sorted(need - set(agg.columns))
    if missing:
        raise ValueError(f"agg lacks columns {missing}")
    if baseline not in set(agg[by]):
        raise ValueError(f"baseline {baseline!r} is not among {sorted(set(agg[by]))}")

    def side(r):
        return seed_mean_se(interval_se(r["ci_low"], r["ci_high"]), r["seed_std"], int(r["n_seeds"]))

    base = agg[agg[by] == baseline].set_index(column)
    rows = []
    for _, r in agg[agg[by] != baseline].iterrows():
        if r[column] not in base.index:
            continue
        b = base.loc[r[column]]
        se = combined_sem(side(r), side(b))
        effect, source = PAPER_EFFECTS.get((r[by], r[column]), (math.nan, ""))
        m = mdd(se)
        rows.append({by: r[by], column: r[column], "difference": float(r[value] - b[value]), "se": se, "mdd": m,
                     "paper_effect": effect, "paper_source": source,
                     "detectable": bool(abs(effect) > m) if _finite(effect, m) else None})
    return pd.DataFrame(rows, columns=[by, column, "difference", "se", "mdd", "paper_effect", "paper_source",
                                       "detectable"])


def power_statement(mdd_value: float, paper_effect: float | None = None) -> str:
    """One sentence: the smallest detectable difference, and the paper's effect beside it."""
    if not _finite(mdd_value):
        return "smallest detectable difference unknown (one seed: the seed spread is not measured)"
    head = f"smallest detectable difference {mdd_value:.3f} (95% two-sided, 80% power)"
    if not _finite(paper_effect):
        return head
    if abs(paper_effect) > mdd_value:
        return f"{head}; the paper's effect {paper_effect:+.3f} is larger: this design can detect it"
    return f"{head}; the paper's effect {paper_effect:+.3f} is smaller: this design cannot detect it"


def mdd_verdicts(agg: pd.DataFrame, column: str, baseline: str = "bt", by: str = "variant",
                 want: str = "higher") -> pd.DataFrame:
    """Notebook 03's claims with their power: per (variant, ``column`` value) against ``baseline``,
    rule 2's verdict (``claims.versus_baseline`` / ``claims.mdd_claim``: difference, noise, verdict),
    the MDD of this design (``mdd_table``), the paper's effect and whether it is detectable here, and
    the sentence of ``power_statement``. Columns: variant, measure, verdict, difference, noise, mdd,
    paper_effect, detectable, paper_source, direction (higher / lower / within noise), power."""
    base = claims.versus_baseline(agg, baseline, by=by, metric_keys=[column])
    table = mdd_table(agg, baseline=baseline, by=by, column=column).set_index([by, column])
    rows = []
    for _, r in base.iterrows():
        m = table.loc[(r[by], r[column])]
        claim = claims.mdd_claim(r["difference"], r["noise"], m["mdd"], m["paper_effect"], want=want)
        rows.append({"variant": r[by], "measure": r[column], **claim, "paper_source": m["paper_source"],
                     "direction": r["verdict"], "power": power_statement(m["mdd"], m["paper_effect"])})
    return pd.DataFrame(rows, columns=["variant", "measure", "verdict", "difference", "noise", "mdd", "paper_effect",
                                       "detectable", "paper_source", "direction", "power"])
