"""``RLOORunConfig``: everything one RLOO run needs, validated at construction, and the TRL
``RLOOConfig`` built from it; the names of a run folder's files.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import asdict, dataclass, field

import torch
from transformers import SchedulerType
from trl import RLOOConfig

from rmlib.core.precision import resolve_bf16
from rmlib.model import assets

MODES = ("lora", "full", "topk")


DTYPES = ("float32", "bfloat16", "auto")
# the files of a run folder (besides checkpoint-N/ and final/)
CONFIG_FILE = "rmlib_rloo_config.json"  # the run identity, also inside every checkpoint
RESULT_FILE = "result.json"
CURVES_FILE = "curves.csv"


# -- configuration ----------------------------------------------------------------------------------
def check_number(name, value, low=None, high=None, low_open=False, integer=False) -> None:
    kind = "an integer" if integer else "a number"
    ok = isinstance(value, (numbers.Integral if integer else numbers.Real)) and not isinstance(value, bool)
    ok = ok and math.isfinite(value)
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value <= high
    if not ok:
        lo, hi = low if low is not None else "-inf", high if high is not None else "inf"
        rng = ("(" if low_open else "[") + f"{lo}, {hi}]"
        raise ValueError(f"{name} must be {kind} in {rng}, got {value!r}")


@dataclass
class RLOORunConfig:
    """Everything one RLOO run needs; saved with every checkpoint and the result (TRL ``RLOOConfig``
    is built from it by ``trl_config``). Defaults follow the BSR paper where it applies
    (k = 2, beta = 0.05); sizes are for presets to set."""

    output_dir: str = "runs/rloo"
    # --- models ---
    policy: str = field(default=assets.DEFAULT_MODEL, metadata={"help": "short name, local folder or hub id"})
    proxy_rm: str = field(default="", metadata={"help": "folder of the proxy RM that is optimized"})
    gold_rm: str = field(default="", metadata={"help": "folder of the gold RM (tracked, never optimized)"})
    mode: str = field(default="lora", metadata={
        "help": "lora | full fine-tuning of the policy | topk: only its top policy_top_k_layers decoder layers + "
                "final norm train, one shared bottom forward per completion (rmlib.rloo.shared_bottom)"})
    policy_top_k_layers: int = field(default=2, metadata={
        "help": "mode topk: trainable top decoder layers of the policy (Coste et al. 2024: 2)"})
    policy_dtype: str = field(default="float32", metadata={
        "help": "float32 | bfloat16 (frozen base, lora only) | auto (bfloat16 where bf16 is fast and mode is lora)"})
    lora_r: int = 16
    lora_alpha: int = 32
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    # --- RLOO (TRL) ---
    num_generations: int = field(default=2, metadata={"help": "k completions per prompt (BSR paper: 2)"})
    beta: float = field(default=0.05, metadata={"help": "KL coefficient (BSR paper: 0.05)"})
    learning_rate: float = 1e-5
    lr_scheduler_type: str = "constant"
    warmup_steps: int = 0
    prompts_per_step: int = field(default=4, metadata={"help": "prompts per micro-batch (x k completions)"})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    max_steps: int = field(default=20, metadata={"help": "optimizer steps"})
    max_completion_length: int = field(default=64, metadata={"help": "new tokens per completion"})
    temperature: float = 1.0
    top_p: float = field(default=1.0, metadata={"help": "1.0 keeps the KL estimate exact"})
    max_grad_norm: float = 1.0
    # --- reward scoring ---
    rm_max_length: int = field(default=512, metadata={"help": "RM input tokens; prompt cut from the left"})
    rm_batch_size: int = 16
    # --- tracking ---
    track_every: int = field(default=5, metadata={"help": "record eval metrics every N optimizer steps"})
    eval_samples_per_prompt: int = field(default=2, metadata={"help": "completions per evaluation prompt"})
    eval_batch_size: int = 16
    # --- checkpoints, precision, seed ---
    save_steps: int = 10
    save_total_limit: int = 2
    logging_steps: int = 1
    bf16: bool | str = "auto"
    use_cpu: bool = field(default_factory=lambda: not torch.cuda.is_available())
    seed: int = 0

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} is not allowed; allowed: {', '.join(MODES)}")
        if self.policy_dtype not in DTYPES:
            raise ValueError(f"policy_dtype={self.policy_dtype!r} is not allowed; allowed: {', '.join(DTYPES)}")
        # "auto" resolved here (rmlib.core.precision): the saved config records what was computed
        self.bf16 = resolve_bf16(self.bf16, "cpu" if self.use_cpu else None)
        if self.policy_dtype == "auto":
            self.policy_dtype = "bfloat16" if self.bf16 and self.mode == "lora" else "float32"
        if self.policy_dtype == "bfloat16" and self.mode != "lora":
            raise ValueError("policy_dtype='bfloat16' needs mode='lora' "
                             "(full fine-tuning keeps float32 master weights)")
        self.lora_targets = tuple(self.lora_targets)
        if self.mode == "lora" and not self.lora_targets:
            raise ValueError("lora_targets must name at least one module in mode 'lora'")
        if not str(self.policy):
            raise ValueError("policy must name a model (short name, folder or hub id)")
        for name in ("lora_r", "lora_alpha", "policy_top_k_layers", "prompts_per_step", "gradient_accumulation_steps", "max_steps",
                     "max_completion_length", "rm_batch_size", "track_every", "eval_samples_per_prompt",
                     "eval_batch_size", "save_steps", "save_total_limit", "logging_steps"):
            check_number(name, getattr(self, name), low=1, integer=True)
        check_number("num_generations", self.num_generations, low=2, integer=True)
        check_number("warmup_steps", self.warmup_steps, low=0, integer=True)
        check_number("seed", self.seed, low=0, integer=True)
        check_number("rm_max_length", self.rm_max_length, low=16, integer=True)
        check_number("beta", self.beta, low=0)
        check_number("learning_rate", self.learning_rate, low=0, low_open=True)
        check_number("temperature", self.temperature, low=0, low_open=True)
        check_number("top_p", self.top_p, low=0, high=1, low_open=True)
        check_number("max_grad_norm", self.max_grad_norm, low=0)

        schedulers = [t.value for t in SchedulerType]
        if self.lr_scheduler_type not in schedulers:
            raise ValueError(f"lr_scheduler_type={self.lr_scheduler_type!r} is not allowed; allowed: "
                             f"{', '.join(schedulers)}")
        if self.bf16 and not self.use_cpu and torch.cuda.is_available() and not torch.cuda.is_bf16_supported():
            raise ValueError("bf16=True but this GPU has no bf16 support; set bf16=False")

    @property
    def completions_per_step(self) -> int:
        """Completions per optimizer step (the paper's 'global batch')."""
        return self.prompts_per_step * self.num_generations * self.gradient_accumulation_steps

    def summary(self) -> dict:
        """All fields (JSON-ready); the identity of a run together with the prompt sets' digest."""
        d = asdict(self)
        d["lora_targets"] = list(self.lora_targets)
        if self.mode != "topk":  # added with mode topk: runs of the other modes keep their identity
            d.pop("policy_top_k_layers")
        return d

    def trl_config(self, progress: bool = True):
        """The TRL ``RLOOConfig``. Fixed here: one policy update per generation (``num_iterations=1``,
        on-policy as in the paper), no dataset shuffling (``prompt_stream`` orders the prompts), no
        gradient checkpointing and dropout off (old and new log-probs of a batch agree), ``use_cpu``
        and bf16 explicit (TRL's defaults are bf16=True and gradient checkpointing on)."""

        return RLOOConfig(
            output_dir=self.output_dir, per_device_train_batch_size=self.prompts_per_step * self.num_generations,
            gradient_accumulation_steps=self.gradient_accumulation_steps, num_generations=self.num_generations,
            beta=self.beta, learning_rate=self.learning_rate, lr_scheduler_type=self.lr_scheduler_type,
            warmup_steps=self.warmup_steps, max_steps=self.max_steps, max_completion_length=self.max_completion_length,
            temperature=self.temperature, top_p=self.top_p, top_k=0, max_grad_norm=self.max_grad_norm,
            num_iterations=1, shuffle_dataset=False, remove_unused_columns=False, disable_dropout=True,
            activation_checkpointing=False, bf16=self.bf16, use_cpu=self.use_cpu, seed=self.seed,
            logging_steps=self.logging_steps, save_strategy="steps", save_steps=self.save_steps,
            save_total_limit=self.save_total_limit, report_to="none", dataloader_num_workers=0,
            disable_tqdm=not progress, normalize_advantages=False, log_completions=False,
            # mode topk: the policy is passed loaded (rmlib.rloo.shared_bottom), TRL loads nothing
            model_init_kwargs=None if self.mode == "topk" else {"dtype": self.policy_dtype},
        )
