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
