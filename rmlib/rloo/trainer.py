"""RLOO policy training against a learned reward model (BSR paper, Hong et al. ICML 2025, §3.2-3.3).

RLOO (REINFORCE Leave-One-Out, Ahmadian et al. ACL 2024) samples k completions y_1..y_k per
prompt x and updates the policy with the advantage

    A_i = R_i - (1 / (k - 1)) * sum_{j != i} R_j,   R_i = r_proxy(x, y_i) - beta * sum_t log(pi(y_it) / pi_ref(y_it)),

i.e. the proxy reward with a sequence-level KL penalty (first-order log-ratio, summed over the
completion's tokens) against the initial policy pi_ref. The loop is TRL's ``RLOOTrainer`` (not
re-implemented here): ``num_generations`` is k, ``beta`` the KL coefficient. The BSR paper uses
k = 2 and beta = 0.05 (Qwen2.5-1.5B SFT policy, lr 1e-6..2e-6, global batch 128, 5 epochs).

What this module adds:

- ``RewardModelFunction``: an rmlib reward model (linear head, MLP head or GRM) as a TRL reward
  function. Each (prompt messages, completion) is formatted with the RM's OWN tokenizer and chat
  template exactly as Best-of-N scores samples (``rmlib.model.encoding.sample_sequences``: ``format_prompt``
  + ``format_reply``, prompt cut from the left at ``max_length``), then scored by
  ``rmlib.model.scoring.score_token_sequences``. Policy, proxy and gold tokenizers may all differ.
- ``build_prompt_sets``: a deterministic prompt pool (AlpacaEval instructions and HH-RLHF first
  human turns, the Best-of-N sources) split into training prompts and a fixed evaluation set,
  disjoint by text, with an ``exclude`` set (e.g. the RM-training prompts).
- ``RLOOTracker``: every ``track_every`` optimizer steps, on the fixed evaluation prompts:
  proxy reward, gold reward, KL to the initial policy, mean response length, gold win rate
  against the initial policy's answers. Records survive a kill and a resume.
- ``train_rloo``: the entry point (resumes from the newest checkpoint, reuses a finished run);
  ``curves_frame`` / ``summary_table`` / ``curves_figure`` for the notebook.

KL estimators (the tracked ``kl`` and ``kl_k1``, nats per completion). For each evaluation prompt x,
m completions y ~ pi_T(.|x) are sampled (pi_T: the policy at temperature T; top_p = 1 keeps the
estimates exact), and with pi_ref the initial policy (LoRA: adapters disabled; full fine-tuning:
TRL's reference copy), over the completion's tokens including its end-of-turn token:

    kl_k1 = mean over (x, y) of sum_t [ log pi_T(y_t | x, y_<t) - log pi_ref,T(y_t | x, y_<t) ]
    kl    = mean over (x, y) of sum_t KL( pi_T(. | x, y_<t) || pi_ref,T(. | x, y_<t) )

Both are unbiased for E_x KL(pi_T(.|x) || pi_ref,T(.|x)) (chain rule of KL). ``kl_k1`` is the
plain log-prob difference of the sampled completion (TRL's penalty, summed); a single value can be
negative. ``kl`` uses the same forward passes but takes the exact KL over the vocabulary at every
sampled prefix: non-negative and of lower variance, so it is the curves' x axis. ``*_sem``: standard
errors over samples. Log-probs are computed in float32 even when training runs in bf16.

Evaluation samples use common random numbers: the completion (prompt p, sample s) draws from its
own ``torch.Generator`` seeded by hash(seed, p, s) at every tracked step (``rmlib.model.generation.RowSampler``):
the same uniforms drive a row's draws at every record, which couples consecutive records and
lowers the noise of step-to-step differences; and the global RNG that the training loop uses is
never touched (a resumed run samples the same training completions as an uninterrupted one).

Resume. ``<output_dir>/rloo_records.jsonl`` is rewritten atomically after each record and copied
into every ``checkpoint-N`` folder. A resumed run reloads the records of the checkpoint it resumes
from and drops newer ones, so its curves equal an uninterrupted run's. The training prompts are
laid out as one stream (``prompt_stream``: successive seeded permutations of the pool) read in
order, so resuming never depends on the sampler state of an epoch boundary. The run resumes from
the newest complete checkpoint (``CHECKPOINT_FILES``, ``rmlib.core.runs``); a checkpoint without
this run's identity file (another config, or a save cut short) is first moved to ``stale-<time>/``.
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM
from transformers.utils import ADAPTER_SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME
from trl import RLOOTrainer

from rmlib.core import runs
from rmlib.core.atomic_io import write_json_atomic, write_table_atomic
from rmlib.model import assets, reward_model
from rmlib.rloo.config import CONFIG_FILE, CURVES_FILE, RESULT_FILE, RLOORunConfig
from rmlib.rloo.prompts import PromptSets, prompt_stream
from rmlib.rloo.reward_fn import (
    RewardModelFunction,
    _tokenizer,
    _version,
    check_reward_model_dir,
)
from rmlib.rloo.tracker import (
    RECORDS_FILE,
    RLOOTracker,
    curves_frame,
    read_records,
)

logger = logging.getLogger(__name__)


# what a complete RLOO checkpoint holds besides trainer_state.json: the policy weights TRL's save
# writes (LoRA adapter, or full weights in one file or sharded) and the tracker's records
CHECKPOINT_FILES = ((ADAPTER_SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME), RECORDS_FILE)


# -- the entry point ----------------------------------------------------------------------------------
@dataclass
class RLOOResult:
    records: list[dict]
    log_history: list[dict]
    metrics: dict
    output_dir: Path
    final_dir: Path

    @property
    def curves(self) -> pd.DataFrame:
        return curves_frame(self.records)


def _identity(config: RLOORunConfig, prompts: PromptSets) -> dict:
    """What makes two runs the same run: every config field but the folder, the prompt sets, and
    the proxy and gold RMs' digests (an RM retrained in the same folder makes a new run)."""
    summary = {k: v for k, v in config.summary().items() if k != "output_dir"}
    rms = {"proxy": reward_model.model_digest(check_reward_model_dir(config.proxy_rm)),
           "gold": reward_model.model_digest(check_reward_model_dir(config.gold_rm))}
    return json.loads(json.dumps({"config": summary, "prompts": prompts.digest(), "reward_models": rms}))


