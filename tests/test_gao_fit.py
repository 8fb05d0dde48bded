"""rmlib.analysis.gao_fit: Gao et al.'s gold(d) = d (alpha - beta d) through the origin, its peak,
bootstrap intervals over prompts, and the paired drop from the peak."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from rmlib.analysis import bon, gao_fit

NS = [1, 2, 4, 8, 16, 32, 64, 128]


def hacked_scores(n_prompts=60, N=128, hack_weight=4.0, hack_cost=2.5, seed=0):
    """Per prompt N replies; a few 'hacks' the BT proxies love and the gold punishes (over-optimization
    by design); the BSR proxies are the gold plus small noise."""
    rng = np.random.default_rng(seed)
    frames = []
    for p in range(n_prompts):
        g = rng.normal(size=N)
        hack = np.zeros(N)
        hack[rng.choice(N, 3, replace=False)] = 1.0
        gold = g - hack_cost * hack
        frames.append(pd.DataFrame({
            "prompt_id": f"p{p:03d}", "bon_gold": gold,
            **{f"bon_proxy_bt_s{s}": g + hack_weight * hack + 0.3 * rng.normal(size=N) for s in (0, 1)},
            **{f"bon_proxy_bsr_s{s}": gold + 0.3 * rng.normal(size=N) for s in (0, 1)}}))
    return pd.concat(frames, ignore_index=True)


def test_exact_curve_is_recovered_with_its_peak():
    kl = bon.kl_bon(np.asarray(NS))
    alpha, beta = 0.8, 0.25
    fit = gao_fit.gao_fit(kl, gao_fit.fitted_curve(alpha, beta, kl))
    assert fit["alpha"] == pytest.approx(alpha, abs=1e-10) and fit["beta"] == pytest.approx(beta, abs=1e-10)
    assert fit["d_star"] == pytest.approx(1.6) and fit["kl_star"] == pytest.approx(2.56)
    assert fit["gold_at_peak"] == pytest.approx(0.8 ** 2 / 1.0) and fit["r2"] == pytest.approx(1.0)
    assert fit["peak_inside"] and fit["kl_max"] == pytest.approx(kl[-1])  # 2.56 < KL(128) = 3.86
    late = gao_fit.gao_fit(kl, gao_fit.fitted_curve(0.8, 0.1, kl))  # KL* = 16: beyond the range
    assert late["kl_star"] == pytest.approx(16.0) and not late["peak_inside"]
    rising = gao_fit.gao_fit(kl, gao_fit.fitted_curve(0.5, -0.1, kl))
    assert rising["d_star"] == math.inf and not rising["peak_inside"] and math.isnan(rising["gold_at_peak"])
    falling = gao_fit.gao_fit(kl, gao_fit.fitted_curve(-0.3, 0.1, kl))  # down from the start: no peak to see
    assert falling["kl_star"] == 0.0 and not falling["peak_inside"]


def test_fit_is_least_squares_through_the_origin():
    kl = bon.kl_bon(np.asarray(NS))
    g = np.random.default_rng(1).normal(size=len(NS))
    fit = gao_fit.gao_fit(kl, g)
    d = np.sqrt(kl)
    coef, *_ = np.linalg.lstsq(np.stack([d, -d ** 2], axis=1), g, rcond=None)
    assert [fit["alpha"], fit["beta"]] == pytest.approx(coef.tolist(), abs=1e-12)
    with pytest.raises(ValueError, match="two distinct KL"):
        gao_fit.gao_fit([0.0, 0.5], [0.0, 0.1])
    with pytest.raises(ValueError, match="finite"):
        gao_fit.gao_fit(kl, np.full(len(NS), np.nan))


def test_per_prompt_curves_average_to_bon_curve():
    scores = hacked_scores(n_prompts=5, N=16)
    G, ns = gao_fit.per_prompt_gold(scores, ["bon_proxy_bt_s0"], ns=[1, 2, 4, 16])
    curve = bon.bon_curve(scores, [1, 2, 4, 16], proxy_col="bon_proxy_bt_s0", gold_col="bon_gold")
    np.testing.assert_allclose(G.mean(axis=0), curve["gold_norm"], atol=1e-12)
    assert ns == [1, 2, 4, 16] and G.shape == (5, 4) and np.allclose(G[:, 0], 0)
    two, _ = gao_fit.per_prompt_gold(scores, ["bon_proxy_bt_s0", "bon_proxy_bt_s1"], ns=[1, 2, 4, 16])
    one, _ = gao_fit.per_prompt_gold(scores, ["bon_proxy_bt_s1"], ns=[1, 2, 4, 16])
    np.testing.assert_allclose(two, (G + one) / 2)


def test_peak_drop_is_paired_over_prompts():
    G = np.array([[0.0, 1.0, 0.5], [0.0, 2.0, 0.5], [0.0, 0.0, 0.5]])  # mean curve 0, 1, 0.5: peak at ns[1]
    out = gao_fit.peak_drop(G, [1, 4, 16])
    diffs = np.array([0.5, 1.5, -0.5])
    assert out["n_peak"] == 4 and out["kl_peak"] == pytest.approx(bon.kl_bon(4))
    assert out["gold_drop"] == pytest.approx(diffs.mean()) and out["gold_drop_sem"] == pytest.approx(
        diffs.std(ddof=1) / math.sqrt(3))
    rising = gao_fit.peak_drop(np.cumsum(np.ones((4, 3)), axis=1), [1, 2, 3])
    assert rising["n_peak"] == 3 and rising["gold_drop"] == 0.0


def test_bootstrap_resamples_prompts_and_refits():
    rng = np.random.default_rng(2)
    kl = bon.kl_bon(np.asarray(NS))
    G = gao_fit.fitted_curve(0.6, 0.2, kl)[None, :] + rng.normal(scale=0.3, size=(12, len(NS)))
    G[:, 0] = 0.0
    out = gao_fit.fit_with_intervals(G, NS, n_boot=200, seed=5)
    idx = np.random.default_rng(5).integers(0, 12, size=(200, 12))
    d = np.sqrt(kl)
    X = np.stack([d, -d ** 2], axis=1)
    betas = [np.linalg.lstsq(X, G[i].mean(axis=0), rcond=None)[0][1] for i in idx]
    lo, hi = np.percentile(betas, [2.5, 97.5], method="inverted_cdf")
    assert (out["beta_low"], out["beta_high"]) == pytest.approx((lo, hi), abs=1e-12)
    assert out["beta_low"] < out["beta"] < out["beta_high"] and out["n_boot"] == 200 and out["n_prompts"] == 12
    assert 0 <= out["peak_inside_share"] <= 1
    again = gao_fit.fit_with_intervals(G, NS, n_boot=200, seed=5)
    assert again == out  # same seed, same numbers
    single = gao_fit.fit_with_intervals(G[:1], NS, n_boot=200)
    assert math.isnan(single["beta_low"]) and single["n_boot"] == 0


def test_table_sees_the_hack_in_bt_and_not_in_bsr():
    scores = hacked_scores()
    proxies = ["bon_proxy_bt_s0", "bon_proxy_bt_s1", "bon_proxy_bsr_s0", "bon_proxy_bsr_s1"]
    table = gao_fit.fit_table(scores, proxies, ns=NS, n_boot=300, seed=0)
    assert list(table.columns) == gao_fit.FIT_COLUMNS and list(table["rm"]) == proxies
    bt = table.set_index("rm").loc["bon_proxy_bt_s0"]
    assert bt["beta_low"] > 0 and bt["peak_inside"] and bt["peak_inside_share"] > 0.9
    assert bt["kl_star_low"] <= bt["kl_star"] <= bt["kl_star_high"] < bt["kl_max"]
    assert bt["gold_drop"] > 2 * bt["gold_drop_sem"] and 1 < bt["n_peak"] < 128
    bsr = table.set_index("rm").loc["bon_proxy_bsr_s0"]
    assert not bsr["peak_inside"] and bsr["gold_drop"] == 0.0 and bsr["n_peak"] == 128
    by_variant = gao_fit.fit_table(scores, proxies, ns=NS, by="variant", n_boot=100).set_index("variant")
    assert list(by_variant.index) == ["bt", "bsr"] and (by_variant["n_members"] == 2).all()
    G, ns = gao_fit.per_prompt_gold(scores, proxies[:2], ns=NS)
    assert by_variant.loc["bt", "alpha"] == pytest.approx(gao_fit.gao_fit(bon.kl_bon(np.asarray(ns)),
                                                                          G.mean(axis=0))["alpha"])
    with pytest.raises(ValueError, match="no column"):
        gao_fit.fit_table(scores, ["bon_proxy_grm_s0"], ns=NS)
    with pytest.raises(ValueError, match="by must be"):
        gao_fit.fit_table(scores, proxies, ns=NS, by="seed")
