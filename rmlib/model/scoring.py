"""Batched, length-grouped reward scoring (forward only, bf16 autocast by default).

``score_texts(rm, prompts, replies)`` (also ``rmlib.score``) scores texts with a saved reward-model
folder or a loaded RewardModel: each row is formatted with the RM's own tokenizer and chat
template as in training (``rmlib.model.encoding.encode_prompt_replies``).

Token ids: ``score_replies(model, prompts, replies)`` picks the path: a reward model whose
bottom is frozen (modes ``topk``/``frozen``, ``rmlib.model.bottom_store.store_for``) scores through the
shared bottom store (only the top layers run per model); any other model runs whole sequences,
sorted by length so padding stays small, with the scores put back in input order.
``score_pairs`` and ``score_token_sequences`` are views of it. A progress bar shows long runs.
"""

from __future__ import annotations

import logging
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from rmlib.core.atomic_io import read_json
from rmlib.core.precision import autocast, resolve_bf16
from rmlib.model import assets, bottom_store
from rmlib.model.encoding import encode_prompt_replies, pad_sequences
from rmlib.model.reward_model import RMLIB_CONFIG, load_reward_model

logger = logging.getLogger(__name__)


def _device_of(model) -> torch.device:
    return next(model.parameters()).device


def _length_batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    order = np.argsort(-np.asarray(lengths), kind="stable")
    return [order[i : i + batch_size].tolist() for i in range(0, len(order), batch_size)]


@torch.no_grad()
def score_replies(model, prompts: list[list[int]], replies: list[list[int]], batch_size: int = 16,
                  bf16: bool | str = "auto", progress: bool = True, return_hidden: bool = False, desc: str = "scoring",
                  use_store: bool = True) -> tuple[np.ndarray, np.ndarray | None]:
    """Rewards (N,) float32 of ``prompts[i] + replies[i]`` (token ids), in input order, and with
    ``return_hidden`` the last-token hidden states (N, H) float32 (else None).

    ``use_store=False`` forces the plain path (the fast path is tested against it)."""

    if len(prompts) != len(replies):
        raise ValueError(f"prompts and replies differ in length ({len(prompts)} vs {len(replies)})")
    prompts, replies = [list(p) for p in prompts], [list(r) for r in replies]
    bf16 = resolve_bf16(bf16, _device_of(model))
    store = None
    if use_store:
        groups = [(p, [r]) for p, r in zip(prompts, replies)]
        store = bottom_store.store_for(model, bf16_autocast=bf16, groups=groups)
        if store is not None:  # what is missing runs through the bottom once; then only the top per model
            store.ensure(groups, progress=progress, desc=f"{desc}: caching layer {store.start_layer} input")
    was_training = model.training
    model.eval()
    device = _device_of(model)
    n = len(prompts)
    rewards = np.zeros(n, np.float32)
    hidden = None
    try:
        for idx in tqdm(_length_batches([len(p) + len(r) for p, r in zip(prompts, replies)], batch_size), desc=desc,
                        disable=not progress, unit="batch"):
            seqs = [prompts[i] + replies[i] for i in idx]
            batch = pad_sequences(seqs, [[0] * len(s) for s in seqs], pad_token_id=0)
            extra = {}
            if store is not None:
                batch = bottom_store.with_stored_inputs(batch, [store.sequence(prompts[i], replies[i]) for i in idx], store)
                extra = {"hidden_in": batch["hidden_in"].to(device), "start_layer": batch["start_layer"]}
            with autocast(device, bf16):
                out = model(batch["input_ids"].to(device), batch["attention_mask"].to(device), **extra)
            rewards[idx] = out.rewards.float().cpu().numpy()
            if return_hidden:
                h = out.hidden.float().cpu().numpy()
                if hidden is None:
                    hidden = np.zeros((n, h.shape[1]), np.float32)
                hidden[idx] = h
    finally:
        model.train(was_training)
    return rewards, hidden


def score_pairs(model, encoded, batch_size: int = 8, bf16: bool | str = "auto", progress: bool = True,
                return_hidden: bool = False, desc: str = "scoring pairs", use_store: bool = True) -> dict[str, np.ndarray]:
    """Rewards of chosen and rejected replies for an encoded pair dataset (see ``encode_pairs``).

    Returns ``{"chosen": (N,), "rejected": (N,)}`` and, with ``return_hidden``, the last-token
    hidden states ``hidden_chosen``/``hidden_rejected`` (N, H) as float32. ``batch_size`` counts
    pairs (2 sequences each)."""
    prompts = [list(p) for p in encoded["prompt_ids"]]
    replies = [list(c) for c in encoded["chosen_ids"]] + [list(r) for r in encoded["rejected_ids"]]
    rewards, hidden = score_replies(model, prompts + prompts, replies, batch_size=2 * batch_size, bf16=bf16,
                                    progress=progress, return_hidden=return_hidden, desc=desc, use_store=use_store)
    n = len(prompts)
    result = {"chosen": rewards[:n], "rejected": rewards[n:]}
    if return_hidden:
        result["hidden_chosen"], result["hidden_rejected"] = hidden[:n], hidden[n:]
    return result


