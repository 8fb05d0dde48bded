"""rmlib.model.generation: the exact Best-of-n estimator against brute-force enumeration of all n-subsets,
and resumable, deterministic sampling/scoring on the tiny random model."""

from __future__ import annotations

import itertools
import logging
import math
import shutil

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import make_tiny_lm

from rmlib.analysis import bon
from rmlib.analysis.bon import (
    bon_curve,
    bon_expectation,
    bon_summary,
    default_ns,
    kl_bon,
)
from rmlib.model import generation, score_cache, scoring
from rmlib.model import reward_model as reward_model_mod
from rmlib.model.encoding import format_prompt, format_reply
from rmlib.model.generation import read_samples, sample_responses, split_response
from rmlib.model.reward_model import RewardModel, save_reward_model
from rmlib.model.score_cache import score_samples, score_samples_cached


# -- the estimator --------------------------------------------------------------------------------
def brute_force(proxy, gold, n):
    """Average over every n-subset of the pick's (proxy, gold); ties: uniform among tied maxima."""
    proxy, gold = np.asarray(proxy, float), np.asarray(gold, float)
    total_p = total_g = 0.0
    subsets = list(itertools.combinations(range(len(proxy)), n))
    for s in subsets:
        best = max(proxy[i] for i in s)
        tied = [i for i in s if proxy[i] == best]
        total_p += best
        total_g += sum(gold[i] for i in tied) / len(tied)
    return total_p / len(subsets), total_g / len(subsets)


class TestBonExpectation:
    @pytest.mark.parametrize("seed", [0, 1, 2])
    def test_matches_enumeration(self, seed):
        rng = np.random.default_rng(seed)
        proxy, gold = rng.normal(size=7), rng.normal(size=7)
        for n in range(1, 8):
            exp_p, exp_g = bon_expectation(proxy, gold, n)
            ref_p, ref_g = brute_force(proxy, gold, n)
            assert abs(exp_p - ref_p) < 1e-9 and abs(exp_g - ref_g) < 1e-9, n

    def test_matches_enumeration_with_ties(self):
        proxy = [0.5, 1.0, 1.0, -2.0, 1.0, 0.5, 3.0, 3.0]  # three tie groups, one of them at the top
        gold = [1.0, -1.0, 2.0, 0.3, 4.0, -3.0, 0.0, 5.0]
        for n in range(1, 9):
            exp_p, exp_g = bon_expectation(proxy, gold, n)
            ref_p, ref_g = brute_force(proxy, gold, n)
            assert abs(exp_p - ref_p) < 1e-9 and abs(exp_g - ref_g) < 1e-9, n

    def test_n1_is_plain_mean_and_nN_is_argmax(self):
        rng = np.random.default_rng(3)
        proxy, gold = rng.normal(size=50), rng.normal(size=50)
        assert bon_expectation(proxy, gold, 1) == pytest.approx((proxy.mean(), gold.mean()), abs=1e-12)
        assert bon_expectation(proxy, gold, 50) == pytest.approx((proxy.max(), gold[proxy.argmax()]), abs=1e-12)

    def test_proxy_expectation_non_decreasing_in_n(self):
        rng = np.random.default_rng(4)
        proxy, gold = rng.normal(size=40), rng.normal(size=40)
        values = [bon_expectation(proxy, gold, n)[0] for n in range(1, 41)]
        assert all(b >= a - 1e-12 for a, b in zip(values, values[1:]))

    def test_large_N_is_stable(self):
        # N = 2000: C(2000, 1000) ~ 1e600 overflows floats; the log-space weights must not
        rng = np.random.default_rng(5)
        proxy = rng.normal(size=2000)
        weights = bon._rank_weights(2000, 1000)
        assert np.all(np.isfinite(weights)) and abs(weights.sum() - 1) < 1e-12
        exp_p, _ = bon_expectation(proxy, proxy, 1000)
        assert np.sort(proxy)[-3] < exp_p <= proxy.max()

    def test_weights_against_exact_binomials(self):
        N, n = 30, 7
        exact = [math.comb(i - 1, n - 1) / math.comb(N, n) for i in range(1, N + 1)]
        np.testing.assert_allclose(bon._rank_weights(N, n), exact, rtol=1e-12, atol=0)

    @pytest.mark.parametrize("n", [0, 8, 2.5])
    def test_bad_n(self, n):
        with pytest.raises(ValueError, match="n must"):
            bon_expectation(np.arange(7.0), np.arange(7.0), n)

    def test_nan_rejected(self):
        with pytest.raises(ValueError, match="finite"):
            bon_expectation([1.0, float("nan")], [0.0, 1.0], 1)


