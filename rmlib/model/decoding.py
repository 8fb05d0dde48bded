"""The sampling engine: our own decode loop (no ``generate``) with per-row random streams.

``DecodeLoop`` samples one continuation per row of a batch of prompts (token ids, any lengths):

1. prefill: the left-padded prompts in one forward (each distinct prompt once: rows that share a
   prompt, as Best-of-N chunks do, share its prefill), positions and masks exactly as HF ``generate``
   builds them, logits of the last position only;
2. decode: one token per step for the live rows, the keys/values appended to a preallocated cache
   (``PreallocLayer``: one buffer per layer sized prompt + max_new_tokens, attention over the
   filled prefix only, so no concatenation per step) and ``decode_attention`` (a decode step's
   attention as plain matmul-softmax-matmul instead of sdpa's CPU flash kernel);
3. sampling: ``top_p_pick``, the math of ``RowSampler`` (temperature, exact top-p via a
   ``topk`` shortlist with a full-sort fallback, inverse CDF on one float64 uniform per row and
   step drawn from the row's own ``torch.Generator``); the uniforms of a row are drawn up front
   (``torch.rand(max_new_tokens)`` on a CPU generator is the same stream as one draw per step);
4. stop tokens end a row; finished rows are dropped from the batch (cache, mask, positions) once
   a quarter of it has finished, and the loop stops when every row has;
5. optionally (``capture=``, ``CaptureHooks``) the hidden states entering one decoder layer are
   recorded for each row's prompt and continuation, and a row that stopped is completed to a given
   target continuation (e.g. the end-of-turn a reward model's chat template adds) by feeding the
   missing tokens on its cached state: ``rmlib.model.bottom_capture`` fills the bottom store so.

A row's tokens depend only on its prompt and seed, never on its batch-mates (up to floating-point
effects of the batch shape). ``SAMPLER`` names this engine in sample files' meta data
(``rmlib.model.generation``), so that a file sampled by another engine is not resumed by this one.
``hf_generate_rows`` is the reference path it replaced (HF ``generate`` + ``RowSampler``); in float32
both give the same tokens for the same seeds (``tests/test_decoding.py``).
"""

from __future__ import annotations

import contextlib
import time
from typing import Protocol

import torch
from accelerate.utils import extract_model_from_parallel
from torch.nn.utils.rnn import pad_sequence
from transformers import AttentionInterface, GenerationConfig, LogitsProcessorList
from transformers.cache_utils import Cache, DynamicLayer
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from rmlib.core.precision import autocast
from rmlib.model.layers import decoder_of, unwrap_causal_lm

# the engine's name in sample files' meta data; change it when a change of this module changes the samples
SAMPLER = "rmlib-decode-v1"

# the engine of sample files written before SAMPLER was recorded: HF generate + RowSampler
LEGACY_SAMPLER = "hf-generate-rowsampler"

# drop finished rows from the batch once this fraction of it has finished (see DecodeLoop)
COMPACT_FRACTION = 0.25


