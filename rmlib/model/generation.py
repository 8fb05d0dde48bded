"""Sampling from a policy: per-row random streams, resumable sample files.

``sample_responses``: N samples per prompt (T=0.7, top_p=0.95 by default, as in the GRM paper),
appended to a JSONL file batch by batch; a rerun skips what is there. ``sample_completions``:
one completion per row of token ids (the RLOO tracker's evaluation samples).

Determinism. Every sample (prompt_id, sample_index) draws from its own ``torch.Generator``
seeded by hash(seed, prompt_id, sample_index); the engine is ``rmlib.model.decoding.DecodeLoop`` (our
own decode loop: shared prefill, preallocated KV cache, exact top-p, finished rows dropped). The
sampled token of a row never depends on which other rows share its batch, nor on the global RNG. Batches are fixed by
(number of prompts, n, batch_size) alone (``generation_batches``): with n >= batch_size a batch is
one "chunk" of ONE prompt's samples, indices [c * batch_size, (c + 1) * batch_size) cut at n; with
n < batch_size it holds all n samples of batch_size // n consecutive prompts (left-padded), so
small N still fills the batch. A resumed run recomputes exactly the batches a fresh run would:
with the same n and batch_size, resuming (after a kill, or with more prompts appended) gives a
file identical in content to a fresh run. Raising n later keeps the old samples and adds new
ones from their own streams (identical to a fresh run up to floating-point effects of the batch
shape).

File format (``out_path``, JSONL, append-only, flushed per batch):
  {"kind": "prompt", "prompt_id", "messages", "prompt"}            once per prompt
  {"kind": "sample", "prompt_id", "sample_index", "response", "response_ids", "n_tokens", "finished"}
and ``<out_path>.meta.json`` with the generation settings; a rerun with other settings that
change the samples (seed, temperature, top_p, max_new_tokens, stop tokens, the sampling engine
``sampler``: a file without it was written by HF ``generate``) is refused.
A partial last line (a run killed mid-write) is dropped with a warning and its batch redone.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import numbers
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm import tqdm

from rmlib.core.atomic_io import append_jsonl, read_json, read_jsonl, write_json_atomic
from rmlib.core.precision import resolve_bf16
from rmlib.model.bottom_capture import StoreCapture, rm_encoder
from rmlib.model.decoding import LEGACY_SAMPLER, SAMPLER, DecodeLoop, RowSampler  # noqa: F401  (RowSampler: re-export)
from rmlib.model.encoding import format_prompt
from rmlib.model.layers import unwrap_causal_lm

logger = logging.getLogger(__name__)


SAMPLE_COLUMNS = ["prompt_id", "sample_index", "messages", "prompt", "response", "response_ids", "n_tokens",
                  "finished"]


# settings that change the samples: a resumed file must have been written with the same values
_META_STRICT = ("seed", "temperature", "top_p", "max_new_tokens", "stop_token_ids", "sampler")

# the value of a strict key in a file written before the key was recorded
_META_BEFORE = {"sampler": LEGACY_SAMPLER}


# settings that change only floating-point details: a mismatch is logged
_META_SOFT = ("batch_size", "bf16", "policy")


# -- 1. sampling ----------------------------------------------------------------------------------
def sample_seed(seed: int, prompt_id: str, sample_index: int, stream: str = "") -> int:
    """The seed of one sample's generator: a stable hash of (stream, seed, prompt_id, sample_index).

    ``stream`` separates independent uses of the same (seed, prompt, index): Best-of-N samples use
    ``""``, the RLOO tracker's evaluation samples ``"rloo-eval"``."""
    prefix = f"{stream}\x00" if stream else ""
    digest = hashlib.sha256(f"{prefix}{seed}\x00{prompt_id}\x00{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def stop_token_ids(model, tokenizer) -> list[int]:
    """Token ids that end a reply: the tokenizer's EOS and the generation config's EOS ids of the
    causal LM inside ``model`` (peft / torch.compile / DDP wrappers are unwrapped). Sorted."""
    ids = {int(tokenizer.eos_token_id)} if tokenizer.eos_token_id is not None else set()
    eos = getattr(getattr(unwrap_causal_lm(model), "generation_config", None), "eos_token_id", None)
    if eos is not None:
        ids.update(int(x) for x in (eos if isinstance(eos, (list, tuple)) else [eos]))
    if not ids:
        raise ValueError("neither the tokenizer nor the policy's generation_config has an EOS token")
    return sorted(ids)


class _BatchSampler:
    """The batched sampling core of ``sample_responses`` and ``sample_completions``.

    Called with a batch of prompts (token ids, any lengths) and one seed per row, it samples with
    ``rmlib.model.decoding.DecodeLoop`` (row i draws from a generator seeded by ``seeds[i]``) and
    returns each row's new token ids, up to and including its first stop token (or
    ``max_new_tokens`` ids). Rows do not depend on their batch or on the global RNG. pad == eos for
    SmolLM2: the padding is marked by the attention mask.
    """

    def __init__(self, policy, tokenizer, max_new_tokens: int, temperature: float, top_p: float,
                 bf16: bool | str = "auto"):
        self.policy = policy
        self.stop_ids = stop_token_ids(policy, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]
        self.device = next(policy.parameters()).device
        self.bf16 = resolve_bf16(bf16, self.device)
        self.temperature, self.top_p = float(temperature), float(top_p)
        self.loop = DecodeLoop(policy, self.stop_ids, self.pad_id, max_new_tokens, self.temperature, self.top_p,
                               self.bf16)

    @contextlib.contextmanager
    def eval_mode(self):
        """The policy in eval mode (no dropout) for the duration; its training flag restored after."""
        was_training = self.policy.training
        self.policy.eval()
        try:
            yield self
        finally:
            self.policy.train(was_training)

    def __call__(self, prompts: list[list[int]], seeds: list[int], capture=None) -> list[list[int]]:
        return self.loop(prompts, seeds) if capture is None else self.loop(prompts, seeds, capture=capture)


def split_response(ids: list[int], stop_token_ids) -> tuple[list[int], bool]:
    """Generated ids -> (reply ids before the first stop token, whether a stop token was hit)."""
    stops = set(stop_token_ids)
    for k, t in enumerate(ids):
        if t in stops:
            return ids[:k], True
    return list(ids), False


def generation_batches(n_prompts: int, n: int, batch_size: int) -> list[list[tuple[int, list[int]]]]:
    """The generation batches, each a list of (prompt index, sample indices) units.

    n >= batch_size: chunks [c * batch_size, (c + 1) * batch_size) of one prompt's n samples.
    n < batch_size: all n samples of m = batch_size // n consecutive prompts, [k * m, (k + 1) * m).
    Depends only on its arguments, so a resumed run redoes exactly the batches of a fresh run.
    """
    if n >= batch_size:
        return [[(i, list(range(start, min(start + batch_size, n))))] for i in range(n_prompts)
                for start in range(0, n, batch_size)]
    per_batch = batch_size // n
    return [[(i, list(range(n))) for i in range(k, min(k + per_batch, n_prompts))]
            for k in range(0, n_prompts, per_batch)]


def _check_sampling_args(prompts, prompt_ids, n, batch_size, max_new_tokens, temperature, top_p) -> list[str]:
    if not isinstance(n, (int, np.integer)) or n < 1:
        raise ValueError(f"n must be an integer >= 1, got {n!r}")
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be an integer >= 1, got {batch_size!r}")
    if not isinstance(max_new_tokens, (int, np.integer)) or max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
    if not (isinstance(temperature, numbers.Real) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if not (isinstance(top_p, numbers.Real) and 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1], got {top_p!r}")
    if len(prompts) != len(prompt_ids):
        raise ValueError(f"prompts and prompt_ids differ in length ({len(prompts)} vs {len(prompt_ids)})")
    ids = [str(p) for p in prompt_ids]
    if len(set(ids)) != len(ids):
        dup = sorted({p for p in ids if ids.count(p) > 1})
        raise ValueError(f"prompt_ids must be unique; repeated: {dup[:5]}")
    return ids


def _check_meta(meta_path: Path, meta: dict) -> None:
    if not meta_path.exists():
        return
    old = read_json(meta_path)
    for key in _META_STRICT:
        if key not in old and key not in _META_BEFORE:
            continue
        if old.get(key, _META_BEFORE.get(key)) != meta[key]:
            raise ValueError(
                f"{meta_path.with_suffix('')} was sampled with {key}={old.get(key, _META_BEFORE.get(key))!r}, not "
                f"{meta[key]!r}; "
                "use another out_path (mixing settings in one file would mix distributions)"
            )
    for key in _META_SOFT:
        if key in old and old[key] != meta[key]:
            logger.warning("%s: resuming with %s=%r (file started with %r); new samples may differ from a "
                           "fresh run in floating-point details", meta_path, key, meta[key], old[key])


def _frame(prompt_rows: dict[str, dict], sample_rows: list[dict]) -> pd.DataFrame:
    records = []
    for r in sample_rows:
        p = prompt_rows.get(r["prompt_id"], {})
        records.append({"prompt_id": r["prompt_id"], "sample_index": int(r["sample_index"]),
                        "messages": p.get("messages"), "prompt": p.get("prompt"), "response": r["response"],
                        "response_ids": r["response_ids"], "n_tokens": int(r["n_tokens"]),
                        "finished": bool(r["finished"])})
    return pd.DataFrame.from_records(records, columns=SAMPLE_COLUMNS)


def read_samples(path) -> pd.DataFrame:
    """Every complete sample row of a file written by ``sample_responses`` (no policy needed)."""
    rows = read_jsonl(Path(path))
    prompts = {r["prompt_id"]: r for r in rows if r.get("kind") == "prompt"}
    samples = {(r["prompt_id"], r["sample_index"]): r for r in rows if r.get("kind") == "sample"}
    return _frame(prompts, [samples[k] for k in sorted(samples)])


def sample_responses(
    policy,
    tokenizer,
    prompts: list[list[dict]],
    prompt_ids: list[str],
    n: int,
    out_path,
    batch_size: int = 32,
    max_new_tokens: int = 128,
    temperature: float = 0.7,
    top_p: float = 0.95,
    seed: int = 0,
    bf16: bool | str = "auto",
    progress: bool = True,
    capture_store=None,
    capture_tokenizer=None,
    capture_max_length: int | None = None,
) -> pd.DataFrame:
    """N sampled replies per prompt, stored in ``out_path`` as they are made; see the module docstring.

    prompts: chat messages per prompt (formatted with ``format_prompt``); prompt_ids: unique names.
    Returns one row per (prompt, sample_index < n), in prompt order: ``SAMPLE_COLUMNS``.
    ``response`` is the decoded reply without the end-of-turn token; ``response_ids`` its ids
    (also without it), ``n_tokens = len(response_ids)``, ``finished``: a stop token was generated
    within ``max_new_tokens``. Batches: ``generation_batches`` (several prompts share a batch
    when n < batch_size).

    ``capture_store``: a ``BottomStore`` of the reward models that will score the samples, whose frozen
    bottom is the policy's: each sampled batch's entries (the samples as ``capture_tokenizer``, default
    ``tokenizer``, encodes them for scoring with ``capture_max_length``) are recorded while sampling and
    written before the batch's samples (``rmlib.model.bottom_capture``; ValueError if the policy's bottom
    is not the store's). Samples are the same with and without it. ``df.attrs["capture"]``: counts of rows captured,
    found stored already and left to the plain build (by reason), and a one-line report.
    """

    ids = _check_sampling_args(prompts, prompt_ids, n, batch_size, max_new_tokens, temperature, top_p)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    sampler = _BatchSampler(policy, tokenizer, max_new_tokens, temperature, top_p, bf16)
    stop_ids = sampler.stop_ids
    meta = {"format": "rmlib-bon-samples-v1", "seed": int(seed), "temperature": float(temperature),
            "top_p": float(top_p), "max_new_tokens": int(max_new_tokens), "stop_token_ids": stop_ids, "sampler": SAMPLER,
            "batch_size": int(batch_size), "bf16": bool(sampler.bf16),
            "policy": str(getattr(getattr(policy, "config", None), "_name_or_path", ""))}
    meta_path = out_path.with_name(out_path.name + ".meta.json")
    _check_meta(meta_path, meta)

    rows = read_jsonl(out_path, repair=True)
    stored_prompts = {r["prompt_id"]: r for r in rows if r.get("kind") == "prompt"}
    stored = {(r["prompt_id"], int(r["sample_index"])): r for r in rows if r.get("kind") == "sample"}
    texts = [format_prompt(tokenizer, m) for m in prompts]
    for pid, text in zip(ids, texts):
        if pid in stored_prompts and stored_prompts[pid]["prompt"] != text:
            raise ValueError(f"prompt_id {pid!r} is in {out_path} with a different prompt text")
    if not meta_path.exists():
        write_json_atomic(meta_path, meta)

    # the work: batches with at least one missing sample; whole batches are redone
    todo = [units for units in generation_batches(len(ids), n, batch_size)
            if any((ids[i], s) not in stored for i, idx in units for s in idx)]
    missing = sum(1 for units in todo for i, idx in units for s in idx if (ids[i], s) not in stored)
    if missing < n * len(ids):
        logger.info("%s: %d of %d samples already there", out_path, n * len(ids) - missing, n * len(ids))

    capture = None
    if capture_store is not None and todo:
        capture = StoreCapture(capture_store, policy, sampler.bf16)
    if todo:
        prompt_tokens = {i: tokenizer(texts[i], add_special_tokens=False)["input_ids"] for units in todo for i, _ in units}
        with sampler.eval_mode(), tqdm(total=missing, desc="sampling", unit="sample", disable=not progress) as bar:
            for units in todo:
                rows = [(i, s) for i, idx in units for s in idx]  # one generated row per (prompt, sample)
                if capture is not None:
                    decode = lambda reply: tokenizer.decode(reply, skip_special_tokens=False)  # noqa: E731  (as below)
                    capture.begin([prompt_tokens[i] for i, _ in rows],
                                  rm_encoder(capture_tokenizer or tokenizer, decode, lambda r: prompts[rows[r][0]],
                                             stop_ids, capture_max_length))
                new_tokens = sampler([prompt_tokens[i] for i, _ in rows],
                                     [sample_seed(seed, ids[i], s) for i, s in rows], capture)
                if capture is not None:
                    capture.flush()  # before the samples: a sample in the file has its entry (or falls back)
                batch_rows, n_new = [], 0
                for (i, s), gen in zip(rows, new_tokens):
                    pid = ids[i]
                    if pid not in stored_prompts:
                        stored_prompts[pid] = {"kind": "prompt", "prompt_id": pid, "messages": prompts[i],
                                               "prompt": texts[i]}
                        batch_rows.append(stored_prompts[pid])
                    if (pid, s) in stored:  # redone only because its batch was incomplete
                        continue
                    reply, finished = split_response(gen, stop_ids)
                    row = {"kind": "sample", "prompt_id": pid, "sample_index": s,
                           "response": tokenizer.decode(reply, skip_special_tokens=False),
                           "response_ids": reply, "n_tokens": len(reply), "finished": finished}
                    stored[(pid, s)] = row
                    batch_rows.append(row)
                    n_new += 1
                append_jsonl(out_path, batch_rows)
                bar.update(n_new)

    for pid, m, text in zip(ids, prompts, texts):  # prompts whose record was lost keep their current text
        stored_prompts.setdefault(pid, {"prompt_id": pid, "messages": m, "prompt": text})
    frame = _frame(stored_prompts, [stored[(pid, s)] for pid in ids for s in range(n)])
    if capture is not None:
        frame.attrs["capture"] = {"captured": capture.captured, "present": capture.present,
                                  "fallback": dict(capture.fallback), "report": capture.report()}
        (logger.warning if capture.fallback else logger.info)("%s: %s", out_path, capture.report())
    return frame


# -- evaluation-time sampling ---------------------------------------------------------------------------
def sample_completions(policy, tokenizer, prompt_ids: list[list[int]], seeds: list[int], max_new_tokens: int,
                       temperature: float = 1.0, top_p: float = 1.0, batch_size: int = 16, bf16: bool | str = "auto",
                       progress: bool = False) -> list[tuple[list[int], bool]]:
    """One sampled completion per row: (ids up to and including the stop token if one was
    generated, finished). Row i draws from its own generator seeded by ``seeds[i]``
    (``rmlib.model.generation.RowSampler``), so rows do not depend on their batch or on the global RNG."""

    sampler = _BatchSampler(policy, tokenizer, max_new_tokens, temperature, top_p, bf16)
    order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))  # similar lengths share a batch
    out: list[tuple[list[int], bool] | None] = [None] * len(prompt_ids)
    with sampler.eval_mode():
        for start in tqdm(range(0, len(order), batch_size), desc="eval sampling", disable=not progress,
                          unit="batch"):
            idx = order[start : start + batch_size]
            new_tokens = sampler([prompt_ids[i] for i in idx], [seeds[i] for i in idx])
            for i, new in zip(idx, new_tokens):
                reply, finished = split_response(new, sampler.stop_ids)
                out[i] = (reply + [new[len(reply)]] if finished else reply, finished)
    return out  # type: ignore[return-value]
