"""rmlib pairs in the dataset format TRL 1.16's ``RewardTrainer`` accepts, and which pairs it keeps.

TRL accepts preference rows with an explicit prompt, conversational: ``prompt`` (messages),
``chosen`` and ``rejected`` (each a one-message assistant list). Its ``_prepare_dataset`` joins
``prompt + chosen`` and tokenizes the conversation with the chat template (``trl.data_utils._tokenize``),
then FILTERS OUT every pair whose chosen or rejected sequence is longer than ``max_length``
(no truncation). ``trl_kept_mask`` reproduces that rule, so rmlib can train on the same pairs.
For SmolLM2 the tokens equal rmlib's ``prompt_ids + reply_ids`` for a pair that needs no cut
(tests/test_bench.py checks it on real HH pairs).
"""

from __future__ import annotations


def assistant(reply: str) -> list[dict]:
    return [{"role": "assistant", "content": reply}]


def to_trl_dataset(pairs):
    """A ``datasets.Dataset`` with columns prompt / chosen / rejected in TRL's conversational format."""
    from datasets import Dataset

    return Dataset.from_dict({
        "prompt": [list(p) for p in pairs["prompt"]],
        "chosen": [assistant(c) for c in pairs["chosen"]],
        "rejected": [assistant(r) for r in pairs["rejected"]],
    })


def trl_token_ids(tokenizer, prompt_messages: list[dict], reply: str) -> list[int]:
    """The token ids TRL's RewardTrainer trains on for prompt + reply (its own tokenize call)."""
    messages = list(prompt_messages) + assistant(reply)
    try:
        from trl.data_utils import _tokenize
    except ImportError:  # other TRL versions: the same call it makes
        return list(tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"])
    return list(_tokenize(tokenizer, messages, tools=None)["input_ids"])


def trl_kept_mask(pairs, tokenizer, max_length: int) -> list[bool]:
    """True for each pair TRL keeps: both chosen and rejected sequences have <= max_length tokens."""
    keep = []
    for prompt, chosen, rejected in zip(pairs["prompt"], pairs["chosen"], pairs["rejected"]):
        c = trl_token_ids(tokenizer, prompt, chosen)
        r = trl_token_ids(tokenizer, prompt, rejected)
        keep.append(len(c) <= max_length and len(r) <= max_length)
    return keep