def test_kl_bon():
    assert kl_bon(1) == 0.0
    assert kl_bon(2) == pytest.approx(math.log(2) - 0.5, abs=1e-15)
    np.testing.assert_allclose(kl_bon(np.array([1, 4])), [0.0, math.log(4) - 0.75])
    with pytest.raises(ValueError, match="n must"):
        kl_bon(0)


def test_default_ns():
    ns = default_ns(400)
    assert ns[0] == 1 and ns[-1] == 400 and all(a < b for a, b in zip(ns, ns[1:]))
    assert 10 <= len(ns) <= 20
    assert default_ns(1) == [1] and default_ns(3) == [1, 2, 3]
    with pytest.raises(ValueError, match="N must"):
        default_ns(0)


def scores_frame(sizes=(9, 12, 10), seed=0):
    rng = np.random.default_rng(seed)
    rows = []
    for k, size in enumerate(sizes):
        gold = rng.normal(size=size)
        proxy = gold + rng.normal(scale=0.5, size=size)
        rows += [{"prompt_id": f"p{k}", "proxy": p, "gold": g} for p, g in zip(proxy, gold)]
    return pd.DataFrame(rows)


class TestBonCurve:
    def test_means_of_per_prompt_expectations(self):
        df = scores_frame()
        curve = bon_curve(df, ns=[1, 2, 5, 9])
        assert list(curve.columns) == bon.CURVE_COLUMNS and list(curve["n"]) == [1, 2, 5, 9]
        for _, row in curve.iterrows():
            per = [bon_expectation(g["proxy"], g["gold"], int(row["n"])) for _, g in df.groupby("prompt_id")]
            assert row["proxy"] == pytest.approx(np.mean([p for p, _ in per]), abs=1e-12)
            assert row["gold"] == pytest.approx(np.mean([g for _, g in per]), abs=1e-12)
            assert row["kl_bon"] == pytest.approx(kl_bon(int(row["n"])))
        assert (curve["n_prompts"] == 3).all() and (curve["gold_sem"] > 0).all()

    def test_normalized_curves_start_at_zero(self):
        df = scores_frame()
        curve = bon_curve(df)  # default grid: 1 .. smallest N
        assert curve["n"].iloc[0] == 1 and curve["n"].iloc[-1] == 9
        assert curve["proxy_norm"].iloc[0] == pytest.approx(0, abs=1e-12)
        assert curve["gold_norm"].iloc[0] == pytest.approx(0, abs=1e-12)
        # without n = 1 in the grid, the offset is still the n = 1 value (mean of prompt means)
        part = bon_curve(df, ns=[3, 9])
        base = df.groupby("prompt_id")["proxy"].mean().mean()
        np.testing.assert_allclose(part["proxy_norm"], part["proxy"] - base, atol=1e-12)
        np.testing.assert_allclose(part["gold_norm"], curve.set_index("n").loc[[3, 9], "gold_norm"], atol=1e-12)

    def test_n_above_smallest_N_raises(self):
        with pytest.raises(ValueError, match="fewer samples"):
            bon_curve(scores_frame(), ns=[1, 10])


