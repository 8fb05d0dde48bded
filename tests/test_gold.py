"""rmlib.analysis.synthetic_gold: the data split (disjoint prompts), relabeling by the gold, the proxy grid, the
curves/summary/text built on the exact BoN estimator, and the reuse of saved reward models."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_tiny_lm
from datasets import Dataset

from rmlib import plots
from rmlib.analysis import bon, bon_runs, claims, synthetic_gold
from rmlib.data import (
    RESPONSE_FEATURES,
    load_alpaca_eval_responses,
    load_hh_rlhf,
    load_mt_bench_questions,
)
from rmlib.data.schema import pair_row, to_dataset
from rmlib.model import score_cache
from rmlib.model.reward_model import RewardModel, save_reward_model


# -- synthetic sources ----------------------------------------------------------------------------
def fake_responses(n_prompts=40, generators=("g0", "g1", "g2", "g3", "falcon-7b-instruct")) -> Dataset:
    """Each prompt: every generator answers; g0/g1 win, the others lose (so pairs exist everywhere)."""
    rows = []
    for p in range(n_prompts):
        for k, g in enumerate(generators):
            win = k < 2
            rows.append({"id": f"{g}.json:{p}", "prompt_id": p, "instruction": f"Instruction {p}: do thing {p}.",
                         "category": ["koala", "oasst"][p % 2], "generator": g, "output": f"answer of {g} to {p}",
                         "preference": 2.0 if win else 1.0, "gold": 1.0 if win else -1.0})
    return Dataset.from_list(rows, features=RESPONSE_FEATURES)


def fake_hh(n_prompts=30) -> Dataset:
    """HH-like pairs; prompts 0..9 carry two pairs each (a prompt must never be split)."""
    rows = []
    for p in range(n_prompts):
        for j in range(2 if p < 10 else 1):
            msgs = [{"role": "user", "content": f"hh question {p}"}, {"role": "assistant", "content": "ok"},
                    {"role": "user", "content": f"and then {p}?"}]
            rows.append(pair_row(id=f"hh:{p}:{j}", prompt=msgs, chosen=f"good {p} {j}", rejected=f"bad {p} {j}",
                                 source="hh-rlhf/harmless-base"))
    return to_dataset(rows)


SPLIT_KW = dict(n_bon_prompts=5, n_gold_alpaca=30, n_gold_hh=8, n_proxy_alpaca=12, n_proxy_hh=4,
                prompt_frac_gold=0.6, max_pairs_per_prompt=2, seed=0)


def keys_of(ds):
    return {synthetic_gold.prompt_key(p) for p in ds["prompt"]}


class TestSplit:
    def test_three_prompt_sets_are_disjoint_and_sized(self):
        split = synthetic_gold.make_gold_split(fake_responses(), fake_hh(), **SPLIT_KW)
        bon_keys = {synthetic_gold.prompt_key(m) for m in split.bon_prompts["messages"]}
        gold_keys, proxy_keys = keys_of(split.gold_train), keys_of(split.proxy_pool)
        assert not (bon_keys & gold_keys) and not (bon_keys & proxy_keys) and not (gold_keys & proxy_keys)
        assert split.prompts == {"bon": bon_keys, "gold": gold_keys, "proxy": proxy_keys}
        assert len(split.bon_prompts) == 5 and split.bon_prompts["prompt_id"].is_unique
        assert (split.bon_prompts["source"] == "alpaca_eval").all()
        sources = pd.Series(split.gold_train["source"]).value_counts().to_dict()
        assert sources == {"alpaca_eval": 30, "hh-rlhf/harmless-base": 8}
        assert pd.Series(split.proxy_pool["source"]).value_counts().to_dict() == {"alpaca_eval": 12,
                                                                                  "hh-rlhf/harmless-base": 4}
        sizes = split.sizes()
        assert sizes.set_index(["part", "source"]).loc[("gold_train", "alpaca_eval"), "pairs"] == 30
        assert sizes.set_index(["part", "source"]).loc[("bon_eval", "alpaca_eval"), "prompts"] == 5

    def test_alpaca_pairs_are_win_over_loss_without_excluded_generators(self):
        split = synthetic_gold.make_gold_split(fake_responses(), fake_hh(), **SPLIT_KW)
        alp = split.gold_train.filter(lambda r: r["source"] == "alpaca_eval")
        assert set(alp["chosen_generator"]) <= {"g0", "g1"} and set(alp["rejected_generator"]) <= {"g2", "g3"}
        per_prompt = pd.Series([p[0]["content"] for p in alp["prompt"]]).value_counts()
        assert per_prompt.max() <= 2  # max_pairs_per_prompt

    def test_prompt_frac_splits_prompts_not_pairs(self):
        split = synthetic_gold.make_gold_split(fake_responses(), fake_hh(), **{**SPLIT_KW, "n_gold_alpaca": 0,
                                                                     "n_proxy_alpaca": 0, "n_gold_hh": 10,
                                                                     "n_proxy_hh": 5})
        # every HH pair of a prompt with two pairs is on one side only
        gold_ids = {i.rsplit(":", 1)[0] for i in split.gold_train["id"]}
        proxy_ids = {i.rsplit(":", 1)[0] for i in split.proxy_pool["id"]}
        assert not gold_ids & proxy_ids

    def test_seed_fixes_everything(self):
        a = synthetic_gold.make_gold_split(fake_responses(), fake_hh(), **SPLIT_KW)
        b = synthetic_gold.make_gold_split(fake_responses(), fake_hh(), **SPLIT_KW)
        c = synthetic_gold.make_gold_split(fake_responses(), fake_hh(), **{**SPLIT_KW, "seed": 1})
        assert list(a.gold_train["id"]) == list(b.gold_train["id"])
        assert list(a.proxy_pool["id"]) == list(b.proxy_pool["id"])
        assert list(a.gold_train["id"]) != list(c.gold_train["id"])
        assert list(a.bon_prompts["prompt_id"]) == list(b.bon_prompts["prompt_id"])
        assert list(a.bon_prompts["prompt_id"]) != list(c.bon_prompts["prompt_id"])

    def test_hh_and_mt_bench_as_bon_source(self):
        split = synthetic_gold.make_gold_split(fake_responses(), fake_hh(), **{**SPLIT_KW, "bon_source": "hh"})
        assert (split.bon_prompts["source"] == "hh-rlhf").all() and len(split.bon_prompts) == 5
        assert len(split.bon_prompts["messages"].iloc[0]) == 3  # the whole conversation before the reply
        assert not split.prompts["bon"] & (split.prompts["gold"] | split.prompts["proxy"])
        mt = load_mt_bench_questions().dataset
        split = synthetic_gold.make_gold_split(fake_responses(), fake_hh(), mt, **{**SPLIT_KW, "bon_source": "mt_bench"})
        assert split.bon_prompts["prompt_id"].str.startswith("mt_bench:").all()
        assert split.bon_prompts["messages"].map(len).eq(1).all()

    def test_prompt_sets_are_saved_for_later_notebooks(self, tmp_path):
        from rmlib.rloo.prompts import exclusion_texts

        split = synthetic_gold.make_gold_split(fake_responses(), fake_hh(), **SPLIT_KW)
        files = synthetic_gold.save_prompt_sets(split, tmp_path)
        train = json.loads(files["rm_training_prompts"].read_text())
        assert set(train) == split.prompts["gold"] | split.prompts["proxy"] and train == sorted(train)
        assert set(json.loads(files["bon_prompts"].read_text())) == split.prompts["bon"]
        # notebook 05 reads the keys back as first user turns
        first_turns = {next(m["content"].strip() for m in p if m["role"] == "user")
                       for ds in (split.gold_train, split.proxy_pool) for p in ds["prompt"]}
        assert exclusion_texts(train) == first_turns

    @pytest.mark.parametrize("bad, name", [
        ({"bon_source": "reddit"}, "bon_source"), ({"n_bon_prompts": 0}, "n_bon_prompts"),
        ({"n_gold_alpaca": -1}, "n_gold_alpaca"), ({"n_proxy_hh": 1.5}, "n_proxy_hh"),
        ({"prompt_frac_gold": 1.0}, "prompt_frac_gold"), ({"n_gold_alpaca": 10_000}, "n_gold_alpaca"),
        ({"n_proxy_hh": 500}, "n_proxy_hh"), ({"n_bon_prompts": 40}, "n_bon_prompts"),
        ({"max_pairs_per_prompt": 0}, "max_pairs_per_prompt"),
    ])
    def test_bad_parameters_are_named(self, bad, name):
        with pytest.raises(ValueError, match=name):
            synthetic_gold.make_gold_split(fake_responses(), fake_hh(), **{**SPLIT_KW, **bad})

    def test_missing_sources_are_named(self):
        with pytest.raises(ValueError, match="hh_pairs"):
            synthetic_gold.make_gold_split(fake_responses(), None, **SPLIT_KW)
        with pytest.raises(ValueError, match="mt_bench_questions"):
            synthetic_gold.make_gold_split(fake_responses(), fake_hh(), **{**SPLIT_KW, "bon_source": "mt_bench"})

    def test_on_the_real_data(self):
        responses = load_alpaca_eval_responses().dataset
        split = synthetic_gold.make_gold_split(responses, load_hh_rlhf().dataset, n_bon_prompts=40, n_gold_alpaca=600,
                                     n_gold_hh=200, n_proxy_alpaca=160, n_proxy_hh=80, seed=0)
        assert len(split.gold_train) == 800 and len(split.proxy_pool) == 240 and len(split.bon_prompts) == 40
        for a, b in [("bon", "gold"), ("bon", "proxy"), ("gold", "proxy")]:
            assert not split.prompts[a] & split.prompts[b], (a, b)
        alp = split.gold_train.filter(lambda r: r["source"] == "alpaca_eval")
        assert (np.array(alp["chosen_score"]) > np.array(alp["rejected_score"])).all()  # GPT-4 win over loss
        assert not {"falcon-7b-instruct", "Mistral-7B+RAHF-DUAL+LoRA"} & set(list(alp["chosen_generator"]) +
                                                                           list(alp["rejected_generator"]))


def test_check_disjoint_names_the_sets():
    synthetic_gold.check_disjoint({"a": {"x", "y"}, "b": {"z"}, "c": set()})
    with pytest.raises(ValueError, match="'a' and 'c'.*1 prompt"):
        synthetic_gold.check_disjoint({"a": {"x", "y"}, "b": {"z"}, "c": {"y"}})


def test_prompt_key_ignores_surrounding_whitespace_only():
    a = synthetic_gold.prompt_key([{"role": "user", "content": " Hi there \n"}])
    assert a == synthetic_gold.prompt_key([{"role": "user", "content": "Hi there"}])
    assert a != synthetic_gold.prompt_key([{"role": "assistant", "content": "Hi there"}])
    assert a != synthetic_gold.prompt_key([{"role": "user", "content": "Hi  there"}])


# -- relabeling ------------------------------------------------------------------------------------
def pool(n=6):
    return to_dataset([pair_row(id=f"p{i}", prompt=[{"role": "user", "content": f"q{i}"}], chosen=f"c{i}",
                                rejected=f"r{i}", source="alpaca_eval", chosen_generator=f"gc{i}",
                                rejected_generator=f"gr{i}", chosen_score=1.0, rejected_score=-1.0)
                       for i in range(n)])


class TestRelabel:
    def test_chosen_is_the_higher_gold_score(self):
        ds = pool()
        c = [2.0, 0.1, 0.5, 1.0, np.nan, -3.0]
        r = [1.0, 0.9, 0.5, 3.0, 0.0, -2.5]
        out = synthetic_gold.relabel_pairs(ds, c, r)
        kept = {row["id"]: row for row in out.pairs.to_list()}
        assert set(kept) == {"p0", "p1", "p3", "p5"}
        assert kept["p0"]["chosen"] == "c0" and kept["p0"]["chosen_generator"] == "gc0"  # gold agrees
        for i in ("1", "3", "5"):  # gold prefers the originally rejected reply: swapped, generators too
            row = kept[f"p{i}"]
            assert (row["chosen"], row["rejected"]) == (f"r{i}", f"c{i}")
            assert (row["chosen_generator"], row["rejected_generator"]) == (f"gr{i}", f"gc{i}")
        for row in kept.values():
            assert row["chosen_score"] > row["rejected_score"]  # the gold scores now
        assert kept["p3"]["chosen_score"] == 3.0 and kept["p3"]["rejected_score"] == 1.0
        assert out.dropped == {"tie": ["p2"], "unscored": ["p4"]}
        assert out.n_flipped == 3 and out.n_ties == 1 and out.n_unscored == 1 and out.n_in == 6
        assert out.agreement == pytest.approx(1 / 4)
        rep = out.report()
        assert rep["kept"] + rep["dropped_ties"] + rep["dropped_unscored"] == rep["pairs_in"]

    def test_tie_tolerance(self):
        out = synthetic_gold.relabel_pairs(pool(3), [1.0, 1.0, 1.0], [1.04, 0.5, 0.96], tie_tol=0.05)
        assert out.dropped == {"tie": ["p0", "p2"]} and list(out.pairs["id"]) == ["p1"]

    def test_bad_inputs(self):
        with pytest.raises(ValueError, match="one gold score per pair"):
            synthetic_gold.relabel_pairs(pool(3), [1.0, 2.0], [0.0, 0.0, 0.0])
        with pytest.raises(ValueError, match="tie_tol"):
            synthetic_gold.relabel_pairs(pool(2), [1.0, 2.0], [0.0, 0.0], tie_tol=-1)


class TestLabelNoise:
    def gold_labelled(self, n):
        return to_dataset([pair_row(id=f"p{i}", prompt=[{"role": "user", "content": f"q{i}"}], chosen=f"c{i}",
                                    rejected=f"r{i}", source="alpaca_eval", chosen_generator=f"gc{i}",
                                    rejected_generator=f"gr{i}", chosen_score=1.0 + i, rejected_score=0.0)
                           for i in range(n)])

    def test_coin_flip_redraws_about_2p_and_gets_about_p_wrong(self):
        ds = self.gold_labelled(4000)
        out = synthetic_gold.add_label_noise(ds, 0.25, seed=0)
        # binomial(4000, 1/2) and (4000, 1/4): 4 standard deviations are about 0.03 and 0.027
        assert abs(len(out.randomized) / 4000 - 0.5) < 0.032
        assert abs(len(out.flipped) / 4000 - 0.25) < 0.028
        assert set(out.flipped) <= set(out.randomized)
        rows = {r["id"]: r for r in out.pairs.to_list()}
        wrong = {i for i, r in rows.items() if r["chosen_score"] < r["rejected_score"]}
        assert wrong == set(out.flipped)  # a swap moves texts, generators and scores together
        r = rows[out.flipped[0]]
        k = out.flipped[0][1:]
        assert (r["chosen"], r["rejected"], r["chosen_generator"]) == (f"r{k}", f"c{k}", f"gr{k}")
        assert out.report()["flipped"] == len(out.flipped) and out.report()["pairs"] == 4000

    def test_flip_scheme_flips_about_p(self):
        out = synthetic_gold.add_label_noise(self.gold_labelled(4000), 0.1, seed=3, scheme="flip")
        assert out.randomized == out.flipped and abs(len(out.flipped) / 4000 - 0.1) < 0.019

    def test_per_pair_draw_ignores_order_and_the_other_pairs(self):
        ds = self.gold_labelled(300)
        whole = set(synthetic_gold.add_label_noise(ds, 0.25, seed=7).flipped)
        shuffled = ds.select(np.random.default_rng(0).permutation(300).tolist())
        assert set(synthetic_gold.add_label_noise(shuffled, 0.25, seed=7).flipped) == whole
        part = synthetic_gold.add_label_noise(ds.select(range(100, 160)), 0.25, seed=7)
        assert set(part.flipped) == {i for i in whole if 100 <= int(i[1:]) < 160}
        other = set(synthetic_gold.add_label_noise(ds, 0.25, seed=8).flipped)
        assert other != whole
        assert synthetic_gold.add_label_noise(ds, 0.0, seed=7).flipped == []

    def test_relabel_then_noise(self):
        ds = pool(6)
        clean = synthetic_gold.relabel_pairs(ds, [2.0, 0.1, 0.7, 1.0, 4.0, -3.0], [1.0, 0.9, 0.5, 3.0, 0.0, -2.5])
        noisy = synthetic_gold.relabel_pairs(ds, [2.0, 0.1, 0.7, 1.0, 4.0, -3.0], [1.0, 0.9, 0.5, 3.0, 0.0, -2.5],
                                             label_noise=0.5, noise_seed=1)
        assert clean.noise is None and noisy.noise.p == 0.5
        assert noisy.n_flipped == clean.n_flipped == 3  # the gold's relabeling is counted apart from the noise
        expected = set(synthetic_gold.add_label_noise(clean.pairs, 0.5, seed=1).flipped)
        wrong = {r["id"] for r in noisy.pairs.to_list() if r["chosen_score"] < r["rejected_score"]}
        assert wrong == expected == set(noisy.noise.flipped)
        assert noisy.report()["noise_flipped"] == len(expected)

    @pytest.mark.parametrize("kw,match", [(dict(p=0.6), "label noise p"), (dict(p=-0.1), "label noise p"),
                                          (dict(p=0.2, scheme="x"), "noise scheme 'x'")])
    def test_bad_noise(self, kw, match):
        with pytest.raises(ValueError, match=match):
            synthetic_gold.add_label_noise(self.gold_labelled(3), seed=0, **kw)

    def test_repeated_ids_are_refused(self):
        ds = to_dataset([pair_row(id="same", prompt=[{"role": "user", "content": "q"}], chosen="a", rejected="b",
                                  source="s")] * 2)
        with pytest.raises(ValueError, match="'same' repeats"):
            synthetic_gold.add_label_noise(ds, 0.25, seed=0)


# -- configs and names ------------------------------------------------------------------------------
COMMON = dict(backbone="smollm2-135m-instruct", mode="topk", top_k_layers=2, learning_rate=5e-5,
              per_device_train_batch_size=4, num_train_epochs=1.0, max_length=128, bf16=False)


class TestConfigs:
    def test_grid(self, tmp_path):
        cfgs = synthetic_gold.proxy_configs(tmp_path, ["bt", "bsr", "grm", "bsr_grm"], [0, 3], grm_alpha=0.02,
                                  grm_beta=0.2, head="linear", **COMMON)
        assert list(cfgs) == [f"bon_proxy_{v}_s{s}" for v in ("bt", "bsr", "grm", "bsr_grm") for s in (0, 3)]
        want = {"bt": ("bt", "none"), "bsr": ("bsr", "none"), "grm": ("bt", "sft"), "bsr_grm": ("bsr", "sft")}
        for name, cfg in cfgs.items():
            variant, seed = synthetic_gold.parse_proxy_name(name)
            assert (cfg.loss, cfg.regularizer) == want[variant] and cfg.seed == seed
            assert cfg.loss_params == ({"lam": pytest.approx(4e-3)} if cfg.loss == "bsr" else {})  # 1e-3 x batch 4
            assert cfg.alpha == 0.02 and cfg.beta == 0.2 and cfg.head == "linear"
            assert cfg.output_dir == str(tmp_path / "models" / name)
            assert cfg.mode == "topk" and cfg.top_k_layers == 2 and cfg.max_length == 128
        assert cfgs["bon_proxy_grm_s0"].model_spec.keep_lm_head and not cfgs["bon_proxy_bt_s0"].model_spec.keep_lm_head

    @pytest.mark.parametrize("kw, name", [
        ({"variants": ["bt", "ppo"]}, "variant"), ({"variants": []}, "variants"),
        ({"variants": ["bt", "bt"]}, "repeat"),
        ({"seeds": []}, "seeds"), ({"seeds": [0, 0]}, "seeds"), ({"seeds": [-1]}, "seeds"), ({"seeds": ["0"]}, "seeds"),
        ({"grm_alpha": 1.0}, "grm_alpha"), ({"grm_beta": float("nan")}, "grm_beta"),
        ({"loss": "bt"}, "loss"), ({"seed": 1}, "seed"),
    ])
    def test_bad_grid_parameters(self, tmp_path, kw, name):
        args = {"variants": ["bt"], "seeds": [0], **kw}
        with pytest.raises(ValueError, match=name):
            synthetic_gold.proxy_configs(tmp_path, args.pop("variants"), args.pop("seeds"), **args, **COMMON)

    def test_gold_config(self, tmp_path):
        cfg = synthetic_gold.gold_config(tmp_path, num_train_epochs=2.0, **{k: v for k, v in COMMON.items()
                                                                   if k != "num_train_epochs"})
        assert cfg.output_dir == str(tmp_path / "models" / "bon_gold") and cfg.loss == "bt"
        assert cfg.regularizer == "none" and cfg.num_train_epochs == 2.0 and cfg.top_k_layers == 2
        with pytest.raises(ValueError, match="loss"):
            synthetic_gold.gold_config(tmp_path, loss="bsr")

    def test_gold_seed_differs_from_proxy_seeds(self):
        assert synthetic_gold.check_gold_seed(100, [0, 1]) == 100
        with pytest.raises(ValueError, match="gold_seed=1 is also a proxy seed"):
            synthetic_gold.check_gold_seed(1, [0, 1])
        with pytest.raises(ValueError, match="gold_seed must"):
            synthetic_gold.check_gold_seed(-1, [0])

    def test_names(self, tmp_path):
        assert synthetic_gold.proxy_name("bsr_grm", 2) == "bon_proxy_bsr_grm_s2"
        assert synthetic_gold.parse_proxy_name("bon_proxy_bsr_grm_s2") == ("bsr_grm", 2)
        for bad in ("bon_gold", "bon_proxy_ppo_s0", "bon_proxy_bt", "bon_proxy_bt_sx"):
            with pytest.raises(ValueError, match="proxy run name"):
                synthetic_gold.parse_proxy_name(bad)
        with pytest.raises(ValueError, match="variant"):
            synthetic_gold.proxy_name("ppo", 0)
        dirs = synthetic_gold.final_dirs(tmp_path, ["bt", "grm"], [0, 1])
        assert list(dirs) == ["bon_gold", "bon_proxy_bt_s0", "bon_proxy_bt_s1", "bon_proxy_grm_s0", "bon_proxy_grm_s1"]
        assert dirs["bon_gold"] == tmp_path / "models" / "bon_gold" / "final"

    def test_trained_models_lists_finished_runs_only(self, tmp_path):
        for name, done in [("bon_proxy_bt_s0", True), ("bon_gold", True), ("bon_proxy_grm_s0", False),
                           ("bt", True), ("bon_other", True)]:
            final = tmp_path / "models" / name / "final"
            final.mkdir(parents=True)
            if done:
                (final / "rmlib_reward.json").write_text("{}")
        found = synthetic_gold.trained_models(tmp_path)
        assert list(found) == ["bon_gold", "bon_proxy_bt_s0"]
        assert found["bon_gold"] == tmp_path / "models" / "bon_gold" / "final"
        assert synthetic_gold.trained_models(tmp_path / "nothing") == {}


# -- curves, summary and the computed text -----------------------------------------------------------
def synthetic_scores(n_prompts=30, N=16, seed=0):
    """bt proxies reward a 'hack' that the gold punishes (over-optimization by design); bsr proxies
    are the gold plus noise (no hack)."""
    rng = np.random.default_rng(seed)
    rows = []
    for p in range(n_prompts):
        g = rng.normal(size=N)
        hack = np.zeros(N)
        hack[rng.choice(N, 2, replace=False)] = 1.0
        g_obs = g - 2.5 * hack  # hacked replies are bad for the gold
        for s in range(N):
            rows.append({"prompt_id": f"p{p}", "sample_index": s, "bon_gold": g_obs[s]})
        for seed_ in (0, 1):
            noise = rng.normal(scale=0.3, size=N)
            for s in range(N):
                rows[-N + s][f"bon_proxy_bt_s{seed_}"] = g[s] + 4.0 * hack[s] + noise[s]
                rows[-N + s][f"bon_proxy_bsr_s{seed_}"] = g_obs[s] + rng.normal(scale=0.3)
    return pd.DataFrame(rows)


PROXIES = ["bon_proxy_bt_s0", "bon_proxy_bt_s1", "bon_proxy_bsr_s0", "bon_proxy_bsr_s1"]


class TestCurves:
    def test_curves_are_the_exact_estimator_per_proxy(self):
        scores = synthetic_scores()
        curves = bon.bon_curves(scores, PROXIES, policy="pol")
        assert list(curves.columns) == bon.CURVES_COLUMNS
        assert set(curves["variant"]) == {"bt", "bsr", "oracle"} and (curves["policy"] == "pol").all()
        one = curves[curves["rm"] == "bon_proxy_bsr_s1"].reset_index(drop=True)
        ref = bon.bon_curve(scores, proxy_col="bon_proxy_bsr_s1", gold_col="bon_gold")
        pd.testing.assert_frame_equal(one[bon.CURVE_COLUMNS], ref)
        oracle = curves[curves["variant"] == "oracle"]
        assert (oracle["seed"] == -1).all()
        # nothing picks better for the gold than the gold itself
        for rm in PROXIES:
            assert (curves[curves["rm"] == rm]["gold"].to_numpy() <= oracle["gold"].to_numpy() + 1e-12).all()

    def test_variant_curves_average_seeds(self):
        curves = bon.bon_curves(synthetic_scores(), PROXIES)
        mean = bon.variant_curves(curves)
        bt = curves[curves["variant"] == "bt"]
        want = bt.groupby("n")["gold_norm"].agg(["mean", "std"])
        got = mean[mean["variant"] == "bt"].set_index("n")
        np.testing.assert_allclose(got["gold_norm"], want["mean"])
        np.testing.assert_allclose(got["gold_norm_sd"], want["std"])
        assert (got["n_seeds"] == 2).all() and got["gold_norm"].iloc[0] == pytest.approx(0, abs=1e-12)

    def test_paired_difference_by_hand(self):
        scores = synthetic_scores(n_prompts=5)
        diff = bon.paired_gold_difference(scores, PROXIES, n=8).set_index("variant")
        by_hand = []
        for pid, g in scores.groupby("prompt_id"):
            bsr = np.mean([bon.bon_expectation(g[f"bon_proxy_bsr_s{s}"], g["bon_gold"], 8)[1] for s in (0, 1)])
            bt = np.mean([bon.bon_expectation(g[f"bon_proxy_bt_s{s}"], g["bon_gold"], 8)[1] for s in (0, 1)])
            by_hand.append(bsr - bt)
        assert diff.loc["bsr", "gold_minus_baseline"] == pytest.approx(np.mean(by_hand), abs=1e-12)
        assert diff.loc["bsr", "sem"] == pytest.approx(np.std(by_hand, ddof=1) / math.sqrt(5), abs=1e-12)
        assert diff.loc["bt", "gold_minus_baseline"] == 0.0
        with pytest.raises(ValueError, match="baseline"):
            bon.paired_gold_difference(scores, PROXIES[2:])

    def test_summary_and_text_follow_the_numbers(self):
        scores = synthetic_scores()
        curves = bon.bon_curves(scores, PROXIES, policy="pol")
        table = bon.summary_table(curves, scores).set_index("variant")
        assert list(bon.summary_table(curves, scores).columns) == bon.SUMMARY_COLUMNS
        bt, bsr = table.loc["bt"], table.loc["bsr"]
        assert bt["gold_bends_down"] and bt["n_gold_peak"] < bt["n_final"] == 16 and bt["seeds_bending"] == 2
        assert bt["proxy_norm_final"] > 0 and not bsr["gold_bends_down"]
        assert claims.z_verdict(bsr["gold_minus_bt"], bsr["gold_minus_bt_sem"]) == claims.REPRODUCED
        assert bsr["gold_minus_bt_sem"] > 0
        assert bsr["tau_proxy_gold"] > bt["tau_proxy_gold"]
        text = bon.describe(bon.summary_table(curves, scores))
        assert "BT's gold curve BENDS DOWN" in text and f"peak at n = {int(bt['n_gold_peak'])}" in text
        assert f"{synthetic_gold.VARIANT_LABELS['bsr']}: gold" in text and "holds up BETTER than BT" in text
        # the other way round: a harmless BT and a hacked "BSR" flip every statement
        swapped = scores.rename(columns={p: p.replace("bt", "tmp") for p in PROXIES}).rename(
            columns=lambda c: c.replace("bsr", "bt")).rename(columns=lambda c: c.replace("tmp", "bsr"))
        text2 = bon.describe(bon.summary_table(bon.bon_curves(swapped, PROXIES, policy="pol"), swapped))
        assert "does NOT bend down" in text2 and "does WORSE than BT" in text2

    def test_a_proxy_ranking_against_the_gold_falls_from_the_start(self):
        scores = synthetic_scores()
        for s in (0, 1):  # "bt" proxies now rank the samples exactly against the gold
            scores[f"bon_proxy_bt_s{s}"] = -scores["bon_gold"]
        table = bon.summary_table(bon.bon_curves(scores, PROXIES, policy="pol"), scores)
        bt = table.set_index("variant").loc["bt"]
        assert bt["gold_bends_down"] and bt["n_gold_peak"] == 1 and bt["tau_proxy_gold"] == pytest.approx(-1)
        text = bon.describe(table)
        assert "BT's gold curve FALLS FROM THE START" in text and "BENDS DOWN" not in text

    def test_summary_without_seeds_variation_and_scores(self):
        scores = synthetic_scores()
        curves = bon.bon_curves(scores, ["bon_proxy_bsr_s0"], include_oracle=False)
        table = bon.summary_table(curves)
        assert len(table) == 1 and math.isnan(table["gold_norm_final_sd"].iloc[0])
        assert math.isnan(table["tau_proxy_gold"].iloc[0]) and table["n_seeds"].iloc[0] == 1

    def test_figure_has_one_panel_per_variant_plus_overlay(self):
        import matplotlib

        matplotlib.use("Agg")
        curves = bon.bon_curves(synthetic_scores(n_prompts=4), PROXIES, policy="pol")
        fig = plots.plot_bon_curves(curves, policy="pol")
        axes = fig.axes
        assert len(axes) == 3  # bt, bsr, all-gold overlay
        styles = {line.get_label(): line.get_linestyle() for line in axes[0].get_lines()}
        assert styles["proxy"] == "--" and styles["gold"] == "-"
        assert "oracle (gold picks)" in [t.get_text() for t in axes[-1].get_legend().get_texts()]
        with pytest.raises(ValueError, match="no curves"):
            plots.plot_bon_curves(curves, policy="other")


def test_save_meta_writes_plain_json(tmp_path):
    path = bon_runs.save_meta(tmp_path / "m.json", sizes=pd.DataFrame({"a": [1, 2]}), n=np.int64(3),
                          where=tmp_path, nested={"x": (np.float32(0.5),)})
    assert json.loads(path.read_text()) == {"sizes": [{"a": 1}, {"a": 2}], "n": 3, "where": str(tmp_path),
                                            "nested": {"x": [0.5]}}


# -- with tiny saved reward models ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def saved_rms(tokenizer, tmp_path_factory):
    """Three tiny linear-head RMs on ONE frozen bottom (3 of 4 layers equal), as top-k training leaves them."""
    root = tmp_path_factory.mktemp("rms")
    base = make_tiny_lm(tokenizer, seed=0, layers=4)
    paths = {}
    for k, name in enumerate(["bon_gold", "bon_proxy_bt_s0", "bon_proxy_bsr_s0"]):
        lm = make_tiny_lm(tokenizer, seed=0, layers=4)
        lm.load_state_dict(base.state_dict())
        torch.manual_seed(100 + k)
        with torch.no_grad():
            for p in lm.model.layers[3].parameters():
                p.add_(0.05 * torch.randn_like(p))
        rm = RewardModel(lm, head="linear")
        paths[name] = save_reward_model(rm, root / name / "final", tokenizer, dtype=torch.float32)
    return paths


def small_pairs(n=6):
    return to_dataset([pair_row(id=f"x{i}", prompt=[{"role": "user", "content": f"What is {i} plus {i}?"}],
                                chosen=f"It is {2 * i}.", rejected=f"Maybe {i}.", source="alpaca_eval")
                       for i in range(n)])


def test_score_pairs_cached_reuses_only_the_same_model(saved_rms, tmp_path, monkeypatch):
    from rmlib.analysis import benchmarks

    calls = []
    original = benchmarks.model_pair_scorer
    monkeypatch.setattr(bon_runs, "model_pair_scorer", lambda *a, **k: calls.append(1) or original(*a, **k))
    pairs, path = small_pairs(), tmp_path / "gold_pool.csv"
    kw = dict(max_length=64, batch_size=4, bf16=False, progress=False)
    first = bon_runs.score_pairs_cached(saved_rms["bon_gold"], pairs, path, **kw)
    again = bon_runs.score_pairs_cached(saved_rms["bon_gold"], pairs, path, **kw)
    assert len(calls) == 1 and np.allclose(first["chosen"], again["chosen"])
    assert first["chosen"].notna().all() and (first["chosen"] != first["rejected"]).all()
    other = bon_runs.score_pairs_cached(saved_rms["bon_proxy_bt_s0"], pairs, path, **kw)  # another model: recomputed
    assert len(calls) == 2 and not np.allclose(other["chosen"], first["chosen"])
    bon_runs.score_pairs_cached(saved_rms["bon_proxy_bt_s0"], pairs, path, **{**kw, "max_length": 48})
    assert len(calls) == 3


def test_score_with_all_matches_each_model_alone(saved_rms, tokenizer, tmp_path):
    from rmlib.model.reward_model import load_reward_model

    samples = pd.DataFrame({"prompt_id": ["a", "a", "b"], "sample_index": [0, 1, 0],
                            "messages": [[{"role": "user", "content": "Hi?"}]] * 2 + [[{"role": "user",
                                                                                          "content": "Why?"}]],
                            "response": ["Hello there.", "Go away.", "Because of physics."]})
    scores = bon_runs.score_with_all(saved_rms, samples, tmp_path / "scores.jsonl", bf16=False, progress=False)
    assert list(scores.columns) == ["prompt_id", "sample_index", *saved_rms]
    for name, path in saved_rms.items():
        alone = score_cache.score_samples(load_reward_model(path), tokenizer, samples, bf16=False, progress=False)
        np.testing.assert_allclose(scores[name], alone, atol=1e-5)
    cached = [json.loads(line)["rm"] for line in (tmp_path / "scores.jsonl").read_text().splitlines()]
    assert {k.split("@")[0] for k in cached} == set(saved_rms) and all("@" in k for k in cached)
    with pytest.raises(FileNotFoundError, match="bon_nothing"):
        bon_runs.score_with_all({"bon_nothing": tmp_path / "nope"}, samples, tmp_path / "s.jsonl")


def test_train_runs_table_trains_then_reuses(tiny_backbone, tmp_path):
    rows = [pair_row(id=f"t{i}", prompt=[{"role": "user", "content": f"Question {i}?"}],
                     chosen="A careful helpful answer.", rejected="No.", source="alpaca_eval") for i in range(8)]
    pairs = to_dataset(rows)
    cfgs = synthetic_gold.proxy_configs(tmp_path, ["bt", "grm"], [0], backbone=tiny_backbone, mode="topk", top_k_layers=1,
                              max_steps=2, per_device_train_batch_size=2, bf16=False, disable_tqdm=True,
                              logging_steps=1, learning_rate=1e-3)
    first = bon_runs.train_runs_table(cfgs, pairs)
    assert list(first["name"]) == ["bon_proxy_bt_s0", "bon_proxy_grm_s0"]
    assert list(first["variant"]) == ["bt", "grm"] and (first["steps"] == 2).all()
    assert set(synthetic_gold.trained_models(tmp_path)) == {"bon_proxy_bt_s0", "bon_proxy_grm_s0"}
    meta = json.loads((tmp_path / "models" / "bon_proxy_grm_s0" / "metrics.json").read_text())
    assert meta["config"]["regularizer"] == "sft" and meta["config"]["seed"] == 0
    second = bon_runs.train_runs_table(cfgs, pairs)  # reused: same metrics, nothing retrained
    assert second["train_seconds"].tolist() == first["train_seconds"].tolist()
