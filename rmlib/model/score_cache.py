"""Rewards of sampled replies (Best-of-N samples), by one or many reward models, with a
resumable JSONL cache: the prompt is re-formatted by each reward model's own chat template, and
top-k models of one backbone share the bottom store, so the frozen bottom runs once in all.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from rmlib.core.atomic_io import append_jsonl, read_jsonl
from rmlib.model.encoding import check_sample_columns
from rmlib.model.reward_model import load_reward_model
from rmlib.model.scoring import score_texts

logger = logging.getLogger(__name__)


def score_samples(reward_model, tokenizer, samples_df: pd.DataFrame, batch_size: int = 16, bf16: bool | str = "auto",
                  max_length: int | None = None, progress: bool = True) -> np.ndarray:
    """Reward of every sample row, in row order: (len(samples_df),) float32. A frozen-bottom (top-k)
    reward model scores through the shared bottom store (``rmlib.model.bottom_store``): the samples' bottom
    activations are computed once for every reward model of the same backbone."""
    check_sample_columns(samples_df)
    return score_texts(reward_model, list(samples_df["messages"]), list(samples_df["response"]), tokenizer=tokenizer,
                       max_length=max_length, batch_size=batch_size, bf16=bf16, progress=progress,
                       desc="scoring samples")


def _sample_key(messages, response: str) -> str:
    """Hash of what a score depends on besides the model: the prompt messages and the reply."""
    text = json.dumps(messages, ensure_ascii=False, sort_keys=True) + "\x00" + response
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def score_samples_cached(reward_model, tokenizer, samples_df: pd.DataFrame, cache_path, rm_name: str,
                         batch_size: int = 16, bf16: bool | str = "auto", max_length: int | None = None,
                         chunk_size: int = 512, progress: bool = True, only_cached: bool = False) -> np.ndarray | None:
    """``score_samples`` with a resumable JSONL cache shared by several reward models.

    A cached score is reused when (rm_name, prompt_id, sample_index) match AND the prompt messages,
    the response text and ``max_length`` are the ones it was computed for (a stale row is ignored,
    not trusted).
    Missing scores are computed ``chunk_size`` sequences at a time and appended after each chunk.
    ``only_cached``: return None instead of computing when any score is missing (no model needed).
    """
    if not rm_name:
        raise ValueError("rm_name must be a non-empty name of the reward model (it keys the cache)")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size!r}")
    check_sample_columns(samples_df)
    cache_path = Path(cache_path)
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    cached = {}
    for r in read_jsonl(cache_path, repair=True):
        if r.get("rm") == rm_name and r.get("max_length") == max_length:
            cached[(r["prompt_id"], int(r["sample_index"]), r["sample_sha1"])] = float(r["score"])
    keys = [(str(p), int(s), _sample_key(m, t)) for p, s, m, t in
            zip(samples_df["prompt_id"], samples_df["sample_index"], samples_df["messages"], samples_df["response"])]
    todo = [k for k, key in enumerate(keys) if key not in cached]
    if todo and only_cached:
        return None
    if todo:
        logger.info("%s: scoring %d of %d samples with %s", cache_path, len(todo), len(keys), rm_name)
    bar = tqdm(total=len(todo), desc=f"scoring ({rm_name})", unit="sample", disable=not progress or not todo)
    for start in range(0, len(todo), chunk_size):
        part = todo[start : start + chunk_size]
        scores = score_samples(reward_model, tokenizer, samples_df.iloc[part], batch_size, bf16, max_length,
                               progress=False)
        rows = []
        for k, score in zip(part, scores):
            pid, s, sha = keys[k]
            cached[keys[k]] = float(score)
            rows.append({"rm": rm_name, "prompt_id": pid, "sample_index": s, "sample_sha1": sha,
                         "max_length": max_length, "score": float(score)})
        append_jsonl(cache_path, rows)
        bar.update(len(part))
    bar.close()
    return np.array([cached[key] for key in keys], dtype=np.float32)


def score_samples_multi(models: dict, tokenizer, samples_df: pd.DataFrame, cache_path=None, batch_size: int = 16,
                        bf16: bool | str = "auto", max_length: int | None = None, chunk_size: int = 512,
                        cache_keys: dict | None = None, progress: bool = True) -> pd.DataFrame:
    """Scores of every sample by every reward model: ``prompt_id``, ``sample_index`` and one float32
    column per model name, in row order.

    models: ``{name: RewardModel or saved folder}``, all using ``tokenizer``. A folder is loaded
    only if some of its scores are missing, and released after scoring, so models are never all in
    memory at once. Top-k reward models of one backbone share the bottom store: the first one
    computes the samples' frozen-bottom activations, the others run only their top layers.
    ``cache_path``: the resumable JSONL cache of ``score_samples_cached``, keyed per model by
    ``cache_keys[name]`` (default the name; use ``name@model_digest(folder)`` so a retrained model
    is not served stale scores).
    """

    if not models:
        raise ValueError("models is empty: pass {name: RewardModel or folder}")
    check_sample_columns(samples_df)
    out = pd.DataFrame({"prompt_id": samples_df["prompt_id"].astype(str).to_numpy(),
                        "sample_index": samples_df["sample_index"].astype(int).to_numpy()})
    for name, model in models.items():
        key = (cache_keys or {}).get(name, name)
        if cache_path is not None and isinstance(model, (str, os.PathLike)):
            done = score_samples_cached(None, tokenizer, samples_df, cache_path, key, batch_size, bf16, max_length,
                                        chunk_size, progress=False, only_cached=True)
            if done is not None:
                out[name] = done
                continue
        if isinstance(model, (str, os.PathLike)):
            model = load_reward_model(model)
            if torch.cuda.is_available():
                model.to("cuda")
        if cache_path is None:
            out[name] = score_samples(model, tokenizer, samples_df, batch_size, bf16, max_length, progress)
        else:
            out[name] = score_samples_cached(model, tokenizer, samples_df, cache_path, key, batch_size, bf16,
                                             max_length, chunk_size, progress)
        del model
    return out