def test_bon_summary():
    ns = np.array([1, 2, 4, 8, 16, 32])
    bent = pd.DataFrame({"n": ns, "kl_bon": kl_bon(ns), "proxy": np.log(ns), "gold": [0, .3, .5, .6, .4, .1],
                         "proxy_norm": np.log(ns), "gold_norm": [0, .3, .5, .6, .4, .1]})
    s = bon_summary(bent)
    assert s["n_gold_peak"] == 8 and s["kl_gold_peak"] == pytest.approx(kl_bon(8))
    assert s["gold_bends_down"] and s["gold_final"] == pytest.approx(0.1) and s["n_final"] == 32
    assert s["gold_drop_from_peak"] == pytest.approx(0.5) and s["proxy_final"] == pytest.approx(math.log(32))
    rising = bent.assign(gold=[0, .3, .5, .6, .7, .7], gold_norm=[0, .3, .5, .6, .7, .7])
    r = bon_summary(rising)
    assert not r["gold_bends_down"] and r["n_gold_peak"] == 16
    assert not bon_summary(bent, tol=1.0)["gold_bends_down"]


# -- sampling on the tiny random model ------------------------------------------------------------
PROMPTS = [[{"role": "user", "content": f"Question number {i}: what is {i} + {i}?"}] for i in range(3)]
IDS = ["q0", "q1", "q2"]
SMALL = dict(n=4, max_new_tokens=8, bf16=False, progress=False)


@pytest.fixture(scope="module")
def policy(tiny_backbone):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_backbone, dtype=torch.float32)


@pytest.fixture
def count_generate(monkeypatch):
    """The batch size of every call of the sampling engine (``DecodeLoop``)."""
    from rmlib.model.decoding import DecodeLoop

    calls = []
    original = DecodeLoop.__call__

    def counting(self, prompts, seeds):
        calls.append(len(prompts))
        return original(self, prompts, seeds)

    monkeypatch.setattr(DecodeLoop, "__call__", counting)
    return calls


@pytest.fixture(scope="module")
def fresh(policy, tokenizer, tmp_path_factory):
    """A fresh 3-prompt run in batches of 2 (two chunks per prompt): (frame, file path)."""
    path = tmp_path_factory.mktemp("fresh") / "samples.jsonl"
    return sample_responses(policy, tokenizer, PROMPTS, IDS, out_path=path, batch_size=2, **SMALL), path