# -- sampling maths --------------------------------------------------------------------------------
def _inverse_cdf(cum: torch.Tensor, n_keep: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Position in each row of ``cum`` (cumulative probs, (B, K)) drawn from its first n_keep."""
    rows = torch.arange(cum.shape[0], device=cum.device)
    target = u * cum[rows, n_keep - 1]  # (B,)
    pos = torch.searchsorted(cum, target[:, None], right=True).squeeze(-1)
    return torch.minimum(pos, n_keep - 1)


def _pick_top_p(cum: torch.Tensor, order: torch.Tensor, u: torch.Tensor, top_p: float) -> torch.Tensor:
    """Token ids drawn from the top-p prefix; cum/order: descending probs' cumsum and token ids, (B, K)."""
    n_keep = torch.clamp((cum < top_p).sum(-1) + 1, max=cum.shape[1])  # (B,) prefix length
    pos = _inverse_cdf(cum, n_keep, u)
    return order.gather(-1, pos[:, None]).squeeze(-1)


def top_p_pick(scores: torch.Tensor, u: torch.Tensor, temperature: float, top_p: float,
               candidates: int = 256, work: torch.Tensor | None = None) -> torch.Tensor:
    """One token per row of ``scores`` (B, V): softmax(scores / temperature) in float32, truncated to
    the top-p set, sampled by inverse CDF with the uniform ``u`` (B,) float64 of each row.

    top-p keeps the smallest set of most likely tokens whose mass reaches ``top_p`` (>= 1 token).
    Sorting the whole vocabulary costs ~60 ms per step for 32 x 49k on 2 CPU cores, more than the
    135M model's forward; so the ``candidates`` most likely tokens come from ``topk`` and only a
    row whose top-p set is larger than that (its shortlist holds less than ``top_p``) is fully
    sorted. ``top_p >= 1``: no truncation, the inverse CDF runs over the vocabulary in id order.

    ``work``: a float32 tensor shaped like ``scores`` that receives the probabilities, and then
    ``scores`` (float32) is divided by the temperature in place: the same numbers without two
    allocations of the vocabulary's size per step (at batch 256, 50 MB each, fresh pages each time).
    """
    if work is None:
        probs = torch.softmax(scores.float() / temperature, dim=-1)  # (B, V)
    else:
        probs = torch.softmax(scores.div_(temperature), dim=-1, out=work)
    u = u.to(probs.device)
    batch, vocab = probs.shape
    if top_p >= 1.0:  # no truncation: any token order will do
        full_len = torch.full((batch,), vocab, device=probs.device)
        return _inverse_cdf(probs.double().cumsum(-1), full_len, u)
    top, order = probs.topk(min(candidates, vocab), dim=-1, sorted=True)  # (B, K)
    cum = top.double().cumsum(-1)
    fast = cum[:, -1] >= top_p  # the top-p set lies within the K candidates
    if bool(fast.all()):
        return _pick_top_p(cum, order, u, top_p)
    picks = torch.empty(batch, dtype=torch.long, device=probs.device)
    if fast.any():
        picks[fast] = _pick_top_p(cum[fast], order[fast], u[fast], top_p)
    sorted_probs, full_order = probs[~fast].sort(dim=-1, descending=True, stable=True)
    picks[~fast] = _pick_top_p(sorted_probs.double().cumsum(-1), full_order, u[~fast], top_p)
    return picks


def row_generators(seeds: list[int]) -> list[torch.Generator]:
    """One CPU ``torch.Generator`` per row, seeded by ``seeds[i]``."""
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


def row_uniforms(seeds: list[int], steps: int) -> torch.Tensor:
    """(B, steps) float64: row i's first ``steps`` uniforms from its own generator, the values that
    ``steps`` one-at-a-time draws give (``RowSampler``)."""
    return torch.stack([torch.rand(steps, generator=g, dtype=torch.float64) for g in row_generators(seeds)])


class RowSampler:
    """Logits processor for HF ``generate``: each row samples from its own generator (``top_p_pick``).

    It returns scores that are 0 at the sampled token and -inf elsewhere, so ``generate`` runs with
    ``do_sample=False`` and its argmax takes the sample: the random draws never depend on the
    global RNG or on the other rows of the batch (one uniform per row and step, inverse CDF).
    The reference path (``hf_generate_rows``); ``DecodeLoop`` samples with the same maths.
    """

    def __init__(self, generators: list[torch.Generator], temperature: float, top_p: float, candidates: int = 256):
        self.generators = generators
        self.temperature = temperature
        self.top_p = top_p
        self.candidates = candidates

    def _uniforms(self) -> torch.Tensor:
        return torch.cat([torch.rand(1, generator=g, device=g.device, dtype=torch.float64)
                          for g in self.generators])  # (B,)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        picks = top_p_pick(scores, self._uniforms(), self.temperature, self.top_p, self.candidates)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(-1, picks[:, None], 0.0)


# -- the KV cache --------------------------------------------------------------------------------------
class PreallocLayer(DynamicLayer):
    """A cache layer whose keys/values live in one buffer of ``max_len`` positions, allocated at the
    first update; ``keys``/``values`` are views of the filled prefix. Attention then sees exactly
    what a ``DynamicLayer`` holds (same shapes, same numbers), without its concatenation per step
    (which copies the whole cache of every layer at every token)."""

    def __init__(self, max_len: int):
        super().__init__()
        self.max_len = max_len
        self.length = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        # keys and values keep the dtypes they arrive in, as in a DynamicLayer: under bf16 autocast the
        # keys come in float32 (the rotary embedding promotes them), which decode_attention reads as is
        self.dtype, self.device = key_states.dtype, key_states.device
        b, h, _, _ = key_states.shape
        self._k = key_states.new_empty(b, h, self.max_len, key_states.shape[-1])
        self._v = value_states.new_empty(b, h, self.max_len, value_states.shape[-1])
        self.is_initialized = True

    def _views(self) -> None:
        self.keys, self.values = self._k[:, :, : self.length], self._v[:, :, : self.length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n, t = self.length, key_states.shape[-2]
        if n + t > self.max_len:
            raise RuntimeError(f"PreallocLayer: {n} + {t} positions exceed max_len={self.max_len}")
        self._k[:, :, n : n + t] = key_states
        self._v[:, :, n : n + t] = value_states
        self.length = n + t
        self._views()
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def get_max_length(self) -> int:
        return self.max_len

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        """Keep rows ``indices`` (also repeats them: a prefill shared by several rows)."""
        if not self.is_initialized:
            return
        for name in ("_k", "_v"):
            old = getattr(self, name)
            new = old.new_empty(len(indices), *old.shape[1:])
            new[:, :, : self.length] = old[indices, :, : self.length]
            setattr(self, name, new)
        self._views()


def prealloc_cache(n_layers: int, max_len: int) -> Cache:
    """A ``Cache`` of ``PreallocLayer``s (one per decoder layer)."""
    return Cache(layers=[PreallocLayer(max_len) for _ in range(n_layers)])


# -- attention for one query token -------------------------------------------------------------------
DECODE_ATTENTION = "rmlib_decode"


def decode_attention(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None, **kwargs):
    """HF's sdpa for a prefill; for a decode step (one query token per row) plain matmul, softmax, matmul
    over the key/value heads, the query heads of a group packed as its rows.

    On CPU, sdpa's flash kernel spends 1.0-2.9 ms per layer on a decode step at batch 128-256 (7-14
    ms without a mask, where HF passes ``enable_gqa``); this takes 0.4-1.5 ms. Scores and softmax in
    float32 from the cached keys (float32 under autocast: ``PreallocLayer``), ``-inf`` where the bool
    mask (B, 1, 1, L) is False; the probabilities meet the values in the values' dtype.
    """
    b, n_heads, q_len, dim = query.shape
    if q_len != 1 or dropout or kwargs.get("position_bias") is not None or kwargs.get("softcap") is not None \
            or kwargs.get("sinks") is not None or getattr(module, "sinks", None) is not None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                      **kwargs)
    kv_heads = key.shape[1]
    scale = scaling if scaling is not None else dim ** -0.5
    with torch.autocast(query.device.type, enabled=False):
        q = query.reshape(b, kv_heads, n_heads // kv_heads, dim).float()  # head h uses kv head h // group
        scores = torch.matmul(q, key.float().transpose(-1, -2)).mul_(scale)  # (B, KV, G, L)
        if attention_mask is not None:
            if attention_mask.dtype == torch.bool:
                scores.masked_fill_(~attention_mask, float("-inf"))
            else:
                scores.add_(attention_mask)
        probs = torch.softmax(scores, dim=-1).to(value.dtype)
        out = torch.matmul(probs, value)  # (B, KV, G, D)
    return out.reshape(b, n_heads, 1, dim).transpose(1, 2).contiguous(), None


AttentionInterface.register(DECODE_ATTENTION, decode_attention)
AttentionMaskInterface.register(DECODE_ATTENTION, sdpa_mask)  # the prefill's masks are sdpa's


@contextlib.contextmanager
def decode_attention_on(model):
    """``model`` (a transformers model using sdpa) runs ``decode_attention`` for the duration; other
    attention implementations are left as they are."""
    config = model.config
    before = config._attn_implementation
    if before != "sdpa":
        yield
        return
    config._attn_implementation = DECODE_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = before


# -- prepacked bf16 linears -------------------------------------------------------------------------------
def _packing_available(device: torch.device, bf16: bool) -> bool:
    if not bf16 or device.type != "cpu":
        return False
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()
                    and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")
                    and hasattr(torch.ops.mkldnn, "_linear_pointwise"))
    except (AttributeError, RuntimeError):
        return False


class PackedLinears:
    """bf16 ``nn.Linear`` layers on CPU with their weights packed once for oneDNN (the packing
    ``torch.compile`` with freezing does), instead of being re-laid-out at every call.

    Measured on this 2-core avx512_bf16 CPU, bf16 (M x 576) @ (576 x N): 1.15-1.7x faster at M = 32
    (the LM head 8.6 -> 4.9 ms), ~1.1x at M = 256; the outputs are bitwise those of the linear under
    bf16 autocast (bf16 input, fp32 accumulation, bf16 output). ``patch(model)`` gives every plain
    ``nn.Linear`` of ``model`` (also a peft LoRA layer's base and adapter linears) a packed forward
    for the duration; the packed weights are kept between calls while a weight is unchanged (its
    tensor version counter, which in-place updates such as optimizer steps advance)."""

    def __init__(self):
        self._packed: dict[int, tuple] = {}

    def _pack(self, module: torch.nn.Linear, batch_hint: int):
        w, b = module.weight, module.bias
        key = (w.data_ptr(), w._version, None if b is None else (b.data_ptr(), b._version))
        hit = self._packed.get(id(module))
        if hit is None or hit[0] != key:
            packed = torch.ops.mkldnn._reorder_linear_weight(w.detach().to(torch.bfloat16), batch_hint)
            bias = None if b is None else b.detach().to(torch.bfloat16)
            hit = self._packed[id(module)] = (key, packed, bias)
        return hit[1], hit[2]

    @contextlib.contextmanager
    def patch(self, model, batch_hint: int):
        patched = []
        try:
            for module in model.modules():
                # exact type only (subclasses may do more); skip modules whose forward is already replaced (hooks)
                if type(module) is not torch.nn.Linear or "forward" in module.__dict__:
                    continue
                packed, bias = self._pack(module, batch_hint)
                module.forward = (lambda x, packed=packed, bias=bias: torch.ops.mkldnn._linear_pointwise(
                    x.to(torch.bfloat16), packed, bias, "none", [], ""))
                patched.append(module)
            yield
        finally:
            for module in patched:
                del module.forward


# -- the decode loop -----------------------------------------------------------------------------------
def _forward_module(policy):
    """What to call for a forward: the model inside DDP / torch.compile wrappers, peft kept (its
    adapters must apply), as ``generate`` on such a model would run it."""
    return extract_model_from_parallel(policy, keep_torch_compile=False)


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both (B, P), left-padded."""
    rows = [torch.as_tensor(list(p), dtype=torch.long) for p in prompts]
    if any(len(r) == 0 for r in rows):
        raise ValueError("every prompt needs at least one token")
    input_ids = pad_sequence(rows, batch_first=True, padding_value=pad_id, padding_side="left")
    mask = pad_sequence([torch.ones_like(r) for r in rows], batch_first=True, padding_value=0, padding_side="left")
    return input_ids, mask


class DecodeLoop:
    """Samples one continuation per row (see the module docstring).

    ``__call__(prompts, seeds)`` -> each row's new token ids, up to and including its first stop
    token (or ``max_new_tokens`` ids). ``compact``: drop finished rows once at least this fraction
    of the current batch has finished (1.0: never, only stop when all have; 0: at every finish).
    ``share_prefill``: rows with the same prompt share one prefill. ``fast_attention``: decode steps
    use ``decode_attention`` (sdpa models). ``packed_linears``: under bf16 autocast on a CPU with native
    bf16, the linears run with prepacked weights (``PackedLinears``). After a call, ``seconds`` holds the wall time of its prefill,
    decode forwards and sampling (the rest of the step: bookkeeping, compactions).
    """

    def __init__(self, policy, stop_ids: list[int], pad_id: int, max_new_tokens: int, temperature: float,
                 top_p: float, bf16: bool, candidates: int = 256, compact: float = COMPACT_FRACTION,
                 share_prefill: bool = True, fast_attention: bool = True, packed_linears: bool = True):
        self.policy = policy
        self.model = _forward_module(policy)
        self.stop_ids = torch.as_tensor(sorted(int(s) for s in stop_ids), dtype=torch.long)
        self.pad_id = int(pad_id)
        self.max_new_tokens = int(max_new_tokens)
        self.temperature, self.top_p, self.candidates = float(temperature), float(top_p), int(candidates)
        self.bf16 = bool(bf16)
        self.compact = float(compact)
        self.share_prefill = share_prefill
        self.fast_attention = fast_attention
        self.device = next(policy.parameters()).device
        self.packed = PackedLinears() if packed_linears and _packing_available(self.device, self.bf16) else None
        self.steps_run = 0  # decode forwards of the last call (for tests and benchmarks)
        self.compactions = 0
        self.seconds: dict[str, float] = {}

    def _n_layers(self) -> int:
        cfg = self.model.config.get_text_config(decoder=True) if hasattr(self.model.config, "get_text_config") \
            else self.model.config
        return int(cfg.num_hidden_layers)

    def _forward(self, input_ids, attention_mask, position_ids, cache) -> torch.Tensor:
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                         past_key_values=cache, use_cache=True, logits_to_keep=1)
        return out.logits[:, -1]  # (B, V), the model's dtype (bf16 under autocast); made float32 by the caller

    @torch.no_grad()
    def __call__(self, prompts: list[list[int]], seeds: list[int], capture=None) -> list[list[int]]:
        """Each row's new token ids (see the class docstring). ``capture``: record the hidden states
        entering one decoder layer for each row's prompt and continuation (``CaptureHooks``; None: no
        recording, the loop as it was). Capture never changes the sampled tokens: every row draws from its
        own uniforms, and a row whose continuation is being completed only rides along."""
        if len(prompts) != len(seeds):
            raise ValueError(f"{len(prompts)} prompts but {len(seeds)} seeds")
        if not prompts:
            return []
        dev, n_new, batch = self.device, self.max_new_tokens, len(prompts)
        keys = [tuple(int(t) for t in p) for p in prompts]
        if self.share_prefill:  # each distinct prompt once; expand[i]: the prefill row of row i
            first: dict[tuple, int] = {}
            expand = torch.as_tensor([first.setdefault(k, len(first)) for k in keys])
            unique = list(first)
        else:
            expand, unique = torch.arange(batch), keys
        input_ids, mask = left_pad(unique, self.pad_id)
        p_len = input_ids.shape[1]
        padded = not bool(mask.all())  # generate drops an all-ones prefill mask (causal attention): so do we
        position_ids = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 0)  # as generate: pads at 0
        uniforms = row_uniforms(seeds, n_new)  # (B, n_new) float64, CPU
        extra = int(capture.extra) if capture is not None else 0  # steps after sampling that complete captured rows
        cache = prealloc_cache(self._n_layers(), p_len + n_new + extra)
        out = torch.full((batch, n_new), self.pad_id, dtype=torch.long)
        lengths = torch.full((batch,), n_new, dtype=torch.long)  # tokens kept per row
        self.steps_run = self.compactions = 0
        clock = time.perf_counter
        t_start = clock()
        t_forward = t_sampling = 0.0

        attention = decode_attention_on(self.model) if self.fast_attention else contextlib.nullcontext()
        linears = self.packed.patch(self.model, batch) if self.packed is not None else contextlib.nullcontext()
        recorder = _LayerInput(self.model, capture.layer) if capture is not None else contextlib.nullcontext()
        with autocast(dev, self.bf16), attention, linears, recorder:
            logits = self._forward(input_ids.to(dev), mask.to(dev) if padded else None, position_ids.to(dev), cache)
            t_prefill = clock() - t_start
            track = None
            if capture is not None:  # the prompts' hidden states, then one column per continuation token
                track = _CaptureState(capture, prompts, expand, recorder.take(), n_new + extra)
            if len(unique) < batch:
                logits = logits[expand.to(dev)]
                cache.batch_select_indices(expand.to(dev))
            # The attention mask of the decode steps, 4D (B, 1, 1, positions; a prefix of it per step): prompt
            # padding, then ones. Given in 4D it reaches the attention as is, also without padding, where
            # generate passes none; without a mask HF's sdpa runs GQA decode as enable_gqa=True, which
            # on CPU is ~7x slower than the packed-query kernel a mask selects (54% of a decode step at
            # batch 128 in a profile, 7.1 vs 1.0 ms per layer call).
            full_mask = torch.cat([mask[expand], mask.new_ones(batch, n_new + extra)], dim=1).to(dev, torch.bool)
            full_mask = full_mask[:, None, None]
            position = position_ids[expand][:, -1:].to(dev)  # (B, 1): the last prompt position
            # the sampler's float32 scores and probabilities, allocated once for all steps
            work_scores = torch.empty(batch, logits.shape[-1], dtype=torch.float32, device=dev)
            work_probs = torch.empty_like(work_scores)
            rows = torch.arange(batch)  # the original row of each batch row
            live = torch.ones(batch, dtype=torch.bool)  # False: finished, riding along until the next compaction
            for step in range(n_new + extra):
                n = len(rows)
                if step < n_new and bool(live.any()):
                    t0 = clock()
                    scores = work_scores[:n].copy_(logits)  # float32, as generate takes the logits
                    tokens = top_p_pick(scores, uniforms[rows, step], self.temperature, self.top_p, self.candidates,
                                        work=work_probs[:n]).cpu()
                    t_sampling += clock() - t0
                    if not bool(live.all()):
                        tokens = tokens.masked_fill(~live, self.pad_id)  # finished rows are fed pad, as in generate
                    out[rows[live], step] = tokens[live]
                    ended = live & torch.isin(tokens, self.stop_ids)
                    if bool(ended.any()):
                        lengths[rows[ended]] = step + 1
                    stopped = live.clone() if step == n_new - 1 else ended  # rows whose sampling ends here
                    live = live & ~ended
                else:  # only captured rows being completed are left
                    tokens = torch.full((n,), self.pad_id, dtype=torch.long)
                    stopped = torch.zeros(n, dtype=torch.bool)
                if track is None:
                    feeding = live
                    if step == n_new - 1:
                        break
                else:
                    live = live & (step < n_new - 1)
                    feeding = track.before_forward(step, rows, live, stopped, tokens, out)
                if not bool(feeding.any()):
                    break
                n_dead = n - int(feeding.sum())
                if n_dead and n_dead >= self.compact * n:  # drop the rows that feed nothing any more
                    keep = feeding.nonzero().squeeze(-1)
                    keep_dev = keep.to(dev)
                    rows, live, feeding, tokens = rows[keep], live[keep], feeding[keep], tokens[keep]
                    position, full_mask = position[keep_dev], full_mask[keep_dev]
                    cache.batch_select_indices(keep_dev)
                    self.compactions += 1
                position = position + 1
                t0 = clock()
                logits = self._forward(tokens[:, None].to(dev), full_mask[..., : p_len + step + 1], position, cache)
                t_forward += clock() - t0
                self.steps_run += 1
                if track is not None:
                    track.after_forward(step, rows, feeding, recorder.take())
        self.seconds = {"total": clock() - t_start, "prefill": t_prefill, "forward": t_forward, "sampling": t_sampling}
        return [out[i, : lengths[i]].tolist() for i in range(batch)]


# -- recording the input of a layer while sampling -------------------------------------------------------
class CaptureHooks(Protocol):
    """What ``DecodeLoop(..., capture=)`` asks of a capture (``rmlib.model.bottom_capture.StoreCapture``).

    ``layer``: the decoder layer whose input is recorded (the number of layers: the final norm's input).
    ``extra``: at most this many steps after the last sampling step complete captured rows.
    ``target(row, generated)``: called once per row when it stops sampling, with its generated ids (up to
    and including its stop token); returns the ids the recorded continuation must have (e.g. the reply as
    a reward model encodes it, end-of-turn included) or None (nothing recorded for this row). The loop
    keeps the recorded states of the tokens it has fed that agree with the target and feeds the target's
    remaining tokens on the row's cached state, one per step; a target that disagrees with a token
    already fed is reported by ``skip(row, reason)``. ``collect(row, prompt_hidden, reply_hidden)``:
    the row's states, (len(prompt), H) and (len(target), H), on the CPU.
    """

    layer: int
    extra: int

    def target(self, row: int, generated: list[int]) -> list[int] | None: ...

    def skip(self, row: int, reason: str) -> None: ...

    def collect(self, row: int, prompt_hidden: torch.Tensor, reply_hidden: torch.Tensor) -> None: ...


class _LayerInput:
    """Context manager: a forward pre-hook on decoder layer ``layer`` of ``model`` (the final norm when
    ``layer`` is the number of layers) keeps the hidden states entering it at each forward (``take``)."""

    def __init__(self, model, layer: int):
        decoder = decoder_of(unwrap_causal_lm(model))
        n_layers = len(decoder.layers)
        if not 0 <= int(layer) <= n_layers:
            raise ValueError(f"capture layer {layer} must be in [0, {n_layers}]")
        self.module = decoder.layers[layer] if layer < n_layers else decoder.norm
        self.handle = None
        self.last: torch.Tensor | None = None

    def _hook(self, module, args, kwargs):
        self.last = args[0] if args else kwargs["hidden_states"]

    def take(self) -> torch.Tensor:
        if self.last is None:
            raise RuntimeError("the capture hook saw no forward")
        h, self.last = self.last, None
        return h

    def __enter__(self):
        self.handle = self.module.register_forward_pre_hook(self._hook, with_kwargs=True)
        return self

    def __exit__(self, *exc):
        self.handle.remove()
        self.last = None


class _CaptureState:
    """The decode loop's bookkeeping for ``capture`` (see ``CaptureHooks``): per original row, the target
    continuation, the tokens of it still to feed, and a buffer of the recorded hidden states (column j:
    the continuation's j-th token, which every row feeds at step j)."""

    def __init__(self, capture, prompts, expand, prefill_hidden: torch.Tensor, columns: int):
        self.capture = capture
        width = prefill_hidden.shape[1]
        # left-padded prefill: prompt i's states are the last len(prompt) positions of its prefill row
        self.prompt_hidden = [prefill_hidden[int(expand[i]), width - len(p):] for i, p in enumerate(prompts)]
        self.reply_hidden = prefill_hidden.new_zeros(len(prompts), columns, prefill_hidden.shape[-1])
        self.columns = columns
        self.targets: dict[int, list[int]] = {}
        self.forced: dict[int, list[int]] = {}  # row -> target tokens still to feed
        self.finishing: list[int] = []  # rows whose last target token is fed at this step

    def before_forward(self, step, rows, live, stopped, tokens, out) -> torch.Tensor:
        """Ask the capture for the targets of the rows that stopped sampling at ``step``, put the forced
        tokens into ``tokens`` (in place) and return which batch rows feed a token worth recording."""
        for i in stopped.nonzero().squeeze(-1).tolist():
            row = int(rows[i])
            generated = out[row, : step + 1].tolist()
            target = self.capture.target(row, generated)
            if target is None:
                continue
            target = [int(t) for t in target]
            k = min(step, len(target))  # continuation tokens fed so far: generated[:step]
            if target[:k] != generated[:k]:
                diff = next(j for j in range(k) if target[j] != generated[j])
                self.capture.skip(row, f"the encoded reply differs from the sampled tokens at token {diff}")
                continue
            if len(target) > self.columns:
                self.capture.skip(row, f"the encoded reply ({len(target)} tokens) needs more than "
                                       f"{self.columns - step} steps after sampling")
                continue
            self.targets[row] = target
            if len(target) <= step:  # every state is recorded already
                self._finish(row)
            else:
                self.forced[row] = target[step:]
        feeding = live.clone()
        self.finishing = []
        for i, row in enumerate(rows.tolist()):
            rest = self.forced.get(row)
            if rest:
                tokens[i] = rest.pop(0)
                feeding[i] = True
                if not rest:
                    self.finishing.append(row)
        return feeding

    def after_forward(self, step, rows, feeding, hidden: torch.Tensor) -> None:
        """Record column ``step`` of the rows that fed a token, and hand over the rows completed."""
        sel = feeding.to(hidden.device)
        self.reply_hidden[rows[feeding].to(hidden.device), step] = hidden[sel, 0].to(self.reply_hidden.dtype)
        for row in self.finishing:
            del self.forced[row]
            self._finish(row)
        self.finishing = []

    def _finish(self, row: int) -> None:
        n = len(self.targets[row])
        self.capture.collect(row, self.prompt_hidden[row].cpu().clone(), self.reply_hidden[row, :n].cpu().clone())


# -- the reference path ------------------------------------------------------------------------------
@torch.no_grad()
def hf_generate_rows(policy, prompts: list[list[int]], seeds: list[int], stop_ids: list[int], pad_id: int,
                     max_new_tokens: int, temperature: float, top_p: float, bf16: bool) -> list[list[int]]:
    """The engine ``DecodeLoop`` replaced: HF ``generate`` (greedy over ``RowSampler``'s 0/-inf
    scores) on the left-padded batch; the same output as ``DecodeLoop`` (each row up to and
    including its first stop token). Kept as the reference of the tests and the benchmark."""
    input_ids, mask = left_pad(prompts, pad_id)
    device = next(policy.parameters()).device
    cfg = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1, eos_token_id=list(stop_ids),
                           pad_token_id=pad_id, repetition_penalty=1.0, no_repeat_ngram_size=0, use_cache=True)
    sampler = RowSampler(row_generators(seeds), temperature, top_p)
    with autocast(device, bf16):
        out = policy.generate(input_ids=input_ids.to(device), attention_mask=mask.to(device), generation_config=cfg,
                              logits_processor=LogitsProcessorList([sampler]))
    stops, rows = set(stop_ids), []
    for new in out[:, input_ids.shape[1]:].cpu().tolist():
        end = next((k + 1 for k, t in enumerate(new) if t in stops), len(new))
        rows.append(new[:end])
    return rows
