"""rmlib.model.bottom_capture: bottom-store entries recorded while sampling.

Tiny random Llama (4 layers, hidden 32, the SmolLM2 tokenizer), float32, a top-2 reward model on a
copy of its weights (so its frozen bottom, layers [0, 2), is the policy's):
- the sampled tokens are the same with and without capture;
- the captured entries equal a separate ``BottomStore.ensure`` build, and scores through them equal
  the plain path (``score_replies(use_store=False)``) with nothing left for scoring to build;
- rows whose RM encoding disagrees with the sampling (prompt cut, reply re-encoded differently) fall
  back to the plain build, and the scores still equal the plain path;
- a store of other bottom weights, or of another autocast, is refused;
- ``sample_responses(capture_store=)`` end to end, resumed.

Tolerance: float32 everywhere, atol 1e-5 / rtol 1e-4 for states and 1e-4 for rewards. The decode loop
computes the same states as the store build but with left padding, other batch shapes and its own
decode attention (a matmul-softmax-matmul instead of sdpa), so they agree to float32 rounding (~2e-7
of the largest value here), not bitwise.
"""

from __future__ import annotations

import copy

import pytest
import torch
from conftest import make_tiny_lm

from rmlib.model.bottom_capture import StoreCapture, rm_encoder
from rmlib.model.bottom_store import BottomStore
from rmlib.model.decoding import DecodeLoop
from rmlib.model.encoding import encode_prompt_replies, format_prompt
from rmlib.model.generation import split_response
from rmlib.model.reward_model import ModelSpec, build_reward_model, load_reward_model
from rmlib.model.scoring import score_replies

STOPS = [2, 0]
N_NEW = 14
ATOL, RTOL = 1e-5, 1e-4


def peaked(model):
    """Next-token distributions peaked like a trained model's, with the end-of-turn (2) near the top, so
    replies end at different steps and some run to max_new_tokens."""
    bias = 3 * torch.randn(model.config.vocab_size, generator=torch.Generator().manual_seed(0))

    def hook(module, inputs, out):
        out = out * 40 + bias
        out[..., 2] = out.max(-1).values - 2.0
        return out

    model.lm_head.register_forward_hook(hook)
    return model


@pytest.fixture(scope="module")
def policy(tokenizer):
    return peaked(make_tiny_lm(tokenizer, layers=4)).eval()


def topk_rm(lm, seed=0):
    return build_reward_model(ModelSpec(backbone="tiny-llama", mode="topk", top_k_layers=2), lm=copy.deepcopy(lm),
                              seed=seed).eval()


@pytest.fixture(scope="module")
def rm(policy):
    return topk_rm(policy)


@pytest.fixture(scope="module")
def messages():
    """Prompts of different lengths (left padding); the first one three times more (a shared prefill)."""
    ms = [[{"role": "user", "content": f"Question {i}: " + "word " * (3 * i % 7)}] for i in range(6)]
    return ms + [ms[0]] * 3


def new_store(model, root, **kw):
    return BottomStore.for_model(model, root=root, **{"dtype": torch.float32, "bf16_autocast": False, **kw})


def sample(policy, tokenizer, messages, capture=None, max_length=None, encode=None, compact=0.25):
    """Sample one reply per prompt (capture: into ``capture``); (prompt ids, generated ids)."""
    prompts = [tokenizer(format_prompt(tokenizer, m), add_special_tokens=False)["input_ids"] for m in messages]
    loop = DecodeLoop(policy, STOPS, tokenizer.pad_token_id, N_NEW, 0.7, 0.95, bf16=False, compact=compact)
    if capture is not None:
        decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731
        capture.begin(prompts, encode or rm_encoder(tokenizer, decode, lambda r: messages[r], STOPS, max_length))
    return prompts, loop(prompts, list(range(len(prompts))), capture=capture)


def scored_rows(tokenizer, messages, generated, max_length=None):
    """(prompt ids, reply ids) as scoring encodes the samples (``encode_prompt_replies`` of the texts)."""
    texts = [tokenizer.decode(split_response(g, STOPS)[0], skip_special_tokens=False) for g in generated]
    return encode_prompt_replies(tokenizer, messages, texts, max_length)


@pytest.mark.parametrize("compact", [0.0, 0.25, 2.0])
def test_tokens_are_the_same_with_and_without_capture(policy, rm, tokenizer, messages, tmp_path, compact):
    _, plain = sample(policy, tokenizer, messages, compact=compact)
    capture = StoreCapture(new_store(rm, tmp_path / "s"), policy, bf16=False)
    _, captured = sample(policy, tokenizer, messages, capture, compact=compact)
    assert captured == plain
    finished = [g[-1] in STOPS for g in plain]
    assert any(finished) and not all(finished)  # both kinds of rows: ended by a stop token, cut at N_NEW
    # every row is captured (or, were two replies of the repeated prompt the same, found already recorded)
    assert capture.captured + capture.present == len(messages) and not capture.fallback