class TestSampling:
    def test_shape_and_columns(self, fresh, tokenizer):
        df, path = fresh
        assert list(df.columns) == generation.SAMPLE_COLUMNS and len(df) == 12
        assert list(df["prompt_id"]) == [p for p in IDS for _ in range(4)]
        assert list(df["sample_index"]) == [0, 1, 2, 3] * 3
        assert df["prompt"].iloc[0] == format_prompt(tokenizer, PROMPTS[0])
        assert (df["n_tokens"] == df["response_ids"].map(len)).all() and (df["n_tokens"] <= 8).all()
        assert df.groupby("prompt_id")["response"].nunique().min() > 1  # each sample has its own stream
        pd.testing.assert_frame_equal(read_samples(path), df)

    def test_same_seed_same_samples(self, fresh, policy, tokenizer, tmp_path):
        again = sample_responses(policy, tokenizer, PROMPTS, IDS, out_path=tmp_path / "a.jsonl", batch_size=2, **SMALL)
        pd.testing.assert_frame_equal(again, fresh[0])
        other = sample_responses(policy, tokenizer, PROMPTS, IDS, out_path=tmp_path / "b.jsonl", batch_size=2,
                                 seed=1, **SMALL)
        assert (other["response"] != fresh[0]["response"]).all()

    def test_resume_with_more_prompts(self, fresh, policy, tokenizer, tmp_path, count_generate):
        path = tmp_path / "s.jsonl"
        first = sample_responses(policy, tokenizer, PROMPTS[:2], IDS[:2], out_path=path, batch_size=2, **SMALL)
        assert len(count_generate) == 4 and len(first) == 8  # 2 prompts x 2 chunks
        before = path.read_bytes()
        count_generate.clear()
        second = sample_responses(policy, tokenizer, PROMPTS, IDS, out_path=path, batch_size=2, **SMALL)
        assert count_generate == [2, 2]  # only the new prompt's two chunks
        assert path.read_bytes().startswith(before)  # earlier rows untouched
        pd.testing.assert_frame_equal(second, fresh[0])
        assert path.read_bytes() == fresh[1].read_bytes()
        count_generate.clear()
        sample_responses(policy, tokenizer, PROMPTS, IDS, out_path=path, batch_size=2, **SMALL)
        assert count_generate == []  # all there

    def test_partial_last_line_is_redone(self, fresh, policy, tokenizer, tmp_path, count_generate, caplog):
        path = tmp_path / "killed.jsonl"
        shutil.copy(fresh[1], path)
        data = path.read_bytes()
        last_start = data.rstrip(b"\n").rfind(b"\n") + 1
        path.write_bytes(data[: last_start + 25])  # killed in the middle of the last row (q2, sample 3)
        with caplog.at_level(logging.WARNING, logger="rmlib.model.generation"):
            df = sample_responses(policy, tokenizer, PROMPTS, IDS, out_path=path, batch_size=2, **SMALL)
        assert "partial last line" in caplog.text
        assert count_generate == [2]  # q2's second chunk (samples 2, 3) redone, only sample 3 written
        pd.testing.assert_frame_equal(df, fresh[0])
        assert path.read_bytes() == fresh[1].read_bytes()

    def test_tiny_top_p_is_greedy(self, policy, tokenizer, tmp_path):
        df = sample_responses(policy, tokenizer, PROMPTS[:1], IDS[:1], out_path=tmp_path / "g.jsonl",
                              top_p=1e-9, **SMALL)
        enc = tokenizer([df["prompt"].iloc[0]], add_special_tokens=False, return_tensors="pt")
        greedy = policy.generate(**enc, max_new_tokens=8, do_sample=False, pad_token_id=tokenizer.pad_token_id)
        expected, _ = split_response(greedy[0, enc["input_ids"].shape[1]:].tolist(), [tokenizer.eos_token_id])
        assert all(ids == expected for ids in df["response_ids"])

    def test_eos_is_stripped_and_marks_finished(self, policy, tokenizer, tmp_path):
        eos = tokenizer.eos_token_id
        bias = torch.zeros(policy.config.vocab_size)
        bias[eos] = 8.5  # the random model is near-uniform over 49k tokens: some replies end, some run on
        hook = policy.lm_head.register_forward_hook(lambda module, inputs, out: out + bias)
        try:
            df = sample_responses(policy, tokenizer, PROMPTS, IDS, out_path=tmp_path / "e.jsonl",
                                  temperature=1.0, **{**SMALL, "n": 8})
        finally:
            hook.remove()
        assert df["finished"].any() and (~df["finished"]).any()
        assert (df.loc[~df["finished"], "n_tokens"] == 8).all() and (df.loc[df["finished"], "n_tokens"] < 8).all()
        assert all(eos not in ids for ids in df["response_ids"])
        assert not df["response"].str.contains(tokenizer.eos_token, regex=False).any()

    def test_changed_settings_refused(self, policy, tokenizer, tmp_path):
        path = tmp_path / "s.jsonl"
        sample_responses(policy, tokenizer, PROMPTS[:1], IDS[:1], out_path=path, **SMALL)
        with pytest.raises(ValueError, match="seed"):
            sample_responses(policy, tokenizer, PROMPTS[:1], IDS[:1], out_path=path, seed=5, **SMALL)
        with pytest.raises(ValueError, match="different prompt text"):
            sample_responses(policy, tokenizer, PROMPTS[1:2], IDS[:1], out_path=path, **SMALL)

    @pytest.mark.parametrize("bad, name", [
        ({"n": 0}, "n"), ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"temperature": 0.0}, "temperature"),
        ({"temperature": -1.0}, "temperature"), ({"batch_size": 0}, "batch_size"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
    ])
    def test_bad_parameters(self, policy, tokenizer, tmp_path, bad, name):
        args = {**SMALL, **bad}
        with pytest.raises(ValueError, match=rf"^{name} must"):
            sample_responses(policy, tokenizer, PROMPTS, IDS, out_path=tmp_path / "x.jsonl", **args)
        assert not (tmp_path / "x.jsonl").exists()

    def test_bad_prompt_ids(self, policy, tokenizer, tmp_path):
        with pytest.raises(ValueError, match="unique"):
            sample_responses(policy, tokenizer, PROMPTS[:2], ["a", "a"], out_path=tmp_path / "x.jsonl", **SMALL)
        with pytest.raises(ValueError, match="length"):
            sample_responses(policy, tokenizer, PROMPTS, IDS[:2], out_path=tmp_path / "x.jsonl", **SMALL)


