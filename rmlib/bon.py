"""Best-of-N over-optimization curves (GRM paper Fig 2, after Gao et al. 2022).

Three steps, each resumable where it is slow:

1. ``sample_responses``: N samples per prompt from a policy (T=0.7, top_p=0.95 by default, as in
   the GRM paper), appended to a JSONL file batch by batch; a rerun skips what is there.
2. ``score_samples`` / ``score_samples_cached``: proxy and gold rewards of every sample, with
   the prompt re-formatted by each reward model's own chat template (gold and proxy may differ).
   ``score_samples_multi``: many reward models (gold and proxies) one after the other; top-k
   models of one backbone share the bottom store, so the frozen bottom runs once in all.
3. ``bon_expectation`` / ``bon_curve``: the EXACT expected proxy and gold score of the proxy's
   pick when n of the N samples are drawn uniformly without replacement, from order statistics;
   plotted against KL_bon = log n - (n-1)/n and normalized to start at 0 (``proxy_norm``,
   ``gold_norm``). ``bon_summary`` says whether gold bends down while proxy keeps rising.

Sampling determinism. Every sample (prompt_id, sample_index) draws from its own
``torch.Generator`` seeded by hash(seed, prompt_id, sample_index): the sampled token of a row never
depends on which other rows share its batch. Batches are fixed by (number of prompts, n,
batch_size) alone (``generation_batches``): with n >= batch_size a batch is one "chunk" of ONE
prompt's samples, indices [c * batch_size, (c + 1) * batch_size) cut at n; with n < batch_size it
holds all n samples of batch_size // n consecutive prompts (left-padded), so small N still fills
the batch (batch 32 generates ~13x faster than batch 1 on 2 CPU cores). A resumed run recomputes
exactly the batches a fresh run would: with the same n and batch_size, resuming (after a kill, or
with more prompts appended) gives a file identical in content to a fresh run. Raising n later
keeps the old samples and adds new ones from their own streams (identical to a fresh run up to
floating-point effects of the batch shape).

File format (``out_path``, JSONL, append-only, flushed per batch):
  {"kind": "prompt", "prompt_id", "messages", "prompt"}            once per prompt
  {"kind": "sample", "prompt_id", "sample_index", "response", "response_ids", "n_tokens", "finished"}
and ``<out_path>.meta.json`` with the generation settings; a rerun with other settings that
change the samples (seed, temperature, top_p, max_new_tokens, stop tokens) is refused.
A partial last line (a run killed mid-write) is dropped with a warning and its batch redone.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import numbers
import os
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm

from rmlib.encoding import format_prompt, format_reply, truncate_pair
from rmlib.results import read_json, write_json_atomic
from rmlib.precision import resolve_bf16
from rmlib.scoring import autocast, score_replies

logger = logging.getLogger(__name__)

SAMPLE_COLUMNS = ["prompt_id", "sample_index", "messages", "prompt", "response", "response_ids", "n_tokens",
                  "finished"]
CURVE_COLUMNS = ["n", "kl_bon", "proxy", "gold", "proxy_norm", "gold_norm", "proxy_sem", "gold_sem", "n_prompts"]
# settings that change the samples: a resumed file must have been written with the same values
_META_STRICT = ("seed", "temperature", "top_p", "max_new_tokens", "stop_token_ids")
# settings that change only floating-point details: a mismatch is logged
_META_SOFT = ("batch_size", "bf16", "policy")


# -- JSONL files that survive a kill ------------------------------------------------------------
def _read_jsonl(path: Path, repair: bool = False) -> list[dict]:
    """Complete JSON lines of ``path`` ([] if missing). A partial last line (no newline: the
    writer was killed mid-write) is ignored with a warning, and cut off the file if ``repair``.
    A malformed complete line is an error (append-only writers never produce one)."""
    if not path.exists():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1  # bytes up to and including the last newline
    if end < len(data):
        logger.warning("%s: ignoring a partial last line (%d bytes; interrupted write), its batch is redone",
                       path, len(data) - end)
        if repair:
            os.truncate(path, end)
    rows = []
    for number, line in enumerate(data[:end].split(b"\n")[:-1], start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path}: line {number} is not valid JSON ({err}); the file is corrupt") from err
    return rows


def _append_jsonl(path: Path, rows: list[dict]) -> None:
    """Append rows in one write and flush, so a killed process loses at most this batch (no fsync:
    it guards only against a machine crash, and costs ~0.1 s per batch on a busy shared disk)."""
    if not rows:
        return
    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    with open(path, "a", encoding="utf-8") as f:
        f.write(text)
        f.flush()


# -- 1. sampling ----------------------------------------------------------------------------------
def _sample_seed(seed: int, prompt_id: str, sample_index: int) -> int:
    """The seed of one sample's generator: a stable hash of (seed, prompt_id, sample_index)."""
    digest = hashlib.sha256(f"{seed}\x00{prompt_id}\x00{sample_index}".encode()).digest()
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


