"""Reward model = causal-LM backbone + reward head on the last real token's final hidden state.

r(x, y) = head(h(x, y)), h = final-layer (post-norm) hidden state of the last attended token.
For a linear head W_p this is r = ||W_p|| * ||h|| * cos(psi) (BSR paper, Hong et al. 2025 §4).
GRM (Yang et al. 2024) keeps the LM head and computes the summed response-token log-probs
log pi(y|x) in the same forward pass, for its text-generation regularizers.

Fine-tuning modes: ``full``; ``lora`` (peft; LM head frozen, as in GRM); ``topk`` (only the top
k decoder layers + final norm trainable); ``frozen`` (head only).
Pooling uses the attention mask, never the pad id: SmolLM2's pad token equals its EOS
(``<|im_end|>``, id 2), which also appears inside every multi-turn chat.
"""

from __future__ import annotations

import copy
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
from transformers.initialization import no_init_weights

from rmlib.model import assets
from rmlib.model.layers import check_frozen_below, top_forward
from rmlib.model.logprobs import response_logps

HEADS = ("linear", "mlp")


MODES = ("full", "lora", "topk", "frozen")


RMLIB_CONFIG = "rmlib_reward.json"


HEAD_WEIGHTS = "reward_head.safetensors"


LM_HEAD_WEIGHTS = "lm_head.safetensors"


@dataclass
class RewardOutput:
    rewards: torch.Tensor  # (N,) float32
    hidden: torch.Tensor  # (N, H) last-token final hidden state
    logps: torch.Tensor | None = None  # (N,) summed response-token log-probs, or None


def last_token_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """Index of the rightmost attended token per row (works for left and right padding). (N,)"""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (attention_mask.long() * (positions + 1)).argmax(dim=-1)


