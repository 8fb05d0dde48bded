"""rmlib.analysis.claims: the verdict rules (one test per rule, each on both sides of its bar) and
the modules that state verdicts through them (bon.describe, rloo_curves.describe_runs,
dispersion.dispersion_findings; the report's sections are in test_report.py)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import scipy.stats

from rmlib.analysis import bon, claims, rloo_curves, stats
from rmlib.analysis.claims import NOT_AT_SCALE, NOT_RUN, OPPOSITE, REPRODUCED
from rmlib.analysis.dispersion import dispersion_findings


# -- the rules -----------------------------------------------------------------------------------
def test_z_rule_counts_a_difference_beyond_1_96_standard_errors():
    assert claims.Z_95 == pytest.approx(scipy.stats.norm.ppf(0.975), abs=5e-4)  # two-sided 95%
    assert claims.z_verdict(1.97, 1.0) == REPRODUCED
    assert claims.z_verdict(1.95, 1.0) == NOT_AT_SCALE  # under z = 2 too, but 1.97 was not beyond z = 2
    assert claims.z_verdict(1.96, 1.0) == NOT_AT_SCALE  # the bar itself is inside
    assert claims.z_verdict(-1.97, 1.0) == OPPOSITE
    assert claims.z_verdict(-1.97, 1.0, want="lower") == REPRODUCED
    assert claims.z_verdict(0.1, 0.0) == REPRODUCED and claims.z_verdict(0.0, 0.0) == NOT_AT_SCALE  # no spread
    assert claims.z_verdict(5.0, math.nan) == NOT_AT_SCALE  # no standard error: cannot be told from noise
    assert claims.z_verdict(math.nan, 1.0) == NOT_RUN and claims.z_verdict(None, 1.0) == NOT_RUN
    assert claims.combined_sem(0.3, 0.4) == pytest.approx(0.5)  # independent runs: SEs add in quadrature
    assert claims.z_noise(0.5) == pytest.approx(0.98)


def test_noise_bar_rule_takes_the_widest_interval_or_seed_spread():
    assert claims.noise_bar([0.02, 0.03], [0.01, math.nan]) == pytest.approx(0.03)
    assert claims.noise_bar([0.02, 0.01], [0.05, 0.0]) == pytest.approx(0.05)
    assert claims.noise_bar([math.nan], []) == 0.0
    assert claims.noise_verdict(0.031, 0.03) == REPRODUCED
    assert claims.noise_verdict(0.03, 0.03) == NOT_AT_SCALE
    assert claims.noise_verdict(-0.031, 0.03) == OPPOSITE
    assert claims.noise_verdict(-0.031, 0.03, want="lower") == REPRODUCED
    assert claims.noise_verdict(math.nan, 0.03) == NOT_RUN


@pytest.fixture
def seeded_table():
    rows = []
    for variant, values in {"bt": [0.60, 0.62], "bsr": [0.70, 0.72], "grm": [0.61, 0.63]}.items():
        for seed, v in enumerate(values):
            rows.append({"variant": variant, "seed": seed, "metric": "acc", "value": v,
                         "ci_low": v - 0.02, "ci_high": v + 0.02})
    return pd.DataFrame(rows)


def test_versus_baseline_applies_the_noise_bar_per_metric(seeded_table):
    agg = stats.seed_aggregate(seeded_table, ["variant", "metric"])
    v = claims.versus_baseline(agg, "bt").set_index("variant")
    assert v.loc["bsr", "verdict"] == claims.HIGHER and v.loc["bsr", "difference"] == pytest.approx(0.10)
    assert v.loc["grm", "verdict"] == claims.TIE  # +0.01 inside the +-0.02 intervals
    assert v.loc["grm", "noise"] == pytest.approx(0.02)
    for _, row in v.iterrows():  # the direction column is rule 2 on the table's own numbers
        verdict = claims.noise_verdict(row["difference"], row["noise"])
        assert row["verdict"] == {REPRODUCED: claims.HIGHER, OPPOSITE: claims.LOWER, NOT_AT_SCALE: claims.TIE}[verdict]
    low = claims.versus_baseline(agg, "bsr").set_index("variant")
    assert low.loc["bt", "verdict"] == claims.LOWER
    spread = seeded_table.assign(value=seeded_table["value"] + np.where(seeded_table["seed"] == 1, 0.2, 0.0))
    wide = claims.versus_baseline(stats.seed_aggregate(spread, ["variant", "metric"]), "bt").set_index("variant")
    assert wide.loc["bsr", "noise"] == pytest.approx(np.std([0.70, 0.92], ddof=1))  # seed spread beats the intervals
    assert wide.loc["bsr", "verdict"] == claims.TIE
    with pytest.raises(ValueError, match="baseline 'x'"):
        claims.versus_baseline(agg, "x")


def test_relative_rule_needs_more_than_5_percent():
    assert claims.REL_TOL == 0.05
    assert claims.relative_verdict(0.949, 1.0, want="lower") == REPRODUCED
    assert claims.relative_verdict(0.951, 1.0, want="lower") == NOT_AT_SCALE
    assert claims.relative_verdict(1.06, 1.0, want="lower") == OPPOSITE
    assert claims.relative_verdict(1.06, 1.0, want="higher") == REPRODUCED
    assert claims.relative_verdict(-1.06, -1.0, want="lower") == REPRODUCED  # relative to |baseline|
    assert claims.relative_verdict(0.5, 0.0, want="lower") == NOT_AT_SCALE  # no relative scale
    assert claims.relative_verdict(math.nan, 1.0, want="lower") == NOT_RUN


def test_bar_rule_and_observed_rule():
    assert claims.bar_verdict(0.62, 0.62) == REPRODUCED and claims.bar_verdict(0.619, 0.62) == NOT_AT_SCALE
    assert claims.bar_verdict(math.nan, 0.62) == NOT_RUN
    assert claims.observed_verdict(True) == REPRODUCED and claims.observed_verdict(False) == NOT_AT_SCALE
    assert claims.observed_verdict(None) == NOT_RUN


def test_direction_must_be_named():
    with pytest.raises(ValueError, match="want must be"):
        claims.z_verdict(3.0, 1.0, want="up")


# -- the over-optimization regime (issue 19) -----------------------------------------------------
def _fit(**kw):
    row = {"gold_drop": 0.0, "gold_drop_sem": 0.1, "n_peak": 128, "beta": -0.1, "beta_low": -0.2,
           "kl_star": math.inf, "kl_max": 3.86}
    return pd.Series({**row, **kw})


def test_bon_regime_by_the_drop_from_the_peak():
    assert claims.BON_DROP_SEMS == 2.0
    yes = claims.bon_overoptimizes(_fit(gold_drop=0.201, gold_drop_sem=0.1, n_peak=16))
    assert yes.reached and yes.test == "drop from the peak" and "n = 16" in yes.numbers
    assert not claims.bon_overoptimizes(_fit(gold_drop=0.199, gold_drop_sem=0.1, n_peak=16)).reached  # 1.99 SEM
    assert claims.bon_overoptimizes(_fit(gold_drop=0.05, gold_drop_sem=0.0, n_peak=16)).reached  # no spread
    assert not claims.bon_overoptimizes(_fit(gold_drop=0.0, gold_drop_sem=0.0)).reached  # peak at the largest n
    assert yes.line().startswith("BT over-optimizes here: yes (drop from the peak: gold at the largest n 0.201")


def test_bon_regime_by_the_gao_fit():
    inside = dict(beta=0.3, beta_low=0.01, kl_star=2.0, kl_max=3.86)
    yes = claims.bon_overoptimizes(_fit(**inside))
    assert yes.reached and yes.test == "Gao fit"
    assert not claims.bon_overoptimizes(_fit(**{**inside, "beta_low": -0.01})).reached  # interval reaches 0
    assert not claims.bon_overoptimizes(_fit(**{**inside, "kl_star": 4.0})).reached  # peak beyond the range
    assert not claims.bon_overoptimizes(_fit(**{**inside, "kl_star": 0.0})).reached  # falls from the start: no peak
    both = claims.bon_overoptimizes(_fit(**inside, gold_drop=1.0, gold_drop_sem=0.1))
    assert both.reached and both.test == "drop from the peak and Gao fit"
    none = claims.bon_overoptimizes(pd.Series({"gold_drop": math.nan, "beta": math.nan}))
    assert none.reached is None and none.line().startswith("BT over-optimizes here: not measured")
    assert claims.bon_overoptimizes({"gold_drop": 1.0, "gold_drop_sem": 0.1}).reached  # a dict works too


def test_bon_regime_on_a_real_fit_table():
    from test_gao_fit import NS, hacked_scores

    from rmlib.analysis import gao_fit

    table = gao_fit.fit_table(hacked_scores(), ["bon_proxy_bt_s0", "bon_proxy_bsr_s0"], ns=NS, n_boot=200)
    rows = table.set_index("variant")
    assert claims.bon_overoptimizes(rows.loc["bt"]).reached is True
    assert claims.bon_overoptimizes(rows.loc["bsr"]).reached is False


def _rl(gold_tail, proxy_tail, head=(0.0, 0.1, 0.2, 0.3, 0.4, 0.5)):
    steps = list(range(0, 10 * (len(head) + len(gold_tail)), 10))
    return steps, [*head, *gold_tail], [*head, *proxy_tail]


def test_rl_regime_needs_gold_falling_and_proxy_rising_over_the_last_third():
    steps, gold, proxy = _rl([0.5, 0.4, 0.3], [0.6, 0.7, 0.8])  # 9 records: the last 3 count
    yes = claims.rl_overoptimizes(steps, gold, proxy)
    assert yes.reached and "steps 60-80 (3 records)" in yes.numbers  # a perfect line: zero SE
    noisy_gold = [0.5, 0.3, 0.45, 0.2]  # falls, but not beyond 1.96 SE of its own scatter
    steps, gold, proxy = _rl(noisy_gold, [0.6, 0.7, 0.8, 0.9], head=(0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.55, 0.6))
    fit = scipy.stats.linregress(steps[-4:], gold[-4:])
    assert fit.slope < 0 and abs(fit.slope) <= 1.96 * fit.stderr
    assert claims.rl_overoptimizes(steps, gold, proxy).reached is False
    steps, gold, proxy = _rl([0.5, 0.4, 0.3], [0.5, 0.4, 0.3])  # gold falls with the proxy: no over-optimization
    no = claims.rl_overoptimizes(steps, gold, proxy)
    assert no.reached is False and "proxy does not rise" in no.test
    # the head of the run does not count: gold rises then falls only in the last third
    steps = list(range(12))
    gold = [0, 1, 2, 3, 4, 5, 6, 7, 7.5, 7.0, 6.5, 6.0]
    assert claims.rl_overoptimizes(steps, gold, [float(s) for s in steps]).reached
    assert claims.rl_overoptimizes([0, 1], [0, 1], [0, 1]).reached is None
    with pytest.raises(ValueError, match="one length"):
        claims.rl_overoptimizes([0, 1, 2], [0, 1], [0, 1, 2])


def test_rl_regime_per_run_of_the_curves():
    steps = list(range(0, 90, 10))
    rows = [{"run": "bt", "step": st, "gold_delta": g, "proxy_delta": 0.1 * i}
            for i, (st, g) in enumerate(zip(steps, [0, .1, .2, .3, .4, .5, .5, .4, .3]))]
    rows += [{"run": "bsr", "step": st, "gold_delta": 0.05 * i, "proxy_delta": 0.1 * i} for i, st in enumerate(steps)]
    regimes = rloo_curves.overoptimization_by_run(pd.DataFrame(rows).sample(frac=1.0, random_state=0))
    assert regimes["bt"].reached is True and regimes["bsr"].reached is False
    assert regimes["bt"] == claims.rl_overoptimizes(steps, [0, .1, .2, .3, .4, .5, .5, .4, .3],
                                                    [0.1 * i for i in range(9)])
    with pytest.raises(ValueError, match="lacks columns"):
        rloo_curves.overoptimization_by_run(pd.DataFrame(rows).drop(columns="proxy_delta"))


def test_overtraining_needs_saturation_and_a_held_out_fall_beyond_noise():
    n = 400
    se = math.sqrt(0.70 * 0.30 / n)  # binomial SE at the best epoch: 0.0229, bar 0.0449
    held = [0.66, 0.70, 0.68, 0.70 - 1.96 * se - 0.001]
    yes = claims.overtraining_reached([0.80, 0.90, 0.96, 0.97], held, n)
    assert yes.reached and "held-out accuracy worsened" in yes.test
    assert not claims.overtraining_reached([0.80, 0.90, 0.96, 0.97], [0.66, 0.70, 0.68, 0.70 - 1.96 * se + 0.001],
                                           n).reached
    flat = claims.overtraining_reached([0.80, 0.85, 0.90, 0.905], held, n)  # a 0.5-point last epoch: saturated
    assert flat.reached
    climbing = claims.overtraining_reached([0.60, 0.70, 0.80, 0.90], held, n)
    assert climbing.reached is False and climbing.test == "training not saturated"
    loss = claims.overtraining_reached([0.9, 0.97], [0.70, 0.70], n, heldout_loss=[0.60, 0.70],
                                       heldout_loss_sem=[0.04, 0.05])
    assert loss.reached and "loss worsened" in loss.test  # rise 0.10 > 1.96 x 0.04
    assert not claims.overtraining_reached([0.9, 0.97], [0.70, 0.70], n, heldout_loss=[0.60, 0.67],
                                           heldout_loss_sem=[0.04, 0.05]).reached
    assert claims.overtraining_reached([], [], n).reached is None
    with pytest.raises(ValueError, match="n_heldout"):
        claims.overtraining_reached([0.9], [0.7], 0)


def test_spreading_needs_net_growth_beyond_5_percent_without_a_fall():
    assert claims.spreads_hidden_states({"pair_dist_mean": [1.0, 1.2, 1.5]}).reached
    assert not claims.spreads_hidden_states({"pair_dist_mean": [1.0, 1.03, 1.049]}).reached  # within 5%
    dip = claims.spreads_hidden_states({"pair_dist_mean": [1.0, 1.5, 1.2, 1.6]})  # -20% at epoch 3
    assert not dip.reached and "falls at epoch(s) [3]" in dip.numbers
    cv = claims.spreads_hidden_states({"pair_dist_mean": [1.0, 0.9], "h_norm_cv": [0.10, 0.12]})
    assert cv.reached and cv.test.startswith("h_norm_cv")
    assert claims.spreads_hidden_states({"pair_dist_mean": [1.0]}).reached is None


def test_mitigation_is_tested_only_where_bt_over_optimizes():
    yes, no = claims.Regime(True, "t", "x"), claims.Regime(False, "t", "x")
    assert claims.mitigation_verdict(yes, claims.z_verdict(0.3, 0.1)) == REPRODUCED
    assert claims.mitigation_verdict(no, claims.z_verdict(0.3, 0.1)) == claims.BT_NO_OVEROPT
    assert claims.BT_NO_OVEROPT == "BT does not over-optimize here"
    assert claims.mitigation_verdict(claims.Regime(None, "t", "x"), REPRODUCED) == NOT_RUN


def test_a_scenario_claim_carries_its_mdd():
    c = claims.mdd_claim(0.02, 0.03, mdd=0.05, paper_effect=0.0152)
    assert c["verdict"] == NOT_AT_SCALE and c["mdd"] == 0.05 and c["detectable"] is False
    assert claims.mdd_claim(0.06, 0.03, mdd=0.01, paper_effect=0.0152)["detectable"] is True
    assert claims.mdd_claim(0.06, 0.03, mdd=math.nan, paper_effect=0.0152)["detectable"] is None


# -- the modules that state verdicts -------------------------------------------------------------
def _bon_row(variant, d, sem):
    return {"policy": "pol", "variant": variant, "n_seeds": 2, "n_final": 16, "kl_final": 1.8, "proxy_norm_final": 0.7,
            "gold_norm_final": 0.2, "n_gold_peak": 16, "kl_gold_peak": 1.8, "gold_drop_from_peak": 0.0,
            "gold_bends_down": False, "seeds_bending": 0, "gold_minus_bt": d, "gold_minus_bt_sem": sem}


def test_bon_describe_states_the_z_rule():
    summary = pd.DataFrame([_bon_row("bt", 0.0, 0.0), _bon_row("bsr", 0.0197, 0.01), _bon_row("grm", 0.0195, 0.01),
                            _bon_row("bsr_grm", -0.0197, 0.01), _bon_row("bsr_1e-2", math.nan, math.nan)])
    lines = {line.split(":")[0].strip(" -"): line for line in bon.describe(summary).splitlines()[1:]}
    labels = bon.VARIANT_LABELS
    assert "holds up BETTER than BT" in lines[labels["bsr"]]
    assert "is indistinguishable from BT at this scale" in lines[labels["grm"]]
    assert "does WORSE than BT" in lines[labels["bsr_grm"]]
    assert "no paired comparison with the baseline" in lines[labels.get("bsr_1e-2", "bsr_1e-2")]


def _rloo_rows(cases):
    rows = pd.DataFrame([{"run": r, "step": st, "kl": 0.1 * st, "kl_sem": 0.01, "proxy_delta": d,
                          "proxy_delta_sem": 0.1, "proxy_std0": 1.0, "gold_delta": d, "gold_delta_sem": sem,
                          "gold_win_rate": 0.5, "length_tokens": 10.0} for r, d, sem in cases for st in (0, 4)])
    rows.loc[rows["step"] == 0, ["proxy_delta", "gold_delta"]] = 0.0
    return rows


def test_rloo_describe_runs_states_the_z_rule():
    cases = (("up", 0.198, 0.1), ("flat", 0.195, 0.1), ("down", -0.5, 0.1), ("same", 0.2, 0.0), ("none", 0.1, math.nan))
    lines = rloo_curves.describe_runs(rloo_curves.summary_table(_rloo_rows(cases))).splitlines()
    assert "(up beyond 1.96 standard errors)" in lines[0]  # 1.98 SE: was "within 2 standard errors" before
    assert "(within 1.96 standard errors of no change)" in lines[1]
    assert "(down beyond 1.96 standard errors)" in lines[2]
    assert "(up beyond 1.96 standard errors)" in lines[3]  # every sample moved by the same amount: zero spread
    assert "(no step-0 record to compare with)" in lines[4]


def test_dispersion_findings_state_the_relative_rule():
    summaries = pd.DataFrame([{"model": m, "split": s, "erank": e, "h_norm_mean": h}
                              for m, rows in {"bt": [("train", 10.0, 10.0), ("a", 20.0, 20.0), ("b", 14.0, 12.0)],
                                              "bsr": [("train", 10.0, 10.0), ("a", 10.5, 19.0), ("b", 11.0, 12.0)],
                                              "grm": [("train", 10.0, 10.0), ("a", 21.0, 21.0), ("b", 14.0, 11.0)]}.items()
                              for s, e, h in rows])
    records = {"bt": [{"pair_dist_mean": 1.0, "pair_dist_std": 1.0}, {"pair_dist_mean": 2.0, "pair_dist_std": 2.0}],
               "bsr": [{"pair_dist_mean": 1.0, "pair_dist_std": 1.0}, {"pair_dist_mean": 1.96, "pair_dist_std": 1.0}],
               "grm": [{"pair_dist_mean": 1.0, "pair_dist_std": 1.0}, {"pair_dist_mean": 2.2, "pair_dist_std": 2.0}]}
    f = dispersion_findings(records, summaries).set_index(["model", "claim"])
    assert "lower_than_baseline" not in f.columns
    # 2% lower: "lower than BT" before this rule, not at this scale now
    assert f.loc[("bsr", "pair_dist_growth_mean"), "verdict"] == NOT_AT_SCALE
    assert f.loc[("bsr", "pair_dist_growth_std"), "verdict"] == REPRODUCED  # 50% lower
    assert f.loc[("grm", "pair_dist_growth_mean"), "verdict"] == OPPOSITE  # 10% higher
    assert pd.isna(f.loc[("bt", "pair_dist_growth_mean"), "verdict"])  # the baseline itself
    for (model, _), row in f.iterrows():
        if model != "bt":
            assert row["verdict"] == claims.relative_verdict(row["value"], row["baseline"], want="lower")
