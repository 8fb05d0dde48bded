"""``RMConfig``: everything a reward-model run needs (``transformers.TrainingArguments`` + the
model, loss and data fields of this project), validated at construction and saved with every
checkpoint and result.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields

import torch
from transformers import TrainingArguments

from rmlib.core.precision import resolve_bf16
from rmlib.model import assets
from rmlib.model.reward_model import ModelSpec
from rmlib.reward.losses import LossSpec


@dataclass
class RMConfig(TrainingArguments):
    """Everything a reward-model run needs. Saved with every checkpoint and result.

    Model, loss and data fields are ours; the rest are ``TrainingArguments`` with defaults
    chosen for this project (set explicitly: TRL's RewardConfig turns on gradient
    checkpointing and lr 1e-4 by default).
    """

    # --- model ---
    backbone: str = field(default=assets.DEFAULT_MODEL, metadata={"help": "short name, local path or hub id"})
    head: str = field(default="linear", metadata={"help": "reward head: linear (BSR) or mlp (GRM)"})
    mode: str = field(default="full", metadata={"help": "full | lora | topk | frozen"})
    top_k_layers: int = field(default=4, metadata={"help": "trainable top layers in mode topk"})
    lora_r: int = field(default=32, metadata={"help": "LoRA rank (GRM paper: 32)"})
    lora_alpha: int = field(default=64, metadata={"help": "LoRA alpha (GRM paper: 64)"})
    lora_dropout: float = field(default=0.05, metadata={"help": "LoRA dropout (GRM paper: 0.05)"})
    # --- loss ---
    loss: str = field(default="bt", metadata={"help": "reward loss name in rmlib.reward.losses.REWARD_LOSSES"})
    # dict | str | None: HfArgumentParser then parses the flag as a string (with `dict | str` it would call dict(text))
    loss_params: dict | str | None = field(default_factory=dict, metadata={
        "help": 'JSON object, e.g. \'{"lam": 1e-3, "global_batch": true}\' for bsr'})
    regularizer: str = field(default="none", metadata={"help": "GRM regularizer: none | sft | sft_nll | dpo_noref | dpo"})
    alpha: float = field(default=0.01, metadata={"help": "GRM weight: (1-alpha) L_reward + alpha L_reg"})
    beta: float = field(default=0.1, metadata={"help": "GRM beta inside the regularizer"})
    # --- data ---
    max_length: int = field(default=256, metadata={"help": "tokens per prompt+reply; prompt cut from the left"})
    bottom_cache: bool = field(default=True, metadata={
        "help": "modes topk/frozen: run the frozen bottom once and train the top from the shared store (rmlib.model.bottom_store)"})
    eval_batch_size: int = field(default=8, metadata={"help": "pairs per scoring batch"})
    # --- TrainingArguments defaults for this project ---
    output_dir: str = "runs/rm"
    learning_rate: float = 1e-5
    per_device_train_batch_size: int = 4
    num_train_epochs: float = 1.0
    lr_scheduler_type: str = "linear"
    warmup_steps: float = 0.05
    weight_decay: float = 0.0
    logging_steps: float = 10
    save_strategy: str = "steps"
    save_steps: float = 100
    save_total_limit: int | None = 2
    report_to: str | list[str] = "none"
    remove_unused_columns: bool = False
    train_sampling_strategy: str = "group_by_length"
    dataloader_num_workers: int = 0
    bf16: bool | str = field(default="auto", metadata={
        "help": "bf16 autocast: True | False | auto (where bf16 matmuls are native, rmlib.core.precision)"})
    use_cpu: bool = field(default_factory=lambda: not torch.cuda.is_available())
    seed: int = 0
    disable_tqdm: bool | None = False

    def __post_init__(self):
        self.loss_params = _json_object("loss_params", self.loss_params)
        self.loss_spec  # validates names and values, naming what is allowed
        self.model_spec
        assets.check_model_name(self.backbone)  # a missing path fails here, not after the data is tokenized
        if self.max_length < 16:
            raise ValueError(f"max_length={self.max_length} is too small (>= 16)")
        self.bf16 = resolve_bf16(self.bf16, "cpu" if self.use_cpu else None)  # what was computed is saved
        super().__post_init__()

    @property
    def loss_spec(self) -> LossSpec:
        return LossSpec(reward=self.loss, reward_params=dict(self.loss_params), regularizer=self.regularizer,
                        alpha=self.alpha, beta=self.beta)

    @property
    def model_spec(self) -> ModelSpec:
        return ModelSpec(backbone=self.backbone, head=self.head, mode=self.mode, top_k_layers=self.top_k_layers,
                         lora_r=self.lora_r, lora_alpha=self.lora_alpha, lora_dropout=self.lora_dropout,
                         keep_lm_head=self.regularizer != "none")

    def summary(self) -> dict:
        """The project-specific fields plus the main optimisation ones (for result rows)."""
        keys = [f.name for f in fields(RMConfig) if f.name not in {f2.name for f2 in fields(TrainingArguments)}]
        keys += ["learning_rate", "per_device_train_batch_size", "gradient_accumulation_steps",
                 "num_train_epochs", "max_steps", "seed", "bf16", "lr_scheduler_type", "warmup_steps",
                 "weight_decay", "logging_steps"]
        return {k: getattr(self, k) for k in keys}


def _json_object(name: str, value) -> dict:
    """``value`` as a dict: a dict as is, None as {}, a string parsed as a JSON object (the CLI passes text)."""
    if value is None:
        return {}
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ValueError(f"{name}: not valid JSON ({e}): {value!r}") from None
    if not isinstance(value, dict):
        raise ValueError(f"{name} must be a JSON object (a dict), e.g. '{{\"lam\": 1e-3}}', got {value!r}")
    return value
