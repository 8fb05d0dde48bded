"""Log-probs of response tokens under a causal LM, gathered in one place (``gather_logps``).

``response_logps``: summed log pi(y|x) of padded batches (the reward model's GRM regularizer and
the bottom store's path, differentiable). ``completion_kl``: per-completion log-probs and KL
estimates of sampled completions against a reference policy (the RLOO tracker).
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import nn

from rmlib.model.encoding import pad_sequences
from rmlib.model.layers import unwrap_causal_lm

# Config fields by which a transformers causal LM changes its logits after the LM head, besides
# final_logit_softcapping (which response_logps applies), as of transformers 5.23. Neutral values pass.
UNSUPPORTED_LOGIT_FIELDS = {
    "logits_scaling": "Granite*: logits / s; MiniCPM3: hidden / s; HyperCLOVA X: logits * s",
    "logit_scale": "Cohere*: logits * s",
    "lm_head_multiplier": "Falcon-H1: logits * m",
    "output_multiplier": "MuseSpark: logits * m",
    "unpadded_vocab_size": "Inkling: logits cut to the unpadded vocabulary",
}


def final_logit_softcap(config) -> float | None:
    """c of the final-logit soft-capping, logits = c * tanh(logits / c) (``final_logit_softcapping`` of
    Gemma-2/3/4, VaultGemma, ...; the formula of their ``*ForCausalLM.forward``), or None.

    Raises ValueError naming the field for a backbone whose logits path ``response_logps`` does not
    reproduce (``UNSUPPORTED_LOGIT_FIELDS``: Granite ``logits_scaling``, Cohere ``logit_scale``, ...).
    Checked on the config and its text config."""
    configs = [config]
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    if text is not config:
        configs.append(text)
    cap = None
    for cfg in configs:
        for name, what in UNSUPPORTED_LOGIT_FIELDS.items():
            value = getattr(cfg, name, None)
            neutral = (None, getattr(cfg, "vocab_size", None)) if name == "unpadded_vocab_size" else (None, 1, 1.0)
            if value not in neutral:
                raise ValueError(
                    f"backbone model_type={getattr(cfg, 'model_type', '?')!r} has {name}={value!r} ({what}): its "
                    "logits are not lm_head(h), and rmlib.model.logprobs.response_logps reproduces only "
                    "final_logit_softcapping; the GRM regularizers (log pi) would be wrong. Use regularizer='none' "
                    "with this backbone, or a backbone without that field")
        cap = cap if cap is not None else getattr(cfg, "final_logit_softcapping", None)
    return float(cap) if cap else None


def gather_logps(lm_head: nn.Module, hidden: torch.Tensor, targets: torch.Tensor, rows: torch.Tensor, n_rows: int,
                 temperature: float = 1.0, chunk_tokens: int | None = None, dtype: torch.dtype = torch.float32,
                 reference: tuple[nn.Module, torch.Tensor] | None = None,
                 softcap: float | None = None) -> dict[str, torch.Tensor]:
    """Per-row sums of token log-probs: the one place where hidden states meet the LM head.

    ``hidden`` (M, H): final hidden states at the positions that predict ``targets`` (M,); ``rows``
    (M,): the row (0..n_rows-1) each position belongs to. Each position's logits ``lm_head(h) / T``
    go through log-softmax, the target's log-prob is gathered and summed per row in ``dtype``:
    ``{"logp": (n_rows,)}``. ``chunk_tokens``: positions per LM-head call (None: all at once), so
    the (chunk, vocab) logits stay small. Differentiable (the GRM regularizer trains through it).

    ``reference=(ref_head, ref_hidden)`` (``ref_hidden`` at the same positions): also
    ``ref_logp``, ``kl_k1`` = sum_t (logp_t - ref_logp_t) and ``kl`` = sum_t KL(p_t || ref_t),
    exact over the vocabulary at each position. ``softcap``: the backbone's final-logit soft-capping c
    (``final_logit_softcap``), logits = c tanh(z / c), before the temperature.
    """
    sums = {k: torch.zeros(n_rows, dtype=dtype, device=hidden.device)
            for k in (("logp",) if reference is None else ("logp", "ref_logp", "kl", "kl_k1"))}
    step = chunk_tokens or max(hidden.shape[0], 1)

    def log_probs(head, h):
        logits = head(h).float()
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        return (logits if temperature == 1.0 else logits / temperature).log_softmax(-1)  # (m, V)

    for c in range(0, hidden.shape[0], step):
        sl = slice(c, c + step)
        y = targets[sl, None]
        lp = log_probs(lm_head, hidden[sl])
        parts = {"logp": lp.gather(-1, y).squeeze(-1)}
        if reference is not None:
            lr = log_probs(reference[0], reference[1][sl])
            parts["ref_logp"] = lr.gather(-1, y).squeeze(-1)
            parts["kl"] = (lp.exp() * (lp - lr)).sum(-1)
            parts["kl_k1"] = parts["logp"] - parts["ref_logp"]
        for k, v in parts.items():
            sums[k].index_add_(0, rows[sl], v.to(dtype))
    return sums


def response_positions(input_ids: torch.Tensor,
                       response_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where (N, T) sequences predict their response tokens: token t is predicted at position t-1.

    Returns the (N, T-1) bool mask of those positions (select ``hidden[:, :-1][mask]``), the
    predicted tokens (M,) and each position's row (M,)."""
    n, t = input_ids.shape
    mask = response_mask[:, 1:].bool()
    rows = torch.arange(n, device=input_ids.device)[:, None].expand(n, t - 1)[mask]
    return mask, input_ids[:, 1:][mask], rows


