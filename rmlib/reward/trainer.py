"""Reward-model training: one config dataclass (TRL style) and one entry point.

``RMConfig`` extends ``transformers.TrainingArguments`` (checkpoints, resume, logging, seeds,
accelerate/DDP/FSDP all come from the HF Trainer) with the model, loss and data fields of this
project. ``RMTrainer`` is a ``Trainer`` whose ``compute_loss`` calls the loss registry
(``rmlib.reward.losses``): any reward loss (BT, BSR, centering, ...) with any GRM regularizer.

Why not TRL's ``RewardTrainer`` itself: it drops pairs longer than ``max_length`` silently
(20% of HH-RLHF at 256 tokens), pools on the pad id (wrong when pad == eos, as in SmolLM2),
and has no LM head for GRM. The loop here is the HF Trainer's; only the loss step is ours.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from safetensors.torch import load_file, save_file
from transformers import Trainer

from rmlib.core import runs
from rmlib.core.atomic_io import write_json_atomic
from rmlib.model import assets, bottom_store
from rmlib.model.encoding import SCORE_COLUMNS, PairCollator, encode_pairs
from rmlib.model.reward_model import (
    RewardModel,
    build_reward_model,
    load_reward_model,
    save_reward_model,
)
from rmlib.model.scoring import pairwise_accuracy, score_pairs
from rmlib.reward.config import RMConfig
from rmlib.reward.losses import (
    NEEDS_REFERENCE,
    NEEDS_REJECTED_LOGP,
    LossSpec,
    assert_finite_loss,
    compute_loss,
)

logger = logging.getLogger(__name__)


TRAINABLE_WEIGHTS = "trainable.safetensors"
CONFIG_FILE = "rmlib_config.json"  # the run identity (the config summary), in every checkpoint
RESULT_FILE = "metrics.json"


class RMTrainer(Trainer):
    """HF Trainer with the rmlib loss step; logs loss parts, accuracy, reward stats, |W_p|, ||h||."""

    def __init__(self, *args, loss_spec: LossSpec, eval_pairs=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_spec = loss_spec
        self.eval_pairs = eval_pairs
        self._metrics: dict[str, list[float]] = defaultdict(list)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        spec = self.loss_spec
        rm: RewardModel = self.accelerator.unwrap_model(model)
        ids, mask, resp = inputs["input_ids"], inputs["attention_mask"], inputs["response_mask"]
        b = ids.shape[0] // 2
        need_logp = spec.regularizer != "none"
        logp_mask = resp
        if need_logp and spec.regularizer not in NEEDS_REJECTED_LOGP:
            logp_mask = resp.clone()
            logp_mask[b:] = 0  # chosen-only regularizers: skip the LM head on rejected replies
        # hidden_in/start_layer: present when the collator reads the shared bottom store (rmlib.model.bottom_store)
        out = model(ids, mask, logp_mask, return_logps=need_logp, hidden_in=inputs.get("hidden_in"),
                    start_layer=inputs.get("start_layer"))
        r_c, r_r = out.rewards[:b], out.rewards[b:]
        logp_c = logp_r = ref_c = ref_r = None
        if need_logp:
            logp_c, logp_r = out.logps[:b], out.logps[b:]
        if spec.regularizer in NEEDS_REFERENCE:
            ref = rm.reference_logps(ids, mask, resp)
            ref_c, ref_r = ref[:b], ref[b:]
        margin = per_pair_margins(spec, inputs.get("margin"), b)
        loss, metrics = compute_loss(spec, r_c, r_r, logp_c, logp_r, ref_c, ref_r, margin=margin)
        assert_finite_loss(metrics, step=self.state.global_step)
        with torch.no_grad():
            hn = out.hidden.float().norm(dim=-1)
            metrics["hidden/norm_mean"] = float(hn.mean())
            metrics["hidden/norm_std"] = float(hn.std()) if hn.numel() > 1 else 0.0
            metrics["model/head_norm"] = rm.head_weight_norm()
        for k, v in metrics.items():
            self._metrics[k].append(float(v))
        return (loss, out) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if self._metrics and "loss" in logs:  # training log: add the averaged loss-step metrics
            logs.update({k: float(np.mean(v)) for k, v in self._metrics.items()})
            self._metrics.clear()
        super().log(logs, start_time)

    # -- evaluation: pairwise accuracy on held-out pairs with the batched scorer --------------------
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        data = eval_dataset if eval_dataset is not None else self.eval_pairs
        if data is None:
            return {}
        model = self.accelerator.unwrap_model(self.model)
        scores = score_pairs(model, data, batch_size=self.args.eval_batch_size, bf16=self.args.bf16,
                             progress=not self.args.disable_tqdm, desc="eval")
        metrics = {
            f"{metric_key_prefix}_accuracy": pairwise_accuracy(scores["chosen"], scores["rejected"]),
            f"{metric_key_prefix}_reward_mean": float(np.concatenate([scores["chosen"], scores["rejected"]]).mean()),
            f"{metric_key_prefix}_margin": float((scores["chosen"] - scores["rejected"]).mean()),
        }
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    # -- checkpoints: only what trains (frozen weights come from the backbone) ------------------
    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir or self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        model = self.accelerator.unwrap_model(self.model)
        if state_dict is None:
            weights = model.trainable_state_dict()
        else:  # FSDP FULL_STATE_DICT / DeepSpeed ZeRO-3: Trainer.save_model gathered whole tensors
            names = {n for n, p in model.named_parameters() if p.requires_grad}
            weights = {k: v.detach().float().contiguous() for k, v in state_dict.items() if k in names}
        tmp = os.path.join(output_dir, TRAINABLE_WEIGHTS + ".tmp")
        save_file(weights, tmp)
        os.replace(tmp, os.path.join(output_dir, TRAINABLE_WEIGHTS))
        write_json_atomic(Path(output_dir) / CONFIG_FILE, _jsonable(self.args.summary()))
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        model = self.accelerator.unwrap_model(model or self.model)
        path = os.path.join(resume_from_checkpoint, TRAINABLE_WEIGHTS)
        if not os.path.exists(path):
            raise FileNotFoundError(f"checkpoint {resume_from_checkpoint} has no {TRAINABLE_WEIGHTS}")
        state = load_file(path)
        missing = [n for n, p in model.named_parameters() if p.requires_grad and n not in state]
        if missing:
            raise ValueError(f"checkpoint {resume_from_checkpoint} lacks trainable weights: {missing[:5]} ...")
        model.load_state_dict(state, strict=False)


def uses_pair_scores(spec: LossSpec) -> bool:
    """Whether the loss reads ``chosen_score``/``rejected_score``: loss "margin" without a constant
    ``loss_params["margin"]`` (see ``per_pair_margins``)."""
    return spec.reward == "margin" and "margin" not in spec.reward_params


def _unscored_message(bad: int, total: int, where: str) -> str:
    return (f"loss='margin' uses the per-pair margin m = |chosen_score - rejected_score| (GRM baseline), but "
            f"{bad} of {total} pairs {where} have no chosen_score/rejected_score (NaN or column missing); "
            "train on scored pairs, or set loss_params={'margin': <number>} for one constant margin "
            "(the BSR code's use_margin)")


def per_pair_margins(spec: LossSpec, margin: torch.Tensor | None, pairs: int) -> torch.Tensor | None:
    """The (B,) margins ``compute_loss`` gets from a collated batch's ``margin`` (``pair_margins``).

    Loss "margin" is GRM's margin baseline, -log sigmoid(r_c - r_r - m_i) with m_i = |rating_c,i -
    rating_r,i| (Yang et al. 2024; code reward_models/reward_trainer.py, loss_type 'margin'). The GRM
    code has no fallback: without ratings its collator yields an empty list and the loss line
    fails (IndexError on ``inputs["margin"][0]``); so here a batch with an unscored pair raises
    ValueError naming the problem. A constant ``loss_params["margin"]`` (the BSR code's
    ``use_margin`` with scalar ``args.margin``) is used instead of the scores when set. Other
    losses: None (hinge keeps its constant margin)."""
    if not uses_pair_scores(spec):
        return None
    if margin is None:
        raise ValueError(_unscored_message(pairs, pairs, "of this batch"))
    bad = int((~torch.isfinite(margin)).sum())
    if bad:
        raise ValueError(_unscored_message(bad, pairs, "of this batch"))
    return margin


def check_pair_scores(spec: LossSpec, pairs) -> None:
    """Before tokenizing: raise ValueError if the loss needs per-pair scores (``uses_pair_scores``)
    and some pairs lack them, naming the first such ids."""
    if not uses_pair_scores(spec):
        return
    if any(c not in pairs.column_names for c in SCORE_COLUMNS):
        raise ValueError(_unscored_message(len(pairs), len(pairs), "of the training data"))
    c, r = (np.asarray(pairs[col], dtype=float) for col in SCORE_COLUMNS)  # None -> NaN
    bad = np.flatnonzero(~np.isfinite(c - r))
    if bad.size:
        ids = pairs["id"] if "id" in pairs.column_names else list(range(len(pairs)))
        raise ValueError(_unscored_message(bad.size, len(pairs), "of the training data")
                         + f"; first: {[str(ids[i]) for i in bad[:5]]}")


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d, default=lambda o: getattr(o, "value", str(o))))


@dataclass
class TrainResult:
    model: RewardModel
    tokenizer: object
    metrics: dict
    log_history: list[dict]
    output_dir: Path
    final_dir: Path


def _set_aside_stale_checkpoints(config: RMConfig) -> None:
    """Move checkpoints and results of another config (or a checkpoint cut short before its
    ``CONFIG_FILE``) to ``stale-<time>/``, with ``final``: ``rmlib.core.runs.set_aside_stale``."""
    runs.set_aside_stale(config.output_dir, _jsonable(config.summary()), CONFIG_FILE,
                         result=(RESULT_FILE, "config"), outputs=("final", RESULT_FILE))


def last_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The newest complete ``checkpoint-N`` (with ``trainable.safetensors``; ``rmlib.core.runs.last_checkpoint``)
    or None."""
    return runs.last_checkpoint(output_dir, [TRAINABLE_WEIGHTS])