def _stop_token_ids(policy, tokenizer) -> list[int]:
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen_eos = getattr(getattr(policy, "generation_config", None), "eos_token_id", None)
    if gen_eos is not None:
        ids.update(int(x) for x in (gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos]))
    if not ids:
        raise ValueError("neither the tokenizer nor the policy's generation_config has an EOS token")
    return sorted(ids)


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
    rows = _read_jsonl(Path(path))
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
    from transformers import GenerationConfig, LogitsProcessorList

    ids = _check_sampling_args(prompts, prompt_ids, n, batch_size, max_new_tokens, temperature, top_p)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    stop_ids = _stop_token_ids(policy, tokenizer)
    bf16 = resolve_bf16(bf16, next(policy.parameters()).device)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop_ids[0]
    meta = {"format": "rmlib-bon-samples-v1", "seed": int(seed), "temperature": float(temperature),
            "top_p": float(top_p), "max_new_tokens": int(max_new_tokens), "stop_token_ids": stop_ids,
            "batch_size": int(batch_size), "bf16": bool(bf16),
            "policy": str(getattr(getattr(policy, "config", None), "_name_or_path", ""))}
    meta_path = out_path.with_name(out_path.name + ".meta.json")
    _check_meta(meta_path, meta)

    rows = _read_jsonl(out_path, repair=True)
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
        # generation needs padding on the left (prompts of different lengths share a batch when
        # n < batch_size; pad == eos for SmolLM2, hence the explicit attention mask and pad_token_id)
        left_tok = copy.deepcopy(tokenizer)
        left_tok.padding_side = "left"
        if left_tok.pad_token_id is None:
            left_tok.pad_token_id = pad_id
        gen_cfg = GenerationConfig(
            max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=stop_ids,
            pad_token_id=pad_id, repetition_penalty=1.0, no_repeat_ngram_size=0,
            use_cache=True,
        )  # sampling is done by RowSampler; everything else switched off so the policy's defaults can't leak in
        device = next(policy.parameters()).device
        was_training = policy.training
        policy.eval()
        bar = tqdm(total=missing, desc="sampling", unit="sample", disable=not progress)
        try:
            for units in todo:
                rows = [(i, s) for i, idx in units for s in idx]  # one generated row per (prompt, sample)
                enc = left_tok([texts[i] for i, _ in rows], padding=True, add_special_tokens=False,
                               return_tensors="pt")
                gens = [torch.Generator(device=device).manual_seed(_sample_seed(seed, ids[i], s)) for i, s in rows]
                sampler = RowSampler(gens, float(temperature), float(top_p))
                with torch.no_grad(), autocast(device, bf16):
                    out = policy.generate(
                        input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device),
                        generation_config=gen_cfg, logits_processor=LogitsProcessorList([sampler]),
                    )
                new_tokens = out[:, enc["input_ids"].shape[1]:].cpu().tolist()  # (B, <= max_new_tokens)
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
                _append_jsonl(out_path, batch_rows)
                bar.update(n_new)
        finally:
            bar.close()
            policy.train(was_training)

    for pid, m, text in zip(ids, prompts, texts):  # prompts whose record was lost keep their current text
        stored_prompts.setdefault(pid, {"prompt_id": pid, "messages": m, "prompt": text})
    return _frame(stored_prompts, [stored[(pid, s)] for pid in ids for s in range(n)])


# -- 2. scoring -------------------------------------------------------------------------------------
def _check_sample_columns(samples_df: pd.DataFrame) -> None:
    for col in ("prompt_id", "sample_index", "messages", "response"):
        if col not in samples_df.columns:
            raise ValueError(f"samples_df needs a {col!r} column (as returned by sample_responses)")


