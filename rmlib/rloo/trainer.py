"""``train_rloo``: TRL's ``RLOOTrainer`` against a proxy reward model, tracked on fixed prompts by
``RLOOTracker``; resumes from the newest complete checkpoint of the same run identity (config,
prompt sets, the proxy and gold RMs' digests), sets others aside, reuses a finished run.
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
from transformers.utils import (
    ADAPTER_SAFE_WEIGHTS_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
)
from trl import RLOOTrainer

from rmlib.core import runs
from rmlib.core.atomic_io import write_json_atomic, write_table_atomic
from rmlib.model import assets, reward_model
from rmlib.model.scoring import _tokenizer, _version
from rmlib.rloo.config import CONFIG_FILE, CURVES_FILE, RESULT_FILE, RLOORunConfig
from rmlib.rloo.prompts import PromptSets, prompt_stream
from rmlib.rloo.reward_fn import RewardModelFunction, check_reward_model_dir
from rmlib.rloo.shared_bottom import SharedBottomRLOOTrainer, make_topk_policy
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
    if config.mode == "topk":  # one frozen-bottom forward per completion for policy, reference and a top-k proxy
        policy = AutoModelForCausalLM.from_pretrained(policy_path, dtype=getattr(torch, config.policy_dtype))
        trainer = SharedBottomRLOOTrainer(model=make_topk_policy(policy, config.policy_top_k_layers),
                                          reward_funcs=proxy, args=args, train_dataset=train_ds,
                                          processing_class=tokenizer, callbacks=[tracker, *(callbacks or [])])
    else:
        trainer = RLOOTrainer(model=policy_path, reward_funcs=proxy, args=args, train_dataset=train_ds,
                              processing_class=tokenizer, callbacks=[tracker, *(callbacks or [])],
                              peft_config=peft_config)
    if config.mode in ("full", "topk"):  # topk: the reference shares the policy's bottom (shared_reference)
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