def test_captured_entries_equal_a_separate_build(policy, rm, tokenizer, messages, tmp_path):
    store = new_store(rm, tmp_path / "captured")
    capture = StoreCapture(store, policy, bf16=False)
    _, generated = sample(policy, tokenizer, messages, capture)
    assert capture.flush() > 0
    prompts, replies = scored_rows(tokenizer, messages, generated)
    groups = [(p, [r]) for p, r in zip(prompts, replies)]
    assert store.missing(groups) == []  # nothing left for scoring to build
    # the RM's encoding adds what sampling lacks: "\n" after the end-of-turn, and the end-of-turn after a cut reply
    for g, r in zip(generated, replies):
        assert r[: len(g)] == g and len(r) > len(g)
    built = new_store(rm, tmp_path / "built")
    built.ensure(groups, progress=False)
    for p, r in groups:
        torch.testing.assert_close(store.sequence(p, r[0]), built.sequence(p, r[0]), atol=ATOL, rtol=RTOL)
    assert store.rows == built.rows  # the same entries, each once


def test_scores_through_the_captured_store_equal_the_plain_path(policy, rm, tokenizer, messages, tmp_path,
                                                                 monkeypatch):
    monkeypatch.setenv("RMLIB_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("RMLIB_FASTPATH", raising=False)
    store = new_store(rm, None)  # the default root, where score_replies looks
    capture = StoreCapture(store, policy, bf16=False)
    _, generated = sample(policy, tokenizer, messages, capture)
    capture.flush()
    prompts, replies = scored_rows(tokenizer, messages, generated)
    rows_before = store.refresh().rows
    fast, _ = score_replies(rm, prompts, replies, bf16=False, progress=False)
    assert store.refresh().rows == rows_before  # scoring found every entry: the bottom did not run again
    plain, _ = score_replies(rm, prompts, replies, bf16=False, progress=False, use_store=False)
    torch.testing.assert_close(torch.from_numpy(fast), torch.from_numpy(plain), atol=1e-4, rtol=1e-4)
    other = topk_rm(policy, seed=5)  # another head on the same bottom: the same entries serve it
    torch.testing.assert_close(torch.from_numpy(score_replies(other, prompts, replies, bf16=False, progress=False)[0]),
                               torch.from_numpy(score_replies(other, prompts, replies, bf16=False, progress=False,
                                                              use_store=False)[0]), atol=1e-4, rtol=1e-4)
    assert store.refresh().rows == rows_before


def test_rows_whose_rm_encoding_differs_fall_back(policy, rm, tokenizer, messages, tmp_path, monkeypatch):
    monkeypatch.setenv("RMLIB_CACHE_DIR", str(tmp_path / "cache"))
    # a max_length that cuts the longer prompts from the left: their RM prompt tokens differ
    lengths = [len(tokenizer(format_prompt(tokenizer, m), add_special_tokens=False)["input_ids"]) for m in messages]
    max_length = min(lengths) + 1 + 8  # the shortest prompt + a short reply fit; longer ones are cut
    store = new_store(rm, None)
    capture = StoreCapture(store, policy, bf16=False)
    _, generated = sample(policy, tokenizer, messages, capture, max_length=max_length)
    capture.flush()
    prompts, replies = scored_rows(tokenizer, messages, generated, max_length)
    sampled_prompts = [tokenizer(format_prompt(tokenizer, m), add_special_tokens=False)["input_ids"] for m in messages]
    cut = [p != s for p, s in zip(prompts, sampled_prompts)]
    assert any(cut)
    reason = "the reward model's prompt tokens differ from the sampling prompt tokens"
    assert capture.fallback[reason] == sum(cut)
    missing = {tuple(p) for p, _, _ in store.missing([(p, [r]) for p, r in zip(prompts, replies)])}
    assert missing == {tuple(p) for p, c in zip(prompts, cut) if c}  # exactly the cut rows are left to the build
    fast, _ = score_replies(rm, prompts, replies, bf16=False, progress=False)  # builds the rest
    plain, _ = score_replies(rm, prompts, replies, bf16=False, progress=False, use_store=False)
    torch.testing.assert_close(torch.from_numpy(fast), torch.from_numpy(plain), atol=1e-4, rtol=1e-4)

    # a reply the RM re-encodes differently from the sampled tokens already fed (here: token 1 changed)
    def encode(row, generated):
        if len(generated) <= 2:
            return None  # counted as "cannot be encoded"
        return sampled_prompts[row], generated[:1] + [generated[1] + 1] + generated[2:] + [198]

    capture = StoreCapture(new_store(rm, tmp_path / "other"), policy, bf16=False)
    _, generated = sample(policy, tokenizer, messages, capture, encode=encode)
    long_rows = sum(len(g) > 2 for g in generated)
    assert long_rows and capture.fallback["the encoded reply differs from the sampled tokens at token 1"] == long_rows
    assert capture.fallback["the row cannot be encoded for the reward model"] == len(messages) - long_rows
    assert capture.captured == 0 and capture.flush() == 0


def test_a_store_of_other_bottom_weights_or_autocast_is_refused(policy, rm, tokenizer, tmp_path):
    other_lm = make_tiny_lm(tokenizer, seed=1, layers=4)
    with pytest.raises(ValueError, match="weights_sha differs"):
        StoreCapture(new_store(topk_rm(other_lm), tmp_path / "other"), policy, bf16=False)
    with pytest.raises(ValueError, match="weights_sha differs"):  # same values, another dtype
        StoreCapture(new_store(rm, tmp_path / "own"), copy.deepcopy(policy).to(torch.bfloat16), bf16=False)
    with pytest.raises(ValueError, match="bf16 autocast"):
        StoreCapture(new_store(rm, tmp_path / "own"), policy, bf16=True)
    deeper = build_reward_model(ModelSpec(backbone="tiny-llama", mode="topk", top_k_layers=1), lm=copy.deepcopy(policy))
    StoreCapture(new_store(deeper, tmp_path / "deeper"), policy, bf16=False)  # another layer of the same bottom: fine


def test_sample_responses_captures_and_resumes(tiny_backbone, tokenizer, tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM

    from rmlib.model.generation import sample_responses
    from rmlib.model.score_cache import score_samples

    monkeypatch.setenv("RMLIB_CACHE_DIR", str(tmp_path / "cache"))
    policy = peaked(AutoModelForCausalLM.from_pretrained(tiny_backbone, dtype=torch.float32))
    rm = topk_rm(policy)
    store = new_store(rm, None)
    msgs = [[{"role": "user", "content": "Hi."}], [{"role": "user", "content": "Tell me about cats and dogs."}]]
    kw = {"n": 3, "max_new_tokens": 10, "bf16": False, "progress": False, "batch_size": 4}
    plain = sample_responses(policy, tokenizer, msgs, ["a", "b"], out_path=tmp_path / "plain.jsonl", **kw)
    path = tmp_path / "captured.jsonl"
    df = sample_responses(policy, tokenizer, msgs, ["a", "b"], out_path=path, capture_store=store, **kw)
    assert df["response_ids"].tolist() == plain["response_ids"].tolist()
    assert df.attrs["capture"]["captured"] == 6 and not df.attrs["capture"]["fallback"]
    prompts, replies = encode_prompt_replies(tokenizer, list(df["messages"]), list(df["response"]))
    assert store.refresh().missing([(p, [r]) for p, r in zip(prompts, replies)]) == []
    rows = store.rows
    fast = score_samples(rm, tokenizer, df, bf16=False, progress=False)
    assert store.refresh().rows == rows
    plain_scores, _ = score_replies(rm, prompts, replies, bf16=False, progress=False, use_store=False)
    torch.testing.assert_close(torch.from_numpy(fast), torch.from_numpy(plain_scores), atol=1e-4, rtol=1e-4)
    # resumed with one more sample per prompt: the old ones are kept, the new batch is captured
    more = sample_responses(policy, tokenizer, msgs, ["a", "b"], out_path=path, capture_store=store,
                            **{**kw, "n": 4})
    assert more[more["sample_index"] < 3]["response_ids"].tolist() == df["response_ids"].tolist()
    prompts, replies = encode_prompt_replies(tokenizer, list(more["messages"]), list(more["response"]))
    assert store.refresh().missing([(p, [r]) for p, r in zip(prompts, replies)]) == []


def test_best_of_n_sample_policy_captures_for_saved_reward_models(tokenizer, tmp_path, monkeypatch):
    """``bon_runs.sample_policy(capture_for=)`` on saved folders, then ``score_with_all``: only the top
    layers run, and the scores equal the plain path's. The backbone's weights are bf16 values (as
    SmolLM2's are), so the float32 policy and the bf16-saved reward model have the same bottom."""
    import pandas as pd

    from rmlib.analysis import bon_runs
    from rmlib.model.reward_model import save_reward_model

    monkeypatch.setenv("RMLIB_CACHE_DIR", str(tmp_path / "cache"))
    backbone = tmp_path / "backbone"
    make_tiny_lm(tokenizer, layers=4).to(torch.bfloat16).float().save_pretrained(backbone)
    tokenizer.save_pretrained(backbone)
    lm = make_tiny_lm(tokenizer, layers=4).to(torch.bfloat16).float()
    rms = {}
    for name, seed in (("gold", 0), ("proxy", 1)):
        rm = build_reward_model(ModelSpec(backbone=str(backbone), mode="topk", top_k_layers=2),
                                lm=copy.deepcopy(lm), seed=seed)
        rms[name] = save_reward_model(rm, tmp_path / name, tokenizer)
    prompts = pd.DataFrame({"prompt_id": ["a", "b"],
                            "messages": [[{"role": "user", "content": "Hi."}],
                                         [{"role": "user", "content": "Name a colour."}]]})
    df = bon_runs.sample_policy(str(backbone), prompts, tmp_path / "s.jsonl", n=3, max_new_tokens=6, bf16=False,
                                progress=False, capture_for=rms)
    store = bon_runs.capture_store_for(rms, bf16=False)
    info = df.attrs["capture"]
    assert info["captured"] > 0 and info["captured"] + info["present"] + sum(info["fallback"].values()) == len(df)
    prompts_ids, replies = encode_prompt_replies(tokenizer, list(df["messages"]), list(df["response"]))
    groups = [(p, [r]) for p, r in zip(prompts_ids, replies)]
    # a random tiny model samples arbitrary tokens, and a few are re-encoded differently: only those are missing
    assert sum(len(rs) for _, _, rs in store.missing(groups)) == sum(info["fallback"].values())
    scores = bon_runs.score_with_all(rms, df, tmp_path / "scores.jsonl", bf16=False, progress=False)
    assert store.refresh().missing(groups) == []  # the first model built the fallback rows, the second used them
    for name, path in rms.items():
        model = load_reward_model(path)
        plain, _ = score_replies(model, prompts_ids, replies, bf16=False, progress=False, use_store=False)
        torch.testing.assert_close(torch.tensor(scores[name].to_numpy()), torch.from_numpy(plain),
                                   atol=2e-4, rtol=1e-4)
    other = tmp_path / "other_backbone"
    make_tiny_lm(tokenizer, seed=3, layers=4).save_pretrained(other)
    tokenizer.save_pretrained(other)
    with pytest.raises(ValueError, match="not the one of the bottom store"):
        bon_runs.sample_policy(str(other), prompts, tmp_path / "o.jsonl", n=1, max_new_tokens=2, bf16=False,
                               progress=False, capture_for=rms)


def test_bf16_autocast_capture_matches_a_separate_bf16_build(policy, rm, tokenizer, messages, tmp_path):
    """The production setting: bf16 autocast, bf16 storage. The decode loop's attention rounds differently
    from the store build's sdpa under bf16 (and the packed linears where the CPU has them), so the
    entries agree to bf16 precision: relative L2 difference per sequence <= 1e-2 (measured on SmolLM2:
    ~1e-3); the samples are still the same with and without capture."""
    prompts = [tokenizer(format_prompt(tokenizer, m), add_special_tokens=False)["input_ids"] for m in messages]
    loop = DecodeLoop(policy, STOPS, tokenizer.pad_token_id, N_NEW, 0.7, 0.95, bf16=True)
    plain = loop(prompts, list(range(len(prompts))))
    store = new_store(rm, tmp_path / "captured", dtype=torch.bfloat16, bf16_autocast=True)
    capture = StoreCapture(store, policy, bf16=True)
    decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731
    capture.begin(prompts, rm_encoder(tokenizer, decode, lambda r: messages[r], STOPS))
    assert loop(prompts, list(range(len(prompts))), capture=capture) == plain
    capture.flush()
    p_ids, r_ids = scored_rows(tokenizer, messages, plain)
    groups = [(p, [r]) for p, r in zip(p_ids, r_ids)]
    assert store.missing(groups) == [] and not capture.fallback
    built = new_store(rm, tmp_path / "built", dtype=torch.bfloat16, bf16_autocast=True)
    built.ensure(groups, progress=False)
    for p, r in zip(p_ids, r_ids):
        got, want = store.sequence(p, r).float(), built.sequence(p, r).float()
        assert float((got - want).norm() / want.norm()) <= 1e-2


def test_put_checks_shapes_and_skips_stored_keys(rm, tmp_path):
    store = new_store(rm, tmp_path / "s")
    h = torch.randn(3, store.hidden_size)
    assert store.put({"k1": h, "k2": h[:1]}) == 2 and store.rows == 4
    torch.testing.assert_close(torch.from_numpy(store._rows("k1").copy()), h)
    assert store.put({"k1": h}) == 0 and store.rows == 4  # already stored: no new shard
    with pytest.raises(ValueError, match=r"expected \(n >= 1, 32\)"):
        store.put({"k3": torch.randn(2, store.hidden_size + 1)})
    with pytest.raises(ValueError, match="k4"):
        store.put({"k4": torch.zeros(0, store.hidden_size)})
    assert len(list(tmp_path.glob("s/shard-*"))) == 1
