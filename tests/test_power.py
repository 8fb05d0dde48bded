"""rmlib.analysis.power: the minimum detectable difference (95% two-sided, 80% power) of notebook 03's
comparisons, and the sentence that puts it beside the paper's effect."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import scipy.stats

from rmlib.analysis import power, stats


def test_mdd_is_2_8_standard_errors():
    assert power.Z_POWER == pytest.approx(scipy.stats.norm.ppf(0.80), abs=2e-3)
    assert power.mdd(0.01) == pytest.approx(0.028)
    assert math.isnan(power.mdd(math.nan))


def test_mdd_has_80_percent_power_by_simulation():
    # a true difference of exactly MDD, tested at |d| > 1.96 SE, is found ~80% of the time
    rng = np.random.default_rng(0)
    se = 0.02
    d = rng.normal(power.mdd(se), se, size=200_000)
    assert np.mean(np.abs(d) > 1.96 * se) == pytest.approx(0.80, abs=0.005)


def test_standard_errors():
    assert power.accuracy_se(0.7, 100) == pytest.approx(math.sqrt(0.21 / 100))
    assert power.mean_se(0.5, 25) == pytest.approx(0.1)
    assert power.seed_mean_se(0.03, 0.04, 4) == pytest.approx(math.sqrt(0.03 ** 2 + 0.04 ** 2 / 4))
    assert math.isnan(power.seed_mean_se(0.03, math.nan, 1))  # one seed: its spread is unknown
    assert power.paired_se([1.0, 2.0, 3.0, 4.0]) == pytest.approx(np.std([1, 2, 3, 4], ddof=1) / 2)
    assert power.interval_se(0.5, 0.5 + 2 * 1.96 * 0.01) == pytest.approx(0.01)
    with pytest.raises(ValueError, match="0 <= p <= 1"):
        power.accuracy_se(1.2, 10)
    with pytest.raises(ValueError, match="n_seeds"):
        power.seed_mean_se(0.1, 0.1, 0)


def test_design_table_shrinks_with_items_and_seeds():
    t = power.design_table(0.7, [200, 800], 0.5, [100, 400], seed_sd=0.01, seeds=[2, 4])
    acc = t[t["metric"] == "accuracy"].set_index(["n_items", "n_seeds"])["mdd"]
    assert acc[(800, 2)] < acc[(200, 2)] and acc[(200, 4)] < acc[(200, 2)]
    one = math.sqrt(0.21 / 200 + 0.01 ** 2 / 2)
    assert acc[(200, 2)] == pytest.approx(2.8 * math.sqrt(2) * one)
    tau = t[t["metric"] == "kendall_tau_b"].set_index(["n_items", "n_seeds"])["mdd"]
    assert tau[(400, 4)] == pytest.approx(2.8 * math.sqrt(2 * (0.5 ** 2 / 400 + 0.01 ** 2 / 4)))


def seeded(values_by_variant, half_width=0.02):
    rows = []
    for variant, values in values_by_variant.items():
        for seed, v in enumerate(values):
            rows.append({"variant": variant, "seed": seed, "scenario": "val2_prompt_ood", "value": v,
                         "ci_low": v - half_width, "ci_high": v + half_width})
    return stats.seed_aggregate(pd.DataFrame(rows), ["variant", "scenario"])


def test_mdd_table_from_results_and_the_paper_effect():
    agg = seeded({"bt": [0.60, 0.62, 0.61], "bsr": [0.63, 0.65, 0.64]})
    t = power.mdd_table(agg).set_index("variant")
    side = math.sqrt((0.02 / 1.96) ** 2 + 0.01 ** 2 / 3)  # seed sd of 0.60, 0.61, 0.62 is 0.01
    assert t.loc["bsr", "se"] == pytest.approx(math.sqrt(2) * side)
    assert t.loc["bsr", "mdd"] == pytest.approx(2.8 * math.sqrt(2) * side)
    assert t.loc["bsr", "difference"] == pytest.approx(0.03)
    assert t.loc["bsr", "paper_effect"] == pytest.approx(0.0152) and t["detectable"].tolist() == [False]
    tight = power.mdd_table(seeded({"bt": [0.6, 0.6, 0.6], "bsr": [0.6, 0.6, 0.6]}, half_width=0.002))
    assert tight["detectable"].tolist() == [True]  # MDD 0.0029 < 0.0152
    one = power.mdd_table(seeded({"bt": [0.6], "bsr": [0.62]}))
    assert math.isnan(one["mdd"].iloc[0]) and one["detectable"].tolist() == [None]
    with pytest.raises(ValueError, match="lacks columns"):
        power.mdd_table(agg.drop(columns="seed_std"))
    with pytest.raises(ValueError, match="baseline 'x'"):
        power.mdd_table(agg, baseline="x")


def test_power_statement():
    assert "cannot detect" in power.power_statement(0.05, 0.0152) and "0.050" in power.power_statement(0.05)
    assert "can detect" in power.power_statement(0.01, 0.0152)
    assert "unknown" in power.power_statement(math.nan, 0.01)


def test_mdd_verdicts_put_the_power_beside_each_claim():
    rows = [{"variant": v, "scenario": "val2_prompt_ood", "value": x, "ci_low": x - 0.05, "ci_high": x + 0.05,
             "seed_std": 0.01, "n_seeds": 3} for v, x in (("bt", 0.50), ("bsr", 0.70))]
    table = power.mdd_verdicts(pd.DataFrame(rows), "scenario").iloc[0]
    se = power.combined_sem(*[power.seed_mean_se(0.05 / 1.96, 0.01, 3)] * 2)
    assert table["measure"] == "val2_prompt_ood" and table["difference"] == pytest.approx(0.2)
    assert table["verdict"] == "reproduced" and table["mdd"] == pytest.approx(power.mdd(se))
    assert table["paper_effect"] == pytest.approx(0.0152) and table["detectable"] is not None and not table["detectable"]
    assert "this design cannot detect it" in table["power"]