def _whole_run_train_loss(training_loss: float, log_history: list[dict], start_step: int, end_step: int) -> float:
    """Mean training loss over every step of the run. The Trainer's ``training_loss`` averages the
    steps run in this call only; after a resume from ``start_step`` the earlier steps come back from
    the logged ``loss`` values (each the mean since the previous log: exact when ``start_step`` is a
    logged step, as with save_steps a multiple of logging_steps)."""
    if start_step == 0:
        return training_loss
    earlier, logged = 0.0, 0
    for rec in log_history:
        if "loss" in rec and rec.get("step", 0) <= start_step:
            earlier += rec["loss"] * (rec["step"] - logged)
            logged = rec["step"]
    steps = logged + (end_step - start_step)
    return (earlier + training_loss * (end_step - start_step)) / steps if steps else training_loss


def train_reward_model(config: RMConfig, train_pairs, eval_pairs=None, tokenizer=None, callbacks=None,
                       resume: bool | str = True, reuse: bool = False) -> TrainResult:
    """Train a reward model on normalized pairs (``rmlib.data`` schema); evaluate; export.

    ``resume=True`` continues from the newest checkpoint in ``config.output_dir`` if any.
    ``reuse=True`` returns a finished run of the same configuration and data as it is
    (nothing is retrained). Writes ``<output_dir>/final`` (see
    ``rmlib.model.reward_model.save_reward_model``) and ``<output_dir>/metrics.json``.
    """
    check_pair_scores(config.loss_spec, train_pairs)
    fingerprint = _data_fingerprint(train_pairs, eval_pairs, scores=uses_pair_scores(config.loss_spec))
    if reuse:
        done = finished_run(config, fingerprint)
        if done is not None:
            logger.info("reusing the finished run in %s", config.output_dir)
            return done
    torch.manual_seed(config.seed)
    tokenizer = tokenizer or assets.load_tokenizer(config.backbone)
    train_enc, train_stats = encode_pairs(train_pairs, tokenizer, config.max_length)
    logger.info("train pairs: %d (prompt cut: %d, reply cut: %d, dropped identical after cut: %d)",
                train_stats.pairs, train_stats.prompt_truncated, train_stats.reply_truncated,
                len(train_stats.dropped_identical_after_truncation))
    eval_enc = None
    if eval_pairs is not None:
        eval_enc, _ = encode_pairs(eval_pairs, tokenizer, config.max_length)
    model = build_reward_model(config.model_spec, seed=config.seed)
    if config.regularizer in NEEDS_REFERENCE:
        model.attach_reference()
    collator = PairCollator(pad_token_id=tokenizer.pad_token_id)
    t_store = time.perf_counter()
    groups = bottom_store.pair_groups(train_enc) + (bottom_store.pair_groups(eval_enc) if eval_enc is not None else [])
    store = bottom_store.store_for(model, bf16_autocast=config.bf16, groups=groups) if config.bottom_cache else None
    if store is not None:  # frozen bottom: compute its output once for every pair (shared across runs)
        with config.main_process_first(desc="bottom store"):  # other processes then find it all stored
            store.ensure(groups, progress=not config.disable_tqdm)
        collator = bottom_store.CachedPairCollator(store, pad_token_id=tokenizer.pad_token_id)
    store_seconds = time.perf_counter() - t_store
    keep = ["prompt_ids", "chosen_ids", "rejected_ids", "length"]
    if uses_pair_scores(config.loss_spec):  # the collators turn them into per-pair margins
        keep += list(SCORE_COLUMNS)
    trainer = RMTrainer(
        model=model, args=config, train_dataset=train_enc.select_columns(keep),
        data_collator=collator, processing_class=tokenizer,
        loss_spec=config.loss_spec, eval_pairs=eval_enc, callbacks=callbacks,
    )
    if resume is True:
        if trainer.is_world_process_zero():  # one process moves files, the others wait for it
            _set_aside_stale_checkpoints(config)
        trainer.accelerator.wait_for_everyone()
    ckpt = last_checkpoint(config.output_dir) if resume is True else (resume or None)
    start_step = runs.checkpoint_step(ckpt) if ckpt else 0  # now: checkpoint rotation may delete it
    if start_step is None:
        raise ValueError(f"resume={resume!r} is not a checkpoint-N folder")
    t0 = time.perf_counter()
    train_out = trainer.train(resume_from_checkpoint=ckpt)
    train_seconds = time.perf_counter() - t0
    pairs_seen = (trainer.state.global_step - start_step) * config.per_device_train_batch_size \
        * config.gradient_accumulation_steps * config.world_size
    metrics = {"train_pairs": len(train_enc), "steps": trainer.state.global_step, "train_seconds": train_seconds,
               "pairs_per_second": pairs_seen / train_seconds if train_seconds > 0 else None,
               "train_loss": _whole_run_train_loss(train_out.training_loss, trainer.state.log_history, start_step,
                                                   trainer.state.global_step),
               "resumed_from": ckpt,
               "bottom_store_seconds": store_seconds if store is not None else None}
    if eval_enc is not None:
        metrics.update(trainer.evaluate())
    final_dir = Path(config.output_dir) / "final"
    # One writer: every process holds the same weights, and under torch.distributed transformers'
    # save_pretrained writes weights on rank 0 only (another rank's export would lack them).
    if trainer.is_world_process_zero():
        save_reward_model(model, final_dir, tokenizer,
                          extra={"config": _jsonable(config.summary()), "metrics": metrics})
        write_json_atomic(Path(config.output_dir) / RESULT_FILE,
                          _jsonable({"config": config.summary(), "data": fingerprint, "metrics": metrics,
                                     "encode": asdict(train_stats), "log_history": trainer.state.log_history}))
    trainer.accelerator.wait_for_everyone()  # final/ exists for every process on return
    return TrainResult(model, tokenizer, metrics, trainer.state.log_history, Path(config.output_dir), final_dir)