def sample_prompt_replies(tokenizer, samples_df: pd.DataFrame,
                          max_length: int | None = None) -> tuple[list[list[int]], list[list[int]]]:
    """(prompt ids, reply ids) per sample, encoded as in training (``encode_pairs``): the prompt
    from ``format_prompt`` of the row's messages with THIS tokenizer, the reply from
    ``format_reply`` (ends with the end-of-turn, also for replies cut at max_new_tokens).
    ``max_length``: cut the prompt from the left as ``truncate_pair`` does (None: no cut)."""
    _check_sample_columns(samples_df)
    prompt_cache: dict[str, tuple[str, list[int]]] = {}
    prompts, replies = [], []
    for pid, messages, response in zip(samples_df["prompt_id"], samples_df["messages"], samples_df["response"]):
        if pid not in prompt_cache:
            text = format_prompt(tokenizer, messages)
            prompt_cache[pid] = (text, tokenizer(text, add_special_tokens=False)["input_ids"])
        text, p = prompt_cache[pid]
        r = tokenizer(format_reply(tokenizer, messages, response, text), add_special_tokens=False)["input_ids"]
        if max_length is not None:
            p, r, _, _, _ = truncate_pair(p, r, r, max_length)
        prompts.append(list(p))
        replies.append(list(r))
    return prompts, replies


def sample_sequences(tokenizer, samples_df: pd.DataFrame, max_length: int | None = None) -> list[list[int]]:
    """Token ids of prompt + reply per sample (see ``sample_prompt_replies``)."""
    return [p + r for p, r in zip(*sample_prompt_replies(tokenizer, samples_df, max_length))]


def score_samples(reward_model, tokenizer, samples_df: pd.DataFrame, batch_size: int = 16, bf16: bool | str = "auto",
                  max_length: int | None = None, progress: bool = True) -> np.ndarray:
    """Reward of every sample row, in row order: (len(samples_df),) float32. A frozen-bottom (top-k)
    reward model scores through the shared bottom store (``rmlib.fastpath``): the samples' bottom
    activations are computed once for every reward model of the same backbone."""
    prompts, replies = sample_prompt_replies(tokenizer, samples_df, max_length)
    return score_replies(reward_model, prompts, replies, batch_size=batch_size, bf16=bf16, progress=progress,
                         desc="scoring samples")[0]


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
    _check_sample_columns(samples_df)
    cache_path = Path(cache_path)
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    cached = {}
    for r in _read_jsonl(cache_path, repair=True):
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
        _append_jsonl(cache_path, rows)
        bar.update(len(part))
    bar.close()
    return np.array([cached[key] for key in keys], dtype=np.float32)


# -- 2b. many reward models -----------------------------------------------------------------------
def model_digest(path) -> str:
    """Identity of a reward model saved by ``save_reward_model``: a hash of its ``rmlib_reward.json``
    (training config and metrics) and its files' names, sizes and modification times (a retrained or
    re-exported model gets a new digest; nothing reads the weights, so it is instant)."""
    path = Path(path)
    meta = path / "rmlib_reward.json"
    if not meta.exists():
        raise FileNotFoundError(f"{path} is not an rmlib reward model: rmlib_reward.json is missing")
    h = hashlib.sha1(meta.read_bytes())
    for f in sorted(path.iterdir()):
        if f.is_file():
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:12]


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
    from rmlib.models import load_reward_model

    if not models:
        raise ValueError("models is empty: pass {name: RewardModel or folder}")
    _check_sample_columns(samples_df)
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


# -- 3. the exact Best-of-n estimator ------------------------------------------------------------
def kl_bon(n):
    """KL(best-of-n || policy) = log n - (n - 1) / n (analytic, Stiennon et al. 2020). n >= 1."""
    arr = np.asarray(n, dtype=np.float64)
    if np.any(~np.isfinite(arr)) or np.any(arr < 1):
        raise ValueError(f"n must be >= 1, got {n!r}")
    out = np.log(arr) - (arr - 1.0) / arr
    return float(out) if out.ndim == 0 else out


@lru_cache(maxsize=64)
def _log_factorials(N: int) -> np.ndarray:
    return np.array([math.lgamma(k + 1.0) for k in range(N + 1)])