class TestRowSampler:
    SCORES = torch.tensor([2.0, 1.5, 1.0, 0.0, -1.0, -3.0])

    def draw(self, rows, temperature, top_p, candidates=256):
        gens = [torch.Generator().manual_seed(generation.sample_seed(0, "p", i)) for i in range(rows)]
        out = generation.RowSampler(gens, temperature, top_p, candidates)(None, self.SCORES.repeat(rows, 1))
        assert torch.isfinite(out).sum(-1).eq(1).all() and out.max(-1).values.eq(0).all()  # one 0, rest -inf
        return out.argmax(-1)

    @pytest.mark.parametrize("top_p", [1.0, 0.8, 0.5])
    def test_frequencies_follow_truncated_softmax(self, top_p):
        probs = torch.softmax(self.SCORES / 0.7, -1).double()
        keep = (probs.cumsum(-1) - probs) < top_p  # scores are in descending order already
        expected = torch.where(keep, probs, 0) / probs[keep].sum()
        picks = self.draw(4000, 0.7, top_p)
        freq = torch.bincount(picks, minlength=6).double() / 4000
        assert (freq[~keep] == 0).all()
        torch.testing.assert_close(freq, expected, atol=0.03, rtol=0)

    def test_candidate_shortcut_equals_full_sort(self):
        # candidates=2 holds < 0.8 of the mass: every row takes the full-sort path
        torch.testing.assert_close(self.draw(500, 0.7, 0.8, candidates=2), self.draw(500, 0.7, 0.8))

    def test_rows_do_not_depend_on_the_batch(self):
        both = self.draw(64, 1.0, 0.9)
        gens = [torch.Generator().manual_seed(generation.sample_seed(0, "p", i)) for i in range(32, 64)]
        alone = generation.RowSampler(gens, 1.0, 0.9)(None, self.SCORES.repeat(32, 1)).argmax(-1)
        torch.testing.assert_close(alone, both[32:])


def test_split_response():
    assert split_response([5, 6, 2, 2, 2], [2]) == ([5, 6], True)
    assert split_response([5, 6, 7], [2]) == ([5, 6, 7], False)
    assert split_response([0, 9], [0, 2]) == ([], True)


# -- scoring ------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def reward_model(tokenizer):
    return RewardModel(make_tiny_lm(tokenizer, seed=1), head="linear").eval()