def score_token_sequences(model, sequences: list[list[int]], batch_size: int = 16, bf16: bool | str = "auto",
                          progress: bool = True, desc: str = "scoring",
                          prompt_lengths: list[int] | None = None) -> np.ndarray:
    """Rewards for already-tokenized full sequences (prompt + reply), in input order. (N,)

    With ``prompt_lengths`` (the prompt's share of each sequence) a frozen-bottom model scores
    through the shared bottom store; without, the whole sequences run."""
    if prompt_lengths is None:
        rewards, _ = score_replies(model, [[] for _ in sequences], sequences, batch_size=batch_size, bf16=bf16,
                                   progress=progress, desc=desc, use_store=False)
        return rewards
    if len(prompt_lengths) != len(sequences):
        raise ValueError(f"prompt_lengths has {len(prompt_lengths)} entries for {len(sequences)} sequences")
    prompts = [list(s[:k]) for s, k in zip(sequences, prompt_lengths)]
    replies = [list(s[k:]) for s, k in zip(sequences, prompt_lengths)]
    return score_replies(model, prompts, replies, batch_size=batch_size, bf16=bf16, progress=progress, desc=desc)[0]


def pairwise_accuracy(chosen: np.ndarray, rejected: np.ndarray) -> float:
    """mean(r_c > r_r); ties count as wrong."""
    return float(np.mean(np.asarray(chosen) > np.asarray(rejected)))


# -- texts --------------------------------------------------------------------------------------------
@lru_cache(maxsize=16)
def _tokenizer(name_or_path: str, version: int = 0):
    """``assets.load_tokenizer``, loaded once per (name, ``version``: the files' mtime) in a
    process; callers must not modify it (copy first)."""
    return assets.load_tokenizer(name_or_path)


def _version(folder) -> int:
    f = Path(folder) / "tokenizer_config.json"
    return f.stat().st_mtime_ns if f.exists() else 0


def reward_tokenizer(rm):
    """The tokenizer (and chat template) a reward model scores with, shared: do not modify it.

    rm: a folder written by ``save_reward_model`` (its own tokenizer, else its base model's), or a
    RewardModel (that of the folder it was loaded from, else its base model's)."""
    if isinstance(rm, (str, os.PathLike)):
        path = Path(rm)
    else:
        source = str(getattr(getattr(rm, "config", None), "_name_or_path", "") or "")
        path = Path(source) if source and (Path(source) / RMLIB_CONFIG).exists() else None
        if path is None:
            if not getattr(rm, "base_model", ""):
                raise ValueError("cannot tell this reward model's tokenizer (not loaded from a folder, no base "
                                 "model): pass tokenizer=")
            return _tokenizer(rm.base_model)
    if (path / "tokenizer_config.json").exists():
        return _tokenizer(str(path.resolve()), _version(path))
    base = read_json(path / RMLIB_CONFIG).get("base_model") or assets.DEFAULT_MODEL
    logger.info("%s has no tokenizer; using the base model's (%s)", path, base)
    return _tokenizer(base)


def score_texts(rm, prompts, replies, *, tokenizer=None, max_length: int | None = None, batch_size: int = 16,
                bf16: bool | str = "auto", device=None, use_store: bool = True, progress: bool = False,
                desc: str = "scoring") -> np.ndarray:
    """Rewards of (prompt, reply text) rows, in input order: (N,) float32.

    rm: a folder written by ``save_reward_model`` (any head; loaded here on ``device``, default CUDA
    if available, in bfloat16 when ``bf16`` resolves true, else float32) or a loaded RewardModel
    (scored where it is). For many calls, load the model once (``load_reward_model``) and pass it.
    prompts: chat messages per row (``[{"role", "content"}, ...]``) or plain strings (one user turn
    each); replies: the reply texts. Each row is formatted with the RM's own chat template as in
    training (``encode_prompt_replies``: reply ending with the end-of-turn; prompt cut from the
    left when prompt + reply exceed ``max_length``; None: no cut).
    tokenizer: default ``reward_tokenizer(rm)``.
    use_store: a frozen-bottom (``topk``/``frozen``) RM scores through the shared on-disk bottom
    store (``rmlib.model.bottom_store``); False: whole sequences through the plain forward.
    """
    if len(prompts) != len(replies):
        raise ValueError(f"{len(prompts)} prompts but {len(replies)} replies")
    if isinstance(rm, (str, os.PathLike)):
        device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        dtype = torch.bfloat16 if resolve_bf16(bf16, device) else torch.float32
        model = load_reward_model(rm, dtype=dtype).to(device)
    else:
        model = rm
    if tokenizer is None:
        tokenizer = reward_tokenizer(rm)
    if not len(prompts):
        return np.zeros(0, np.float32)
    prompt_ids, reply_ids = encode_prompt_replies(tokenizer, prompts, replies, max_length)
    return score_replies(model, prompt_ids, reply_ids, batch_size=batch_size, bf16=bf16, progress=progress,
                         desc=desc, use_store=use_store)[0]