def response_logps(
    lm_head: nn.Module, hidden: torch.Tensor, input_ids: torch.Tensor, response_mask: torch.Tensor,
    softcap: float | None = None,
) -> torch.Tensor:
    """Summed log pi(y_t | x, y_<t) over response tokens: (N,). Only response positions hit the LM head.

    ``softcap``: the backbone's final-logit soft-capping c (``final_logit_softcap``), logits = c tanh(z / c)."""
    mask, targets, rows = response_positions(input_ids, response_mask)
    return gather_logps(lm_head, hidden[:, :-1][mask], targets, rows, input_ids.shape[0], softcap=softcap)["logp"]


def _completion_hidden(model, prompt_ids, completion_ids):
    """Final hidden states at the positions that predict completion tokens, for one batch.

    Returns h (M, H), the predicted tokens y (M,) and each position's row (M,). Sequences are
    right-padded, so positions run 0..L-1 as during generation; ``model`` may be peft-wrapped
    (its layers carry the adapters, active unless disabled)."""
    inner = unwrap_causal_lm(model)
    device = next(inner.parameters()).device
    seqs = [list(p) + list(c) for p, c in zip(prompt_ids, completion_ids)]
    resp = [[0] * len(p) + [1] * len(c) for p, c in zip(prompt_ids, completion_ids)]
    batch = pad_sequences(seqs, resp, pad_token_id=0, pad_to_multiple_of=None)
    input_ids, attn = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    hidden = inner.base_model(input_ids=input_ids, attention_mask=attn, use_cache=False).last_hidden_state
    mask, targets, rows = response_positions(input_ids, batch["response_mask"].to(device))
    return hidden[:, :-1][mask], targets, rows


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
    Returns ``{"kl", "kl_k1", "logp", "ref_logp"}``, each (N,) float64; ``logp`` is
    sum_t log pi_T(y_t | x, y_<t), ``ref_logp`` the same under pi_ref."""
    if reference is None and not hasattr(policy, "disable_adapter"):
        raise ValueError("completion_kl needs a reference model unless the policy is a peft model")
    out = {k: np.zeros(len(prompt_ids), np.float64) for k in ("kl", "kl_k1", "logp", "ref_logp")}
    head = unwrap_causal_lm(policy).get_output_embeddings()
    ref_head = unwrap_causal_lm(reference).get_output_embeddings() if reference is not None else head
    softcap = final_logit_softcap(unwrap_causal_lm(policy).config)  # the reference is the same backbone
    was_training = policy.training
    policy.eval()
    try:
        with float32_weights(policy, reference):
            for start in range(0, len(prompt_ids), batch_size):
                rows = list(range(start, min(start + batch_size, len(prompt_ids))))
                p_ids, c_ids = [prompt_ids[i] for i in rows], [completion_ids[i] for i in rows]
                h, y, row = _completion_hidden(policy, p_ids, c_ids)
                if reference is None:
                    with policy.disable_adapter():
                        h_ref = _completion_hidden(policy, p_ids, c_ids)[0]
                else:
                    h_ref = _completion_hidden(reference, p_ids, c_ids)[0].to(h.device)
                sums = gather_logps(head, h, y, row, len(rows), temperature, chunk_tokens, torch.float64,
                                    reference=(ref_head, h_ref), softcap=softcap)
                for k, values in out.items():
                    values[rows] = sums[k].cpu().numpy()
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