class TestScoring:
    def test_scores_match_one_by_one_forward(self, fresh, reward_model, tokenizer):
        df = fresh[0]
        scores = score_samples(reward_model, tokenizer, df, batch_size=5, bf16=False, progress=False)
        assert scores.shape == (12,)
        for k in (0, 7, 11):
            messages, response = df["messages"].iloc[k], df["response"].iloc[k]
            text = format_prompt(tokenizer, messages)
            ids = tokenizer(text + format_reply(tokenizer, messages, response, text),
                            add_special_tokens=False, return_tensors="pt")["input_ids"]
            assert ids[0, -2].item() == tokenizer.eos_token_id  # the reply ends with the end of turn, as in training
            with torch.no_grad():
                ref = reward_model(ids, torch.ones_like(ids)).rewards.item()
            assert scores[k] == pytest.approx(ref, abs=1e-5)

    def test_cache_resumes_and_keys_by_model(self, fresh, reward_model, tokenizer, tmp_path, monkeypatch):
        df, cache = fresh[0], tmp_path / "scores.jsonl"
        scored = []
        original = scoring.score_replies
        monkeypatch.setattr(scoring, "score_replies", lambda m, prompts, replies, **kw: scored.append(len(replies)) or
                            original(m, prompts, replies, **kw))
        kw = dict(batch_size=4, bf16=False, progress=False)
        direct = score_samples(reward_model, tokenizer, df, **kw)
        scored.clear()
        part = score_samples_cached(reward_model, tokenizer, df.iloc[:5], cache, "proxy", chunk_size=3, **kw)
        assert scored == [3, 2]
        np.testing.assert_allclose(part, direct[:5], atol=1e-6)  # other batches: float noise only
        data = cache.read_bytes()
        cache.write_bytes(data[:-10])  # killed mid-write: the last score is lost
        scored.clear()
        full = score_samples_cached(reward_model, tokenizer, df, cache, "proxy", chunk_size=100, **kw)
        assert scored == [8]  # 7 never scored + 1 lost
        np.testing.assert_allclose(full, direct, atol=1e-6)
        scored.clear()
        np.testing.assert_array_equal(score_samples_cached(reward_model, tokenizer, df, cache, "proxy", **kw), full)
        assert scored == []
        score_samples_cached(reward_model, tokenizer, df, cache, "gold", **kw)  # another model: its own keys
        assert scored == [12]
        scored.clear()
        changed = df.copy()
        changed.loc[3, "response"] = "a different reply"
        changed.at[5, "messages"] = [{"role": "user", "content": "another prompt"}]
        score_samples_cached(reward_model, tokenizer, changed, cache, "proxy", **kw)
        assert scored == [2]  # stale cached scores (other reply, other prompt) are not trusted
        with pytest.raises(ValueError, match="messages"):
            score_samples_cached(reward_model, tokenizer, df.drop(columns="messages"), cache, "proxy", **kw)


# -- several prompts per generation batch (n < batch_size) -------------------------------------------
def test_generation_batches():
    assert generation.generation_batches(2, 5, 2) == [[(0, [0, 1])], [(0, [2, 3])], [(0, [4])], [(1, [0, 1])],
                                               [(1, [2, 3])], [(1, [4])]]
    assert generation.generation_batches(5, 4, 9) == [[(0, [0, 1, 2, 3]), (1, [0, 1, 2, 3])],
                                               [(2, [0, 1, 2, 3]), (3, [0, 1, 2, 3])], [(4, [0, 1, 2, 3])]]
    assert generation.generation_batches(3, 4, 4) == [[(i, [0, 1, 2, 3])] for i in range(3)]
    # fixed by the arguments alone: appending prompts never regroups the earlier ones
    assert generation.generation_batches(4, 4, 9)[:1] == generation.generation_batches(5, 4, 9)[:1]


LONG_PROMPTS = [[{"role": "user", "content": "Hi."}],
                [{"role": "user", "content": "Please write a long and careful answer about the history of tea."}],
                [{"role": "user", "content": "Why?"}]]


