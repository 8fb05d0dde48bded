"""Tokenize preference pairs with the model's chat template and batch them.

A pair (prompt messages, chosen, rejected) becomes ``prompt_ids`` (ending with the assistant
generation header) and the two replies' ids (ending with the template's end-of-turn). When
prompt + longest reply exceeds ``max_length``, the prompt is cut from the LEFT (the end of the
conversation is kept) and the replies stay whole; only a reply longer than
``max_length - min_prompt_tokens`` is cut at its end. Nothing is dropped silently: pairs whose
replies become identical after truncation are dropped and counted. The pair schema's
``chosen_score``/``rejected_score`` columns stay, and the collators turn them into the per-pair
margin of GRM's margin baseline (``pair_margins``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pandas as pd
import torch
from torch.nn.utils.rnn import pad_sequence

SCORE_COLUMNS = ("chosen_score", "rejected_score")


@dataclass
class EncodeStats:
    """What truncation did to a dataset (counts of pairs)."""

    pairs: int = 0
    prompt_truncated: int = 0
    reply_truncated: int = 0
    dropped_identical_after_truncation: list[str] = field(default_factory=list)


def format_prompt(tokenizer, prompt_messages: list[dict]) -> str:
    """Chat-template text of the prompt, ending with the assistant generation header."""
    return tokenizer.apply_chat_template(prompt_messages, add_generation_prompt=True, tokenize=False)


def format_reply(tokenizer, prompt_messages: list[dict], reply: str, prompt_text: str | None = None) -> str:
    """The text the chat template appends after the prompt for ``reply`` (incl. end of turn)."""
    prompt_text = prompt_text if prompt_text is not None else format_prompt(tokenizer, prompt_messages)
    full = tokenizer.apply_chat_template(
        list(prompt_messages) + [{"role": "assistant", "content": reply}], tokenize=False
    )
    if not full.startswith(prompt_text):  # templates that rewrite earlier turns: fall back to the raw reply
        return reply + (tokenizer.eos_token or "")
    return full[len(prompt_text) :]


def truncate_pair(
    prompt_ids: list[int], chosen_ids: list[int], rejected_ids: list[int], max_length: int, min_prompt_tokens: int = 32
) -> tuple[list[int], list[int], list[int], bool, bool]:
    """Fit prompt + each reply into ``max_length``: prompt cut from the left, replies whole if possible.

    Returns (prompt, chosen, rejected, prompt_was_cut, a_reply_was_cut).
    """
    longest = max(len(chosen_ids), len(rejected_ids))
    if len(prompt_ids) + longest <= max_length:
        return prompt_ids, chosen_ids, rejected_ids, False, False
    keep_prompt = min(len(prompt_ids), max(max_length - longest, min_prompt_tokens))
    reply_budget = max_length - keep_prompt
    prompt_cut = keep_prompt < len(prompt_ids)
    reply_cut = longest > reply_budget
    return (
        prompt_ids[len(prompt_ids) - keep_prompt :],
        chosen_ids[:reply_budget],
        rejected_ids[:reply_budget],
        prompt_cut,
        reply_cut,
    )


def encode_pairs(dataset, tokenizer, max_length: int = 256, min_prompt_tokens: int = 32, num_proc: int | None = None):
    """Add ``prompt_ids``, ``chosen_ids``, ``rejected_ids`` and ``length`` columns to a pair dataset.

    Returns ``(encoded_dataset, EncodeStats)``. Pairs whose two replies are identical after
    truncation are removed and their ids listed in the stats. Every input column is kept,
    ``chosen_score``/``rejected_score`` (``SCORE_COLUMNS``) included.
    """

    def encode(batch):
        out = {"prompt_ids": [], "chosen_ids": [], "rejected_ids": [], "length": [], "_cut": []}
        for prompt, chosen, rejected in zip(batch["prompt"], batch["chosen"], batch["rejected"]):
            p_text = format_prompt(tokenizer, prompt)
            p = tokenizer(p_text, add_special_tokens=False)["input_ids"]
            c = tokenizer(format_reply(tokenizer, prompt, chosen, p_text), add_special_tokens=False)["input_ids"]
            r = tokenizer(format_reply(tokenizer, prompt, rejected, p_text), add_special_tokens=False)["input_ids"]
            p, c, r, pcut, rcut = truncate_pair(p, c, r, max_length, min_prompt_tokens)
            out["prompt_ids"].append(p)
            out["chosen_ids"].append(c)
            out["rejected_ids"].append(r)
            out["length"].append(len(p) + max(len(c), len(r)))
            out["_cut"].append(int(pcut) + 2 * int(rcut))
        return out

    encoded = dataset.map(encode, batched=True, num_proc=num_proc, desc="tokenizing pairs")
    cuts = encoded["_cut"]
    stats = EncodeStats(
        pairs=len(encoded),
        prompt_truncated=sum(1 for x in cuts if x & 1),
        reply_truncated=sum(1 for x in cuts if x & 2),
    )
    same = [i for i, (c, r) in enumerate(zip(encoded["chosen_ids"], encoded["rejected_ids"])) if c == r]
    if same:
        ids = encoded["id"] if "id" in encoded.column_names else list(range(len(encoded)))
        stats.dropped_identical_after_truncation = [str(ids[i]) for i in same]
        keep = sorted(set(range(len(encoded))) - set(same))
        encoded = encoded.select(keep)
    return encoded.remove_columns("_cut"), stats


@dataclass
class PairCollator:
    """Batch B encoded pairs into 2B right-padded sequences: rows [0, B) chosen, [B, 2B) rejected.

    Returns input_ids, attention_mask and response_mask (1 on reply tokens), shapes (2B, T), and
    ``margin`` (B,) when the pairs carry scores (``pair_margins``). Ours because TRL's reward-model
    collator has no response mask (GRM's regularizers need it) and its DPO collator no margin.
    """

    pad_token_id: int
    pad_to_multiple_of: int | None = 8

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        seqs, resp = [], []
        for key in ("chosen_ids", "rejected_ids"):
            for f in features:
                seqs.append(list(f["prompt_ids"]) + list(f[key]))
                resp.append([0] * len(f["prompt_ids"]) + [1] * len(f[key]))
        return with_margins(pad_sequences(seqs, resp, self.pad_token_id, self.pad_to_multiple_of), features)


def pair_margins(features: list[dict]) -> torch.Tensor | None:
    """GRM's per-pair margin m_i = |rating_c,i - rating_r,i| from ``chosen_score``/``rejected_score``:
    (B,) float32, NaN for a pair missing either score; None when the features have no score columns.

    GRM code (reward_models/load_datasets.py, build_dataset_UF): chosen is the higher-rated reply and
    ``margin = rating_chosen - rating_rejected`` (ties filtered out), i.e. |rating_c - rating_r|.
    """
    if not features or not all(c in f for f in features for c in SCORE_COLUMNS):
        return None
    nan = float("nan")
    c = torch.tensor([nan if f["chosen_score"] is None else float(f["chosen_score"]) for f in features])
    r = torch.tensor([nan if f["rejected_score"] is None else float(f["rejected_score"]) for f in features])
    return (c - r).abs().float()


def with_margins(batch: dict, features: list[dict]) -> dict:
    """Add ``margin`` (B,) (``pair_margins``) to a collated batch when the pairs carry scores."""
    m = pair_margins(features)
    if m is not None:
        batch["margin"] = m
    return batch


def pad_sequences(seqs, response_masks, pad_token_id: int, pad_to_multiple_of: int | None = 8,
                  padding_side: str = "right"):
    """Pad token lists into (N, T) tensors: input_ids, attention_mask, response_mask
    (``torch.nn.utils.rnn.pad_sequence``; T = the longest sequence, rounded up to a multiple of
    ``pad_to_multiple_of``)."""
    width = max(len(s) for s in seqs)
    if pad_to_multiple_of:
        width = -(-width // pad_to_multiple_of) * pad_to_multiple_of

    def padded(rows, value):
        out = pad_sequence([torch.as_tensor(r, dtype=torch.long) for r in rows], batch_first=True,
                           padding_value=value, padding_side=padding_side)
        fill = torch.full((out.shape[0], width - out.shape[1]), value, dtype=torch.long)
        return torch.cat([out, fill] if padding_side == "right" else [fill, out], dim=1)

    return {"input_ids": padded(seqs, pad_token_id), "attention_mask": padded([[1] * len(s) for s in seqs], 0),
            "response_mask": padded(response_masks, 0)}


# -- 2. scoring -------------------------------------------------------------------------------------
def check_sample_columns(samples_df: pd.DataFrame) -> None:
    for col in ("prompt_id", "sample_index", "messages", "response"):
        if col not in samples_df.columns:
            raise ValueError(f"samples_df needs a {col!r} column (as returned by sample_responses)")


def as_messages(prompt) -> list[dict]:
    """Chat messages of a prompt: a string becomes one user turn; a sequence of ``{"role", "content"}``
    mappings (a list, or an array as pandas/datasets hold it) becomes a list of dicts."""
    if isinstance(prompt, str):
        return [{"role": "user", "content": prompt}]
    try:
        messages = [dict(m) for m in prompt]
    except (TypeError, ValueError):
        messages = None
    if not messages or not all("role" in m and "content" in m for m in messages):
        raise TypeError(f"a prompt must be a string or chat messages ({{'role', 'content'}} dicts), got {prompt!r:.80}")
    return messages


def encode_prompt_replies(tokenizer, prompts, replies, max_length: int | None = None,
                          min_prompt_tokens: int = 32) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt ids, reply ids) per row, encoded as in training (``encode_pairs``): the prompt from
    ``format_prompt`` of its messages with THIS tokenizer (each distinct prompt tokenized once), the
    reply from ``format_reply`` (ends with the end-of-turn, also for replies cut at max_new_tokens).

    prompts: chat messages or plain strings (``as_messages``); replies: reply texts.
    ``max_length``: fit prompt + reply as ``truncate_pair`` does, the prompt cut from the left and
    the reply kept whole unless it alone exceeds ``max_length - min_prompt_tokens`` (None: no cut)."""
    if len(prompts) != len(replies):
        raise ValueError(f"{len(prompts)} prompts but {len(replies)} replies")
    prompt_cache: dict[str, tuple[str, list[int]]] = {}
    prompt_ids, reply_ids = [], []
    for prompt, reply in zip(prompts, replies):
        messages = as_messages(prompt)
        key = json.dumps(messages, sort_keys=True, ensure_ascii=False, default=str)
        if key not in prompt_cache:
            text = format_prompt(tokenizer, messages)
            prompt_cache[key] = (text, tokenizer(text, add_special_tokens=False)["input_ids"])
        text, p = prompt_cache[key]
        r = tokenizer(format_reply(tokenizer, messages, reply, text), add_special_tokens=False)["input_ids"]
        if max_length is not None:
            p, r, _, _, _ = truncate_pair(p, r, r, max_length, min_prompt_tokens)
        prompt_ids.append(list(p))
        reply_ids.append(list(r))
    return prompt_ids, reply_ids
