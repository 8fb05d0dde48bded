"""One benchmark measurement per process: ``python -m bench.measure SPEC.json RESULT.json``.

``bench.run`` starts each in a fresh process (its own peak RSS, its own fresh cache folder in
``RMLIB_CACHE_DIR``, so the bottom store is built from scratch) and reads RESULT.json. SPEC holds
``name`` (a key of ``MEASURE``), ``backbone`` (the resolved model folder), ``sizes``,
``threads`` and ``device`` (``cpu``, the default, or ``cuda``: ``bench.run --device cuda``, issue 20).
Every timing here is wall-clock ``time.perf_counter`` around the work alone (on CUDA after a
``torch.cuda.synchronize``).
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np
import torch

from bench.report import matmul_flops, param_counts, token_counts


def log(msg: str) -> None:
    print(f"    [{time.strftime('%H:%M:%S')}] {msg}", flush=True)


# -- shared pieces -----------------------------------------------------------------------------------
def load_split(sizes: dict):
    """HH-RLHF harmless pairs: (train, held-out), seeded and disjoint (``rmlib.data.train_eval_split``)."""
    from rmlib.data import load_hh_rlhf, train_eval_split

    return train_eval_split(load_hh_rlhf().dataset, sizes["n_train"], sizes["n_eval"], seed=sizes["seed"])


def kept_subset(pairs, tokenizer, max_length: int):
    """The pairs TRL's RewardTrainer keeps (both sequences <= max_length tokens)."""
    from bench.trl_format import trl_kept_mask

    mask = trl_kept_mask(pairs, tokenizer, max_length)
    return pairs.select([i for i, k in enumerate(mask) if k])


def encoded_eval(held, tokenizer, max_length: int):
    """Held-out pairs encoded by rmlib (prompt cut from the left) + a TRL-kept flag per row."""
    from bench.trl_format import trl_kept_mask
    from rmlib.model.encoding import encode_pairs

    enc, _ = encode_pairs(held, tokenizer, max_length)
    kept_ids = {i for i, k in zip(held["id"], trl_kept_mask(held, tokenizer, max_length)) if k}
    return enc, np.array([i in kept_ids for i in enc["id"]], bool)


def accuracy(chosen: np.ndarray, rejected: np.ndarray, kept: np.ndarray, seconds: float) -> dict:
    wins = np.asarray(chosen) > np.asarray(rejected)
    return {"accuracy_all": float(wins.mean()), "accuracy_kept": float(wins[kept].mean()) if kept.any() else None,
            "n_all": int(wins.size), "n_kept": int(kept.sum()), "seconds": seconds}


def autocast(device: str = "cpu"):
    """bf16 autocast if the run computes in bf16 (the parent sets RMLIB_BF16 from --precision), else fp32."""
    from rmlib.core.precision import autocast as rm_autocast

    return rm_autocast(device, "auto")


def device_of(spec: dict) -> str:
    """Where the measurement runs: ``cpu`` (default) or ``cuda`` (``bench.run --device``)."""
    return spec.get("device", "cpu")


