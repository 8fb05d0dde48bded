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
  template exactly as Best-of-N scores samples (``rmlib.bon.sample_sequences``: ``format_prompt``
  + ``format_reply``, prompt cut from the left at ``max_length``), then scored by
  ``rmlib.scoring.score_token_sequences``. Policy, proxy and gold tokenizers may all differ.
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
own ``torch.Generator`` seeded by hash(seed, p, s) at every tracked step (``rmlib.bon.RowSampler``):
the same uniforms drive a row's draws at every record, which couples consecutive records and
lowers the noise of step-to-step differences; and the global RNG that the training loop uses is
never touched (a resumed run samples the same training completions as an uninterrupted one).

Resume. ``<output_dir>/rloo_records.jsonl`` is rewritten atomically after each record and copied
into every ``checkpoint-N`` folder. A resumed run reloads the records of the checkpoint it resumes
from and drops newer ones, so its curves equal an uninterrupted run's. The training prompts are
laid out as one stream (``prompt_stream``: successive seeded permutations of the pool) read in
order, so resuming never depends on the sampler state of an epoch boundary.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import logging
import math
import numbers
import os
import re
import time
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm import tqdm
from transformers import TrainerCallback
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from rmlib import assets, bon
from rmlib.bon import RowSampler, sample_sequences, split_response
from rmlib.encoding import format_prompt, pad_sequences
from rmlib.precision import resolve_bf16
from rmlib.results import read_json, write_json_atomic, write_table_atomic, write_text_atomic
from rmlib.scoring import autocast, score_token_sequences

logger = logging.getLogger(__name__)

MODES = ("lora", "full")
DTYPES = ("float32", "bfloat16", "auto")
PROMPT_SOURCES = ("alpaca_eval", "hh-rlhf")
RECORDS_FILE = "rloo_records.jsonl"
CONFIG_FILE = "rmlib_rloo_config.json"
RESULT_FILE = "result.json"
CURVES_FILE = "curves.csv"
# one number per record (the tidy curves); "samples" holds the per-completion details
CURVE_COLUMNS = ["step", "epoch", "proxy", "proxy_sem", "gold", "gold_sem", "proxy_delta", "proxy_delta_sem",
                 "gold_delta", "gold_delta_sem", "proxy_std0", "gold_std0", "kl", "kl_sem", "kl_k1", "kl_k1_sem",
                 "length_tokens", "length_chars", "finished_frac", "gold_win_rate", "n_samples"]


# -- prompts ----------------------------------------------------------------------------------------
def _prompt_id(source: str, text: str) -> str:
    return f"{source}:{hashlib.sha1(text.encode()).hexdigest()[:12]}"


def first_user_turn(messages) -> str | None:
    """The text of the first user message of a conversation (None if there is none)."""
    for m in messages or []:
        if m.get("role") == "user":
            return str(m.get("content", "")).strip()
    return None


def rm_training_prompts(pairs) -> set[str]:
    """First user turns of a pair dataset's prompts: pass as ``exclude`` to keep RM-training
    prompts out of the RLOO prompt sets."""
    return {t for t in (first_user_turn(p) for p in pairs["prompt"]) if t}


def exclusion_texts(items) -> set[str]:
    """Prompt texts to exclude, from any mix of: plain texts, chat-message lists, or prompt keys
    (``rmlib.gold.prompt_key``: JSON lists of [role, content]). Conversations contribute their
    first user turn (what an RLOO prompt from that conversation would be)."""
    out = set()
    for item in items:
        if isinstance(item, str) and item.startswith("[["):
            try:
                item = [{"role": r, "content": c} for r, c in json.loads(item)]
            except (ValueError, TypeError):
                pass  # a text that merely starts with "[["
        text = first_user_turn(item) if isinstance(item, list) else str(item).strip()
        if text:
            out.add(text)
    return out


def prompt_candidates(sources=PROMPT_SOURCES) -> list[dict]:
    """Single-turn prompts ``{"source", "text"}`` from the Best-of-N sources, in source order:
    ``alpaca_eval`` (the 805 AlpacaEval instructions), ``hh-rlhf`` (first human turn of each
    HH-RLHF harmless conversation)."""
    sources = list(sources)
    bad = [s for s in sources if s not in PROMPT_SOURCES]
    if bad or not sources:
        raise ValueError(f"prompt sources {bad or sources!r} not allowed; allowed: {', '.join(PROMPT_SOURCES)}")
    out = []
    for source in sources:
        if source == "alpaca_eval":
            from rmlib.data import load_alpaca_eval_responses

            texts = sorted(set(load_alpaca_eval_responses().dataset["instruction"]))
        else:
            from rmlib.data import load_hh_rlhf

            texts = [first_user_turn(p) for p in load_hh_rlhf().dataset["prompt"]]
        out += [{"source": source, "text": t.strip()} for t in texts if t and t.strip()]
    return out