class TestPackedSampling:
    def test_packed_equals_one_prompt_per_batch(self, policy, tokenizer, tmp_path, count_generate):
        alone = sample_responses(policy, tokenizer, LONG_PROMPTS, IDS, out_path=tmp_path / "a.jsonl", batch_size=4,
                                 **SMALL)
        assert count_generate == [4, 4, 4]
        count_generate.clear()
        packed = sample_responses(policy, tokenizer, LONG_PROMPTS, IDS, out_path=tmp_path / "p.jsonl", batch_size=12,
                                  **SMALL)
        assert count_generate == [12]  # three prompts of different lengths, left-padded into one batch
        pd.testing.assert_frame_equal(packed, alone)  # same per-sample streams, padding changes nothing

    def test_packed_resume_redoes_only_incomplete_batches(self, policy, tokenizer, tmp_path, count_generate):
        path = tmp_path / "s.jsonl"
        sample_responses(policy, tokenizer, LONG_PROMPTS[:1], IDS[:1], out_path=path, batch_size=8, **SMALL)
        assert count_generate == [4]
        count_generate.clear()
        df = sample_responses(policy, tokenizer, LONG_PROMPTS, IDS, out_path=path, batch_size=8, **SMALL)
        assert count_generate == [8, 4]  # batch (q0, q1) redone for q1; q2 alone
        fresh = sample_responses(policy, tokenizer, LONG_PROMPTS, IDS, out_path=tmp_path / "f.jsonl", batch_size=8,
                                 **SMALL)
        pd.testing.assert_frame_equal(df, fresh)


# -- many reward models on one frozen bottom -----------------------------------------------------------
@pytest.fixture(scope="module")
def rm_family(tokenizer, tmp_path_factory):
    """Three saved top-1 RMs of one tiny backbone (layers 0..2 frozen, layer 3 and the head differ, as
    top-k training leaves them) and a fourth, full-mode RM of another backbone."""
    from rmlib.model.reward_model import ModelSpec, build_reward_model

    root = tmp_path_factory.mktemp("family")
    paths = {}
    for k in range(3):
        rm = build_reward_model(ModelSpec(backbone="tiny", mode="topk", top_k_layers=1),
                                lm=make_tiny_lm(tokenizer, seed=0, layers=4), seed=10 + k)
        torch.manual_seed(10 + k)
        with torch.no_grad():
            for p in rm.decoder.layers[3].parameters():
                p.add_(0.1 * torch.randn_like(p))
        paths[f"rm{k}"] = save_reward_model(rm, root / f"rm{k}", tokenizer, dtype=torch.float32)
    other = build_reward_model(ModelSpec(backbone="tiny2", mode="full"), lm=make_tiny_lm(tokenizer, seed=5, layers=4))
    paths["other"] = save_reward_model(other, root / "other", tokenizer, dtype=torch.float32)
    return paths