def sync(device) -> None:
    """Wait for queued CUDA work, so that a wall-clock timer stops after it (no-op on CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def rmlib_train_config(spec: dict, output_dir: str, mode: str):
    from rmlib.reward.config import RMConfig

    z = spec["sizes"]
    return RMConfig(output_dir=output_dir, backbone=spec["backbone"], mode=mode, top_k_layers=z["top_k_layers"],
                    learning_rate=z["learning_rate"], per_device_train_batch_size=z["batch_pairs"],
                    max_length=z["max_length"], bf16=spec["bf16"], use_cpu=device_of(spec) == "cpu", seed=z["seed"],
                    save_strategy="no", disable_tqdm=True)


# -- measurements ------------------------------------------------------------------------------------
def measure_peak(spec: dict) -> dict:
    """Median seconds of an (n x n) @ (n x n) matmul in bf16 and fp32; the peak is the best size."""
    from rmlib.core.precision import bf16_is_fast

    z = spec["sizes"]
    dev = device_of(spec)
    out: dict = {"sizes": z["matmul_sizes"], "repeats": z["matmul_repeats"], "bf16_gflops": {}, "fp32_gflops": {},
                 "bf16_native": bf16_is_fast(dev), "device": dev}
    for dtype, key in ((torch.bfloat16, "bf16_gflops"), (torch.float32, "fp32_gflops")):
        # emulated bf16 (no AVX-512) runs ~1 GFLOP/s: one small matmul shows it without taking minutes
        sizes = z["matmul_sizes"] if dtype == torch.float32 or out["bf16_native"] else [512]
        for n in sizes:
            g = torch.Generator().manual_seed(0)
            a = torch.randn(n, n, generator=g).to(dev, dtype)
            b = torch.randn(n, n, generator=g).to(dev, dtype)
            for _ in range(2):  # warm-up (allocations, kernel choice)
                a @ b
            times = []
            for _ in range(z["matmul_repeats"]):
                sync(dev)
                t0 = time.perf_counter()
                a @ b
                sync(dev)
                times.append(time.perf_counter() - t0)
            out[key][str(n)] = matmul_flops(n) / statistics.median(times) / 1e9
            log(f"matmul {n}^3 {str(dtype).removeprefix('torch.')}: {out[key][str(n)]:.0f} GFLOP/s")
    best = max(out["bf16_gflops"], key=out["bf16_gflops"].get)
    best32 = max(out["fp32_gflops"], key=out["fp32_gflops"].get)
    out.update(best_size=int(best), best_size_fp32=int(best32), peak_bf16_flops=out["bf16_gflops"][best] * 1e9,
               peak_fp32_flops=out["fp32_gflops"][best32] * 1e9)
    return out


@torch.no_grad()
def score_seqcls(model, sequences: list[list[int]], pad_id: int, batch_size: int = 16) -> np.ndarray:
    """Rewards of a transformers sequence-classification model (its own forward and pooling), batched
    by length, right-padded, bf16 autocast; in input order."""
    from rmlib.model.encoding import pad_sequences

    model.eval()
    dev = next(model.parameters()).device
    order = np.argsort(-np.array([len(s) for s in sequences]), kind="stable")
    out = np.zeros(len(sequences), np.float32)
    for b0 in range(0, len(order), batch_size):
        idx = order[b0 : b0 + batch_size].tolist()
        batch = pad_sequences([sequences[i] for i in idx], [[0] * len(sequences[i]) for i in idx], pad_id,
                              pad_to_multiple_of=None)
        with autocast(dev.type):
            logits = model(input_ids=batch["input_ids"].to(dev), attention_mask=batch["attention_mask"].to(dev)).logits
        out[idx] = logits[:, 0].float().cpu().numpy()
    return out


def measure_trl(spec: dict) -> dict:
    """TRL RewardTrainer with its defaults (except the listed ones) on the training pairs; pairs/s on
    the pairs it keeps, tokens it processed (real and padded), held-out accuracy with its model."""
    from trl import RewardConfig, RewardTrainer

    from bench.trl_format import to_trl_dataset, trl_kept_mask
    from rmlib.model.assets import load_tokenizer

    z = spec["sizes"]
    tok = load_tokenizer(spec["backbone"])
    train, held = load_split(z)
    expected_kept = sum(trl_kept_mask(train, tok, z["max_length"]))

    class CountingRewardTrainer(RewardTrainer):
        """RewardTrainer that counts the pairs and tokens (real, padded) of every training batch."""

        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.counts = {"pairs": 0, "real": 0, "padded": 0}

        def training_step(self, model, inputs, *args, **kwargs):
            mask = inputs["attention_mask"]
            self.counts["pairs"] += mask.shape[0] // 2
            self.counts["real"] += int(mask.sum())
            self.counts["padded"] += int(mask.numel())
            return super().training_step(model, inputs, *args, **kwargs)

    with tempfile.TemporaryDirectory(prefix="trl-") as tmp:
        # gradient checkpointing off (RewardConfig's default is on); transformers 5 names it activation_checkpointing
        ckpt_off = ({"activation_checkpointing": False} if "activation_checkpointing" in RewardConfig.__dataclass_fields__
                    else {"gradient_checkpointing": False})
        args = RewardConfig(output_dir=tmp, learning_rate=z["learning_rate"], num_train_epochs=1,
                            per_device_train_batch_size=z["batch_pairs"], max_length=z["max_length"], bf16=spec["bf16"],
                            use_cpu=device_of(spec) == "cpu", report_to="none", save_strategy="no", disable_tqdm=True,
                            seed=z["seed"], **ckpt_off)
        trainer = CountingRewardTrainer(model=spec["backbone"], args=args, train_dataset=to_trl_dataset(train))
        kept = len(trainer.train_dataset)
        log(f"TRL keeps {kept} of {len(train)} pairs (our rule predicts {expected_kept}); training")
        t0 = time.perf_counter()
        trainer.train()
        sync(trainer.args.device)
        train_s = time.perf_counter() - t0
        model = trainer.model
        grad_ckpt = bool(model.is_activation_checkpointing if hasattr(model, "is_activation_checkpointing")
                         else model.is_gradient_checkpointing)  # the Trainer switches it on in train() if asked
        if grad_ckpt:
            raise RuntimeError("TRL's model trained with gradient checkpointing although it was switched off")
        log(f"TRL trained {trainer.counts['pairs']} pairs in {train_s:.1f} s; scoring held-out pairs")
        enc, kept_mask = encoded_eval(held, tok, z["max_length"])
        pad_id = model.config.pad_token_id
        seqs_c = [list(p) + list(c) for p, c in zip(enc["prompt_ids"], enc["chosen_ids"])]
        seqs_r = [list(p) + list(r) for p, r in zip(enc["prompt_ids"], enc["rejected_ids"])]
        t0 = time.perf_counter()
        scores = score_seqcls(model, seqs_c + seqs_r, pad_id, batch_size=2 * z["eval_batch_pairs"])
        eval_s = time.perf_counter() - t0
        n = len(seqs_c)
        ends_with_pad = sum(1 for s in seqs_c + seqs_r if s[-1] == pad_id)
        params = param_counts(model.model, model.score, 0)
    c = trainer.counts
    return {"pairs_in": len(train), "pairs_kept": kept, "pairs_dropped": len(train) - kept,
            "pairs_kept_predicted": expected_kept, "pairs_trained": c["pairs"], "train_seconds": train_s,
            "real_tokens": c["real"], "padded_tokens": c["padded"],
            "pad_fraction": 1 - c["real"] / c["padded"] if c["padded"] else None, "max_length": z["max_length"],
            "gradient_checkpointing": grad_ckpt, "epochs": float(args.num_train_epochs), "learning_rate": z["learning_rate"],
            "params": params,
            "eval": {**accuracy(scores[:n], scores[n:], kept_mask, eval_s),
                     "sequences_ending_in_pad_id": ends_with_pad}}


def measure_rmlib_train(spec: dict) -> dict:
    """``train_reward_model`` in ``spec['mode']`` on the TRL-kept (``subset='kept'``) or all training
    pairs, fresh store; held-out accuracy with ``rmlib.model.scoring.score_pairs`` (its default path)."""
    from rmlib.model import bottom_store
    from rmlib.model.assets import load_tokenizer
    from rmlib.model.encoding import encode_pairs
    from rmlib.model.scoring import score_pairs
    from rmlib.reward.trainer import train_reward_model

    z = spec["sizes"]
    tok = load_tokenizer(spec["backbone"])
    train, held = load_split(z)
    if spec["subset"] == "kept":
        train = kept_subset(train, tok, z["max_length"])
    enc, _ = encode_pairs(train, tok, z["max_length"])
    with tempfile.TemporaryDirectory(prefix="rmlib-train-") as tmp:
        cfg = rmlib_train_config(spec, tmp, spec["mode"])
        log(f"rmlib mode {spec['mode']} on {len(train)} pairs ({spec['subset']}); training")
        res = train_reward_model(cfg, train, None, tokenizer=tok, resume=False)
        m = res.metrics
        log(f"trained {m['train_pairs']} pairs in {m['train_seconds']:.1f} s (store {m['bottom_store_seconds']}); "
            "scoring held-out pairs")
        eval_enc, kept_mask = encoded_eval(held, tok, z["max_length"])
        t0 = time.perf_counter()
        scores = score_pairs(res.model, eval_enc, batch_size=z["eval_batch_pairs"], progress=False)
        eval_s = time.perf_counter() - t0
        store = bottom_store.store_for(res.model)
        start = int(res.model.frozen_layers or 0)
        params = param_counts(res.model.decoder, res.model.head, start)
        trainable = sum(p.numel() for p in res.model.parameters() if p.requires_grad)
    return {"mode": spec["mode"], "subset": spec["subset"], "pairs": m["train_pairs"], "steps": m["steps"],
            "train_seconds": m["train_seconds"], "store_seconds": m["bottom_store_seconds"],
            "store_root": str(store.root) if store is not None else None, "params": params, "trainable": trainable,
            "tokens": token_counts(enc["prompt_ids"], enc["chosen_ids"], enc["rejected_ids"]),
            "learning_rate": z["learning_rate"], "train_loss": m["train_loss"],
            "eval": accuracy(scores["chosen"], scores["rejected"], kept_mask, eval_s)}


def measure_scoring(spec: dict) -> dict:
    """responses/s: score_replies batched plain vs a per-example forward loop vs the store path."""
    from rmlib.model import bottom_store
    from rmlib.model.assets import load_tokenizer
    from rmlib.model.encoding import encode_pairs
    from rmlib.model.reward_model import ModelSpec, build_reward_model
    from rmlib.model.scoring import score_replies

    z = spec["sizes"]
    tok = load_tokenizer(spec["backbone"])
    _, held = load_split(z)
    held = held.select(range(min(z["n_score_pairs"], len(held))))
    enc, _ = encode_pairs(held, tok, z["max_length"])
    prompts = [list(p) for p in enc["prompt_ids"]] * 2
    replies = [list(c) for c in enc["chosen_ids"]] + [list(r) for r in enc["rejected_ids"]]
    model = build_reward_model(ModelSpec(backbone=spec["backbone"], mode="topk", top_k_layers=z["top_k_layers"]),
                               seed=z["seed"]).eval()
    bs = z["score_batch"]
    n = len(replies)
    log(f"scoring {n} responses; warm-up")
    score_replies(model, prompts[:bs], replies[:bs], batch_size=bs, progress=False, use_store=False)

    t0 = time.perf_counter()
    plain, _ = score_replies(model, prompts, replies, batch_size=bs, progress=False, use_store=False)
    plain_s = time.perf_counter() - t0
    log(f"batched plain: {n / plain_s:.2f} responses/s")

    loop = np.zeros(n, np.float32)
    t0 = time.perf_counter()
    with torch.no_grad():
        for i, (p, r) in enumerate(zip(prompts, replies)):
            ids = torch.tensor([p + r])
            with autocast():
                loop[i] = float(model(ids, torch.ones_like(ids)).rewards[0])
    loop_s = time.perf_counter() - t0
    log(f"per-example loop: {n / loop_s:.2f} responses/s")

    store = bottom_store.store_for(model)
    if store is None:
        raise RuntimeError("no bottom store for a top-k model: is RMLIB_FASTPATH=0 set?")
    t0 = time.perf_counter()
    store.ensure([(p, [r]) for p, r in zip(prompts, replies)], progress=False)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    cached, _ = score_replies(model, prompts, replies, batch_size=bs, progress=False)
    cached_s = time.perf_counter() - t0
    log(f"store path: {n / cached_s:.2f} responses/s (store build {build_s:.1f} s, not included)")
    return {"responses": n, "batch_size": bs, "top_k_layers": z["top_k_layers"],
            "plain_batched": {"seconds": plain_s, "responses_per_second": n / plain_s},
            "per_example": {"seconds": loop_s, "responses_per_second": n / loop_s},
            "store_topk": {"seconds": cached_s, "responses_per_second": n / cached_s, "build_seconds": build_s},
            "max_abs_diff_plain_vs_loop": float(np.abs(plain - loop).max()),
            "max_abs_diff_store_vs_plain": float(np.abs(cached - plain).max())}


def generation_prompts(tok, count: int, max_prompt_tokens: int, seed: int) -> list[list[dict]]:
    """The first ``count`` HH prompts (in a seeded order) whose chat-formatted text has at most
    ``max_prompt_tokens`` tokens."""
    from rmlib.data import load_hh_rlhf
    from rmlib.model.encoding import format_prompt

    ds = load_hh_rlhf().dataset
    picked = []
    for i in np.random.default_rng(seed).permutation(len(ds)).tolist():
        messages = ds[i]["prompt"]
        if len(tok(format_prompt(tok, messages), add_special_tokens=False)["input_ids"]) <= max_prompt_tokens:
            picked.append(list(messages))
        if len(picked) == count:
            return picked
    raise ValueError(f"only {len(picked)} HH prompts have <= {max_prompt_tokens} tokens; {count} needed")


def measure_generation(spec: dict) -> dict:
    """tokens/s: rmlib.model.generation.sample_responses (batch 32) vs batch-1 model.generate, same prompts and
    max_new_tokens, same sampling settings, both warmed up."""
    from transformers import GenerationConfig

    from rmlib.model.assets import load_causal_lm, load_tokenizer
    from rmlib.model.encoding import format_prompt
    from rmlib.model.generation import sample_responses

    z = spec["sizes"]
    tok = load_tokenizer(spec["backbone"])
    prompts = generation_prompts(tok, z["gen_prompts"], z["gen_max_prompt_tokens"], z["seed"])
    policy = load_causal_lm(spec["backbone"]).eval()
    stop = sorted({int(tok.eos_token_id)} | ({int(policy.generation_config.eos_token_id)}
                                              if isinstance(policy.generation_config.eos_token_id, int) else set()))
    m_new = z["gen_max_new_tokens"]
    cfg1 = GenerationConfig(max_new_tokens=m_new, do_sample=True, temperature=0.7, top_p=0.95, top_k=0,
                            eos_token_id=stop, pad_token_id=tok.pad_token_id, use_cache=True)
    texts = [format_prompt(tok, p) for p in prompts]

    log("warm-up (batch 32 and batch 1, 8 new tokens)")
    warm = GenerationConfig(max_new_tokens=8, do_sample=False, eos_token_id=stop, pad_token_id=tok.pad_token_id)
    with torch.no_grad(), autocast():
        enc = tok([texts[0]] * z["gen_batch"], return_tensors="pt", add_special_tokens=False)
        policy.generate(**enc, generation_config=warm)
        policy.generate(**tok(texts[0], return_tensors="pt", add_special_tokens=False), generation_config=warm)

    with tempfile.TemporaryDirectory(prefix="gen-") as tmp:
        t0 = time.perf_counter()
        df = sample_responses(policy, tok, prompts, [f"p{i}" for i in range(len(prompts))], n=z["gen_samples"],
                              out_path=Path(tmp) / "samples.jsonl", batch_size=z["gen_batch"], max_new_tokens=m_new,
                              seed=z["seed"], progress=False)
        batched_s = time.perf_counter() - t0
    batched_tokens = int(df["n_tokens"].sum() + df["finished"].sum())  # + the end-of-turn token when generated
    log(f"batch {z['gen_batch']}: {batched_tokens} tokens in {batched_s:.1f} s")

    torch.manual_seed(z["seed"])
    b1_tokens = 0
    t0 = time.perf_counter()
    with torch.no_grad(), autocast():
        for text in texts:
            enc = tok(text, return_tensors="pt", add_special_tokens=False)
            out = policy.generate(**enc, generation_config=cfg1)
            b1_tokens += out.shape[1] - enc["input_ids"].shape[1]
    b1_s = time.perf_counter() - t0
    log(f"batch 1: {b1_tokens} tokens in {b1_s:.1f} s")
    return {"prompts": len(prompts), "samples_per_prompt": z["gen_samples"], "max_new_tokens": m_new,
            "batched": {"batch_size": z["gen_batch"], "rows": len(df), "tokens": batched_tokens,
                        "seconds": batched_s, "tokens_per_second": batched_tokens / batched_s},
            "batch1": {"rows": len(texts), "tokens": b1_tokens, "seconds": b1_s, "tokens_per_second": b1_tokens / b1_s}}


def sampling_prompts(tok, count: int, length: int, seed: int) -> list[list[int]]:
    """``count`` distinct prompts of exactly ``length`` tokens: HH prompts (seeded order), chat-formatted,
    cut from the LEFT as rmlib cuts prompts (so each ends with the assistant header)."""
    from rmlib.data import load_hh_rlhf
    from rmlib.model.encoding import format_prompt

    ds = load_hh_rlhf().dataset
    picked, seen = [], set()
    for i in np.random.default_rng(seed).permutation(len(ds)).tolist():
        ids = tok(format_prompt(tok, ds[i]["prompt"]), add_special_tokens=False)["input_ids"]
        if len(ids) >= length and tuple(ids[-length:]) not in seen:
            seen.add(tuple(ids[-length:]))
            picked.append(ids[-length:])
        if len(picked) == count:
            return picked
    raise ValueError(f"only {len(picked)} distinct HH prompts have >= {length} tokens; {count} needed")


def _until_stop(rows: list[list[int]], stops) -> list[list[int]]:
    """Each row up to and including its first stop token."""
    stops = set(stops)
    return [r[: next((k + 1 for k, t in enumerate(r) if t in stops), len(r))] for r in rows]


def measure_sampling(spec: dict) -> dict:
    """tokens/s of three ways to continue B distinct prompts (``sampling_prompt_tokens`` tokens each)
    by ``sampling_new_tokens`` tokens at T=0.7, top-p 0.95, for each B in ``sampling_batches``:
    HF ``generate`` (do_sample, top_k=0), the raw decode forward with its KV cache and no sampling
    (prefill + one forward per token: the limit), and rmlib's engine (``DecodeLoop``, as
    ``sample_responses`` runs it). Tokens: generated tokens up to and including the stop token
    (raw: every row runs to the end); each engine warmed up first."""
    from transformers import DynamicCache, GenerationConfig

    from rmlib.model.assets import load_causal_lm, load_tokenizer
    from rmlib.model.decoding import SAMPLER, DecodeLoop
    from rmlib.model.generation import stop_token_ids

    z = spec["sizes"]
    temperature, top_p = 0.7, 0.95
    p_len, n_new = z["sampling_prompt_tokens"], z["sampling_new_tokens"]
    tok = load_tokenizer(spec["backbone"])
    dev = device_of(spec)
    policy = load_causal_lm(spec["backbone"]).eval().to(dev)
    stops, pad = stop_token_ids(policy, tok), tok.pad_token_id
    all_prompts = sampling_prompts(tok, max(z["sampling_batches"]), p_len, z["seed"])

    def hf(prompts, new):
        cfg = GenerationConfig(do_sample=True, temperature=temperature, top_p=top_p, top_k=0, max_new_tokens=new,
                               eos_token_id=stops, pad_token_id=pad, use_cache=True)
        torch.manual_seed(z["seed"])
        ids = torch.tensor(prompts, device=dev)
        with torch.no_grad(), autocast(dev):
            out = policy.generate(input_ids=ids, attention_mask=torch.ones_like(ids), generation_config=cfg)
        return _until_stop(out[:, ids.shape[1]:].tolist(), stops)

    def raw(prompts, new):
        ids = torch.tensor(prompts, device=dev)
        pos = torch.arange(ids.shape[1], device=dev).expand(len(prompts), -1)
        cache, last = DynamicCache(), ids[:, -1:]
        with torch.no_grad(), autocast(dev):
            policy(input_ids=ids, position_ids=pos, past_key_values=cache, use_cache=True, logits_to_keep=1)
            for k in range(new - 1):  # the prefill gave the first token's logits
                policy(input_ids=last, position_ids=pos[:, -1:] + 1 + k, past_key_values=cache, use_cache=True)
        sync(dev)
        return [[0] * new for _ in prompts]

    loop_info = {}

    def rmlib(prompts, new):
        loop = DecodeLoop(policy, stops, pad, new, temperature, top_p, spec["bf16"])
        rows = loop(prompts, list(range(len(prompts))))
        loop_info.update(steps=loop.steps_run + 1, compactions=loop.compactions)
        return rows

    engines = {"hf_generate": hf, "raw_decode": raw, "rmlib": rmlib}
    log("warm-up (4 rows, 4 new tokens, each engine)")
    for fn in engines.values():
        fn(all_prompts[:4], 4)
    batches = []
    for b in z["sampling_batches"]:
        row = {"batch": b}
        for name, fn in engines.items():
            sync(dev)
            t0 = time.perf_counter()
            rows = fn(all_prompts[:b], n_new)
            sync(dev)
            dt = time.perf_counter() - t0
            tokens = sum(len(r) for r in rows)
            row[name] = {"seconds": dt, "tokens": tokens, "tokens_per_second": tokens / dt,
                         "finished": sum(1 for r in rows if r and r[-1] in stops and name != "raw_decode")}
            if name == "rmlib":
                row[name].update(loop_info)
            log(f"B={b} {name}: {tokens} tokens in {dt:.1f} s = {tokens / dt:.1f} tok/s")
        batches.append(row)
    return {"prompt_tokens": p_len, "new_tokens": n_new, "temperature": temperature, "top_p": top_p,
            "sampler": SAMPLER, "batches": batches, "device": dev}


def _rloo_part(spec: dict, kind: str, rm_dir: str, prompts: list[dict], out_dir: str) -> dict:
    """One trainer of ``measure_rloo_step`` in this (fresh, spawned) process: optimizer-step wall
    times, TRL's logged metrics, and this process's peak RSS."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import RLOOConfig, RLOOTrainer

    from rmlib.model.assets import load_causal_lm, load_tokenizer
    from rmlib.rloo.reward_fn import RewardModelFunction
    from rmlib.rloo.shared_bottom import SharedBottomRLOOTrainer, make_topk_policy

    torch.set_num_threads(int(spec["threads"]))
    z = spec["sizes"]
    tok = load_tokenizer(spec["backbone"])
    tok.padding_side = "left"
    policy = make_topk_policy(load_causal_lm(spec["backbone"]), z["rloo_policy_top_k"])
    rm = RewardModelFunction.from_dir(rm_dir, name="proxy_rm", max_length=512, batch_size=16, bf16=spec["bf16"])
    args = RLOOConfig(output_dir=out_dir, per_device_train_batch_size=z["rloo_prompts"] * z["rloo_k"],
                      num_generations=z["rloo_k"], beta=z["rloo_beta"], max_completion_length=z["rloo_completion_tokens"],
                      temperature=1.0, top_p=1.0, top_k=0, num_iterations=1, learning_rate=1e-6,
                      max_steps=z["rloo_steps"], bf16=spec["bf16"], use_cpu=True, report_to="none", save_strategy="no",
                      logging_steps=1, shuffle_dataset=False, remove_unused_columns=False, disable_dropout=True,
                      activation_checkpointing=False, normalize_advantages=False, seed=z["seed"], disable_tqdm=True)

    class StepClock(TrainerCallback):
        def __init__(self):
            self.seconds, self.t0 = [], None

        def on_step_begin(self, args, state, control, **kw):
            self.t0 = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            self.seconds.append(time.perf_counter() - self.t0)
            log(f"{kind}: step {state.global_step} in {self.seconds[-1]:.1f} s")

    clock = StepClock()
    data = Dataset.from_list([{"prompt": p} for p in prompts])
    cls = SharedBottomRLOOTrainer if kind == "rmlib" else RLOOTrainer
    trainer = cls(model=policy, reward_funcs=rm, args=args, train_dataset=data, processing_class=tok,
                  callbacks=[clock])
    shared = [f.__name__ for f in getattr(trainer, "shared_rewards", [])]
    trainer.train()
    logged = [r for r in trainer.state.log_history if "completions/mean_length" in r]
    timed = clock.seconds[1:] or clock.seconds  # the first step warms up
    return {"kind": kind, "step_seconds": clock.seconds, "median_step_seconds": statistics.median(timed),
            "mean_completion_tokens": float(np.mean([r["completions/mean_length"] for r in logged])),
            "reward_mean": float(np.mean([r["rewards/proxy_rm/mean"] for r in logged])),
            "shared_bottom_rewards": shared, "reference": type(trainer.ref_model).__name__,
            "reward_rows_shared_plain": [[f.rows_shared, f.rows_plain] for f in getattr(trainer, "shared_rewards", [])],
            "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}


def measure_rloo_step(spec: dict) -> dict:
    """One RLOO optimizer step, rmlib (``SharedBottomRLOOTrainer``: DecodeLoop sampling, one bottom
    forward per completion for policy, reference and proxy) vs TRL's ``RLOOTrainer`` in its plain
    configuration (HF generate, a second full reference model, the proxy as a reward function scoring
    whole sequences): the same policy (SmolLM2, top ``rloo_policy_top_k`` layers + norm train), k,
    prompts per step, completion length, beta, T = 1, top-p 1; the proxy a top-k RM of the same
    backbone (untrained head: its speed is a trained one's). Each trainer runs ``rloo_steps`` steps
    in its own spawned process (its own peak RSS); median step time over the steps after the first."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    from rmlib.model.assets import load_tokenizer
    from rmlib.model.reward_model import (
        ModelSpec,
        build_reward_model,
        save_reward_model,
    )
    from rmlib.rloo.prompts import build_prompt_sets

    z = spec["sizes"]
    n_prompts = z["rloo_prompts"] * z["rloo_steps"]
    tok = load_tokenizer(spec["backbone"])
    sets = build_prompt_sets(n_train=n_prompts, n_eval=1, seed=z["seed"], sources=["hh-rlhf"], tokenizer=tok,
                             max_prompt_tokens=z["rloo_max_prompt_tokens"])
    prompts = [p["prompt"] for p in sets.train]
    parts = {}
    with tempfile.TemporaryDirectory(prefix="rloo-step-") as tmp:
        rm = build_reward_model(ModelSpec(backbone=spec["backbone"], head="linear", mode="topk",
                                          top_k_layers=z["top_k_layers"]), seed=z["seed"])
        save_reward_model(rm, Path(tmp) / "proxy", tok)
        del rm
        ctx = multiprocessing.get_context("spawn")
        for kind in ("rmlib", "trl"):
            log(f"{kind}: {z['rloo_steps']} steps of {z['rloo_prompts']} prompts x k={z['rloo_k']}, "
                f"{z['rloo_completion_tokens']} new tokens")
            with ProcessPoolExecutor(1, mp_context=ctx) as pool:
                parts[kind] = pool.submit(_rloo_part, spec, kind, str(Path(tmp) / "proxy"), prompts,
                                          str(Path(tmp) / kind)).result()
    return {"prompts_per_step": z["rloo_prompts"], "k": z["rloo_k"], "completion_tokens": z["rloo_completion_tokens"],
            "beta": z["rloo_beta"], "steps": z["rloo_steps"], "policy_top_k": z["rloo_policy_top_k"],
            "rm_top_k": z["top_k_layers"], **parts}
def measure_bon_cost(spec: dict) -> dict:
    """Best-of-N cost per sample: sampling N replies for each of ``bon_prompts`` HH prompts (as
    notebook 04 does: ``sample_responses``, batch ``gen_batch``, T=0.7, top-p 0.95) then scoring every
    sample by a gold and ``bon_proxies`` proxy top-k reward models (``bon_runs.score_with_all`` on saved
    folders, one model loaded at a time), against sampling alone.

    Three timed phases: (1) sampling alone; (2) scoring those samples with a fresh bottom store (the
    store build: a second forward through the bottom; the path without capture); (3) sampling again
    with the bottom captured into a fresh store (``capture_store``), then scoring (top layers only).
    The reward models are built from the backbone (head seeds differ) and saved as notebook 04's are;
    their weights are untrained, which changes no cost. The lookup of the store the models share
    (``bon_runs.capture_store_for``: each model loaded once) is timed apart (once per run, any N)."""
    import shutil

    from rmlib.analysis import bon_runs
    from rmlib.model.assets import load_causal_lm, load_tokenizer
    from rmlib.model.generation import sample_responses
    from rmlib.model.reward_model import (
        ModelSpec,
        build_reward_model,
        load_reward_model,
        save_reward_model,
    )

    z = spec["sizes"]
    tok = load_tokenizer(spec["backbone"])
    prompts = generation_prompts(tok, z["bon_prompts"], z["gen_max_prompt_tokens"], z["seed"])
    ids = [f"p{i}" for i in range(len(prompts))]
    root = Path(tempfile.mkdtemp(prefix="bon-cost-"))
    base_cache = os.environ.get("RMLIB_CACHE_DIR")
    try:
        rms = {}
        log(f"building and saving 1 gold + {z['bon_proxies']} proxy top-{z['top_k_layers']} reward models")
        for k in range(1 + z["bon_proxies"]):
            name = "gold" if k == 0 else f"proxy_{k}"
            model = build_reward_model(ModelSpec(backbone=spec["backbone"], mode="topk", top_k_layers=z["top_k_layers"]),
                                       seed=z["seed"] + k)
            rms[name] = save_reward_model(model, root / name, tok)
            del model
        t0 = time.perf_counter()
        load_reward_model(rms["gold"])  # what each scoring does per model (the files are in the page cache)
        load_s = time.perf_counter() - t0
        policy = load_causal_lm(spec["backbone"]).eval()  # float32: the reward models' dtype (the store key's)
        kw = {"n": z["bon_samples"], "batch_size": z["gen_batch"], "max_new_tokens": z["bon_max_new_tokens"],
              "seed": z["seed"], "progress": False}
        log("warm-up (2 prompts, 4 new tokens)")
        sample_responses(policy, tok, prompts[:2], ids[:2], out_path=root / "warm.jsonl", **{**kw, "max_new_tokens": 4})

        def fresh_cache(name: str) -> None:  # store_for looks in RMLIB_CACHE_DIR: a fresh one per path
            os.environ["RMLIB_CACHE_DIR"] = str(root / f"cache-{name}")

        fresh_cache("plain")
        t0 = time.perf_counter()
        df = sample_responses(policy, tok, prompts, ids, out_path=root / "plain.jsonl", **kw)
        sample_s = time.perf_counter() - t0
        tokens = int(df["n_tokens"].sum() + df["finished"].sum())
        log(f"sampling alone: {len(df)} samples, {tokens} tokens in {sample_s:.1f} s")
        t0 = time.perf_counter()
        plain_scores = bon_runs.score_with_all(rms, df, root / "plain-scores.jsonl", progress=False)
        plain_score_s = time.perf_counter() - t0
        log(f"scoring by {len(rms)} models with a fresh store (its build included): {plain_score_s:.1f} s")

        fresh_cache("capture")
        t0 = time.perf_counter()
        store = bon_runs.capture_store_for(rms)
        lookup_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        dfc = sample_responses(policy, tok, prompts, ids, out_path=root / "capture.jsonl", capture_store=store, **kw)
        capture_sample_s = time.perf_counter() - t0
        info = dfc.attrs["capture"]
        log(f"sampling with capture: {capture_sample_s:.1f} s; {info['report']}")
        t0 = time.perf_counter()
        capture_scores = bon_runs.score_with_all(rms, dfc, root / "capture-scores.jsonl", progress=False)
        capture_score_s = time.perf_counter() - t0
        log(f"scoring by {len(rms)} models through the captured store: {capture_score_s:.1f} s (store lookup "
            f"{lookup_s:.1f} s, apart)")
        same = dfc["response_ids"].tolist() == df["response_ids"].tolist()
        diff = float(np.nanmax(np.abs(capture_scores[list(rms)].to_numpy() - plain_scores[list(rms)].to_numpy()))) \
            if same else None
    finally:
        if base_cache is None:
            os.environ.pop("RMLIB_CACHE_DIR", None)
        else:
            os.environ["RMLIB_CACHE_DIR"] = base_cache
        shutil.rmtree(root, ignore_errors=True)
    return {"prompts": len(prompts), "samples_per_prompt": z["bon_samples"], "samples": len(df),
            "max_new_tokens": z["bon_max_new_tokens"], "batch_size": z["gen_batch"], "reward_models": len(rms),
            "top_k_layers": z["top_k_layers"], "tokens": tokens, "rm_load_seconds": load_s,
            "sampling_seconds": sample_s, "plain": {"score_seconds": plain_score_s},
            "capture": {"sample_seconds": capture_sample_s, "score_seconds": capture_score_s,
                        "store_lookup_seconds": lookup_s, "captured": info["captured"], "present": info["present"],
                        "fallback": info["fallback"]},
            "same_samples": same, "max_abs_score_diff_capture_vs_plain": diff}


def measure_sweep(spec: dict) -> dict:
    """Variants trained one after another (mode topk) in this process with a fresh store; wall
    seconds per run, model loading and the store build (first run) included."""
    from rmlib.model.assets import load_tokenizer
    from rmlib.reward.trainer import train_reward_model
    from rmlib.reward.variants import variant_config

    z = spec["sizes"]
    tok = load_tokenizer(spec["backbone"])
    train, _ = load_split(z)
    train = train.select(range(min(z["n_sweep"], len(train))))
    runs = []
    with tempfile.TemporaryDirectory(prefix="sweep-") as tmp:
        for name in spec["variants"]:
            t0 = time.perf_counter()
            cfg = variant_config(name, z["seed"], tmp, backbone=spec["backbone"], mode="topk",
                                 top_k_layers=z["top_k_layers"], learning_rate=z["learning_rate"],
                                 per_device_train_batch_size=z["batch_pairs"], max_length=z["max_length"],
                                 bf16=spec["bf16"], use_cpu=True, save_strategy="no", disable_tqdm=True)
            res = train_reward_model(cfg, train, None, tokenizer=tok, resume=False)
            dt = time.perf_counter() - t0
            runs.append({"variant": name, "seconds": dt, "store_seconds": res.metrics["bottom_store_seconds"],
                         "train_seconds": res.metrics["train_seconds"]})
            log(f"{name}: {dt:.1f} s (store {res.metrics['bottom_store_seconds']:.1f} s, "
                f"train {res.metrics['train_seconds']:.1f} s)")
            del res
    return {"variants": list(spec["variants"]), "pairs": len(train), "runs": runs,
            "total_seconds": sum(r["seconds"] for r in runs)}


MEASURE = {
    "peak": measure_peak,
    "trl": measure_trl,
    "rmlib_full_kept": measure_rmlib_train,
    "rmlib_topk_kept": measure_rmlib_train,
    "rmlib_topk_all": measure_rmlib_train,
    "rmlib_lora_kept": measure_rmlib_train,
    "rmlib_frozen_kept": measure_rmlib_train,
    "scoring": measure_scoring,
    "generation": measure_generation,
    "sampling": measure_sampling,
    "rloo_step": measure_rloo_step,
    "bon_cost": measure_bon_cost,
    "sweep_one": measure_sweep,
    "sweep": measure_sweep,
}


def main(argv: list[str]) -> int:
    spec_file, result_file = argv
    spec = json.loads(Path(spec_file).read_text())
    torch.set_num_threads(int(spec["threads"]))
    import datasets
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    datasets.disable_progress_bars()
    t0 = time.perf_counter()
    try:
        result, error = MEASURE[spec["name"]](spec), None
    except Exception:  # reported to the parent, which records it and goes on with the next measurement
        result, error = None, traceback.format_exc()
        print(error, file=sys.stderr, flush=True)
    out = {"ok": error is None, "result": result, "error": error, "seconds": time.perf_counter() - t0,
           "torch_threads": torch.get_num_threads(),
           "self_maxrss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024}
    from rmlib.core.atomic_io import write_json_atomic

    write_json_atomic(result_file, out)
    return 0 if error is None else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main(sys.argv[1:]))