@dataclass
class PromptSets:
    """Training prompts and the fixed evaluation prompts (disjoint by text), plus what was left out.

    Each prompt: ``{"prompt_id", "source", "text", "prompt": [{"role": "user", "content": text}]}``."""

    train: list[dict]
    eval: list[dict]
    report: dict

    def digest(self) -> str:
        """Hash of both sets (ids in order): part of a run's identity."""
        ids = [p["prompt_id"] for p in self.train] + ["|"] + [p["prompt_id"] for p in self.eval]
        return hashlib.sha1("\n".join(ids).encode()).hexdigest()[:16]


def split_prompts(candidates: list[dict], n_train: int, n_eval: int, seed: int = 0, exclude=(),
                  tokenizer=None, max_prompt_tokens: int | None = None) -> PromptSets:
    """Deterministic train / evaluation prompt sets from ``candidates`` (``{"source", "text"}``).

    Texts are stripped and de-duplicated (a text in several sources keeps the alphabetically
    first source), ``exclude`` texts removed (anything ``exclusion_texts`` reads), and with
    ``tokenizer`` + ``max_prompt_tokens`` the prompts whose chat-formatted length exceeds it
    removed (all counted in ``report``); the rest is sorted by text (so the input order does not
    matter) and shuffled with ``seed``. The first ``n_eval`` form the evaluation set, the next
    ``n_train`` the training set: the evaluation set does not change when ``n_train`` does.
    Raises naming the numbers when too few prompts are left.
    """
    for name, value, low in (("n_train", n_train, 1), ("n_eval", n_eval, 1)):
        if not isinstance(value, (int, np.integer)) or value < low:
            raise ValueError(f"{name} must be an integer >= {low}, got {value!r}")
    if max_prompt_tokens is not None and (tokenizer is None or max_prompt_tokens < 1):
        raise ValueError(f"max_prompt_tokens={max_prompt_tokens!r} needs a tokenizer and must be >= 1")
    excluded = exclusion_texts(exclude)
    seen: dict[str, str] = {}
    report = {"candidates": len(candidates), "duplicates": 0, "excluded": 0, "too_long": 0}
    for source, text in sorted((str(c["source"]), str(c["text"]).strip()) for c in candidates):
        if not text:
            continue
        if text in seen:
            report["duplicates"] += 1
        elif text in excluded:
            report["excluded"] += 1
            seen[text] = ""  # counted once
        else:
            seen[text] = source
    kept = sorted((t, s) for t, s in seen.items() if s)
    if max_prompt_tokens is not None:
        def fits(text):
            ids = tokenizer(format_prompt(tokenizer, [{"role": "user", "content": text}]),
                            add_special_tokens=False)["input_ids"]
            return len(ids) <= max_prompt_tokens
        ok = [fits(t) for t, _ in kept]
        report["too_long"] = ok.count(False)
        kept = [k for k, good in zip(kept, ok) if good]
    if n_train + n_eval > len(kept):
        raise ValueError(f"n_train={n_train} + n_eval={n_eval} exceeds the {len(kept)} usable prompts "
                         f"({report})")
    order = np.random.default_rng(seed).permutation(len(kept))
    rows = [{"prompt_id": _prompt_id(s, t), "source": s, "text": t, "prompt": [{"role": "user", "content": t}]}
            for t, s in (kept[i] for i in order[: n_eval + n_train])]
    report.update(usable=len(kept), n_train=n_train, n_eval=n_eval, seed=seed)
    return PromptSets(train=rows[n_eval:], eval=rows[:n_eval], report=report)


def build_prompt_sets(n_train: int, n_eval: int, seed: int = 0, sources=PROMPT_SOURCES, exclude=(),
                      tokenizer=None, max_prompt_tokens: int | None = None) -> PromptSets:
    """``split_prompts`` of ``prompt_candidates(sources)``: the RLOO training and evaluation prompts."""
    return split_prompts(prompt_candidates(sources), n_train, n_eval, seed, exclude, tokenizer, max_prompt_tokens)


def prompt_stream(prompts: list[dict], n: int, seed: int = 0) -> list[dict]:
    """``n`` prompts read in order by training: successive passes over ``prompts``, each pass a
    permutation seeded by (seed, pass number). The trainer reads this list without shuffling."""
    if not prompts:
        raise ValueError("no training prompts")
    out: list[dict] = []
    k = 0
    while len(out) < n:
        perm = np.random.default_rng([seed, k]).permutation(len(prompts))
        out += [prompts[i] for i in perm]
        k += 1
    return out[:n]