def _content_hash(pairs) -> str:
    h = hashlib.sha1()
    for col in ("prompt", "chosen", "rejected"):
        h.update(json.dumps(list(pairs[col]), sort_keys=True).encode())
    return h.hexdigest()[:16]


def _data_fingerprint(train_pairs, eval_pairs, scores: bool = False) -> dict:
    """Identity of the data: sizes and a hash of the prompts and replies (``scores``: and of the
    training pairs' scores, which a per-pair margin loss reads)."""
    fp = {"train": len(train_pairs), "train_hash": _content_hash(train_pairs)}
    if scores:
        fp["train_scores_hash"] = hashlib.sha1(json.dumps(
            [list(train_pairs[c]) for c in SCORE_COLUMNS]).encode()).hexdigest()[:16]
    if eval_pairs is not None:
        fp.update(eval=len(eval_pairs), eval_hash=_content_hash(eval_pairs))
    return fp


def finished_run(config: RMConfig, fingerprint: dict | None = None) -> TrainResult | None:
    """A completed run in ``config.output_dir`` with the same config (and data), loaded; else None."""

    out, final = Path(config.output_dir), Path(config.output_dir) / "final"
    expected = {"config": _jsonable(config.summary())}
    if fingerprint is not None:
        expected["data"] = _jsonable(fingerprint)
    meta = runs.finished_result(out, RESULT_FILE, expected, needs=("final/rmlib_reward.json",))
    if meta is None:
        return None
    model = load_reward_model(final)
    tokenizer = assets.load_tokenizer(final)
    return TrainResult(model, tokenizer, meta["metrics"], meta.get("log_history", []), out, final)


def log_history_frame(log_history: list[dict]):
    """Trainer log history -> tidy DataFrame (one row per logged step, train rows only)."""

    rows = [r for r in log_history if "loss" in r or "loss/total" in r]
    return pd.DataFrame(rows)


def results_row(result: TrainResult, name: str = "") -> "pd.DataFrame":
    """One tidy row: run name, the config summary and the metrics (held-out accuracy, time...)."""

    meta = json.loads((result.output_dir / "metrics.json").read_text())
    row = {"run": name or result.output_dir.name}
    row.update({k: (json.dumps(v) if isinstance(v, (dict, list)) else v) for k, v in meta["config"].items()})
    row.update({k: v for k, v in result.metrics.items() if not isinstance(v, (dict, list))})
    return pd.DataFrame([row])
