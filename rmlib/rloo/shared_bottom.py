"""RLOO with one bottom forward per completion (mode ``topk``; Coste et al. ICLR 2024 train only
the policy's top 2 layers).

With a top-k policy the embeddings and decoder layers ``[0, s)`` (s = L - k) never change, and a
top-k reward model built from the same backbone has the same frozen bottom ``[0, s_rm)``. So per
batch of sampled completions the frozen bottom runs ONCE on prompt + completion, up to s, keeping
the states entering s and each RM's ``min(s, s_rm)`` (and its keys/values), which serve

- the policy log-probs: layers [s, L) + norm + LM head, with grad in the loss;
- the reference log-probs: the ORIGINAL layers [s, L) + norm (``shared_reference``: a causal LM that
  shares the policy's bottom modules and holds copies of the top ones: no second full model);
- the rewards of top-k RMs: their own layers [min(s, s_rm), L) + head (``SharedBottomReward``).

Trainable: the top k decoder layers and the final norm (``make_topk_policy``). The LM head stays
frozen: SmolLM2 ties it to the input embedding, which belongs to the shared bottom.

The loop stays TRL's ``RLOOTrainer`` (advantages A_i = R_i - mean_{j != i} R_j with
R_i = r(x, y_i) - beta * sum_t [log pi(y_it) - log pi_ref(y_it)], the clipped loss, logging,
checkpoints); ``SharedBottomRLOOTrainer`` overrides only where the forwards happen:
``_generate_single_turn`` (sampling with ``rmlib.model.decoding.DecodeLoop`` on per-row seeds),
``_generate`` (builds the batch's ``BottomBatch`` after sampling), ``_get_per_token_logps_and_entropies``
(top layers on the stored bottom; TRL's own fused log-prob kernel ``trl.kernels.ChunkedLogProbFunction``
on the completion positions only), ``_generate_and_score_completions`` (hands the policy's bottom
to the loss micro-batches as ``bottom_hidden``) and ``_compute_loss``.

Exactness. A causal decoder's hidden state at a real token depends only on the tokens before it.
The RM formats prompt + reply with its own tokenizer and chat template
(``rmlib.model.encoding.encode_prompt_replies``, as ``RewardModelFunction`` does); its ids share a
prefix with the policy's (at least the prompt) and then go on with their own tokens: SmolLM2's
newline after ``<|im_end|>`` (and ``<|im_end|>`` itself for a reply cut at the length limit), or,
where the decoded text re-tokenizes differently from the sampled ids, the rest of the reply. Those
own tokens run through the bottom in one short extra pass on the stored keys/values of the shared
prefix (``BottomBatch.rm_input``). A row whose RM ids differ already in the prompt (the RM cut it at
``max_length``) is scored by the plain ``RewardModelFunction`` path. RoPE attention depends on
position differences only, so left padding (the policy's layout) and right padding (the RM's) agree
to float rounding. In float32 everything equals the plain TRL path to ~1e-5
(tests/test_rloo_shared_bottom.py); under bf16 autocast the RM sees bf16-autocast bottom states of
the policy's float32 weights instead of its own bf16 weights (same values for SmolLM2, whose
checkpoint is bf16), so rewards agree to bf16 rounding.

Sampler hand-off. ``BottomBatch.build(..., states=, cache=)`` accepts bottom states (and keys/values)
computed elsewhere (a sampler that captures the bottom while decoding); ``_sampled_bottom`` is where
such a sampler plugs in. Until then they come from one no-grad bottom forward after sampling.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from transformers import DynamicCache
from trl import RLOOTrainer
from trl.kernels import ChunkedLogProbFunction

from rmlib.core.precision import autocast
from rmlib.model.decoding import DecodeLoop
from rmlib.model.encoding import encode_prompt_replies
from rmlib.model.generation import sample_seed
from rmlib.model.layers import check_supported, decoder_of, run_layers, unwrap_causal_lm
from rmlib.model.logprobs import final_logit_softcap

logger = logging.getLogger(__name__)

LOGPROB_CHUNK = 32768  # vocabulary tile of TRL's fused log-prob kernel (trl.trainer.utils._CHUNKED_LOGPROB_CHUNK_SIZE)


# -- the policy and its reference --------------------------------------------------------------------
def make_topk_policy(model: nn.Module, top_k_layers: int) -> nn.Module:
    """Freeze all of ``model`` but its top ``top_k_layers`` decoder layers and the final norm.

    The LM head stays frozen: SmolLM2 ties it to the input embedding, which is part of the shared
    bottom (training it would change every bottom state)."""
    decoder = decoder_of(unwrap_causal_lm(model))
    check_supported(decoder)
    n = len(decoder.layers)
    if not 1 <= top_k_layers <= n:
        raise ValueError(f"policy_top_k_layers={top_k_layers} must be in [1, {n}] (the policy's decoder layers)")
    for p in model.parameters():
        p.requires_grad_(False)
    for module in [*decoder.layers[n - top_k_layers:], decoder.norm]:
        for p in module.parameters():
            p.requires_grad_(True)
    return model


def trainable_start(model: nn.Module) -> int:
    """The first decoder layer with a trainable parameter (embeddings and LM head must be frozen)."""
    lm = unwrap_causal_lm(model)
    decoder = decoder_of(lm)
    frozen = [decoder.embed_tokens, lm.get_output_embeddings()]
    if any(p.requires_grad for m in frozen for p in m.parameters()):
        raise ValueError("the shared-bottom RLOO needs the embeddings and the LM head frozen (make_topk_policy)")
    for i, layer in enumerate(decoder.layers):
        if any(p.requires_grad for p in layer.parameters()):
            return i
    raise ValueError("the policy has no trainable decoder layer (make_topk_policy)")


def shared_reference(policy: nn.Module, start_layer: int) -> nn.Module:
    """pi_ref as a causal LM that SHARES the policy's embeddings and layers [0, start_layer) (frozen,
    so they stay the initial ones) and holds frozen copies of layers [start_layer, L), the final norm
    and the rest: the initial policy at the memory of k layers."""
    lm = unwrap_causal_lm(policy)
    decoder = decoder_of(lm)
    shared = [decoder.embed_tokens, *decoder.layers[:start_layer]]
    memo = {}
    for module in shared:
        memo[id(module)] = module
        for p in module.parameters():
            memo[id(p)] = p
    ref = copy.deepcopy(lm, memo)
    for p in ref.parameters():
        p.requires_grad_(False)
    return ref.eval()


def same_bottom(a: nn.Module, b: nn.Module, layers: int) -> bool:
    """Whether the embeddings and decoder layers [0, layers) of ``a`` and ``b`` hold equal values."""
    da, db = decoder_of(a), decoder_of(b)
    if len(da.layers) < layers or len(db.layers) < layers:
        return False
    for ma, mb in zip([da.embed_tokens, *da.layers[:layers]], [db.embed_tokens, *db.layers[:layers]]):
        pa, pb = dict(ma.named_parameters()), dict(mb.named_parameters())
        if pa.keys() != pb.keys():
            return False
        for name, p in pa.items():
            q = pb[name]
            if p.shape != q.shape or not torch.equal(p.detach().float().cpu(), q.detach().float().cpu()):
                return False
    return True


# -- one batch's bottom --------------------------------------------------------------------------------
@dataclass
class BottomBatch:
    """The frozen bottom of one generation batch: N rows laid out as TRL lays them out (prompt
    left-padded to P, completion right-padded to C), ``ids``/``mask`` (N, W = P + C).

    ``states``: layer -> hidden states entering it (N, W, H), for the policy's start layer and every
    shared RM's; ``cache``: the bottom's keys/values (layers below the highest of them), from which
    ``rm_input`` continues a row with the tokens where the RM's ids differ from the policy's."""

    ids: torch.Tensor
    mask: torch.Tensor
    lengths: list[int]  # real tokens per row (prompt + completion)
    first: list[int]  # column of each row's first real token
    prompt_lengths: list[int]
    decoder: nn.Module  # the frozen bottom's layers (the policy's)
    autocast: object  # context-manager factory of the policy forward's autocast
    states: dict[int, torch.Tensor] = field(default_factory=dict)
    cache: object | None = None

    @classmethod
    def build(cls, decoder, prompt_ids, completion_ids, pad_id: int, layers, autocast_ctx,
              states: dict[int, torch.Tensor] | None = None, cache=None) -> BottomBatch:
        """Lay out the rows and run the bottom once (no grad) up to the highest of ``layers``, keeping
        the states entering each and the keys/values below; unless ``states`` (and ``cache``) of this
        layout come from elsewhere (a sampler that captured them while decoding)."""
        n = len(prompt_ids)
        p_width = max(len(p) for p in prompt_ids)
        width = p_width + max(len(c) for c in completion_ids)
        device = decoder.embed_tokens.weight.device
        ids = torch.full((n, width), pad_id, dtype=torch.long)
        mask = torch.zeros(n, width, dtype=torch.long)
        for i, (p, c) in enumerate(zip(prompt_ids, completion_ids)):
            lo, hi = p_width - len(p), p_width + len(c)
            ids[i, lo:hi] = torch.as_tensor(list(p) + list(c), dtype=torch.long)
            mask[i, lo:hi] = 1
        batch = cls(ids.to(device), mask.to(device), [len(p) + len(c) for p, c in zip(prompt_ids, completion_ids)],
                    [p_width - len(p) for p in prompt_ids], [len(p) for p in prompt_ids], decoder, autocast_ctx)
        layers = sorted({int(x) for x in layers})
        if states is not None:
            for layer, h in states.items():
                if tuple(h.shape[:2]) != (n, width):
                    raise ValueError(f"handed-in bottom states are {tuple(h.shape)}, expected ({n}, {width}, H)")
                batch.states[int(layer)] = h.to(device)
            batch.cache = cache
            return batch
        keep = dict.fromkeys(layers[:-1])
        batch.cache = DynamicCache()
        with torch.no_grad(), autocast_ctx():
            top = run_layers(decoder, decoder.embed_tokens(batch.ids), batch.mask, 0, layers[-1],
                             past_key_values=batch.cache, keep=keep)
        batch.states.update(keep)
        batch.states[layers[-1]] = top
        return batch

    @torch.no_grad()
    def states_at(self, layer: int) -> torch.Tensor:
        """Hidden states entering ``layer`` (N, W, H), from the highest stored layer below it through
        the policy's (frozen) layers in between; kept for the next caller."""
        if layer not in self.states:
            below = max((k for k in self.states if k < layer), default=None)
            if below is None:
                raise ValueError(f"no bottom state at or below layer {layer} (stored: {sorted(self.states)})")
            with self.autocast():
                self.states[layer] = run_layers(self.decoder, self.states[below], self.mask, below, layer)
        return self.states[layer]

    def matches(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> bool:
        """Whether (input_ids, attention_mask) is this batch's policy input (same rows, same order)."""
        return (input_ids.shape == self.ids.shape and torch.equal(attention_mask.long(), self.mask)
                and torch.equal(input_ids.masked_fill(attention_mask == 0, 0), self.ids.masked_fill(self.mask == 0, 0)))

    @torch.no_grad()
    def rm_input(self, seqs: list[list[int]], layer: int):
        """A reward model's input on the shared bottom: ``seqs[i]`` its token ids of row i.

        Row i shares the bottom up to c_i, the length of the common prefix of ``seqs[i]`` and the
        policy's ids (at least the policy's prompt: otherwise, e.g. an RM that cut the prompt, it is
        left out); the RM's remaining ids (the chat template's end-of-turn tail, or where the decoded
        text re-tokenizes differently) run through the bottom [0, layer) once more, on the stored
        keys/values of the first c_i tokens. Returns (rows (R,), ids, mask (R, T'), hidden entering
        ``layer`` (R, T', H), right-padded; the RM's positions are the policy layout's columns) or None."""
        rows, cuts, tails = [], [], []
        for i, seq in enumerate(seqs):
            lo, n = self.first[i], self.lengths[i]
            pol = self.ids[i, lo : lo + n].tolist()
            c = next((k for k, (a, b) in enumerate(zip(seq, pol)) if a != b), min(len(seq), n))
            if c < self.prompt_lengths[i] or c == 0 or (c < len(seq) and self.cache is None):
                continue  # the RM's prompt differs (cut at max_length), or no keys/values to continue on
            rows.append(i)
            cuts.append(lo + c)
            tails.append(list(seq[c:]))
        if not rows:
            return None
        device = self.ids.device
        base = self.states_at(layer)
        width = max(c + len(t) for c, t in zip(cuts, tails))
        r = len(rows)
        ids = torch.zeros(r, width, dtype=torch.long, device=device)
        mask = torch.zeros(r, width, dtype=torch.long, device=device)
        hidden = base.new_zeros(r, width, base.shape[-1])
        for k, (i, c) in enumerate(zip(rows, cuts)):
            ids[k, :c], mask[k, :c], hidden[k, :c] = self.ids[i, :c], self.mask[i, :c], base[i, :c]
        ext = [k for k, t in enumerate(tails) if t]
        if ext:  # the rows' own tokens after the shared prefix: one short pass on the stored keys/values
            sel = torch.as_tensor([rows[k] for k in ext], device=device)
            t_len = max(len(tails[k]) for k in ext)
            t_ids = torch.zeros(len(ext), t_len, dtype=torch.long, device=device)
            t_mask = torch.zeros(len(ext), t_len, dtype=torch.long, device=device)
            for j, k in enumerate(ext):
                t_ids[j, : len(tails[k])] = torch.as_tensor(tails[k], device=device)
                t_mask[j, : len(tails[k])] = 1
            cut = torch.as_tensor([cuts[k] for k in ext], device=device)
            cols = torch.arange(self.ids.shape[1], device=device)
            past_mask = self.mask[sel] * (cols[None] < cut[:, None])  # the prefix only
            kv = DynamicCache(ddp_cache_data=[(layer_kv.keys[sel], layer_kv.values[sel])
                                              for layer_kv in self.cache.layers[:layer]])
            pos = cut[:, None] + torch.arange(t_len, device=device)
            with self.autocast():
                h = run_layers(self.decoder, self.decoder.embed_tokens(t_ids), torch.cat([past_mask, t_mask], 1),
                               0, layer, position_ids=pos, past_key_values=kv)
            for j, k in enumerate(ext):
                c, m = cuts[k], len(tails[k])
                ids[k, c : c + m], mask[k, c : c + m], hidden[k, c : c + m] = t_ids[j, :m], 1, h[j, :m]
        return torch.as_tensor(rows), ids, mask, hidden


# -- rewards from the shared bottom --------------------------------------------------------------------
class SharedBottomReward:
    """A ``RewardModelFunction`` whose rows come from the trainer's ``BottomBatch`` where they can
    (``BottomBatch.rm_input``, then the RM's layers [start_layer, L) + head), the rest by the plain
    path. Same call and name as the wrapped function (TRL logs ``rewards/<name>/mean``)."""

    def __init__(self, fn, start_layer: int, batch_of):
        self.fn, self.start_layer, self.batch_of = fn, int(start_layer), batch_of
        self.__name__ = fn.__name__
        self.rows_shared = self.rows_plain = 0  # counters, for tests and logs

    def rm_sequences(self, prompts, replies) -> list[list[int]]:
        """The RM's token ids of each (prompt messages, reply text), as ``RewardModelFunction`` scores them."""
        p, r = encode_prompt_replies(self.fn.tokenizer, list(prompts), list(replies), self.fn.max_length)
        return [a + b for a, b in zip(p, r)]

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        batch = self.batch_of()
        n = len(prompts)
        if batch is None or batch.ids.shape[0] != n:
            self.rows_plain += n
            return self.fn(prompts, completions)
        replies = [c[-1]["content"] if isinstance(c, list) else str(c) for c in completions]
        got = batch.rm_input(self.rm_sequences(prompts, replies), self.start_layer)
        rewards = np.zeros(n, np.float64)
        done = torch.zeros(n, dtype=torch.bool)
        if got is not None:
            rows, ids, mask, hidden = got
            model = self.fn.model
            device = next(model.parameters()).device
            for chunk in torch.arange(len(rows)).split(self.fn.batch_size):
                with torch.no_grad(), autocast(device, self.fn.bf16):
                    out = model(ids[chunk].to(device), mask[chunk].to(device), hidden_in=hidden[chunk],
                                start_layer=self.start_layer)
                rewards[rows[chunk].numpy()] = out.rewards.float().cpu().numpy()
            done[rows] = True
        rest = (~done).nonzero().squeeze(-1).tolist()
        if rest:
            rewards[rest] = self.fn([prompts[i] for i in rest], [completions[i] for i in rest])
        self.rows_shared += n - len(rest)
        self.rows_plain += len(rest)
        return [float(x) for x in rewards]


# -- the trainer ---------------------------------------------------------------------------------------
class SharedBottomRLOOTrainer(RLOOTrainer):
    """TRL's ``RLOOTrainer`` for a top-k policy with one bottom forward per completion (module docstring).

    ``model``: a causal LM instance whose trainable part is its top layers + final norm
    (``make_topk_policy``). ``reward_funcs``: any TRL reward functions; ``RewardModelFunction``s of
    top-k RMs with the policy's bottom weights score through the shared bottom, the others as in TRL.
    ``use_decode_loop``: sample with ``DecodeLoop`` (per-row seeds from (seed, step, row)); False: TRL's
    ``generate``. Other arguments as ``RLOOTrainer``'s."""

    def __init__(self, model, reward_funcs, args=None, use_decode_loop: bool = True, **kwargs):
        if args is None:
            raise ValueError("SharedBottomRLOOTrainer needs args (a trl.RLOOConfig)")
        if isinstance(model, str) or not isinstance(model, nn.Module):
            raise TypeError("SharedBottomRLOOTrainer needs the policy as a loaded causal LM (make_topk_policy)")
        if kwargs.get("peft_config") is not None:
            raise ValueError("SharedBottomRLOOTrainer trains the policy's top layers; peft_config must be None")
        self.policy_start = trainable_start(model)
        reference = shared_reference(model, self.policy_start)  # also with beta = 0: the tracker's pi_ref
        beta, args.beta = args.beta, 0.0  # TRL builds no second full reference model; ours shares the bottom
        try:
            super().__init__(model=model, reward_funcs=reward_funcs, args=args, **kwargs)
        finally:
            args.beta = beta
        self.beta = beta
        self.ref_model = reference.to(self.accelerator.device)
        self.use_decode_loop = use_decode_loop
        self._batch: BottomBatch | None = None
        self._loss_bottom: torch.Tensor | None = None  # the loss micro-batch's bottom_hidden
        self._decode_loop: DecodeLoop | None = None
        self.shared_rewards: list[SharedBottomReward] = []
        self.bottom_layer = self.policy_start
        lm = unwrap_causal_lm(self.model)
        for i, fn in enumerate(self.reward_funcs):
            start = self._shared_start(fn, lm)
            if start is None:
                continue
            wrapped = SharedBottomReward(fn, start, lambda: self._batch)
            self.shared_rewards.append(wrapped)
            self.reward_funcs[i] = wrapped
            self.bottom_layer = min(self.bottom_layer, start)

    def _shared_start(self, fn, lm) -> int | None:
        """The layer up to which reward function ``fn`` shares the policy's bottom, or None (plain path)."""
        rm = getattr(fn, "model", None)
        frozen = int(getattr(rm, "frozen_layers", 0) or 0)
        if rm is None or not hasattr(fn, "tokenizer") or frozen <= 0:
            return None
        start = min(frozen, self.policy_start)
        if not same_bottom(rm, lm, start):
            logger.warning("reward function %s: its frozen bottom differs from the policy's; scored by the "
                           "plain path", getattr(fn, "__name__", fn))
            return None
        return start

    # -- sampling ------------------------------------------------------------------------------------
    def _decode_loop_usable(self, images, multimodal_fields) -> bool:
        return (self.use_decode_loop and not self.use_vllm and not self.use_transformers_continuous_batching
                and images is None and not multimodal_fields and not self.top_k and self.min_p is None
                and self.repetition_penalty == 1.0)

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields):
        if not self._decode_loop_usable(images, multimodal_fields):
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields)
        policy = self.accelerator.unwrap_model(self.model)
        if self._decode_loop is None:
            pad = self._tokenizer.pad_token_id
            self._decode_loop = DecodeLoop(policy, list(self.eos_token_ids), pad if pad is not None else
                                           self.eos_token_ids[0], self.max_completion_length, self.temperature,
                                           self.top_p if self.top_p is not None else 1.0, bool(self.args.bf16))
        # row i of the generation at optimizer step t draws from hash(seed, t, i): a resumed run samples
        # what an uninterrupted one does, and the global RNG is not touched
        mode = "train" if self.model.training else "eval"
        stream = f"rloo-{mode}-rank-{self.accelerator.process_index}"
        seeds = [sample_seed(self.args.seed, f"step-{self.state.global_step}", i, stream=stream)
                 for i in range(len(prompt_ids))]
        return self._decode_loop([list(p) for p in prompt_ids], seeds)

    def _sampled_bottom(self, prompt_ids, completion_ids):
        """(states {layer: (N, W, H)}, keys/values cache or None) the sampler captured for these rows in
        ``BottomBatch``'s layout, or None: the hook for a sampler that keeps the bottom while decoding
        (without the cache, RM rows whose ids go beyond the policy's are scored the plain way)."""
        return None

    def _generate(self, prompts: list):
        prompt_ids, completion_ids, completions = super()._generate(prompts)
        self._batch = None
        if self.pad_to_multiple_of is None:  # otherwise TRL's layout differs: the plain forwards below
            lm = unwrap_causal_lm(self.accelerator.unwrap_model(self.model))
            layers = [self.policy_start, *(r.start_layer for r in self.shared_rewards)]
            states, cache = self._sampled_bottom(prompt_ids, completion_ids) or (None, None)
            self._batch = BottomBatch.build(decoder_of(lm), prompt_ids, completion_ids, self._tokenizer.pad_token_id,
                                            layers, self.accelerator.autocast, states=states, cache=cache)
        return prompt_ids, completion_ids, completions

    # -- the bottom of the policy forwards -----------------------------------------------------------
    def _generate_and_score_completions(self, inputs):
        try:
            output = super()._generate_and_score_completions(inputs)
            batch = self._batch
            ids = torch.cat([output["prompt_ids"], output["completion_ids"]], dim=1)
            mask = torch.cat([output["prompt_mask"], output["completion_mask"]], dim=1)
            if batch is not None and batch.matches(ids, mask):
                output["bottom_hidden"] = batch.states_at(self.policy_start)
        finally:
            self._batch = None  # the batch's states are no longer needed
        return output

    def _compute_loss(self, model, inputs):
        self._loss_bottom = inputs.get("bottom_hidden")
        try:
            return super()._compute_loss(model, inputs)
        finally:
            self._loss_bottom = None

    def _policy_bottom(self, input_ids, attention_mask) -> torch.Tensor:
        """Hidden states entering the policy's first trainable layer for this input (N, T, H), no grad."""
        hidden = self._loss_bottom
        if hidden is not None and tuple(hidden.shape[:2]) == tuple(input_ids.shape):
            return hidden
        if self._batch is not None and self._batch.matches(input_ids, attention_mask):
            return self._batch.states_at(self.policy_start)
        lm = unwrap_causal_lm(self.accelerator.unwrap_model(self.model))  # any other input: its own bottom forward
        decoder = decoder_of(lm)
        with torch.no_grad(), self.accelerator.autocast():
            return run_layers(decoder, decoder.embed_tokens(input_ids), attention_mask, 0, self.policy_start)

    def _get_per_token_logps_and_entropies(self, model, input_ids, attention_mask, logits_to_keep, batch_size=None,
                                           compute_entropy=False, compute_aux_loss=False, **multimodal):
        if compute_aux_loss or any(v is not None for v in multimodal.values()):
            return super()._get_per_token_logps_and_entropies(
                model, input_ids, attention_mask, logits_to_keep, batch_size, compute_entropy, compute_aux_loss,
                **multimodal)
        lm = self.ref_model if model is self.ref_model else unwrap_causal_lm(self.accelerator.unwrap_model(model))
        decoder = decoder_of(lm)
        hidden_in = self._policy_bottom(input_ids, attention_mask)
        head = lm.get_output_embeddings()
        outputs = ("log_probs", "entropy") if compute_entropy else ("log_probs",)
        with self.accelerator.autocast():
            hidden = run_layers(decoder, hidden_in, attention_mask, self.policy_start, len(decoder.layers))
            hidden = decoder.norm(hidden[:, -logits_to_keep - 1 : -1])  # (N, K, H): predicts the completion
            targets = input_ids[:, -logits_to_keep:]
            logps, entropy, *_ = ChunkedLogProbFunction.apply(
                hidden.reshape(-1, hidden.shape[-1]), head.weight, head.bias, targets.reshape(-1), self.temperature,
                LOGPROB_CHUNK, final_logit_softcap(lm.config), 1.0, outputs)
        pad = attention_mask[:, -logits_to_keep:] == 0  # TRL's labels -100: log-prob and entropy 0
        logps = logps.view(targets.shape).masked_fill(pad, 0)
        if compute_entropy:
            entropy = entropy.view(targets.shape).masked_fill(pad, 0)
        return logps, entropy if compute_entropy else None, None