# -- reward models as TRL reward functions ------------------------------------------------------------
@lru_cache(maxsize=16)
def _tokenizer(name_or_path: str, version: int = 0):
    """``assets.load_tokenizer``, loaded once per (name, ``version``: the files' mtime) in a
    process; callers must not modify it (copy first)."""
    return assets.load_tokenizer(name_or_path)


def _version(folder) -> int:
    f = Path(folder) / "tokenizer_config.json"
    return f.stat().st_mtime_ns if f.exists() else 0


def _rm_tokenizer(path: Path):
    if (path / "tokenizer_config.json").exists():
        return _tokenizer(str(path.resolve()), _version(path))
    meta = read_json(path / "rmlib_reward.json")
    base = meta.get("base_model") or assets.DEFAULT_MODEL
    logger.info("%s has no tokenizer; using the base model's (%s)", path, base)
    return _tokenizer(base)


def check_reward_model_dir(path, role: str = "reward model", hint: str = "") -> Path:
    """``path`` as a Path if it holds an rmlib reward model (``rmlib_reward.json``); else a
    FileNotFoundError naming the folder, its role, and ``hint`` (what produces it)."""
    p = Path(path)
    if not (p / "rmlib_reward.json").exists():
        what = "does not exist" if not p.exists() else "is not an rmlib reward model (no rmlib_reward.json)"
        raise FileNotFoundError(f"{role} folder {p} {what}" + (f"; {hint}" if hint else ""))
    return p


class RewardModelFunction:
    """An rmlib reward model as a TRL reward function: ``f(prompts, completions, **kw) -> list[float]``.

    ``prompts``: chat messages per row; ``completions``: TRL's conversational completions
    (``[{"role": "assistant", "content": text}]``) or plain strings. The RM scores
    prompt + reply formatted with ITS tokenizer's chat template (``rmlib.bon.sample_sequences``),
    the prompt cut from the left at ``max_length``. Not an ``nn.Module`` on purpose: TRL would
    then re-tokenize with its own pooling (first pad id), which is wrong when pad == eos.
    """

    def __init__(self, model, tokenizer, name: str = "reward", max_length: int | None = 512, batch_size: int = 16,
                 bf16: bool | str = "auto"):
        if max_length is not None and max_length < 16:
            raise ValueError(f"max_length={max_length} must be >= 16 (or None: no truncation)")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.__name__ = name  # TRL logs rewards/<name>/mean
        self.max_length = max_length
        self.batch_size = batch_size
        self.bf16 = resolve_bf16(bf16, next(model.parameters()).device)

    @classmethod
    def from_dir(cls, path, name: str = "reward", device=None, hint: str = "", dtype: torch.dtype | None = None,
                 **kwargs) -> "RewardModelFunction":
        """Load a folder written by ``rmlib.models.save_reward_model`` (any head, GRM included).
        ``dtype``: default bfloat16 when ``bf16`` resolves true (the saved precision; no casts per call), else float32."""
        from rmlib.models import load_reward_model

        path = check_reward_model_dir(path, name, hint)
        if dtype is None:
            dtype = torch.bfloat16 if resolve_bf16(kwargs.get("bf16", "auto"), device) else torch.float32
        model = load_reward_model(path, dtype=dtype)
        if device is not None:
            model.to(device)
        return cls(model, _rm_tokenizer(path), name=name, **kwargs)

    def score(self, prompts: list[list[dict]], replies: list[str], progress: bool = False) -> np.ndarray:
        """Rewards of (messages, reply text) rows, in order: (N,) float32."""
        if len(prompts) != len(replies):
            raise ValueError(f"{len(prompts)} prompts but {len(replies)} replies")
        if not len(prompts):
            return np.zeros(0, np.float32)
        for p in prompts:
            if not (isinstance(p, list) and p and isinstance(p[0], dict)):
                raise TypeError(f"prompts must be chat messages (lists of {{'role', 'content'}} dicts), got {p!r:.80}")
        keys = [json.dumps(p, sort_keys=True, ensure_ascii=False) for p in prompts]
        frame = pd.DataFrame({"prompt_id": keys, "sample_index": range(len(keys)), "messages": list(prompts),
                              "response": list(replies)})
        seqs = sample_sequences(self.tokenizer, frame, self.max_length)
        return score_token_sequences(self.model, seqs, batch_size=self.batch_size, bf16=self.bf16,
                                     progress=progress, desc=f"scoring ({self.__name__})")

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        replies = [c[-1]["content"] if isinstance(c, list) else str(c) for c in completions]
        return [float(x) for x in self.score(list(prompts), replies)]


