"""``RLOOTracker``: proxy reward, gold reward, KL to the initial policy and response length on
fixed evaluation prompts during RLOO training, recorded so that the records survive a kill and a
resume; ``curves_frame`` / ``samples_frame`` turn records into tidy tables.
"""

from __future__ import annotations

import logging
import math
import os
import time
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.stats
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from rmlib.core import runs
from rmlib.core.atomic_io import write_json_atomic
from rmlib.model.encoding import format_prompt
from rmlib.model.generation import sample_completions, sample_seed
from rmlib.model.logprobs import completion_kl
from rmlib.rloo.config import CONFIG_FILE, check_number
from rmlib.rloo.reward_fn import RewardModelFunction

logger = logging.getLogger(__name__)


RECORDS_FILE = "rloo_records.jsonl"


# one number per record (the tidy curves); "samples" holds the per-completion details
CURVE_COLUMNS = ["step", "epoch", "proxy", "proxy_sem", "gold", "gold_sem", "proxy_delta", "proxy_delta_sem",
                 "gold_delta", "gold_delta_sem", "proxy_std0", "gold_std0", "kl", "kl_sem", "kl_k1", "kl_k1_sem",
                 "length_tokens", "length_chars", "finished_frac", "gold_win_rate", "n_samples"]


# -- tracking callback --------------------------------------------------------------------------------
def _sem(x) -> float:
    x = np.asarray(x, dtype=np.float64)
    return float(scipy.stats.sem(x, axis=None, ddof=1)) if x.size > 1 else math.nan  # scipy warns on n < 2


def read_records(path) -> list[dict]:
    """Records of an ``rloo_records.jsonl`` file (or of the file inside a run folder)."""
    path = Path(path)
    return runs.read_records(path / RECORDS_FILE if path.is_dir() else path)


