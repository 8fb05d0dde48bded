"""Sampling from a policy: per-row random streams, resumable sample files.

``sample_responses``: N samples per prompt (T=0.7, top_p=0.95 by default, as in the GRM paper),
appended to a JSONL file batch by batch; a rerun skips what is there. ``sample_completions``:
one completion per row of token ids (the RLOO tracker's evaluation samples).

Determinism. Every sample (prompt_id, sample_index) draws from its own ``torch.Generator``
seeded by hash(seed, prompt_id, sample_index) (``RowSampler``): the sampled token of a row never
depends on which other rows share its batch, nor on the global RNG. Batches are fixed by
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
change the samples (seed, temperature, top_p, max_new_tokens, stop tokens) is refused.
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
import torch
from torch.nn.utils.rnn import pad_sequence
from tqdm import tqdm
from transformers import GenerationConfig, LogitsProcessorList

from rmlib.core.atomic_io import append_jsonl, read_json, read_jsonl, write_json_atomic
from rmlib.core.precision import autocast, resolve_bf16
from rmlib.model.encoding import format_prompt
from rmlib.model.layers import unwrap_causal_lm

logger = logging.getLogger(__name__)


SAMPLE_COLUMNS = ["prompt_id", "sample_index", "messages", "prompt", "response", "response_ids", "n_tokens",
                  "finished"]


# settings that change the samples: a resumed file must have been written with the same values
_META_STRICT = ("seed", "temperature", "top_p", "max_new_tokens", "stop_token_ids")


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


class RowSampler:
    """Logits processor that samples each row from its own generator (temperature, then top-p).

    It returns scores that are 0 at the sampled token and -inf elsewhere, so ``generate`` runs with
    ``do_sample=False`` and its argmax takes the sample: the random draws never depend on the
    global RNG or on the other rows of the batch (one uniform per row and step, inverse CDF).

    top-p keeps the smallest set of most likely tokens whose mass reaches ``top_p`` (>= 1 token).
    Sorting the whole vocabulary costs ~60 ms per step for 32 x 49k on 2 CPU cores, more than
    the 135M model's forward; so the ``candidates`` most likely tokens come from ``topk`` (~3 ms)
    and only a row whose top-p set is larger than that is fully sorted.
    """

    def __init__(self, generators: list[torch.Generator], temperature: float, top_p: float, candidates: int = 256):
        self.generators = generators
        self.temperature = temperature
        self.top_p = top_p
        self.candidates = candidates

    def _uniforms(self, device) -> torch.Tensor:
        return torch.cat([torch.rand(1, generator=g, device=g.device, dtype=torch.float64)
                          for g in self.generators]).to(device)  # (B,)

    @staticmethod
    def _inverse_cdf(cum: torch.Tensor, n_keep: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Position in each row of ``cum`` (cumulative probs, (B, K)) drawn from its first n_keep."""
        rows = torch.arange(cum.shape[0], device=cum.device)
        target = u * cum[rows, n_keep - 1]  # (B,)
        pos = torch.searchsorted(cum, target[:, None], right=True).squeeze(-1)
        return torch.minimum(pos, n_keep - 1)

    def _pick_top_p(self, cum: torch.Tensor, order: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        """Token ids drawn from the top-p prefix; cum/order: descending probs' cumsum and token ids, (B, K)."""
        n_keep = torch.clamp((cum < self.top_p).sum(-1) + 1, max=cum.shape[1])  # (B,) prefix length
        pos = self._inverse_cdf(cum, n_keep, u)
        return order.gather(-1, pos[:, None]).squeeze(-1)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        probs = torch.softmax(scores.float() / self.temperature, dim=-1)  # (B, V)
        u = self._uniforms(probs.device)  # (B,)
        batch, vocab = probs.shape
        if self.top_p >= 1.0:  # no truncation: any token order will do
            full_len = torch.full((batch,), vocab, device=probs.device)
            picks = self._inverse_cdf(probs.double().cumsum(-1), full_len, u)
        else:
            top, order = probs.topk(min(self.candidates, vocab), dim=-1, sorted=True)  # (B, K)
            cum = top.double().cumsum(-1)
            fast = cum[:, -1] >= self.top_p  # the top-p set lies within the K candidates
            picks = torch.empty(batch, dtype=torch.long, device=probs.device)
            if fast.any():
                picks[fast] = self._pick_top_p(cum[fast], order[fast], u[fast])
            if not fast.all():
                sorted_probs, full_order = probs[~fast].sort(dim=-1, descending=True, stable=True)
                picks[~fast] = self._pick_top_p(sorted_probs.double().cumsum(-1), full_order, u[~fast])
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(-1, picks[:, None], 0.0)


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

    Called with a batch of prompts (token ids, any lengths) and one seed per row, it left-pads the
    prompts (pad == eos for SmolLM2, hence the explicit attention mask and pad_token_id), generates
    with a ``RowSampler`` whose row i draws from a generator seeded by ``seeds[i]``, and returns each
    row's new token ids (up to ``max_new_tokens``; after a stop token the row is padded with
    ``pad_id``). Rows do not depend on their batch or on the global RNG.
    """

    def __init__(self, policy, tokenizer, max_new_tokens: int, temperature: float, top_p: float,
                 bf16: bool | str = "auto"):
        self.policy = policy
        self.stop_ids = stop_token_ids(policy, tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.stop_ids[0]
        self.device = next(policy.parameters()).device
        self.bf16 = resolve_bf16(bf16, self.device)
        self.temperature, self.top_p = float(temperature), float(top_p)
        self.gen_cfg = GenerationConfig(
            max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=self.stop_ids,
            pad_token_id=self.pad_id, repetition_penalty=1.0, no_repeat_ngram_size=0, use_cache=True,
        )  # sampling is done by RowSampler; everything else switched off so the policy's defaults can't leak in

    @contextlib.contextmanager
    def eval_mode(self):
        """The policy in eval mode (no dropout) for the duration; its training flag restored after."""
        was_training = self.policy.training
        self.policy.eval()
        try:
            yield self
        finally:
            self.policy.train(was_training)

    @torch.no_grad()
    def __call__(self, prompts: list[list[int]], seeds: list[int]) -> list[list[int]]:
        rows = [torch.as_tensor(list(p), dtype=torch.long) for p in prompts]
        input_ids = pad_sequence(rows, batch_first=True, padding_value=self.pad_id, padding_side="left")
        attention_mask = pad_sequence([torch.ones_like(r) for r in rows], batch_first=True, padding_value=0,
                                      padding_side="left")
        gens = [torch.Generator(device=self.device).manual_seed(int(s)) for s in seeds]
        sampler = RowSampler(gens, self.temperature, self.top_p)
        with autocast(self.device, self.bf16):
            out = self.policy.generate(
                input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
                generation_config=self.gen_cfg, logits_processor=LogitsProcessorList([sampler]),
            )
        return out[:, input_ids.shape[1]:].cpu().tolist()  # (B, <= max_new_tokens)


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
        if key in old and old[key] != meta[key]:
            raise ValueError(
                f"{meta_path.with_suffix('')} was sampled with {key}={old[key]!r}, not {meta[key]!r}; "
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
) -> pd.DataFrame:
    """N sampled replies per prompt, stored in ``out_path`` as they are made; see the module docstring.

    prompts: chat messages per prompt (formatted with ``format_prompt``); prompt_ids: unique names.
    Returns one row per (prompt, sample_index < n), in prompt order: ``SAMPLE_COLUMNS``.
    ``response`` is the decoded reply without the end-of-turn token; ``response_ids`` its ids
    (also without it), ``n_tokens = len(response_ids)``, ``finished``: a stop token was generated
    within ``max_new_tokens``. Batches: ``generation_batches`` (several prompts share a batch
    when n < batch_size).
    """

    ids = _check_sampling_args(prompts, prompt_ids, n, batch_size, max_new_tokens, temperature, top_p)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    sampler = _BatchSampler(policy, tokenizer, max_new_tokens, temperature, top_p, bf16)
    stop_ids = sampler.stop_ids
    meta = {"format": "rmlib-bon-samples-v1", "seed": int(seed), "temperature": float(temperature),
            "top_p": float(top_p), "max_new_tokens": int(max_new_tokens), "stop_token_ids": stop_ids,
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

    if todo:
        prompt_tokens = {i: tokenizer(texts[i], add_special_tokens=False)["input_ids"] for units in todo for i, _ in units}
        with sampler.eval_mode(), tqdm(total=missing, desc="sampling", unit="sample", disable=not progress) as bar:
            for units in todo:
                rows = [(i, s) for i, idx in units for s in idx]  # one generated row per (prompt, sample)
                new_tokens = sampler([prompt_tokens[i] for i, _ in rows],
                                     [sample_seed(seed, ids[i], s) for i, s in rows])
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
    return _frame(stored_prompts, [stored[(pid, s)] for pid in ids for s in range(n)])


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