# -- configuration ----------------------------------------------------------------------------------
def _check_number(name, value, low=None, high=None, low_open=False, integer=False) -> None:
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
    mode: str = field(default="lora", metadata={"help": "lora | full fine-tuning of the policy"})
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
        # "auto" resolved here (rmlib.precision): the saved config records what was computed
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
        for name in ("lora_r", "lora_alpha", "prompts_per_step", "gradient_accumulation_steps", "max_steps",
                     "max_completion_length", "rm_batch_size", "track_every", "eval_samples_per_prompt",
                     "eval_batch_size", "save_steps", "save_total_limit", "logging_steps"):
            _check_number(name, getattr(self, name), low=1, integer=True)
        _check_number("num_generations", self.num_generations, low=2, integer=True)
        _check_number("warmup_steps", self.warmup_steps, low=0, integer=True)
        _check_number("seed", self.seed, low=0, integer=True)
        _check_number("rm_max_length", self.rm_max_length, low=16, integer=True)
        _check_number("beta", self.beta, low=0)
        _check_number("learning_rate", self.learning_rate, low=0, low_open=True)
        _check_number("temperature", self.temperature, low=0, low_open=True)
        _check_number("top_p", self.top_p, low=0, high=1, low_open=True)
        _check_number("max_grad_norm", self.max_grad_norm, low=0)
        from transformers import SchedulerType

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
        return d

    def trl_config(self, progress: bool = True):
        """The TRL ``RLOOConfig``. Fixed here: one policy update per generation (``num_iterations=1``,
        on-policy as in the paper), no dataset shuffling (``prompt_stream`` orders the prompts), no
        gradient checkpointing and dropout off (old and new log-probs of a batch agree), ``use_cpu``
        and bf16 explicit (TRL's defaults are bf16=True and gradient checkpointing on)."""
        from trl import RLOOConfig

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
            model_init_kwargs={"dtype": self.policy_dtype},
        )


