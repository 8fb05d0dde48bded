"""Pair tokenization: chat template, left-truncated prompt, whole replies, nothing dropped silently."""

from __future__ import annotations

import torch
from datasets import Dataset

from rmlib.model.encoding import (
    PairCollator,
    encode_pairs,
    format_prompt,
    format_reply,
    truncate_pair,
)


def test_truncate_keeps_reply_and_cuts_prompt_from_the_left():
    p, c, r, pcut, rcut = truncate_pair(list(range(100)), [1] * 30, [2] * 20, max_length=64)
    assert p == list(range(66, 100)) and c == [1] * 30 and r == [2] * 20 and pcut and not rcut


def test_truncate_cuts_an_overlong_reply_at_its_end_keeping_some_prompt():
    p, c, r, pcut, rcut = truncate_pair(list(range(100)), list(range(500)), [2] * 10, max_length=64,
                                        min_prompt_tokens=16)
    assert len(p) == 16 and p[-1] == 99 and c == list(range(48)) and r == [2] * 10 and pcut and rcut


def test_no_truncation_when_it_fits():
    assert truncate_pair([1, 2], [3], [4, 5], max_length=8) == ([1, 2], [3], [4, 5], False, False)


def test_reply_ends_with_end_of_turn(tokenizer):
    msgs = [{"role": "user", "content": "hi"}]
    reply = format_reply(tokenizer, msgs, "hello")
    assert reply.startswith("hello") and "<|im_end|>" in reply
    assert format_prompt(tokenizer, msgs).endswith("<|im_start|>assistant\n")


def test_encode_pairs_drops_pairs_identical_after_truncation_and_reports_them(tokenizer):
    long_same = "word " * 400
    ds = Dataset.from_list([
        {"id": "a", "prompt": [{"role": "user", "content": "q"}], "chosen": "yes", "rejected": "no"},
        {"id": "b", "prompt": [{"role": "user", "content": "q"}], "chosen": long_same + "A", "rejected": long_same + "B"},
    ])
    enc, stats = encode_pairs(ds, tokenizer, max_length=64)
    assert enc["id"] == ["a"] and stats.dropped_identical_after_truncation == ["b"]
    assert stats.reply_truncated == 1 and all(n <= 64 for n in enc["length"])


def test_collator_stacks_chosen_then_rejected():
    feats = [{"prompt_ids": [1, 2], "chosen_ids": [3], "rejected_ids": [4, 5, 6]},
             {"prompt_ids": [7], "chosen_ids": [8, 9], "rejected_ids": [10]}]
    b = PairCollator(pad_token_id=0, pad_to_multiple_of=None)(feats)
    assert b["input_ids"].tolist() == [[1, 2, 3, 0, 0], [7, 8, 9, 0, 0], [1, 2, 4, 5, 6], [7, 10, 0, 0, 0]]
    assert b["response_mask"].tolist() == [[0, 0, 1, 0, 0], [0, 1, 1, 0, 0], [0, 0, 1, 1, 1], [0, 1, 0, 0, 0]]
    assert torch.equal(b["attention_mask"].sum(1), torch.tensor([3, 3, 5, 2]))


def test_collator_emits_per_pair_margins_only_for_scored_pairs():
    feats = [{"prompt_ids": [1], "chosen_ids": [2], "rejected_ids": [3], "chosen_score": 4.0, "rejected_score": 6.5},
             {"prompt_ids": [1], "chosen_ids": [4], "rejected_ids": [5], "chosen_score": None, "rejected_score": 1.0}]
    m = PairCollator(pad_token_id=0)(feats)["margin"]
    assert m.dtype == torch.float32 and m[0].item() == 2.5 and m[1].isnan()  # |rating_c - rating_r|; NaN: unscored
    assert "margin" not in PairCollator(pad_token_id=0)([{k: feats[0][k] for k in list(feats[0])[:3]}])


def test_encode_pairs_keeps_the_score_columns(tokenizer):
    ds = Dataset.from_list([{"id": "a", "prompt": [{"role": "user", "content": "q"}], "chosen": "yes",
                             "rejected": "no", "chosen_score": 3.0, "rejected_score": 1.0}])
    enc, _ = encode_pairs(ds, tokenizer, max_length=64)
    assert enc["chosen_score"] == [3.0] and enc["rejected_score"] == [1.0]
