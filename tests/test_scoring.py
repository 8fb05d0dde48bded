"""rmlib.score (rmlib.model.scoring.score_texts): scoring texts with a saved reward model, the same
numbers as the RLOO reward function and as plain transformers on a linear-head export."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import make_tiny_lm
from transformers import AutoModelForSequenceClassification

import rmlib
from rmlib.model.reward_model import (
    ModelSpec,
    build_reward_model,
    load_reward_model,
    save_reward_model,
)
from rmlib.model.scoring import reward_tokenizer, score_texts
from rmlib.rloo.reward_fn import RewardModelFunction

PROMPTS = [[{"role": "user", "content": "How do I cook rice?"}],
           [{"role": "user", "content": "Name a prime number."}],
           [{"role": "user", "content": "Hi!"}, {"role": "assistant", "content": "Hello."},
            {"role": "user", "content": "How do I cook rice?"}]]
REPLIES = ["Rinse it, then simmer 15 minutes.", "Seven.", "Boil it."]


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tokenizer, tiny_backbone):
    root = tmp_path_factory.mktemp("score_texts")
    linear = build_reward_model(ModelSpec(backbone=tiny_backbone, head="linear", mode="full"),
                                lm=make_tiny_lm(tokenizer, seed=3, layers=4), seed=3)
    topk = build_reward_model(ModelSpec(backbone=tiny_backbone, head="linear", mode="topk", top_k_layers=1),
                              lm=make_tiny_lm(tokenizer, seed=4, layers=4), seed=4)
    return {"linear": str(save_reward_model(linear, root / "linear", tokenizer, dtype=torch.float32)),
            "topk": str(save_reward_model(topk, root / "topk", tokenizer, dtype=torch.float32))}


def _hf_score(model, tokenizer, messages, reply) -> float:
    """Plain transformers: the conversation rendered whole by the chat template, one row, no rmlib code."""
    text = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": reply}], tokenize=False)
    ids = torch.tensor([tokenizer(text, add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        return float(model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, 0])


def test_equals_the_reward_function_and_plain_transformers(folders):
    got = rmlib.score(folders["linear"], PROMPTS, REPLIES, bf16=False, device="cpu")
    assert got.dtype == np.float32 and got.shape == (3,)
    fn = RewardModelFunction.from_dir(folders["linear"], bf16=False, max_length=None)
    np.testing.assert_array_equal(got, fn.score(PROMPTS, REPLIES))
    hf = AutoModelForSequenceClassification.from_pretrained(folders["linear"], dtype=torch.float32).eval()
    tok = reward_tokenizer(folders["linear"])
    want = [_hf_score(hf, tok, p, r) for p, r in zip(PROMPTS, REPLIES)]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_loaded_model_string_prompts_and_max_length(folders):
    model = load_reward_model(folders["linear"])
    by_folder = score_texts(folders["linear"], PROMPTS, REPLIES, bf16=False, device="cpu")
    np.testing.assert_array_equal(score_texts(model, PROMPTS, REPLIES, bf16=False), by_folder)  # its folder's tokenizer
    plain = score_texts(model, ["How do I cook rice?", "Name a prime number."], REPLIES[:2], bf16=False)
    np.testing.assert_allclose(plain, by_folder[:2], rtol=1e-6, atol=1e-6)  # a string is one user turn (other batch)
    long_prompt = [[{"role": "user", "content": "blah " * 200 + "How do I cook rice?"}]]
    cut = score_texts(model, long_prompt, ["Boil it."], max_length=64, bf16=False)
    fn = RewardModelFunction(model, reward_tokenizer(model), max_length=64, bf16=False)
    np.testing.assert_array_equal(cut, fn.score(long_prompt, ["Boil it."]))
    assert cut[0] != pytest.approx(score_texts(model, long_prompt, ["Boil it."], bf16=False)[0])
    assert score_texts(model, [], [], bf16=False).shape == (0,)
    with pytest.raises(TypeError, match="chat messages"):
        score_texts(model, [{"role": "user", "content": "a dict, not a list"}], ["x"], bf16=False)
    with pytest.raises(ValueError, match="2 prompts but 1 replies"):
        score_texts(model, PROMPTS[:2], REPLIES[:1], bf16=False)


def test_frozen_bottom_model_scores_through_the_store_like_the_plain_path(folders, tmp_path, monkeypatch):
    monkeypatch.setenv("RMLIB_CACHE_DIR", str(tmp_path))
    model = load_reward_model(folders["topk"])
    stored = score_texts(model, PROMPTS, REPLIES, bf16=False)
    assert (tmp_path / "bottom").is_dir()
    plain = score_texts(model, PROMPTS, REPLIES, bf16=False, use_store=False)
    np.testing.assert_allclose(stored, plain, rtol=1e-5, atol=1e-5)