def last_checkpoint(output_dir) -> str | None:
    """The newest complete ``checkpoint-N`` (``CHECKPOINT_FILES``; ``rmlib.core.runs.last_checkpoint``), or None."""
    return runs.last_checkpoint(output_dir, CHECKPOINT_FILES)


def _set_aside_stale(output_dir: Path, identity: dict) -> None:
    """Move checkpoints and results of another config, prompt set or RM pair (or a checkpoint cut
    short before its ``CONFIG_FILE``) to ``stale-<time>/``, with ``final`` and the curves."""
    runs.set_aside_stale(output_dir, identity, CONFIG_FILE, result=(RESULT_FILE, "identity"),
                         outputs=("final", RECORDS_FILE, CURVES_FILE, RESULT_FILE))


def finished_run(config: RLOORunConfig, prompts: PromptSets) -> RLOOResult | None:
    """A completed run in ``config.output_dir`` with the same config, prompts and RMs, else None."""
    out = Path(config.output_dir)
    meta = runs.finished_result(out, RESULT_FILE, {"identity": _identity(config, prompts)},
                                needs=(RECORDS_FILE, "final"))
    if meta is None:
        return None
    return RLOOResult(read_records(out), meta.get("log_history", []), meta.get("metrics", {}), out, out / "final")


