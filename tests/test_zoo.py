"""The shared reward-model zoo (rmlib.analysis.zoo) and what the notebooks compute from it: Best-of-N per
noise level (bon_runs.analyze_level), RLOO arms (rloo_curves), summaries from per-epoch records."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from test_gao_fit import hacked_scores

from rmlib.analysis import bon_runs, claims, dispersion, rloo_curves, zoo
from rmlib.analysis.synthetic_gold import GOLD_NAME


class TestNames:
    def test_plan_checks_variants_seeds_and_levels(self):
        plan = zoo.plan({"bt": [0, 1, 2], "bsr": [0]}, {"bt": [0]}, 0.25)
        assert list(plan) == [0.25, 0.0] and plan[0.25]["bt"] == [0, 1, 2] and zoo.all_seeds(plan) == [0, 1, 2]
        assert list(zoo.plan({"bt": [0]}, {}, 0.25)) == [0.25]  # an empty clean level is left out
        with pytest.raises(ValueError, match="unknown variant"):
            zoo.plan({"bst": [0]}, {}, 0.25)
        with pytest.raises(ValueError, match="distinct integer seeds"):
            zoo.plan({"bt": [0, 0]}, {}, 0.25)
        assert zoo.plan({"bt": [0]}, {}, 0.0) == {0.0: {"bt": [0]}}  # a paper's clean setting
        with pytest.raises(ValueError, match="leave proxies_clean empty"):
            zoo.plan({"bt": [0]}, {"bt": [1]}, 0.0)
        with pytest.raises(ValueError, match=r"\[0, 0.5\]"):
            zoo.plan({"bt": [0]}, {}, 0.6)

    def test_folders_and_score_columns_carry_the_level(self, tmp_path):
        assert zoo.noise_tag(0.25) == "noise25" and zoo.noise_tag(0.0) == "noise0"
        with pytest.raises(ValueError, match="whole percent"):
            zoo.noise_tag(0.255)
        assert zoo.proxy_final_dir(tmp_path, 0.25, "bt", 1) == tmp_path / "zoo/noise25/models/bon_proxy_bt_s1/final"
        col = zoo.score_column("bon_proxy_bsr_s0", 0.25)
        assert col == "bon_proxy_bsr_s0@noise25" and zoo.parse_score_column(col) == ("bon_proxy_bsr_s0", 0.25)
        with pytest.raises(ValueError, match="not a zoo score column"):
            zoo.parse_score_column("bon_proxy_bsr_s0")
        plan = zoo.plan({"bt": [0, 1]}, {"bt": [0]}, 0.25)
        dirs = zoo.final_dirs(tmp_path, plan)
        assert sorted(dirs) == ["bon_proxy_bt_s0@noise0", "bon_proxy_bt_s0@noise25", "bon_proxy_bt_s1@noise25"]
        cfgs = zoo.configs(tmp_path, plan, backbone="smollm2-135m-instruct", mode="topk", top_k_layers=2)
        assert cfgs[0.0]["bon_proxy_bt_s0"].output_dir == str(tmp_path / "zoo/noise0/models/bon_proxy_bt_s0")
        assert cfgs[0.25]["bon_proxy_bt_s1"].seed == 1 and cfgs[0.25]["bon_proxy_bt_s1"].top_k_layers == 2

    def test_records_name_the_notebook_that_writes_them(self, tmp_path):
        with pytest.raises(FileNotFoundError, match="04_bon_curves"):
            zoo.records(tmp_path, zoo.plan({"bt": [0]}, {}, 0.25))
        with pytest.raises(FileNotFoundError, match="04_bon_curves"):
            zoo.load_pairs(tmp_path, 0.25, "train")


def zoo_scores():
    """A zoo score table: at 25% the BT proxies love hacks the gold punishes (over-optimization by design),
    the BSR proxy follows the gold; at 0% the BT proxies follow the gold."""
    s = hacked_scores(n_prompts=40)
    s["sample_index"] = s.groupby("prompt_id").cumcount()
    rng = np.random.default_rng(1)
    clean = {zoo.score_column(f"bon_proxy_bt_s{k}", 0.0): s[GOLD_NAME] + 0.3 * rng.normal(size=len(s)) for k in (0, 1)}
    return pd.DataFrame({"prompt_id": s["prompt_id"], "sample_index": s["sample_index"], GOLD_NAME: s[GOLD_NAME],
                         zoo.score_column("bon_proxy_bt_s0", 0.25): s["bon_proxy_bt_s0"],
                         zoo.score_column("bon_proxy_bt_s1", 0.25): s["bon_proxy_bt_s1"],
                         zoo.score_column("bon_proxy_bsr_s0", 0.25): s["bon_proxy_bsr_s0"], **clean})


class TestBonLevels:
    def test_scores_at_selects_one_level_under_plain_names(self):
        frame, proxies = zoo.scores_at(zoo_scores(), 0.0)
        assert proxies == ["bon_proxy_bt_s0", "bon_proxy_bt_s1"]
        assert list(frame.columns) == ["prompt_id", "sample_index", GOLD_NAME, *proxies]
        with pytest.raises(ValueError, match="noise50"):
            zoo.scores_at(zoo_scores(), 0.5)

    def test_noisy_level_over_optimizes_and_tests_the_mitigations(self):
        level = bon_runs.analyze_level(zoo_scores(), 0.25, policy="pol", n_boot=100)
        assert level.regime.reached is True and level.regime.line().startswith("BT over-optimizes here: yes (")
        assert {"bt", "bsr", "bt_mean", "bt_min", "oracle"} <= set(level.summary["variant"])
        fits = level.fits[level.fits["rm"] == ""].set_index("variant")
        assert fits.loc["bt", "n_members"] == 2 and fits.loc["bt", "beta"] > 0
        v = level.verdicts.set_index("variant")
        assert v.loc["bsr", "verdict"] == claims.REPRODUCED == v.loc["bsr", "rule_verdict"]  # BSR follows the gold
        assert (level.curves["noise"] == 0.25).all() and (level.fits["policy"] == "pol").all()
        row = level.regime_row()
        assert row["reached"] is True and row["noise"] == 0.25 and "BT over-optimizes here: yes" in row["line"]
        assert "BT over-optimizes here: yes" in bon_runs.describe_level(level)

    def test_clean_level_does_not_and_the_mitigation_rows_say_so(self):
        level = bon_runs.analyze_level(zoo_scores(), 0.0, n_boot=50)
        assert level.regime.reached is False and "BT over-optimizes here: no" in level.regime.line()
        assert set(level.verdicts["variant"]) == {"bt_mean", "bt_min"}
        assert (level.verdicts["verdict"] == claims.BT_NO_OVEROPT).all()


def curves(gold_tail, proxy_tail, run):
    steps = list(range(7))
    gold, proxy = [0.0, 0.1, 0.2, 0.3, *gold_tail], [0.0, 0.1, 0.2, 0.3, *proxy_tail]
    return pd.DataFrame({"run": run, "step": steps, "gold_delta": gold, "proxy_delta": proxy})


class TestRlooArms:
    def test_arms_are_checked_and_named(self):
        arms = rloo_curves.check_arms([["bt", 0.0], ["bsr", 0], ["bt", 0.05]], ["bt", "bsr"])
        assert arms == {"bt_beta0": ("bt", 0.0), "bsr_beta0": ("bsr", 0.0), "bt_beta0.05": ("bt", 0.05)}
        for bad, match in [([["grm", 0.0]], "not among"), ([["bt", -1.0]], ">= 0"), ([["bt", 0.0], ["bt", 0]], "twice"),
                           ([["bt"]], r"\[proxy, beta\]"), ([], "empty")]:
            with pytest.raises(ValueError, match=match):
                rloo_curves.check_arms(bad, ["bt", "bsr"])

    def test_mitigation_is_tested_only_where_bt_over_optimizes(self):
        arms = rloo_curves.check_arms([["bt", 0.0], ["bsr", 0.0]], ["bt", "bsr"])
        frame = pd.concat([curves([0.2, 0.1, 0.0], [0.4, 0.5, 0.6], "bt_beta0"),
                           curves([0.4, 0.5, 0.6], [0.4, 0.5, 0.6], "bsr_beta0")], ignore_index=True)
        regimes = rloo_curves.overoptimization_by_run(frame)
        assert regimes["bt_beta0"].reached is True and regimes["bsr_beta0"].reached is False
        table = pd.DataFrame([{"run": "bt_beta0", "gold_delta": 0.0, "gold_delta_sem": 0.05, "length_tokens_end": 90.0},
                              {"run": "bsr_beta0", "gold_delta": 0.6, "gold_delta_sem": 0.05, "length_tokens_end": 50.0}])
        v = rloo_curves.mitigation_table(table, regimes, arms)
        assert v["verdict"].tolist() == [claims.REPRODUCED, claims.REPRODUCED]
        lines = rloo_curves.regime_table(regimes, arms)["line"].tolist()
        assert lines[0].startswith("bt_beta0: BT over-optimizes here: yes") and "BSR over-optimizes here: no" in lines[1]
        regimes["bt_beta0"] = claims.Regime(False, "t", "n")
        v = rloo_curves.mitigation_table(table, regimes, arms)
        assert v["verdict"].tolist() == [claims.BT_NO_OVEROPT, claims.REPRODUCED]  # the length claim is no mitigation


def test_summaries_from_records_split_the_eval_probes():
    last = {"step": 10, "epoch": 2.0, "epoch_end": True, "pair_distances": [1.0], "w_norm": 1.1, "h_norm_mean": 5.0,
            "erank": 3.0, "accuracy": 0.9, "heldout_h_norm_mean": 6.0, "heldout_erank": 4.0, "heldout_accuracy": 0.6,
            "ood_h_norm_mean": 7.0, "ood_erank": 5.0, "ood_accuracy": 0.5}
    rows = dispersion.summaries_from_records({"bt": [{"step": 0}, last]}).set_index("split")
    assert rows.loc["train", "h_norm_mean"] == 5.0 and rows.loc["heldout", "h_norm_mean"] == 6.0
    assert rows.loc["ood", "erank"] == 5.0 and math.isnan(rows.loc["ood"].get("w_norm", math.nan))
    assert "pair_distances" not in rows.columns and "heldout_erank" not in rows.columns
    with pytest.raises(ValueError, match=r"lacks eval probe\(s\) \['ood'\]"):
        dispersion.summaries_from_records({"bt": [{k: v for k, v in last.items() if not k.startswith("ood")}]})


def test_findings_become_mitigation_claims_only_where_bt_spreads():
    findings = pd.DataFrame({"model": ["bt", "bsr"], "claim": ["pair_dist_growth_mean"] * 2, "value": [1.5, 1.1],
                             "baseline": [1.5, 1.5], "verdict": [None, claims.REPRODUCED]})
    spreads = dispersion.mitigation_findings(findings, claims.Regime(True, "t", "n"))
    assert pd.isna(spreads["verdict"].iloc[0]) and spreads["verdict"].iloc[1] == claims.REPRODUCED
    assert spreads["rule_verdict"].iloc[1] == claims.REPRODUCED
    flat = dispersion.mitigation_findings(findings.assign(verdict=[math.nan, claims.REPRODUCED]), claims.Regime(False, "t", "n"))
    assert pd.isna(flat["verdict"].iloc[0]) and flat["verdict"].iloc[1] == claims.BT_NO_OVEROPT


def test_training_sets_noise_the_training_pairs_only():
    from rmlib.data.schema import pair_row, to_dataset

    pairs = to_dataset([pair_row(id=f"p{i}", prompt=[{"role": "user", "content": f"q{i}"}], chosen=f"good {i}",
                                 rejected=f"bad {i}", source="x", chosen_score=1.0, rejected_score=0.0)
                        for i in range(200)])
    plan = zoo.plan({"bt": [0]}, {"bt": [0]}, 0.25)
    sets, heldout, report = zoo.training_sets(pairs, 40, plan, seed=3)
    assert len(heldout) == 40 and all(c > r for c, r in zip(heldout["chosen_score"], heldout["rejected_score"]))
    clean, noisy = sets[0.0], sets[0.25]
    assert len(clean) == len(noisy) == 160 and set(clean["id"]) == set(noisy["id"]) and not set(clean["id"]) & set(heldout["id"])
    wrong = sum(c < r for c, r in zip(noisy["chosen_score"], noisy["rejected_score"]))
    assert report.set_index("p").loc[0.25, "flipped"] == wrong and 20 <= wrong <= 60  # ~25% of 160
    assert report.set_index("p").loc[0.0, "flipped"] == 0
    with pytest.raises(ValueError, match="n_heldout"):
        zoo.training_sets(pairs, 1, plan)


def test_noise_of_a_zoo_folder(tmp_path):
    assert zoo.noise_of_path(zoo.proxy_final_dir(tmp_path, 0.25, "bt", 0)) == 0.25
    assert zoo.noise_of_path("runs/cpu/zoo/noise0/models/bon_proxy_bt_s0/final") == 0.0
    assert zoo.noise_of_path("runs/cpu/models/bon_proxy_bt_s0/final") is None