def pool_last_token(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(N, T, H) -> (N, H): the hidden state of the last real token (by attention mask, not pad id)."""
    idx = last_token_index(attention_mask)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), idx]


def make_head(kind: str, hidden_size: int, dropout: float = 0.1) -> nn.Module:
    """``linear``: Linear(H, 1, no bias), init N(0, 1/(H+1)) (BSR paper).
    ``mlp``: Dropout(0.1) -> Linear(H, 1024) -> ReLU -> Linear(1024, 1) (GRM official default)."""
    if kind == "linear":
        head = nn.Linear(hidden_size, 1, bias=False)
        nn.init.normal_(head.weight, mean=0.0, std=math.sqrt(1.0 / (hidden_size + 1)))
        return head
    if kind == "mlp":
        return nn.Sequential(nn.Dropout(dropout), nn.Linear(hidden_size, 1024), nn.ReLU(), nn.Linear(1024, 1))
    raise ValueError(f"unknown head {kind!r}; allowed: {', '.join(HEADS)}")


class RewardModel(nn.Module):
    """Backbone (a causal LM, possibly peft-wrapped) + reward head; see module docstring."""

    def __init__(self, lm: nn.Module, head: str = "linear", keep_lm_head: bool = False, base_model: str = ""):
        super().__init__()
        self.lm = lm
        self.head_kind = head
        self.keep_lm_head = keep_lm_head
        self.base_model = base_model
        self.head = make_head(head, self.config.hidden_size)
        self.frozen_layers = 0  # decoder layers (with the embeddings) that never train: see apply_mode
        self._reference: list[nn.Module] = []  # frozen reference LM for the DPO regularizer, unregistered

    # -- structure -------------------------------------------------------------------------
    @property
    def causal_lm(self) -> nn.Module:
        """The transformers causal LM (inside a peft wrapper if any)."""
        return self.lm.get_base_model() if hasattr(self.lm, "get_base_model") else self.lm

    @property
    def config(self):
        return self.causal_lm.config

    @property
    def decoder(self) -> nn.Module:
        """The transformer without its LM head (LlamaModel etc.)."""
        return self.causal_lm.model

    @property
    def lm_head(self) -> nn.Module:
        return self.causal_lm.get_output_embeddings()

    @property
    def _no_split_modules(self):
        """The backbone's decoder-layer class names: FSDP's TRANSFORMER_BASED_WRAP (accelerate) wraps
        each such layer without the config naming the class."""
        return getattr(self.causal_lm, "_no_split_modules", None)

    @property
    def is_peft(self) -> bool:
        return hasattr(self.lm, "get_base_model")

    # -- forward ---------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        response_mask: torch.Tensor | None = None,
        return_logps: bool = False,
        hidden_in: torch.Tensor | None = None,
        start_layer: int | None = None,
    ) -> RewardOutput:
        """Rewards (N,) of right- or left-padded sequences (N, T); ``return_logps``: also the summed
        response-token log-probs (needs ``response_mask``). ``hidden_in`` (N, T, H): the stored input
        of decoder layer ``start_layer`` (``rmlib.model.bottom_store``), so only the layers above it run."""
        if hidden_in is not None:

            check_frozen_below(self, start_layer)
            weight = self.decoder.embed_tokens.weight  # the residual stream's dtype in the plain path
            hidden = top_forward(self, hidden_in.to(device=weight.device, dtype=weight.dtype), attention_mask,
                                 start_layer)
        else:
            hidden = self.decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        h = pool_last_token(hidden, attention_mask)  # (N, H)
        rewards = self.head(h).squeeze(-1).float()  # (N,)
        logps = None
        if return_logps:
            if response_mask is None:
                raise ValueError("return_logps=True needs response_mask (1 on reply tokens)")
            logps = response_logps(self.lm_head, hidden, input_ids, response_mask)
        return RewardOutput(rewards=rewards, hidden=h, logps=logps)

    @torch.no_grad()
    def reference_logps(self, input_ids, attention_mask, response_mask) -> torch.Tensor:
        """log pi_ref(y|x) under the frozen initial model (peft: adapters disabled; else a frozen copy)."""
        if self.is_peft:
            with self.lm.disable_adapter():
                hidden = self.decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
                return response_logps(self.lm_head, hidden.last_hidden_state, input_ids, response_mask)
        if not self._reference:
            raise RuntimeError("no reference model: call attach_reference() before using the 'dpo' regularizer")
        ref = self._reference[0]
        if next(ref.parameters()).device != input_ids.device:
            ref.to(input_ids.device)
        hidden = ref.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        return response_logps(ref.get_output_embeddings(), hidden, input_ids, response_mask)

    def attach_reference(self) -> None:
        """Keep a frozen copy of the current (initial) causal LM as DPO reference (not a submodule)."""
        if self.is_peft or self._reference:
            return
        ref = copy.deepcopy(self.causal_lm).eval()
        for p in ref.parameters():
            p.requires_grad_(False)
        self._reference = [ref]

    def head_weight_norm(self) -> float:
        """||W_p|| for a linear head; for the MLP head, the norm of its last layer."""
        last = self.head if isinstance(self.head, nn.Linear) else self.head[-1]
        return float(last.weight.detach().float().norm())

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """Only the parameters that train (what a Trainer checkpoint needs to resume)."""
        return {n: p.detach().clone().contiguous() for n, p in self.named_parameters() if p.requires_grad}


# -- building ---------------------------------------------------------------------------------
@dataclass
class ModelSpec:
    """How to build a reward model. Saved inside every checkpoint."""

    backbone: str = assets.DEFAULT_MODEL
    head: str = "linear"
    mode: str = "full"
    top_k_layers: int = 4
    lora_r: int = 32
    lora_alpha: int = 64
    lora_dropout: float = 0.05
    lora_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")
    keep_lm_head: bool = False

    def __post_init__(self):
        if self.head not in HEADS:
            raise ValueError(f"head={self.head!r} is not allowed; allowed: {', '.join(HEADS)}")
        if self.mode not in MODES:
            raise ValueError(f"mode={self.mode!r} is not allowed; allowed: {', '.join(MODES)}")
        if self.mode == "topk" and self.top_k_layers < 1:
            raise ValueError(f"top_k_layers={self.top_k_layers} must be >= 1 in mode 'topk'")
        self.lora_targets = tuple(self.lora_targets)


def apply_mode(model: RewardModel, spec: ModelSpec) -> RewardModel:
    """Set requires_grad (and wrap with LoRA) according to ``spec.mode``. The head always trains."""
    if spec.mode == "lora":

        cfg = LoraConfig(
            r=spec.lora_r, lora_alpha=spec.lora_alpha, lora_dropout=spec.lora_dropout,
            target_modules=list(spec.lora_targets), bias="none",
        )
        model.lm = get_peft_model(model.lm, cfg)  # freezes the base, LM head included
    elif spec.mode in ("topk", "frozen"):
        for p in model.lm.parameters():
            p.requires_grad_(False)
        if spec.mode == "topk":
            layers = model.decoder.layers
            if spec.top_k_layers > len(layers):
                raise ValueError(f"top_k_layers={spec.top_k_layers} exceeds the model's {len(layers)} layers")
            for layer in list(layers)[len(layers) - spec.top_k_layers :]:
                for p in layer.parameters():
                    p.requires_grad_(True)
            for p in model.decoder.norm.parameters():
                p.requires_grad_(True)
    for p in model.head.parameters():
        p.requires_grad_(True)
    n_layers = len(model.decoder.layers)
    model.frozen_layers = {"topk": n_layers - spec.top_k_layers, "frozen": n_layers}.get(spec.mode, 0)
    return model


def build_reward_model(spec: ModelSpec, lm: nn.Module | None = None, seed: int | None = None) -> RewardModel:
    """Load the backbone (fp32 master weights), add the head, apply the fine-tuning mode."""
    if seed is not None:
        torch.manual_seed(seed)
    if lm is None:
        lm = assets.load_causal_lm(spec.backbone, dtype=torch.float32)
    model = RewardModel(lm, head=spec.head, keep_lm_head=spec.keep_lm_head, base_model=spec.backbone)
    return apply_mode(model, spec)


# -- saving and loading -----------------------------------------------------------------------
def _merged_causal_lm(model: RewardModel) -> nn.Module:
    """A standalone causal LM with any LoRA adapters merged (the model itself is left untouched)."""
    if model.is_peft:
        return copy.deepcopy(model.lm).merge_and_unload()
    return model.causal_lm


def save_reward_model(
    model: RewardModel, out_dir: str | os.PathLike, tokenizer=None, dtype: torch.dtype = torch.bfloat16,
    extra: dict | None = None,
) -> Path:
    """Export a reward model (LoRA merged), atomically.

    - linear head: the folder is a plain ``AutoModelForSequenceClassification`` checkpoint
      (``score.weight`` = W_p), which transformers loads and scores with no rmlib code;
    - mlp head: a causal-LM checkpoint + ``reward_head.safetensors``; load with
      ``rmlib.model.reward_model.load_reward_model``.
    Both carry ``rmlib_reward.json`` (head, base model, ``extra`` such as the training config).
    """

    out_dir = Path(out_dir)
    lm = _merged_causal_lm(model)
    meta = {"head": model.head_kind, "keep_lm_head": model.keep_lm_head, "base_model": model.base_model,
            "frozen_layers": model.frozen_layers, "dtype": str(dtype).removeprefix("torch."), "extra": extra or {}}

    def write(tmp: Path) -> None:
        tied = bool(getattr(lm.config, "tie_word_embeddings", False))
        if model.head_kind == "linear":
            cfg = copy.deepcopy(lm.config)
            cfg.num_labels = 1
            cfg.architectures = None
            if tokenizer is not None and tokenizer.pad_token_id is not None:
                cfg.pad_token_id = tokenizer.pad_token_id

            with no_init_weights():  # every weight is copied in below: skip the random init (seconds)
                cls = AutoModelForSequenceClassification.from_config(cfg)
            cls.model.load_state_dict(lm.model.state_dict())
            with torch.no_grad():
                cls.score.weight.copy_(model.head.weight)
            cls.to(dtype).save_pretrained(tmp)
            meta["format"] = "sequence_classification"
            if not tied:  # a seq-cls checkpoint has no LM head: keep it beside for GRM reloads
                save_file({"weight": lm.get_output_embeddings().weight.detach().to(dtype).contiguous()},
                          str(tmp / LM_HEAD_WEIGHTS))
        else:
            lm_copy = copy.deepcopy(lm).to(dtype)
            lm_copy.save_pretrained(tmp)
            save_file({k: v.detach().to(dtype).contiguous() for k, v in model.head.state_dict().items()},
                      str(tmp / HEAD_WEIGHTS))
            meta["format"] = "causal_lm+head"
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / RMLIB_CONFIG).write_text(json.dumps(meta, indent=2, default=str))

    return assets._atomic_save_dir(out_dir, write)


def load_reward_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> RewardModel:
    """Load a reward model written by ``save_reward_model`` (any head), ready to score."""

    path = Path(path)
    meta_file = path / RMLIB_CONFIG
    if not meta_file.exists():
        raise FileNotFoundError(f"{path} is not an rmlib reward model: {RMLIB_CONFIG} is missing")
    meta = json.loads(meta_file.read_text())
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    if (path / LM_HEAD_WEIGHTS).exists():
        with torch.no_grad():
            lm.get_output_embeddings().weight.copy_(load_file(str(path / LM_HEAD_WEIGHTS))["weight"])
    model = RewardModel(lm, head=meta["head"], keep_lm_head=meta.get("keep_lm_head", False),
                        base_model=meta.get("base_model", ""))
    if meta["format"] == "sequence_classification":

        weights = {}
        for f in sorted(path.glob("*.safetensors")):
            with safe_open(str(f), framework="pt") as sf:
                if "score.weight" in sf.keys():
                    weights["weight"] = sf.get_tensor("score.weight")
        model.head.load_state_dict({k: v.to(dtype) for k, v in weights.items()})
    else:
        model.head.load_state_dict({k: v.to(dtype) for k, v in load_file(str(path / HEAD_WEIGHTS)).items()})
    model.to(dtype)
    freeze_bottom(model, int(meta.get("frozen_layers", 0)))
    model.rmlib_meta = meta
    return model.eval()


def freeze_bottom(model: RewardModel, layers: int) -> RewardModel:
    """Freeze the embeddings and the bottom ``layers`` decoder layers (as trained in mode topk/frozen),
    so the model scores (and trains further) through the shared bottom store of ``rmlib.model.bottom_store``."""
    if layers <= 0:
        return model
    for module in [model.decoder.embed_tokens, *list(model.decoder.layers)[:layers]]:
        for p in module.parameters():
            p.requires_grad_(False)
    model.frozen_layers = layers
    return model


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