class RLOOTracker(runs.RecordsCallback):
    """Proxy reward, gold reward, KL to the initial policy and response length on fixed evaluation
    prompts, at step 0 and every ``every_steps`` optimizer steps (and at the last step).

    A record: ``step``, ``epoch``, the ``CURVE_COLUMNS`` statistics and ``samples`` (one dict per
    completion: prompt_id, sample_index, completion, n_tokens, finished, proxy, gold, kl, kl_k1;
    see ``completion_kl``). ``length_tokens``: mean reply tokens before the end-of-turn.
    ``*_delta`` are paired differences to the step-0 completions of the same (prompt, sample)
    with their standard errors; ``gold_win_rate`` = mean of 1[gold_t > gold_0] + 0.5 * 1[equal];
    ``*_std0`` the step-0 spread of the scores (to put proxy RMs of different scale on one axis).
    Records are kept and resumed by ``rmlib.core.runs.RecordsCallback``; each checkpoint also gets
    the run identity ``config`` (``CONFIG_FILE``).

    ``reference``: the frozen initial policy for the KL (None: the policy is a peft model and its
    adapters are disabled).
    """

    filename = RECORDS_FILE
    label = "rloo records"

    def __init__(self, eval_prompts: list[dict], tokenizer, proxy: RewardModelFunction, gold: RewardModelFunction,
                 every_steps: int = 5, samples_per_prompt: int = 2, max_new_tokens: int = 64,
                 temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, batch_size: int = 16,
                 bf16: bool | str = "auto", reference=None, config: dict | None = None, progress: bool = False):
        check_number("every_steps", every_steps, low=1, integer=True)
        check_number("samples_per_prompt", samples_per_prompt, low=1, integer=True)
        if not eval_prompts:
            raise ValueError("eval_prompts is empty")
        if top_p < 1.0:
            logger.warning("top_p=%s < 1: the tracked KL is then an estimate for the truncated sampler", top_p)
        super().__init__()
        self.eval_prompts = eval_prompts
        self.tokenizer = tokenizer
        self.proxy, self.gold = proxy, gold
        self.every_steps = every_steps
        self.samples_per_prompt = samples_per_prompt
        self.max_new_tokens, self.temperature, self.top_p = max_new_tokens, temperature, top_p
        self.seed, self.batch_size, self.bf16 = seed, batch_size, bf16
        self.reference = reference
        self.config = config or {}
        self.progress = progress
        self.seconds = 0.0  # wall time spent recording in this process (not part of the records)
        self._prompt_ids = [tokenizer(format_prompt(tokenizer, p["prompt"]), add_special_tokens=False)["input_ids"]
                            for p in eval_prompts]

    # -- computing ------------------------------------------------------------------------------
    def measure(self, policy) -> dict:
        """Statistics of the policy on the evaluation prompts (no record kept)."""
        rows = [(i, s) for i in range(len(self.eval_prompts)) for s in range(self.samples_per_prompt)]
        prompt_ids = [self._prompt_ids[i] for i, _ in rows]
        seeds = [sample_seed(self.seed, self.eval_prompts[i]["prompt_id"], s, stream="rloo-eval") for i, s in rows]
        sampled = sample_completions(policy, self.tokenizer, prompt_ids, seeds, self.max_new_tokens,
                                     self.temperature, self.top_p, self.batch_size, self.bf16, self.progress)
        completions = [ids for ids, _ in sampled]
        kls = completion_kl(policy, prompt_ids, completions, self.reference, self.temperature, self.batch_size)
        kl, kl_k1 = kls["kl"], kls["kl_k1"]
        reply_ids = [ids[:-1] if fin else ids for ids, fin in sampled]
        texts = self.tokenizer.batch_decode(reply_ids, skip_special_tokens=True)  # as TRL decodes for rewards
        messages = [self.eval_prompts[i]["prompt"] for i, _ in rows]
        proxy = self.proxy.score(messages, texts)
        gold = self.gold.score(messages, texts)
        n_tokens = np.array([len(r) for r in reply_ids])
        samples = [{"prompt_id": self.eval_prompts[i]["prompt_id"], "sample_index": s, "completion": t,
                    "n_tokens": int(n), "finished": bool(f), "proxy": float(p), "gold": float(g), "kl": float(k),
                    "kl_k1": float(k1)}
                   for (i, s), t, n, (_, f), p, g, k, k1
                   in zip(rows, texts, n_tokens, sampled, proxy, gold, kl, kl_k1)]
        return {"proxy": float(proxy.mean()), "proxy_sem": _sem(proxy), "gold": float(gold.mean()),
                "gold_sem": _sem(gold), "kl": float(kl.mean()), "kl_sem": _sem(kl),
                "kl_k1": float(kl_k1.mean()), "kl_k1_sem": _sem(kl_k1), "length_tokens": float(n_tokens.mean()),
                "length_chars": float(np.mean([len(t) for t in texts])),
                "finished_frac": float(np.mean([f for _, f in sampled])), "n_samples": len(rows), "samples": samples}

    def _paired(self, stats: dict, step: int) -> None:
        """Add the differences to step 0 (paired by prompt and sample index); NaN if step 0 is lost."""
        base = self.records[0] if self.records and self.records[0]["step"] == 0 else stats if step == 0 else None
        if base is None:
            stats.update({k: math.nan for k in ("proxy_delta", "proxy_delta_sem", "proxy_std0", "gold_delta",
                                                "gold_delta_sem", "gold_std0", "gold_win_rate")})
            return
        key = lambda r: (r["prompt_id"], r["sample_index"])  # noqa: E731
        ref = {key(r): r for r in base["samples"]}
        pairs = [(r, ref[key(r)]) for r in stats["samples"] if key(r) in ref]
        for name in ("proxy", "gold"):
            d = np.array([a[name] - b[name] for a, b in pairs])
            stats[f"{name}_delta"] = float(d.mean()) if d.size else math.nan
            stats[f"{name}_delta_sem"] = _sem(d)
            stats[f"{name}_std0"] = float(np.std([r[name] for r in base["samples"]], ddof=1)) \
                if len(base["samples"]) > 1 else math.nan
        wins = [1.0 if a["gold"] > b["gold"] else 0.5 if a["gold"] == b["gold"] else 0.0 for a, b in pairs]
        stats["gold_win_rate"] = float(np.mean(wins)) if wins else math.nan

    def _record(self, args, state, model) -> None:
        t0 = time.perf_counter()
        stats = self.measure(model)
        self._paired(stats, int(state.global_step))
        record = {"step": int(state.global_step), "epoch": float(state.epoch or 0.0), **stats}
        self.records.append(record)
        self._write(args, state, self._path(args))
        dt = time.perf_counter() - t0
        self.seconds += dt
        logger.info("rloo tracking step %d: proxy %.4f gold %.4f kl %.4f length %.1f (%.1f s)", record["step"],
                    record["proxy"], record["gold"], record["kl"], record["length_tokens"], dt)

    # -- events (train begin and end: RecordsCallback) ---------------------------------------------
    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        if (step % self.every_steps == 0 or step == state.max_steps) and not self._has(step):
            self._record(args, state, model)

    def on_save(self, args, state, control, **kwargs):
        super().on_save(args, state, control, **kwargs)  # the records
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if folder.is_dir() and state.is_world_process_zero:  # last: a checkpoint cut short lacks it
            write_json_atomic(folder / CONFIG_FILE, self.config)


# -- tables and figures -------------------------------------------------------------------------------
def curves_frame(records, run: str | None = None, long: bool = False) -> pd.DataFrame:
    """Tracked curves as a tidy DataFrame: one row per (run, step), the ``CURVE_COLUMNS`` as columns.

    ``records``: a list of records, a records file, or a run folder. ``run`` adds a ``run`` column.
    ``long=True``: one row per (run, step, metric) with ``metric`` and ``value`` columns instead.
    """
    if isinstance(records, (str, os.PathLike)):
        records = read_records(records)
    frame = pd.DataFrame([{c: r.get(c, math.nan) for c in CURVE_COLUMNS} for r in records], columns=CURVE_COLUMNS)
    if run is not None:
        frame.insert(0, "run", run)
    if long:
        ids = [c for c in ("run", "step", "epoch") if c in frame.columns]
        return frame.melt(id_vars=ids, var_name="metric", value_name="value")
    return frame


def samples_frame(records, run: str | None = None) -> pd.DataFrame:
    """Every tracked completion: step, prompt_id, sample_index, completion, n_tokens, finished, proxy, gold, kl."""
    if isinstance(records, (str, os.PathLike)):
        records = read_records(records)
    frame = pd.DataFrame([{"step": r["step"], **s} for r in records for s in r.get("samples", [])])
    if run is not None:
        frame.insert(0, "run", run)
    return frame