def train_rloo(config: RLOORunConfig, prompts: PromptSets, resume: bool = True, reuse: bool = False,
               callbacks=None, progress: bool = True) -> RLOOResult:
    """Train the policy with TRL's RLOO against ``config.proxy_rm``; track on ``prompts.eval``.

    ``resume=True`` continues from the newest checkpoint in ``config.output_dir`` written with the
    same config and prompts (others are moved to ``stale-*``); ``reuse=True`` returns a finished
    run of the same config and prompts as it is. Writes ``<output_dir>/final`` (the policy: LoRA
    adapter or full weights, + tokenizer), ``rloo_records.jsonl``, ``curves.csv`` and ``result.json``.
    """

    out = Path(config.output_dir)
    hint = "train it first (rmlib.reward.trainer.train_reward_model writes <output_dir>/final)"
    check_reward_model_dir(config.proxy_rm, "proxy RM", hint)
    check_reward_model_dir(config.gold_rm, "gold RM", hint)
    identity = _identity(config, prompts)
    if reuse and (done := finished_run(config, prompts)) is not None:
        logger.info("reusing the finished RLOO run in %s", out)
        return done
    if not prompts.train or not prompts.eval:
        raise ValueError("prompts needs non-empty train and eval sets (build_prompt_sets)")
    out.mkdir(parents=True, exist_ok=True)
    if resume:
        _set_aside_stale(out, identity)

    policy_path = assets.resolve_model(config.policy)  # TRL rebuilds the reference from this path (beta > 0)
    tokenizer = copy.deepcopy(_tokenizer(config.policy, _version(config.policy)))
    tokenizer.padding_side = "left"

    stream = prompt_stream(prompts.train, config.max_steps * config.prompts_per_step
                           * config.gradient_accumulation_steps, seed=config.seed)
    train_ds = Dataset.from_list([{"prompt": p["prompt"], "prompt_id": p["prompt_id"]} for p in stream])
    args = config.trl_config(progress=progress)
    device = torch.device("cpu") if config.use_cpu or not torch.cuda.is_available() else torch.device("cuda")
    rm_kwargs = dict(max_length=config.rm_max_length, batch_size=config.rm_batch_size, bf16=config.bf16,
                     device=device, hint=hint)
    proxy = RewardModelFunction.from_dir(config.proxy_rm, name="proxy_rm", **rm_kwargs)
    gold = RewardModelFunction.from_dir(config.gold_rm, name="gold_rm", **rm_kwargs)
    peft_config = None
    if config.mode == "lora":
        peft_config = LoraConfig(r=config.lora_r, lora_alpha=config.lora_alpha, lora_dropout=0.0,
                                 target_modules=list(config.lora_targets), bias="none", task_type="CAUSAL_LM")
    tracker = RLOOTracker(prompts.eval, tokenizer, proxy, gold, every_steps=config.track_every,
                          samples_per_prompt=config.eval_samples_per_prompt,
                          max_new_tokens=config.max_completion_length, temperature=config.temperature,
                          top_p=config.top_p, seed=config.seed, batch_size=config.eval_batch_size, bf16=config.bf16,
                          config=identity, progress=progress)
    trainer = RLOOTrainer(model=policy_path, reward_funcs=proxy, args=args, train_dataset=train_ds,
                          processing_class=tokenizer, callbacks=[tracker, *(callbacks or [])],
                          peft_config=peft_config)
    if config.mode == "full":
        tracker.reference = trainer.ref_model
        if tracker.reference is None:  # beta = 0: TRL keeps no reference; load the initial policy

            ref = AutoModelForCausalLM.from_pretrained(policy_path, dtype=getattr(torch, config.policy_dtype))
            tracker.reference = ref.to(device).eval()
    ckpt = last_checkpoint(out) if resume else None
    start = runs.checkpoint_step(ckpt) if ckpt else 0  # now: checkpoint rotation may delete it during training
    if ckpt:
        logger.info("resuming RLOO from %s", ckpt)
    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=ckpt)
    seconds = time.perf_counter() - t0
    steps_run = trainer.state.global_step - start

    def write_final(tmp: Path) -> None:
        trainer.save_model(str(tmp))
        tokenizer.save_pretrained(tmp)

    final = assets._atomic_save_dir(out / "final", write_final)
    records = tracker.records
    curves = curves_frame(records)
    write_table_atomic(out / CURVES_FILE, curves)
    metrics = {"steps": trainer.state.global_step, "train_seconds": seconds, "resumed_from": ckpt,
               "tracking_seconds": tracker.seconds,
               "seconds_per_step": (seconds - tracker.seconds) / steps_run if steps_run > 0 else None,
               "completions_per_step": config.completions_per_step, "prompts": prompts.report}
    write_json_atomic(out / RESULT_FILE, {"identity": identity, "metrics": metrics,
                                          "log_history": trainer.state.log_history})
    return RLOOResult(records, trainer.state.log_history, metrics, out, final)
