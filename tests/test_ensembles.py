"""rmlib.analysis.ensembles: mean and worst-case ensembles of a variant's seeds (Coste et al. 2023),
as score columns the Best-of-N curves and summary table take like any proxy."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from rmlib.analysis import bon, ensembles, synthetic_gold


def seed_scores(n_prompts=40, N=32, seeds=(0, 1, 2), seed=0):
    """Gold g per reply; each BT seed = g + its own independent error (sd 1), each BSR seed = g + a
    small error. Averaging independent errors is what a mean ensemble is for."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_prompts):
        g = rng.normal(size=N)
        block = {"prompt_id": [f"p{p}"] * N, "sample_index": np.arange(N), "bon_gold": g}
        for s in seeds:
            block[f"bon_proxy_bt_s{s}"] = g + rng.normal(size=N)
            block[f"bon_proxy_bsr_s{s}"] = g + 0.1 * rng.normal(size=N)
        rows.append(pd.DataFrame(block))
    return pd.concat(rows, ignore_index=True)


def test_mean_and_min_by_hand():
    df = pd.DataFrame({"a": [1.0, -2.0, 3.0], "b": [3.0, 0.0, -1.0], "c": [2.0, 1.0, 1.0]})
    np.testing.assert_allclose(ensembles.ensemble_scores(df, ["a", "b", "c"], "mean"), [2.0, -1 / 3, 1.0])
    np.testing.assert_allclose(ensembles.ensemble_scores(df, ["a", "b", "c"], "min"), [1.0, -2.0, -1.0])
    z = ensembles.ensemble_scores(df, ["a", "b"], "min", standardize=True)
    za = (df["a"] - df["a"].mean()) / df["a"].std(ddof=0)
    zb = (df["b"] - df["b"].mean()) / df["b"].std(ddof=0)
    np.testing.assert_allclose(z, np.minimum(za, zb))
    scaled = df.assign(b=100 * df["b"] + 7)  # standardizing removes a member's scale and offset
    np.testing.assert_allclose(ensembles.ensemble_scores(scaled, ["a", "b"], "min", standardize=True), z)


def test_names_round_trip():
    name = synthetic_gold.ensemble_name("bsr_grm", "min")
    assert name == "bon_ens_min_bsr_grm"
    assert synthetic_gold.parse_proxy_name(name) == ("bsr_grm_min", synthetic_gold.ENSEMBLE_SEED)
    assert synthetic_gold.VARIANT_LABELS["bt_mean"].startswith(synthetic_gold.VARIANT_LABELS["bt"])
    with pytest.raises(ValueError, match="ensemble kind 'avg'"):
        synthetic_gold.ensemble_name("bt", "avg")
    with pytest.raises(ValueError, match="proxy run name"):
        synthetic_gold.parse_proxy_name("bon_ens_mean_ppo")


def test_seed_ensembles_feed_the_curves_and_the_summary():
    scores = seed_scores()
    proxies = [c for c in scores.columns if c.startswith("bon_proxy_")]
    out, names = ensembles.add_seed_ensembles(scores, proxies)
    assert names == ["bon_ens_mean_bt", "bon_ens_min_bt", "bon_ens_mean_bsr", "bon_ens_min_bsr"]
    members = [f"bon_proxy_bt_s{s}" for s in range(3)]
    np.testing.assert_allclose(out["bon_ens_mean_bt"], scores[members].mean(axis=1))
    np.testing.assert_allclose(out["bon_ens_min_bt"], scores[members].min(axis=1))
    assert list(scores.columns) == [c for c in out.columns if c not in names]  # input left alone
    curves = bon.bon_curves(out, proxies + names, policy="pol")
    ens = curves[curves["rm"] == "bon_ens_mean_bt"]
    assert set(ens["variant"]) == {"bt_mean"} and set(ens["seed"]) == {synthetic_gold.ENSEMBLE_SEED}
    table = bon.summary_table(curves, out).set_index("variant")
    assert {"bt", "bt_mean", "bt_min", "bsr", "bsr_mean", "bsr_min"} <= set(table.index)
    assert table.loc["bt_mean", "n_seeds"] == 1 and table.loc["bt", "n_seeds"] == 3
    # independent seed errors average out: the mean ensemble ranks closer to the gold and its
    # Best-of-N pick gets more gold than the single seeds' picks (paired over prompts)
    assert table.loc["bt_mean", "tau_proxy_gold"] > table.loc["bt", "tau_proxy_gold"] + 0.05
    assert table.loc["bt_mean", "gold_minus_bt"] > 2 * table.loc["bt_mean", "gold_minus_bt_sem"]


def test_one_seed_gets_no_ensemble_and_bad_inputs_are_named():
    scores = seed_scores(n_prompts=2, N=4)
    out, names = ensembles.add_seed_ensembles(scores, ["bon_proxy_bt_s0", "bon_proxy_bt_s1", "bon_proxy_bsr_s0"])
    assert names == ["bon_ens_mean_bt", "bon_ens_min_bt"] and "bon_ens_mean_bsr" not in out
    with pytest.raises(ValueError, match=">= 2 distinct member"):
        ensembles.ensemble_scores(scores, ["bon_proxy_bt_s0"], "mean")
    with pytest.raises(ValueError, match="no column"):
        ensembles.ensemble_scores(scores, ["bon_proxy_bt_s0", "nope"], "mean")
    with pytest.raises(ValueError, match="ensemble kind"):
        ensembles.ensemble_scores(scores, ["bon_proxy_bt_s0", "bon_proxy_bt_s1"], "median")
    bad = scores.assign(bon_proxy_bt_s1=np.nan)
    with pytest.raises(ValueError, match="non-finite"):
        ensembles.ensemble_scores(bad, ["bon_proxy_bt_s0", "bon_proxy_bt_s1"], "min")
    with pytest.raises(ValueError, match="constant member"):
        ensembles.ensemble_scores(scores.assign(c=1.0), ["bon_proxy_bt_s0", "c"], "min", standardize=True)
    with pytest.raises(ValueError, match="already an ensemble"):
        ensembles.add_seed_ensembles(out, ["bon_ens_mean_bt", "bon_proxy_bt_s0"])
