"""``train_rloo``: TRL's ``RLOOTrainer`` against a proxy reward model, tracked on fixed prompts by
``RLOOTracker``; resumes from the newest complete checkpoint of the same run identity (config,
prompt sets, the proxy and gold RMs' digests), sets others aside, reuses a finished run.
"""

from __future__ import annotations

import copy
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from trl import RLOOTrainer

from rmlib.core.atomic_io import read_json, write_json_atomic, write_table_atomic
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
    _checkpoint_step,
    curves_frame,
    read_records,
)

logger = logging.getLogger(__name__)


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
    """The newest complete ``checkpoint-N`` (its ``trainer_state.json`` is written last), or None."""
    out = Path(output_dir)
    ckpts = [(s, p) for p in out.glob(f"{PREFIX_CHECKPOINT_DIR}-*")
             if (s := _checkpoint_step(p)) is not None and (p / "trainer_state.json").exists()]
    return str(max(ckpts)[1]) if ckpts else None


def _set_aside_stale(output_dir: Path, identity: dict) -> None:
    """Checkpoints (and results) written under another config or prompt set must not be resumed:
    move them to ``stale-<time>/`` in the same folder, deleting nothing."""
    stale = [p for p in output_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*")
             if _checkpoint_step(p) is not None
             and not ((p / CONFIG_FILE).exists() and read_json(p / CONFIG_FILE) == identity)]
    result = output_dir / RESULT_FILE
    if result.exists() and read_json(result).get("identity") != identity:
        stale.append(result)
    if stale:
        target = output_dir / f"stale-{time.strftime('%Y%m%d-%H%M%S')}"
        target.mkdir(parents=True, exist_ok=True)
        extra = [p for p in (output_dir / "final", output_dir / RECORDS_FILE, output_dir / CURVES_FILE)
                 if p.exists()]
        for path in stale + extra:
            os.replace(path, target / path.name)
        logger.warning("%d item(s) in %s came from another config or prompt set; moved to %s", len(stale),
                       output_dir, target)


def finished_run(config: RLOORunConfig, prompts: PromptSets) -> RLOOResult | None:
    """A completed run in ``config.output_dir`` with the same config, prompts and RMs, else None."""
    out = Path(config.output_dir)
    if not ((out / RESULT_FILE).exists() and (out / RECORDS_FILE).exists() and (out / "final").is_dir()):
        return None
    meta = read_json(out / RESULT_FILE)
    if meta.get("identity") != _identity(config, prompts):
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
    if ckpt:
        logger.info("resuming RLOO from %s", ckpt)
    t0 = time.perf_counter()
    trainer.train(resume_from_checkpoint=ckpt)
    seconds = time.perf_counter() - t0
    start = int(Path(ckpt).name.split("-")[-1]) if ckpt else 0
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