class TestManyRewardModels:
    @pytest.mark.parametrize("names", [("rm0", "rm1", "rm2"), ("rm0", "other"), ("rm1",)])
    def test_scores_equal_each_models_plain_forward(self, rm_family, fresh, tokenizer, names, tmp_path, monkeypatch):
        from rmlib.model.reward_model import load_reward_model

        monkeypatch.setenv("RMLIB_CACHE_DIR", str(tmp_path))
        df = fresh[0]
        got = score_cache.score_samples_multi({k: rm_family[k] for k in names}, tokenizer, df, batch_size=5, bf16=False,
                                      progress=False)
        assert list(got.columns) == ["prompt_id", "sample_index", *names] and len(got) == len(df)
        monkeypatch.setenv("RMLIB_FASTPATH", "0")  # the reference: whole sequences, no store
        for k in names:
            ref = score_samples(load_reward_model(rm_family[k]), tokenizer, df, batch_size=3, bf16=False,
                                progress=False)
            np.testing.assert_allclose(got[k], ref, atol=1e-5)

    def test_the_bottom_runs_once_for_all_models_of_one_backbone(self, rm_family, fresh, tokenizer, tmp_path,
                                                                  monkeypatch):
        from rmlib.model import bottom_store

        monkeypatch.setenv("RMLIB_CACHE_DIR", str(tmp_path))
        computed = []
        real = bottom_store.bottom_prompt_replies
        monkeypatch.setattr(bottom_store, "bottom_prompt_replies",
                            lambda d, p, r, *a: computed.append(len(r)) or real(d, p, r, *a))
        score_cache.score_samples_multi({k: rm_family[k] for k in ("rm0", "rm1", "rm2")}, tokenizer, fresh[0], bf16=False,
                                progress=False)
        assert sum(computed) == len(fresh[0])  # every sample once, for the first model only
        assert len(list((tmp_path / "bottom").iterdir())) == 1

    def test_cache_resumes_per_model_and_loads_only_what_it_needs(self, rm_family, fresh, tokenizer, tmp_path,
                                                                   monkeypatch):
        from rmlib.model import reward_model as reward_model_mod

        monkeypatch.setenv("RMLIB_CACHE_DIR", str(tmp_path))
        df, cache = fresh[0], tmp_path / "scores.jsonl"
        scored, loaded = [], []
        original, load = score_cache.score_samples, reward_model_mod.load_reward_model
        monkeypatch.setattr(score_cache, "score_samples", lambda m, t, d, *a, **k: scored.append(len(d)) or
                            original(m, t, d, *a, **k))
        monkeypatch.setattr(score_cache, "load_reward_model", lambda p, *a, **k: loaded.append(p) or load(p, *a, **k))
        dirs = {k: rm_family[k] for k in ("rm0", "rm1")}
        kw = dict(bf16=False, progress=False, cache_keys={"rm0": "rm0@v1", "rm1": "rm1@v1"})
        first = score_cache.score_samples_multi(dirs, tokenizer, df.iloc[:5], cache, chunk_size=3, **kw)
        assert scored == [3, 2, 3, 2] and len(loaded) == 2
        scored.clear()
        full = score_cache.score_samples_multi(dirs, tokenizer, df, cache, **kw)
        assert scored == [7, 7]
        pd.testing.assert_frame_equal(full.iloc[:5], first)
        scored.clear(), loaded.clear()
        pd.testing.assert_frame_equal(score_cache.score_samples_multi(dirs, tokenizer, df, cache, **kw), full)
        assert scored == [] and loaded == []  # everything cached: no model loaded
        score_cache.score_samples_multi(dirs, tokenizer, df, cache, **{**kw, "cache_keys": {"rm0": "rm0@v2", "rm1": "rm1@v1"}})
        assert scored == [12]  # a new version of rm0 is scored again
        with pytest.raises(ValueError, match="models is empty"):
            score_cache.score_samples_multi({}, tokenizer, df)

    def test_model_digest_changes_with_a_new_export(self, rm_family, tmp_path, tokenizer):
        d0 = reward_model_mod.model_digest(rm_family["rm0"])
        assert d0 == reward_model_mod.model_digest(rm_family["rm0"]) and d0 != reward_model_mod.model_digest(rm_family["rm1"])
        with pytest.raises(FileNotFoundError, match="rmlib_reward.json"):
            reward_model_mod.model_digest(tmp_path)


def test_bon_per_prompt_matches_bon_expectation():
    df = scores_frame()
    per = bon.bon_per_prompt(df, ns=[1, 4, 9])
    assert list(per.columns) == bon.PER_PROMPT_COLUMNS and len(per) == 3 * 3
    for _, row in per.iterrows():
        g = df[df["prompt_id"] == row["prompt_id"]]
        p_exp, g_exp = bon_expectation(g["proxy"], g["gold"], int(row["n"]))
        assert row["proxy"] == pytest.approx(p_exp, abs=1e-12) and row["gold"] == pytest.approx(g_exp, abs=1e-12)
        assert row["gold_base"] == pytest.approx(g["gold"].mean(), abs=1e-12)