@lru_cache(maxsize=256)
def _rank_weights(N: int, n: int) -> np.ndarray:
    """P(the i-th smallest of N is the max of a uniform n-subset) = C(i-1, n-1) / C(N, n), i = 1..N. (N,)

    Computed in log space (lgamma) so N in the thousands neither overflows nor underflows."""
    lf = _log_factorials(N)
    i = np.arange(n, N + 1)  # ranks that can be a maximum
    log_w = (lf[i - 1] - lf[n - 1] - lf[i - n]) - (lf[N] - lf[n] - lf[N - n])
    w = np.zeros(N)
    w[n - 1 :] = np.exp(log_w)
    w /= w.sum()  # sums to 1 exactly in exact arithmetic (hockey-stick identity); removes rounding drift
    w.setflags(write=False)
    return w


def _sorted_with_tie_means(proxy: np.ndarray, gold: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sort by proxy ascending; each gold replaced by the mean gold of its proxy-tie group."""
    order = np.argsort(proxy, kind="stable")
    p, g = proxy[order], gold[order]
    _, group = np.unique(p, return_inverse=True)
    g = (np.bincount(group, weights=g) / np.bincount(group))[group]
    return p, g


def _as_scores(proxy, gold) -> tuple[np.ndarray, np.ndarray]:
    proxy = np.asarray(proxy, dtype=np.float64).ravel()
    gold = np.asarray(gold, dtype=np.float64).ravel()
    if proxy.shape != gold.shape:
        raise ValueError(f"proxy and gold differ in length ({proxy.size} vs {gold.size})")
    if proxy.size == 0:
        raise ValueError("proxy and gold are empty")
    if not (np.all(np.isfinite(proxy)) and np.all(np.isfinite(gold))):
        raise ValueError("proxy and gold scores must be finite (no NaN/inf)")
    return proxy, gold


def bon_expectation(proxy, gold, n: int) -> tuple[float, float]:
    """Exact (E[proxy of the pick], E[gold of the pick]) for best-of-n by proxy, n of N drawn
    uniformly WITHOUT replacement from one prompt's N samples.

    Sorted by proxy ascending, the i-th smallest (1-based) is the subset's max with probability
    C(i-1, n-1) / C(N, n). Ties in proxy: the pick is uniform among the subset's tied maxima; by
    symmetry that equals giving every member of a tie group the group's mean gold (what is done).
    n = 1: the plain means; n = N: the proxy argmax (tie group mean of gold).
    """
    proxy, gold = _as_scores(proxy, gold)
    N = proxy.size
    if not isinstance(n, (int, np.integer)) or not 1 <= n <= N:
        raise ValueError(f"n must be an integer in [1, N={N}], got {n!r}")
    p, g = _sorted_with_tie_means(proxy, gold)
    w = _rank_weights(N, int(n))
    return float(w @ p), float(w @ g)


def default_ns(N: int, num: int = 20) -> list[int]:
    """About ``num`` roughly log-spaced integers from 1 to N (both included), increasing.
    Log spacing in n is close to even spacing in KL_bon ~ log n - 1."""
    if not isinstance(N, (int, np.integer)) or N < 1:
        raise ValueError(f"N must be an integer >= 1, got {N!r}")
    if num < 2:
        raise ValueError(f"num must be >= 2, got {num!r}")
    grid = np.unique(np.round(np.geomspace(1, N, num)).astype(int))
    return sorted({1, int(N), *map(int, grid)})


PER_PROMPT_COLUMNS = ["prompt_id", "n", "proxy", "gold", "proxy_base", "gold_base"]


def bon_per_prompt(df: pd.DataFrame, ns=None, prompt_col: str = "prompt_id", proxy_col: str = "proxy",
                   gold_col: str = "gold") -> pd.DataFrame:
    """Exact per-prompt Best-of-n expectations: one row per (prompt, n), ``PER_PROMPT_COLUMNS``.

    proxy / gold: E[score of the proxy's pick] among n of the prompt's N samples (``bon_expectation``);
    proxy_base / gold_base: the prompt's n = 1 values (its mean scores). Prompts sorted by id; every
    n must be <= the smallest N. ns: default ``default_ns(smallest N)``.
    """
    for col in (prompt_col, proxy_col, gold_col):
        if col not in df.columns:
            raise ValueError(f"df needs a {col!r} column")
    groups = [(pid, *_as_scores(g[proxy_col], g[gold_col])) for pid, g in df.groupby(prompt_col, sort=True)]
    if not groups:
        raise ValueError("df has no rows")
    sizes = {pid: p.size for pid, p, _ in groups}
    n_min = min(sizes.values())
    ns = default_ns(n_min) if ns is None else [int(x) for x in ns]
    if not ns or min(ns) < 1:
        raise ValueError(f"ns must be non-empty integers >= 1, got {ns!r}")
    if max(ns) > n_min:
        short = [pid for pid, size in sizes.items() if size < max(ns)]
        raise ValueError(f"ns goes up to {max(ns)} but {len(short)} prompt(s) have fewer samples "
                         f"(smallest N = {n_min}; e.g. {short[:5]})")
    parts = []
    for pid, proxy, gold in groups:
        p, g = _sorted_with_tie_means(proxy, gold)
        weights = np.stack([_rank_weights(p.size, n) for n in ns])  # (ns, N)
        parts.append(pd.DataFrame({"prompt_id": pid, "n": ns, "proxy": weights @ p, "gold": weights @ g,
                                   "proxy_base": proxy.mean(), "gold_base": gold.mean()}))
    return pd.concat(parts, ignore_index=True)[PER_PROMPT_COLUMNS]


def bon_curve(df: pd.DataFrame, ns=None, prompt_col: str = "prompt_id", proxy_col: str = "proxy",
              gold_col: str = "gold") -> pd.DataFrame:
    """Best-of-n curve over prompts: one row per n (``CURVE_COLUMNS``).

    proxy / gold: mean over prompts of the exact per-prompt expectations (``bon_per_prompt``);
    *_sem: their standard error across prompts (NaN with one prompt); kl_bon = log n - (n-1)/n;
    proxy_norm / gold_norm: minus the value at n = 1 (computed even when 1 is not in ``ns``), so
    curves start at 0 as in the GRM paper. Prompts may have different N; every n must be <= the
    smallest N. ns: default ``default_ns(smallest N)``.
    """
    per = bon_per_prompt(df, ns, prompt_col, proxy_col, gold_col)
    ns = per["n"].tolist()[: len(per) // per["prompt_id"].nunique()]  # the grid, as given (per prompt)
    exp_p = per["proxy"].to_numpy().reshape(-1, len(ns))  # (prompts, ns)
    exp_g = per["gold"].to_numpy().reshape(-1, len(ns))
    base_p = per["proxy_base"].to_numpy()[:: len(ns)]  # (prompts,)
    base_g = per["gold_base"].to_numpy()[:: len(ns)]
    P = exp_p.shape[0]

    def sem(x):
        return x.std(axis=0, ddof=1) / math.sqrt(P) if P > 1 else np.full(x.shape[1], np.nan)

    proxy_mean, gold_mean = exp_p.mean(axis=0), exp_g.mean(axis=0)
    return pd.DataFrame({
        "n": ns, "kl_bon": kl_bon(np.asarray(ns)), "proxy": proxy_mean, "gold": gold_mean,
        "proxy_norm": proxy_mean - base_p.mean(), "gold_norm": gold_mean - base_g.mean(),
        "proxy_sem": sem(exp_p), "gold_sem": sem(exp_g), "n_prompts": P,
    }, columns=CURVE_COLUMNS)


def bon_summary(curve: pd.DataFrame, tol: float | None = None) -> dict:
    """What a curve shows: final gold/proxy (at the largest n), where gold peaks, and whether it bends down.

    ``gold_bends_down``: the gold peak comes before the largest n AND the drop from the peak to
    the end exceeds ``tol`` (default: 5% of the curve's gold range, so flat noise does not count).
    """
    if curve.empty:
        raise ValueError("curve is empty")
    c = curve.sort_values("n").reset_index(drop=True)
    last = c.iloc[-1]
    peak = c.iloc[int(np.argmax(c["gold"].to_numpy()))]  # first maximum
    drop = float(peak["gold"] - last["gold"])
    if tol is None:
        tol = 0.05 * float(c["gold"].max() - c["gold"].min())
    return {
        "n_final": int(last["n"]), "kl_final": float(last["kl_bon"]),
        "gold_final": float(last["gold"]), "gold_norm_final": float(last["gold_norm"]),
        "proxy_final": float(last["proxy"]), "proxy_norm_final": float(last["proxy_norm"]),
        "n_gold_peak": int(peak["n"]), "kl_gold_peak": float(peak["kl_bon"]),
        "gold_peak": float(peak["gold"]), "gold_drop_from_peak": drop, "tol": float(tol),
        "gold_bends_down": bool(int(peak["n"]) < int(last["n"]) and drop > tol),
    }
