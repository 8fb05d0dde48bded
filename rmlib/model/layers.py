"""Decoder maths for frozen-bottom models: run a Llama-style decoder from layer ``s`` upward, or
its bottom ``[0, s)`` alone, with the same masks and rotary positions as ``LlamaModel.forward``.
No I/O: ``rmlib.model.bottom_store`` stores what the bottom computes; ``RewardModel.forward``
runs the top on it. Also ``unwrap_causal_lm`` (the causal LM inside peft / DDP / compile
wrappers) and ``decoder_of``.
"""

from __future__ import annotations

import torch
from accelerate.utils import extract_model_from_parallel
from torch import nn
from transformers.masking_utils import create_causal_mask

SUPPORTED_MODEL_TYPES = ("llama",)


# -- the top of the decoder --------------------------------------------------------------------------
def decoder_of(model: nn.Module) -> nn.Module:
    """The transformer without LM head, from a RewardModel (``.decoder``), a *ForCausalLM or the decoder itself."""
    if isinstance(getattr(type(model), "decoder", None), property):  # rmlib RewardModel
        return model.decoder
    if hasattr(model, "layers"):
        return model
    if hasattr(model, "model"):
        return model.model
    raise NotImplementedError(f"cannot find the decoder layers of {type(model).__name__}")


def check_supported(decoder: nn.Module) -> None:
    """Raise NotImplementedError unless ``decoder`` is a Llama-style decoder this module reproduces."""
    config = getattr(decoder, "config", None)
    model_type = getattr(config, "model_type", "?")
    missing = [a for a in ("embed_tokens", "layers", "norm", "rotary_emb") if not hasattr(decoder, a)]
    layer_types = set(getattr(config, "layer_types", None) or ["full_attention"])
    if not missing and model_type in SUPPORTED_MODEL_TYPES and layer_types == {"full_attention"} \
            and getattr(config, "is_causal", True):
        return
    why = f"missing attributes {missing}" if missing else f"model_type={model_type!r}"
    hint = ""
    if model_type.startswith("gemma3") or layer_types - {"full_attention"}:
        hint = (" Gemma-3 style decoders interleave sliding-window and full-attention layers, each with"
                " its own mask (create_sliding_window_causal_mask) and rotary embedding"
                " (rotary_emb(x, pos, layer_type)); that dispatch is not implemented here.")
    raise NotImplementedError(
        f"rmlib.model.bottom_store supports Llama-style decoders (model_type in {SUPPORTED_MODEL_TYPES}); "
        f"got {type(decoder).__name__} ({why}).{hint} Use the plain RewardModel.forward path."
    )


def supported(model: nn.Module) -> bool:
    """Whether ``top_forward``/``BottomCache`` handle this model's decoder (see ``check_supported``)."""
    try:
        check_supported(decoder_of(model))
    except NotImplementedError:
        return False
    return True


def run_layers(
    decoder: nn.Module,
    hidden: torch.Tensor,
    attention_mask: torch.Tensor,
    start: int,
    stop: int,
    position_ids: torch.Tensor | None = None,
    past_key_values=None,
    keep: dict | None = None,
) -> torch.Tensor:
    """decoder.layers[start:stop] on ``hidden`` (N, T, H), built as in ``LlamaModel.forward``.

    ``attention_mask`` is 2D (N, past + T); ``position_ids`` default to 0..T-1 (right padding)
    plus the cache length. A ``past_key_values`` cache is read and extended in place. ``keep``:
    a dict whose keys are layer indices in (start, stop); each gets the hidden states entering it.
    """

    if position_ids is None:
        past = past_key_values.get_seq_length() if past_key_values is not None else 0
        position_ids = (torch.arange(hidden.shape[1], device=hidden.device) + past).unsqueeze(0)  # (1, T)
    mask = create_causal_mask(config=decoder.config, inputs_embeds=hidden, attention_mask=attention_mask,
                              past_key_values=past_key_values, position_ids=position_ids)
    position_embeddings = decoder.rotary_emb(hidden, position_ids=position_ids)  # (cos, sin)
    for i, layer in enumerate(decoder.layers[start:stop], start):
        if keep is not None and i in keep:
            keep[i] = hidden
        hidden = layer(hidden, attention_mask=mask, position_embeddings=position_embeddings,
                       position_ids=position_ids, past_key_values=past_key_values,
                       use_cache=past_key_values is not None)
    return hidden


def top_forward(model: nn.Module, hidden_in: torch.Tensor, attention_mask: torch.Tensor,
                start_layer: int) -> torch.Tensor:
    """Layers [start_layer, L) + final norm on the hidden states entering ``start_layer``.

    (N, T, H), (N, T) right-padded -> last_hidden_state (N, T, H), as ``LlamaModel.forward``
    computes it from that point (same causal+padding mask, positions 0..T-1, rotary embeddings).
    """
    decoder = decoder_of(model)
    check_supported(decoder)
    n_layers = len(decoder.layers)
    if not 0 <= start_layer <= n_layers:
        raise ValueError(f"start_layer={start_layer} must be in [0, {n_layers}]")
    hidden = run_layers(decoder, hidden_in, attention_mask, start_layer, n_layers)
    return decoder.norm(hidden)


@torch.no_grad()
def bottom_forward(model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                   start_layer: int) -> torch.Tensor:
    """Hidden states entering layer ``start_layer``: embeddings + layers [0, start_layer). (N, T, H)"""
    decoder = decoder_of(model)
    check_supported(decoder)
    return run_layers(decoder, decoder.embed_tokens(input_ids), attention_mask, 0, start_layer)


def frozen_prefix(model: nn.Module) -> int:
    """How many bottom layers (with the embeddings) have no trainable parameter: the cacheable depth."""
    decoder = decoder_of(model)
    if any(p.requires_grad for p in decoder.embed_tokens.parameters()):
        return 0
    for i, layer in enumerate(decoder.layers):
        if any(p.requires_grad for p in layer.parameters()):
            return i
    return len(decoder.layers)


def check_frozen_below(model: nn.Module, start_layer: int) -> None:
    """Raise ValueError if the embeddings or a layer below ``start_layer`` train (cached inputs of
    layer ``start_layer`` would go stale). Under ``torch.no_grad`` nothing trains: no check."""
    if not torch.is_grad_enabled():
        return
    decoder = decoder_of(model)
    modules = [("embed_tokens", decoder.embed_tokens)] + [(f"layers.{i}", m) for i, m in
                                                          enumerate(decoder.layers[:start_layer])]
    trainable = [f"{name}.{n}" for name, m in modules for n, p in m.named_parameters() if p.requires_grad]
    if trainable:
        raise ValueError(f"the cached path needs layers below {start_layer} frozen, but {trainable[:3]} "
                         f"({len(trainable)} tensors) train; use mode 'topk' with top_k_layers <= "
                         f"{len(decoder.layers) - start_layer}, or the plain path")


def unwrap_causal_lm(model):
    """The transformers causal LM inside DDP / FSDP / DeepSpeed / torch.compile wrappers (accelerate's
    ``extract_model_from_parallel``) and a peft wrapper (``get_base_model``)."""
    model = extract_model_from_parallel(model, keep_torch_compile=False)
    return model.get_base_model() if hasattr(model, "get_base_model") else model