# -- evaluation-time sampling and log-probs -----------------------------------------------------------
def _row_seed(seed: int, prompt_id: str, sample_index: int) -> int:
    digest = hashlib.sha256(f"rloo-eval\x00{seed}\x00{prompt_id}\x00{sample_index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _causal_lm(model):
    """The transformers causal LM inside peft / torch.compile / DDP wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(getattr(model, "module", None), torch.nn.Module):
            model = model.module
        elif hasattr(model, "get_base_model"):
            model = model.get_base_model()
        else:
            return model


def _stop_ids(model, tokenizer) -> list[int]:
    ids = {int(tokenizer.eos_token_id)} if tokenizer.eos_token_id is not None else set()
    eos = getattr(getattr(_causal_lm(model), "generation_config", None), "eos_token_id", None)
    if eos is not None:
        ids.update(int(x) for x in (eos if isinstance(eos, (list, tuple)) else [eos]))
    if not ids:
        raise ValueError("neither the tokenizer nor the policy's generation_config has an EOS token")
    return sorted(ids)


@torch.no_grad()
def sample_completions(policy, tokenizer, prompt_ids: list[list[int]], seeds: list[int], max_new_tokens: int,
                       temperature: float = 1.0, top_p: float = 1.0, batch_size: int = 16, bf16: bool | str = "auto",
                       progress: bool = False) -> list[tuple[list[int], bool]]:
    """One sampled completion per row: (ids up to and including the stop token if one was
    generated, finished). Row i draws from its own generator seeded by ``seeds[i]``
    (``rmlib.bon.RowSampler``), so rows do not depend on their batch or on the global RNG."""
    from transformers import GenerationConfig, LogitsProcessorList

    stop = _stop_ids(policy, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stop[0]
    device = next(policy.parameters()).device
    gen_cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=stop,
                               pad_token_id=pad_id, repetition_penalty=1.0, use_cache=True)
    order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))  # similar lengths share a batch
    out: list[tuple[list[int], bool] | None] = [None] * len(prompt_ids)
    was_training = policy.training
    policy.eval()
    try:
        for start in tqdm(range(0, len(order), batch_size), desc="eval sampling", disable=not progress,
                          unit="batch"):
            idx = order[start : start + batch_size]
            width = max(len(prompt_ids[i]) for i in idx)
            ids = torch.full((len(idx), width), pad_id, dtype=torch.long)
            mask = torch.zeros((len(idx), width), dtype=torch.long)
            for r, i in enumerate(idx):  # left padding for generation
                ids[r, width - len(prompt_ids[i]):] = torch.tensor(prompt_ids[i])
                mask[r, width - len(prompt_ids[i]):] = 1
            gens = [torch.Generator(device=device).manual_seed(seeds[i]) for i in idx]
            with autocast(device, bf16):
                seq = policy.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                                      generation_config=gen_cfg,
                                      logits_processor=LogitsProcessorList([RowSampler(gens, temperature, top_p)]))
            for r, i in enumerate(idx):
                new = seq[r, width:].tolist()
                reply, finished = split_response(new, stop)
                out[i] = (reply + [new[len(reply)]] if finished else reply, finished)
    finally:
        policy.train(was_training)
    return out  # type: ignore[return-value]


def _completion_hidden(model, prompt_ids, completion_ids, bf16: bool):
    """Final hidden states at the positions that predict completion tokens, for one batch.

    Returns h (M, H), the predicted tokens y (M,) and each position's row (M,). Sequences are
    right-padded, so positions run 0..L-1 as during generation; ``model`` may be peft-wrapped
    (its layers carry the adapters, active unless disabled)."""
    inner = _causal_lm(model)
    device = next(inner.parameters()).device
    seqs = [list(p) + list(c) for p, c in zip(prompt_ids, completion_ids)]
    resp = [[0] * len(p) + [1] * len(c) for p, c in zip(prompt_ids, completion_ids)]
    batch = pad_sequences(seqs, resp, pad_token_id=0, pad_to_multiple_of=None)
    input_ids, attn = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    with autocast(device, bf16):
        hidden = inner.base_model(input_ids=input_ids, attention_mask=attn, use_cache=False).last_hidden_state
    target = batch["response_mask"][:, 1:].bool().to(device)  # token t is predicted at position t-1
    row = torch.arange(len(seqs), device=device)[:, None].expand_as(target)[target]
    return hidden[:, :-1][target], input_ids[:, 1:][target], row


@torch.no_grad()
def completion_logps(model, prompt_ids: list[list[int]], completion_ids: list[list[int]], temperature: float = 1.0,
                     batch_size: int = 16, bf16: bool | str = "auto", chunk_tokens: int = 2048) -> np.ndarray:
    """sum_t log softmax(logits / T)[y_t] over each completion's tokens, given its prompt: (N,) float64.
    Only completion positions go through the LM head, ``chunk_tokens`` at a time."""
    lm_head = _causal_lm(model).get_output_embeddings()
    result = np.zeros(len(prompt_ids), np.float64)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(prompt_ids), batch_size):
            rows = list(range(start, min(start + batch_size, len(prompt_ids))))
            h, y, row = _completion_hidden(model, [prompt_ids[i] for i in rows], [completion_ids[i] for i in rows],
                                           bf16)
            logp = torch.zeros(len(rows), dtype=torch.float64, device=h.device)
            with autocast(h.device, bf16):
                for c in range(0, h.shape[0], chunk_tokens):
                    logits = lm_head(h[c : c + chunk_tokens]).float() / temperature  # (m, V)
                    tok = logits.log_softmax(-1).gather(-1, y[c : c + chunk_tokens, None]).squeeze(-1)
                    logp.index_add_(0, row[c : c + chunk_tokens], tok.double())
            result[rows] = logp.cpu().numpy()
    finally:
        model.train(was_training)
    return result


@torch.no_grad()
def completion_kl(policy, prompt_ids: list[list[int]], completion_ids: list[list[int]], reference=None,
                  temperature: float = 1.0, batch_size: int = 16, chunk_tokens: int = 512) -> dict[str, np.ndarray]:
    """Two per-completion KL estimates for completions y sampled from ``policy`` (pi) given x:

        kl_k1 = sum_t [log pi_T(y_t | x, y_<t) - log pi_ref,T(y_t | x, y_<t)]
        kl    = sum_t KL(pi_T(. | x, y_<t) || pi_ref,T(. | x, y_<t))   (exact over the vocabulary)

    Over y ~ pi_T both have expectation KL(pi_T(.|x) || pi_ref,T(.|x)) (chain rule); ``kl`` sums
    non-negative terms and has lower variance, since only the prefixes y_<t are sampled.
    ``reference``: the initial policy, or None for a peft policy with its adapters disabled.
    Computed in float32 (``float32_weights``), so rounding adds nothing to the sampling noise.
    Returns ``{"kl", "kl_k1", "logp", "ref_logp"}``, each (N,) float64."""
    if reference is None and not hasattr(policy, "disable_adapter"):
        raise ValueError("completion_kl needs a reference model unless the policy is a peft model")
    out = {k: np.zeros(len(prompt_ids), np.float64) for k in ("kl", "kl_k1", "logp", "ref_logp")}
    head = _causal_lm(policy).get_output_embeddings()
    ref_head = _causal_lm(reference).get_output_embeddings() if reference is not None else head
    was_training = policy.training
    policy.eval()
    try:
        with float32_weights(policy, reference):
            for start in range(0, len(prompt_ids), batch_size):
                rows = list(range(start, min(start + batch_size, len(prompt_ids))))
                p_ids, c_ids = [prompt_ids[i] for i in rows], [completion_ids[i] for i in rows]
                h, y, row = _completion_hidden(policy, p_ids, c_ids, bf16=False)
                if reference is None:
                    with policy.disable_adapter():
                        h_ref = _completion_hidden(policy, p_ids, c_ids, bf16=False)[0]
                else:
                    h_ref = _completion_hidden(reference, p_ids, c_ids, bf16=False)[0].to(h.device)
                sums = {k: torch.zeros(len(rows), dtype=torch.float64, device=h.device) for k in out}
                for c in range(0, h.shape[0], chunk_tokens):
                    sl = slice(c, c + chunk_tokens)
                    lp = (head(h[sl]).float() / temperature).log_softmax(-1)  # (m, V)
                    lr = (ref_head(h_ref[sl]).float() / temperature).log_softmax(-1)
                    tok_p = lp.gather(-1, y[sl, None]).squeeze(-1)
                    tok_r = lr.gather(-1, y[sl, None]).squeeze(-1)
                    parts = {"kl": (lp.exp() * (lp - lr)).sum(-1), "kl_k1": tok_p - tok_r, "logp": tok_p,
                             "ref_logp": tok_r}
                    for k, v in parts.items():
                        sums[k].index_add_(0, row[sl], v.double())
                for k in out:
                    out[k][rows] = sums[k].cpu().numpy()
    finally:
        policy.train(was_training)
    return out


@contextlib.contextmanager
def float32_weights(*models):
    """Temporarily hold every bf16/fp16 parameter and buffer of ``models`` in float32; restored
    exactly on exit (bf16 -> fp32 -> bf16 is lossless; the Parameter objects, hence the optimizer's
    references, are kept). For log-probs whose sums over many tokens bf16 rounding would blur."""
    low = [t for m in models if m is not None for t in (*m.parameters(), *m.buffers())
           if t.dtype in (torch.bfloat16, torch.float16)]
    dtypes = [t.dtype for t in low]
    for t in low:
        t.data = t.data.float()
    try:
        yield
    finally:
        for t, d in zip(low, dtypes):
            t.data = t.data.to(d)


# -- tracking callback --------------------------------------------------------------------------------
def _sem(x) -> float:
    x = np.asarray(x, dtype=np.float64)
    return float(x.std(ddof=1) / math.sqrt(x.size)) if x.size > 1 else math.nan


def _checkpoint_step(path: Path) -> int | None:
    m = re.fullmatch(rf"{PREFIX_CHECKPOINT_DIR}-(\d+)", path.name)
    return int(m.group(1)) if m and path.is_dir() else None


def read_records(path) -> list[dict]:
    """Records of an ``rloo_records.jsonl`` file (or of the file inside a run folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / RECORDS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def _write_records(path: Path, records: list[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


class RLOOTracker(TrainerCallback):
    """Proxy reward, gold reward, KL to the initial policy and response length on fixed evaluation
    prompts, at step 0 and every ``every_steps`` optimizer steps (and at the last step).

    A record: ``step``, ``epoch``, the ``CURVE_COLUMNS`` statistics and ``samples`` (one dict per
    completion: prompt_id, sample_index, completion, n_tokens, finished, proxy, gold, kl, kl_k1;
    see ``completion_kl``). ``length_tokens``: mean reply tokens before the end-of-turn.
    ``*_delta`` are paired differences to the step-0 completions of the same (prompt, sample)
    with their standard errors; ``gold_win_rate`` = mean of 1[gold_t > gold_0] + 0.5 * 1[equal];
    ``*_std0`` the step-0 spread of the scores (to put proxy RMs of different scale on one axis).
    Records are written like ``rmlib.norms.NormProbeCallback``'s (see the module docstring).

    ``reference``: the frozen initial policy for the KL (None: the policy is a peft model and its
    adapters are disabled).
    """

    def __init__(self, eval_prompts: list[dict], tokenizer, proxy: RewardModelFunction, gold: RewardModelFunction,
                 every_steps: int = 5, samples_per_prompt: int = 2, max_new_tokens: int = 64,
                 temperature: float = 1.0, top_p: float = 1.0, seed: int = 0, batch_size: int = 16,
                 bf16: bool | str = "auto", reference=None, config: dict | None = None, progress: bool = False):
        _check_number("every_steps", every_steps, low=1, integer=True)
        _check_number("samples_per_prompt", samples_per_prompt, low=1, integer=True)
        if not eval_prompts:
            raise ValueError("eval_prompts is empty")
        if top_p < 1.0:
            logger.warning("top_p=%s < 1: the tracked KL is then an estimate for the truncated sampler", top_p)
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
        self.records: list[dict] = []
        self.seconds = 0.0  # wall time spent recording in this process (not part of the records)
        self._prompt_ids = [tokenizer(format_prompt(tokenizer, p["prompt"]), add_special_tokens=False)["input_ids"]
                            for p in eval_prompts]

    # -- computing ------------------------------------------------------------------------------
    def measure(self, policy) -> dict:
        """Statistics of the policy on the evaluation prompts (no record kept)."""
        rows = [(i, s) for i in range(len(self.eval_prompts)) for s in range(self.samples_per_prompt)]
        prompt_ids = [self._prompt_ids[i] for i, _ in rows]
        seeds = [_row_seed(self.seed, self.eval_prompts[i]["prompt_id"], s) for i, s in rows]
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
        self._write(args, state, Path(args.output_dir) / RECORDS_FILE)
        dt = time.perf_counter() - t0
        self.seconds += dt
        logger.info("rloo tracking step %d: proxy %.4f gold %.4f kl %.4f length %.1f (%.1f s)", record["step"],
                    record["proxy"], record["gold"], record["kl"], record["length_tokens"], dt)

    def _write(self, args, state, path: Path) -> None:
        if state.is_world_process_zero:
            _write_records(path, self.records)

    def _resumed_records(self, output_dir: Path, step: int) -> list[dict]:
        ckpts = sorted((s, p) for p in output_dir.glob(f"{PREFIX_CHECKPOINT_DIR}-*")
                       if (s := _checkpoint_step(p)) is not None and s <= step)
        for path in ([ckpts[-1][1] / RECORDS_FILE] if ckpts else []) + [output_dir / RECORDS_FILE]:
            if path.exists():
                logger.info("rloo records: resuming from %s", path)
                return [r for r in read_records(path) if r["step"] <= step]
        logger.warning("rloo records: resuming at step %d but no %s found; earlier records are lost", step,
                       RECORDS_FILE)
        return []

    # -- events ---------------------------------------------------------------------------------
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step > 0:
            self.records = self._resumed_records(Path(args.output_dir), state.global_step)
            self._write(args, state, Path(args.output_dir) / RECORDS_FILE)
        else:
            self.records = []
            self._record(args, state, model)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        step = state.global_step
        if (step % self.every_steps == 0 or step == state.max_steps) and not self._has(step):
            self._record(args, state, model)

    def on_save(self, args, state, control, **kwargs):
        folder = Path(args.output_dir) / f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}"
        if folder.is_dir() and state.is_world_process_zero:
            write_json_atomic(folder / CONFIG_FILE, self.config)
            self._write(args, state, folder / RECORDS_FILE)

    def on_train_end(self, args, state, control, **kwargs):
        self._write(args, state, Path(args.output_dir) / RECORDS_FILE)

    def _has(self, step: int) -> bool:
        return bool(self.records) and self.records[-1]["step"] == step


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
    rms = {"proxy": bon.model_digest(check_reward_model_dir(config.proxy_rm)),
           "gold": bon.model_digest(check_reward_model_dir(config.gold_rm))}
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
    from peft import LoraConfig
    from trl import RLOOTrainer

    out = Path(config.output_dir)
    hint = "train it first (rmlib.train.train_reward_model writes <output_dir>/final)"
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
    from datasets import Dataset

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
            from transformers import AutoModelForCausalLM

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


def train_log_frame(log_history: list[dict], run: str | None = None) -> pd.DataFrame:
    """TRL's per-step training log (reward, kl on the training batch, completion lengths, ...)."""
    frame = pd.DataFrame([r for r in log_history if "loss" in r])
    if run is not None:
        frame.insert(0, "run", run)
    return frame


def _z(delta: float, sem: float) -> float:
    """delta / sem; +-inf for a nonzero delta with zero spread, 0 for no change, NaN if unknown."""
    if not (np.isfinite(delta) and np.isfinite(sem)):
        return math.nan
    if sem > 0:
        return float(delta / sem)
    return 0.0 if delta == 0 else math.copysign(math.inf, delta)


def summary_table(curves: pd.DataFrame) -> pd.DataFrame:
    """One row per run: its last tracked step against step 0 (``curves`` needs a ``run`` column).

    Columns: run, steps, kl, proxy_delta (+ sem, and in step-0 standard deviations), gold_delta
    (+ sem), gold_delta_z = gold_delta / gold_delta_sem, gold_win_rate, length_tokens at 0 and at
    the end, length_change (relative)."""
    rows = []
    for run, g in curves.groupby("run", sort=False):
        g = g.sort_values("step")
        first, last = g.iloc[0], g.iloc[-1]
        sem = last["gold_delta_sem"]
        rows.append({
            "run": run, "steps": int(last["step"]), "kl": last["kl"], "kl_sem": last["kl_sem"],
            "proxy_delta": last["proxy_delta"], "proxy_delta_sem": last["proxy_delta_sem"],
            "proxy_delta_in_std0": last["proxy_delta"] / first["proxy_std0"] if first["proxy_std0"] else math.nan,
            "gold_delta": last["gold_delta"], "gold_delta_sem": sem,
            "gold_delta_z": _z(last["gold_delta"], sem),
            "gold_win_rate": last["gold_win_rate"], "length_tokens_start": first["length_tokens"],
            "length_tokens_end": last["length_tokens"],
            "length_change": last["length_tokens"] / first["length_tokens"] - 1 if first["length_tokens"] else math.nan,
        })
    return pd.DataFrame(rows)


def describe_runs(table: pd.DataFrame, z: float = 2.0) -> str:
    """Plain sentences computed from ``summary_table``: per run, the gold change and whether it
    exceeds ``z`` standard errors, the proxy change, KL and length change. Claims nothing else."""
    lines = []
    for r in table.itertuples():
        if np.isnan(r.gold_delta_z):
            verdict = "no step-0 record to compare with"
        elif abs(r.gold_delta_z) >= z:
            verdict = f"{'up' if r.gold_delta > 0 else 'down'} beyond {z:g} standard errors"
        else:
            verdict = f"within {z:g} standard errors of no change"
        lines.append(
            f"- **{r.run}** (step {r.steps}, KL {r.kl:.3g} ± {r.kl_sem:.2g} nats): proxy reward "
            f"{r.proxy_delta:+.3g} ({r.proxy_delta_in_std0:+.2f} initial std); gold reward {r.gold_delta:+.3g} "
            f"± {r.gold_delta_sem:.2g} ({verdict}); gold win rate vs the initial policy {r.gold_win_rate:.2f}; "
            f"mean length {r.length_tokens_start:.1f} -> {r.length_tokens_end:.1f} tokens ({r.length_change:+.0%})."
        )
    return "\n".join(lines)


def curves_figure(curves: pd.DataFrame, title: str = ""):
    """Four panels, one line per run: proxy reward (change from step 0, in units of its step-0
    standard deviation) vs KL; gold reward change vs step and vs KL (±1 standard error of the
    paired change); mean response length vs step."""
    import matplotlib.pyplot as plt

    hue = "run" if "run" in curves.columns else None
    groups = list(curves.groupby(hue, sort=False)) if hue else [("", curves)]
    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    for name, g in groups:
        g = g.sort_values("step")
        std0 = g["proxy_std0"].iloc[0]
        proxy_z = g["proxy_delta"] / std0 if std0 else g["proxy_delta"]
        (line,) = axes[0].plot(g["kl"], proxy_z, marker="o", ms=3, label=name)
        color = line.get_color()
        axes[1].plot(g["step"], g["gold_delta"], marker="o", ms=3, color=color, label=name)
        axes[1].fill_between(g["step"], g["gold_delta"] - g["gold_delta_sem"], g["gold_delta"] + g["gold_delta_sem"],
                             color=color, alpha=0.15)
        axes[2].errorbar(g["kl"], g["gold_delta"], yerr=g["gold_delta_sem"], marker="o", ms=3, color=color,
                         capsize=2, label=name)
        axes[3].plot(g["step"], g["length_tokens"], marker="o", ms=3, color=color, label=name)
    labels = [("KL(pi || pi_0) [nats]", "proxy reward - step 0 [initial std]", "proxy reward vs KL"),
              ("step", "gold reward - step 0", "gold reward vs step"),
              ("KL(pi || pi_0) [nats]", "gold reward - step 0", "gold reward vs KL"),
              ("step", "mean response length [tokens]", "response length")]
    for ax, (x, y, t) in zip(axes, labels):
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.set_title(t)
        ax.grid(alpha=0.3)
    if hue:
        axes[0].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig
