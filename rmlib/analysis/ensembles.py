"""Reward-model ensembles from the seed runs already trained (Coste et al. 2023, "Reward Model
Ensembles Help Mitigate Overoptimization", github tlc4418/llm_optimization ``src/bon/ensemble_rm.py``).

For a reply y with member scores r_1(y) .. r_k(y) (the same variant, k seeds):

    mean ensemble      r_mean(y) = (1/k) sum_j r_j(y)
    worst-case (WCO)   r_min(y)  = min_j r_j(y)

Coste et al. combine the members' raw scores (their per-model normalization is commented out);
``standardize=True`` first z-scores each member over all scored replies (mean 0, sd 1), for
members on different scales. The result is one more score column of the Best-of-N score table
(``ensemble_name``: ``bon_ens_<kind>_<variant>``), so ``bon.bon_curves`` / ``bon.summary_table``
and the Gao fit (``rmlib.analysis.gao_fit``) treat it like any proxy (variant ``<variant>_<kind>``).
No extra training: the members are the seeds of one variant.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pandas as pd

from rmlib.analysis.synthetic_gold import (
    ENSEMBLE_KINDS,
    ENSEMBLE_SEED,
    ensemble_name,
    parse_proxy_name,
)


def ensemble_scores(scores: pd.DataFrame, members: Sequence[str], kind: str, standardize: bool = False) -> pd.Series:
    """Row-wise mean (``kind="mean"``) or minimum (``"min"``) of the ``members`` score columns.

    ``standardize``: z-score each member over all rows first (population sd). Needs >= 2 members
    (one member is no ensemble) and finite scores; ValueError naming what is wrong."""
    members = list(members)
    if kind not in ENSEMBLE_KINDS:
        raise ValueError(f"ensemble kind {kind!r} is not one of {', '.join(ENSEMBLE_KINDS)}")
    if len(members) < 2 or len(set(members)) != len(members):
        raise ValueError(f"an ensemble needs >= 2 distinct member columns, got {members}")
    missing = [c for c in members if c not in scores.columns]
    if missing:
        raise ValueError(f"scores has no column(s) {missing}")
    x = scores[members].to_numpy(dtype=np.float64)
    if not np.isfinite(x).all():
        raise ValueError(f"non-finite scores in {members}: an ensemble of them would hide it")
    if standardize:
        sd = x.std(axis=0)
        if (sd == 0).any():
            raise ValueError(f"cannot standardize constant member(s) {[m for m, s in zip(members, sd) if s == 0]}")
        x = (x - x.mean(axis=0)) / sd
    values = x.mean(axis=1) if kind == "mean" else x.min(axis=1)
    return pd.Series(values, index=scores.index, name=f"{kind}({', '.join(members)})")


def add_seed_ensembles(scores: pd.DataFrame, proxies: Sequence[str], kinds: Sequence[str] = ENSEMBLE_KINDS,
                       standardize: bool = False) -> tuple[pd.DataFrame, list[str]]:
    """Add, per variant with >= 2 seeds among ``proxies`` (``bon_proxy_<variant>_s<seed>`` columns),
    one ensemble column per kind (``ensemble_name(variant, kind)``).

    Returns (a copy of ``scores`` with the new columns, their names in order). Variants with one
    seed get none (logged by the caller's table: they are simply absent)."""
    by_variant: dict[str, list[str]] = {}
    for rm in proxies:
        variant, seed = parse_proxy_name(rm)
        if seed == ENSEMBLE_SEED:
            raise ValueError(f"{rm!r} is already an ensemble")
        by_variant.setdefault(variant, []).append(rm)
    out, names = scores.copy(), []
    for variant, members in by_variant.items():
        if len(members) < 2:
            continue
        for kind in kinds:
            name = ensemble_name(variant, kind)
            out[name] = ensemble_scores(scores, sorted(members), kind, standardize).to_numpy()
            names.append(name)
    return out, names
