"""The four over-optimization scenarios on the real AlpacaEval data (small caps): disjointness,
determinism, sizes, and evaluation with a perfect scorer and with the tiny model."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from rmlib.analysis import scenarios

SMALL = dict(n_train_pairs=300, max_pairs_per_prompt=4, max_responses_per_prompt=4, max_prompts_per_split=12)


@pytest.fixture(scope="module")
def responses():
    from rmlib.data import load_alpaca_eval_responses

    return load_alpaca_eval_responses().dataset


@pytest.fixture(scope="module")
def split(responses):
    return scenarios.make_scenarios(responses, seed=0, **SMALL)


def _response_ids(pairs):
    return {part for i in pairs["id"] for part in i.split("|")}


def _prompt_ids(split_, pairs):
    pid = {}
    for table in [split_.train_responses, *(v.responses for v in split_.val.values())]:
        pid.update(zip(table["id"], table["prompt_id"]))
    return {pid[i] for i in _response_ids(pairs)}


def test_prompt_and_generator_splits_are_disjoint_and_exclude_known_bad_generators(split):
    assert not set(split.train_prompts) & set(split.unseen_prompts)
    assert len(split.train_prompts) + len(split.unseen_prompts) == 805
    assert not set(split.train_generators) & set(split.new_generators)
    assert len(split.train_generators) + len(split.new_generators) == 51
    assert set(split.excluded_generators) == {"falcon-7b-instruct", "Mistral-7B+RAHF-DUAL+LoRA"}
    everything = [split.train_responses] + [v.responses for v in split.val.values()]
    assert not any(t["generator"].isin(split.excluded_generators).any() for t in everything)


def test_each_part_uses_its_prompts_and_generators(split):
    train_p, unseen_p = set(split.train_prompts), set(split.unseen_prompts)
    train_g, new_g = set(split.train_generators), set(split.new_generators)
    assert _prompt_ids(split, split.train_pairs) <= train_p
    assert set(split.train_pairs["chosen_generator"]) | set(split.train_pairs["rejected_generator"]) <= train_g
    expect = {"val1_in_domain": (train_p, train_g), "val2_prompt_ood": (unseen_p, train_g),
              "val3_response_ood": (train_p, new_g), "val4_mutual_ood": (unseen_p, new_g)}
    for name, (prompts, gens) in expect.items():
        v = split.val[name]
        assert set(v.responses["prompt_id"]) <= prompts and set(v.responses["generator"]) <= gens, name
        assert _response_ids(v.pairs) <= set(v.responses["id"]), name
        assert (v.pairs["chosen_score"] == np.ones(len(v.pairs))).all() and set(v.pairs["rejected_score"]) == {-1.0}
        # every kept prompt has a +1 and a -1 response, so gold can order a pair
        g = v.responses.groupby("prompt_id")["gold"]
        assert (g.max() > 0).all() and (g.min() < 0).all(), name


def test_val1_shares_no_response_or_pair_with_train(split, responses):
    v1 = split.val["val1_in_domain"]
    assert not set(v1.pairs["id"]) & set(split.train_pairs["id"])
    assert not _response_ids(v1.pairs) & _response_ids(split.train_pairs)
    assert not set(v1.responses["id"]) & set(split.train_responses["id"])


def test_caps(split):
    assert len(split.train_pairs) == SMALL["n_train_pairs"]
    for v in split.val.values():
        assert v.responses.groupby("prompt_id").size().max() <= SMALL["max_responses_per_prompt"]
        assert v.responses["prompt_id"].nunique() == SMALL["max_prompts_per_split"]


def test_deterministic_with_the_seed(split, responses):
    again = scenarios.make_scenarios(responses, seed=0, **SMALL)
    other = scenarios.make_scenarios(responses, seed=1, **SMALL)
    assert again.train_pairs["id"] == split.train_pairs["id"]
    assert (again.train_prompts, again.train_generators) == (split.train_prompts, split.train_generators)
    for name in scenarios.SCENARIOS:
        pd.testing.assert_frame_equal(again.val[name].responses, split.val[name].responses)
        assert again.val[name].pairs["id"] == split.val[name].pairs["id"]
    assert other.train_prompts != split.train_prompts and other.train_pairs["id"] != split.train_pairs["id"]
    pd.testing.assert_frame_equal(scenarios.split_sizes(again), scenarios.split_sizes(split))


def test_sizes_table(split):
    sizes = scenarios.split_sizes(split)
    assert sizes["split"].tolist() == ["train", *scenarios.SCENARIOS]
    assert {"prompts", "generators", "responses", "pairs", "prompt_pool", "generator_pool"} <= set(sizes.columns)
    row = sizes.set_index("split")
    assert row.loc["train", "pairs"] == 300 and row.loc["val3_response_ood", "generator_pool"] == 15
    assert (row.loc[list(scenarios.SCENARIOS), "prompts"] == 12).all()
    assert (row.loc[list(scenarios.SCENARIOS[1:]), "responses"] == 48).all()  # 12 prompts x 4 (pools have >= 15)
    assert row.loc["val1_in_domain", "responses"] <= 48  # a Val1 prompt may hold fewer than 4 held-out responses
    for name in scenarios.SCENARIOS:
        assert row.loc[name, "pairs"] == len(split.val[name].pairs) > 0


def test_prompts_stratified_by_category(split, responses):
    df = responses.select_columns(["prompt_id", "category"]).to_pandas().drop_duplicates("prompt_id")
    train = df[df.prompt_id.isin(split.train_prompts)]["category"].value_counts()
    total = df["category"].value_counts()
    assert ((train - total / 2).abs() <= 1).all()


def test_perfect_scorer_gets_tau_and_accuracy_one(split):
    out = scenarios.evaluate_scenarios(None, None, split, score_fn=lambda df: df["gold"].to_numpy(float), n_boot=100)
    assert list(out.columns) == scenarios.RESULT_COLUMNS
    assert out["scenario"].tolist() == [s for s in scenarios.SCENARIOS for _ in range(2)]
    assert (out["value"] == 1.0).all() and (out["ci_low"] == 1.0).all()
    tau = out[out.metric == "kendall_tau_b"]
    assert (tau["n_prompts"] == 12).all() and (tau["n_skipped_prompts"] == 0).all()
    # the reversed scorer is perfectly wrong
    rev = scenarios.evaluate_scenarios(None, None, split, score_fn=lambda df: -df["gold"].to_numpy(float), n_boot=0)
    assert (rev["value"] == np.where(rev.metric == "accuracy", 0.0, -1.0)).all()


def test_constant_scorer_skips_every_prompt(split):
    out = scenarios.evaluate_scenarios(None, None, split, scenarios=["val2_prompt_ood"], n_boot=10,
                               score_fn=lambda df: np.zeros(len(df)))
    acc, tau = out.iloc[0], out.iloc[1]
    assert acc["value"] == 0.0  # ties are wrong
    assert np.isnan(tau["value"]) and tau["n_prompts"] == 0 and tau["n_skipped_prompts"] == 12


def test_evaluate_scenarios_on_the_tiny_model(responses, tokenizer, tiny_backbone):
    from rmlib.model.encoding import encode_prompt_replies
    from rmlib.model.reward_model import ModelSpec, build_reward_model
    from rmlib.model.scoring import score_token_sequences

    tiny = scenarios.make_scenarios(responses, seed=0, **{**SMALL, "max_prompts_per_split": 3})
    model = build_reward_model(ModelSpec(backbone=tiny_backbone), seed=0)
    out, scores = scenarios.evaluate_scenarios(model, tokenizer, tiny, max_length=64, batch_size=8, bf16=False,
                                       n_boot=50, progress=False, return_scores=True)
    assert out["scenario"].tolist() == [s for s in scenarios.SCENARIOS for _ in range(2)]
    assert np.isfinite(out[["value", "ci_low", "ci_high"]].to_numpy()).all()
    assert np.isfinite(scores["reward"]).all() and len(scores) == sum(len(v.responses) for v in tiny.val.values())
    # the rewards are those of the left-truncated token sequences scored one at a time
    v4 = tiny.val["val4_mutual_ood"].responses
    prompts = [[{"role": "user", "content": text}] for text in v4["instruction"]]
    seqs = [p + r for p, r in zip(*encode_prompt_replies(tokenizer, prompts, list(v4["output"]), max_length=64))]
    assert max(len(s) for s in seqs) <= 64
    ref = score_token_sequences(model, seqs, batch_size=1, bf16=False, progress=False)
    np.testing.assert_allclose(scores[scores.scenario == "val4_mutual_ood"]["reward"], ref, rtol=1e-4, atol=1e-5)
