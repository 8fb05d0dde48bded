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
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
from transformers.initialization import no_init_weights

from rmlib.model import assets
from rmlib.model.layers import check_frozen_below, top_forward
from rmlib.model.logprobs import final_logit_softcap, response_logps

HEADS = ("linear", "mlp")


MODES = ("full", "lora", "topk", "frozen")


RMLIB_CONFIG = "rmlib_reward.json"


HEAD_WEIGHTS = "reward_head.safetensors"


LM_HEAD_WEIGHTS = "lm_head.safetensors"
EXPORT_PAD_TOKEN = "<|rmlib_pad|>"  # the pad token of a linear-head export (see save_reward_model)


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
    """``linear``: Linear(H, 1, no bias), W_p ~ N(0, std = 1/sqrt(H)) (BSR official code,
    modules/utils.py ``initialize_reward_model_head``: ``nn.init.normal_(model.score.weight, mean=0.0,
    std=1/np.sqrt(model.config.hidden_size))``), so E||W_p||^2 = 1.
    ``mlp``: Dropout(0.1) -> Linear(H, 1024) -> ReLU -> Linear(1024, 1) (GRM official default)."""
    if kind == "linear":
        head = nn.Linear(hidden_size, 1, bias=False)
        nn.init.normal_(head.weight, mean=0.0, std=1.0 / math.sqrt(hidden_size))
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
        if keep_lm_head:
            final_logit_softcap(self.config)  # a logits path response_logps does not reproduce fails here
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
            logps = response_logps(self.lm_head, hidden, input_ids, response_mask, final_logit_softcap(self.config))
        return RewardOutput(rewards=rewards, hidden=h, logps=logps)

    @torch.no_grad()
    def reference_logps(self, input_ids, attention_mask, response_mask) -> torch.Tensor:
        """log pi_ref(y|x) under the frozen initial model (peft: adapters disabled; else a frozen copy)."""
        if self.is_peft:
            with self.lm.disable_adapter():
                hidden = self.decoder(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
                return response_logps(self.lm_head, hidden.last_hidden_state, input_ids, response_mask,
                                      final_logit_softcap(self.config))
        if not self._reference:
            raise RuntimeError("no reference model: call attach_reference() before using the 'dpo' regularizer")
        ref = self._reference[0]
        if next(ref.parameters()).device != input_ids.device:
            ref.to(input_ids.device)
        hidden = ref.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
        return response_logps(ref.get_output_embeddings(), hidden, input_ids, response_mask,
                              final_logit_softcap(ref.config))

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


def export_tokenizer(tokenizer):
    """A copy of ``tokenizer`` whose pad token is ``EXPORT_PAD_TOKEN`` (added if new), for the linear
    export (``save_reward_model``); the original is left as it is."""
    tok = copy.deepcopy(tokenizer)
    if tok.pad_token != EXPORT_PAD_TOKEN:
        tok.add_special_tokens({"pad_token": EXPORT_PAD_TOKEN})
    return tok


def _embedding_key(decoder: nn.Module) -> str:
    """State-dict key of the decoder's input embedding weight (``embed_tokens.weight`` for Llama)."""
    emb = decoder.get_input_embeddings()
    return next(name for name, m in decoder.named_modules() if m is emb) + ".weight"


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

    Weights are stored as ``dtype`` (bf16 by default: half the disk), but ``config.json`` records
    float32 (``assets.record_load_dtype``), so ``from_pretrained(out_dir)`` and TRL's loading of a
    reward-model path, which resolve transformers' default ``dtype="auto"`` from the config, load
    float32 weights on any machine (bf16 compute is emulated, ~3x slower, on a CPU without native
    bf16; TRL also needs ``bf16=False`` in its config there, or it autocasts to bf16: README, "Loading
    the artifacts elsewhere"); pass ``dtype=torch.bfloat16`` to compute in bf16 where it is native.
    ``load_reward_model`` picks its dtype explicitly.

    Pooling of the linear export: transformers' ``*ForSequenceClassification`` (``GenericForSequence
    Classification.forward``) scores the rightmost token whose id is not ``config.pad_token_id``,
    rmlib the last attended token. They differ on a sequence that ENDS with the pad id, e.g. a reply
    ending in EOS when pad == eos (SmolLM2: both ``<|im_end|>``, id 2; the ``reply + eos_token``
    fallback of ``format_reply``, generated samples, a cut reply). So the export pads with a token of
    its own, ``EXPORT_PAD_TOKEN``, added to the saved tokenizer (id = len(tokenizer); a zero embedding
    row appended when that id is past the embedding, so the base model cannot sample it either): no
    text the base tokenizer encodes contains it, so for every such sequence, padded with it, the two
    poolings agree. ``tokenizer`` is required for a linear head (it is what pads) and is not modified.
    ``load_reward_model`` drops the added row again.
    """
    out_dir = Path(out_dir)
    export_tok = None
    if model.head_kind == "linear":
        if tokenizer is None:
            raise ValueError("save_reward_model: a linear-head export needs tokenizer=: transformers pools on the "
                             "pad id, so the export pads with its own token (EXPORT_PAD_TOKEN), saved with it")
        export_tok = export_tokenizer(tokenizer)
    lm = _merged_causal_lm(model)
    meta = {"head": model.head_kind, "keep_lm_head": model.keep_lm_head, "base_model": model.base_model,
            "frozen_layers": model.frozen_layers, "dtype": str(dtype).removeprefix("torch."), "extra": extra or {}}

    def write(tmp: Path) -> None:
        tied = bool(getattr(lm.config, "tie_word_embeddings", False))
        if model.head_kind == "linear":
            vocab = lm.get_input_embeddings().weight.shape[0]  # rows of the trained embedding
            cfg = copy.deepcopy(lm.config)
            cfg.num_labels = 1
            cfg.architectures = None
            cfg.pad_token_id = export_tok.pad_token_id
            cfg.vocab_size = max(vocab, export_tok.pad_token_id + 1)
            with no_init_weights():  # every weight is copied in below: skip the random init (seconds)
                cls = AutoModelForSequenceClassification.from_config(cfg)
            state = lm.model.state_dict()
            key = _embedding_key(lm.model)
            extra_rows = cfg.vocab_size - vocab  # the export pad token's row, zeros (never attended to)
            state[key] = torch.cat([state[key], state[key].new_zeros(extra_rows, state[key].shape[1])])
            cls.model.load_state_dict(state)
            with torch.no_grad():
                cls.score.weight.copy_(model.head.weight)
            cls.to(dtype).save_pretrained(tmp)
            meta["format"] = "sequence_classification"
            meta["vocab_size"] = vocab  # load_reward_model drops the rows added for the pad token
            meta["pad_token_id"] = lm.config.pad_token_id
            if not tied:  # a seq-cls checkpoint has no LM head: keep it beside for GRM reloads
                save_file({"weight": lm.get_output_embeddings().weight.detach().to(dtype).contiguous()},
                          str(tmp / LM_HEAD_WEIGHTS))
        else:
            lm_copy = copy.deepcopy(lm).to(dtype)
            lm_copy.save_pretrained(tmp)
            save_file({k: v.detach().to(dtype).contiguous() for k, v in model.head.state_dict().items()},
                      str(tmp / HEAD_WEIGHTS))
            meta["format"] = "causal_lm+head"
        if model.head_kind == "linear":
            export_tok.save_pretrained(tmp)
        elif tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        assets.record_load_dtype(tmp)  # float32 for dtype="auto"; the weights stay as dtype
        (tmp / RMLIB_CONFIG).write_text(json.dumps(meta, indent=2, default=str))

    return assets._atomic_save_dir(out_dir, write)


def load_reward_model(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> RewardModel:
    """Load a reward model written by ``save_reward_model`` (any head), ready to score.

    A linear-head export is read as what it is, an ``AutoModelForSequenceClassification`` (no load
    report: reading it as a causal LM would flag ``score.weight`` UNEXPECTED), and its decoder, W_p
    and the LM head (tied, or ``lm_head.safetensors``) go into a causal LM of the trained vocabulary
    (the export's pad-token row dropped)."""
    path = Path(path)
    meta_file = path / RMLIB_CONFIG
    if not meta_file.exists():
        raise FileNotFoundError(f"{path} is not an rmlib reward model: {RMLIB_CONFIG} is missing")
    meta = json.loads(meta_file.read_text())
    if meta["format"] == "sequence_classification":
        lm, w_p = _causal_lm_from_sequence_classification(path, meta, dtype)
    else:
        lm = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    if (path / LM_HEAD_WEIGHTS).exists():
        with torch.no_grad():
            lm.get_output_embeddings().weight.copy_(load_file(str(path / LM_HEAD_WEIGHTS))["weight"])
    model = RewardModel(lm, head=meta["head"], keep_lm_head=meta.get("keep_lm_head", False),
                        base_model=meta.get("base_model", ""))
    if meta["format"] == "sequence_classification":
        model.head.load_state_dict({"weight": w_p.to(dtype)})
    else:
        model.head.load_state_dict({k: v.to(dtype) for k, v in load_file(str(path / HEAD_WEIGHTS)).items()})
    model.to(dtype)
    freeze_bottom(model, int(meta.get("frozen_layers", 0)))
    model.rmlib_meta = meta
    return model.eval()


def _causal_lm_from_sequence_classification(path: Path, meta: dict, dtype: torch.dtype) -> tuple[nn.Module, torch.Tensor]:
    """(causal LM, W_p (1, H)) from a linear-head export: the decoder of the sequence-classification
    checkpoint with its embedding cut back to ``meta["vocab_size"]`` rows, config ``pad_token_id`` as
    trained; the LM head tied to the embedding or left for ``lm_head.safetensors``."""
    cls = AutoModelForSequenceClassification.from_pretrained(path, dtype=dtype)
    cfg = copy.deepcopy(cls.config)
    key = _embedding_key(cls.model)
    state = cls.model.state_dict()
    vocab = int(meta.get("vocab_size", state[key].shape[0]))  # older exports: no rows were added
    state[key] = state[key][:vocab]
    cfg.vocab_size = vocab
    cfg.pad_token_id = meta.get("pad_token_id", cfg.pad_token_id)
    cfg.architectures = None
    with no_init_weights():  # every weight is set below
        lm = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    lm.model.load_state_dict(state, assign=True)  # the loaded tensors become the weights: no second copy
    lm.tie_weights()  # tied LM head = the embedding (no_init_weights skips the tying)
    w_p = cls.score.weight.detach().clone()
    del cls, state
    return lm, w_p


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
