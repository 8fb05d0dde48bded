"""Bottom-store entries written while sampling: the frozen bottom runs once, in the sampler.

When the sampling policy's embeddings and layers ``[0, s)`` are the frozen bottom of the reward
models' backbone (Best-of-N from the base policy; a policy that trains only its top layers), the
decode loop computes, for every generated sequence, the very hidden states entering layer ``s``
that a ``BottomStore`` keeps for it. ``StoreCapture`` records them during sampling
(``rmlib.model.decoding.DecodeLoop(..., capture=)``) and writes them under the keys a separate build
(``BottomStore.ensure``) would use, so scoring the samples by any top-k reward model of that bottom
runs only its top layers: no second forward through the bottom.

The reward model's formatting is honoured: a sample is scored as ``encode_prompt_replies`` encodes
(prompt messages, reply text) with the RM's tokenizer and chat template, reply ending with the
end-of-turn (``<|im_end|>\\n`` for SmolLM2), which the sampled ids lack (the newline; for a reply cut at
``max_new_tokens`` also the end-of-turn). The decode loop feeds those missing tokens on the row's
cached state (a few extra steps in which the row rides along). A row is NOT captured, and its entry
is left to the plain build that scoring runs for whatever is missing, when its RM prompt tokens
differ from the sampling prompt tokens (another template, a prompt cut at ``max_length``), or when
the RM's re-encoding of the decoded reply differs from a sampled token already fed (a
non-canonical tokenization); ``fallback`` counts the reasons, and a warning says so.

Exactness: the states of a causal decoder at a token depend only on the tokens up to it, so the
captured states are the store's up to floating-point effects: left padding, a batch of other
shapes, the decode loop's attention kernel (``decode_attention``: float32 scores from the cached
keys, sdpa in the store build). In float32 that is ~2e-7 relative (tests/test_bottom_capture.py);
under bf16 autocast the two paths round differently: on SmolLM2-135M (layer 26, 31 samples of 32
tokens) the captured entries differ from a separate build by 1e-3 relative (L2, median; max 1.4e-3),
below the bf16 storage's own rounding, and rewards through them are within 0.03 of the plain path
(reward std 0.42), as through the separately built store (0.04).

Refusal: the store key covers the bottom weights (a digest), their dtype, the storage dtype and
autocast; ``StoreCapture`` raises ``ValueError`` unless the policy's bottom gives exactly the store's
key and the sampler's autocast is the store's. So the policy must be loaded in the reward models'
dtype (``load_reward_model``: float32; the matmuls run in bf16 under autocast either way).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable

import torch

from rmlib.model.bottom_store import BottomStore, prompt_digest, reply_digest, store_key
from rmlib.model.encoding import encode_prompt_replies
from rmlib.model.layers import unwrap_causal_lm

# steps after the last sampling step that complete captured rows: the end-of-turn tokens the RM's
# formatting adds, plus the last sampled token when a reply was cut at max_new_tokens
EXTRA_STEPS = 8


class StoreCapture:
    """Collects, while ``DecodeLoop`` samples, the bottom-store entries of the sampled sequences as a
    reward model encodes them; ``flush`` writes them into ``store`` (one shard per call).

    ``encode(row, generated_ids)`` -> (RM prompt ids, RM reply ids) of batch row ``row``, or None: how
    the consumer will encode the row (``rm_encoder`` builds it from ``encode_prompt_replies``).
    ``begin(prompts, encode)`` starts a batch (``prompts``: its sampling prompt ids, one per row).
    ``bf16``: the sampler's autocast, which must be the store's.
    """

    def __init__(self, store: BottomStore, policy, bf16: bool, extra: int = EXTRA_STEPS):
        key = store_key(unwrap_causal_lm(policy), store.start_layer, dtype=store.dtype,
                        bf16_autocast=bool(store.key["bf16_autocast"]))
        if key["store"] != store.key["store"]:
            what = [k for k in ("weights_sha", "config", "attn_implementation") if key[k] != store.key.get(k)]
            raise ValueError(f"the policy's bottom (embeddings + layers [0, {store.start_layer})) is not the one of the "
                             f"bottom store {store.root} ({', '.join(what) or 'key'} differ{'s' if len(what) == 1 else ''}:"
                             " other weights, or weights in another dtype): its states cannot be captured while "
                             "sampling; sample without capture (scoring then builds the store)")
        if bool(bf16) != bool(store.key["bf16_autocast"]):
            raise ValueError(f"the sampler runs {'with' if bf16 else 'without'} bf16 autocast but the bottom store "
                             f"{store.root} holds states computed {'with' if store.key['bf16_autocast'] else 'without'}")
        self.store = store
        self.layer = store.start_layer
        self.extra = int(extra)
        self.pending: dict[str, torch.Tensor] = {}
        self.captured = 0  # replies whose entries were recorded
        self.present = 0  # replies whose entries the store held already
        self.fallback: Counter[str] = Counter()  # reason -> rows left to the plain build
        self._prompts: list[list[int]] = []
        self._encode: Callable | None = None
        self._rm: dict[int, tuple[list[int], list[int]]] = {}

    def begin(self, prompts: list[list[int]], encode: Callable[[int, list[int]], tuple[list[int], list[int]] | None]):
        """Start a batch: its sampling prompts (one per row) and how each row is encoded for scoring."""
        self._prompts = [[int(t) for t in p] for p in prompts]
        self._encode = encode
        self._rm = {}
        return self

    # -- the DecodeLoop side (rmlib.model.decoding.CaptureHooks) ----------------------------------------
    def target(self, row: int, generated: list[int]) -> list[int] | None:
        encoded = self._encode(row, generated)
        if encoded is None:
            self.skip(row, "the row cannot be encoded for the reward model")
            return None
        prompt, reply = [int(t) for t in encoded[0]], [int(t) for t in encoded[1]]
        if prompt != self._prompts[row]:
            self.skip(row, "the reward model's prompt tokens differ from the sampling prompt tokens")
            return None
        if not reply:
            self.skip(row, "empty encoded reply")
            return None
        if reply_digest(prompt, reply) in self.store or reply_digest(prompt, reply) in self.pending:
            self.present += 1
            return None
        self._rm[row] = (prompt, reply)
        return reply

    def skip(self, row: int, reason: str) -> None:
        self.fallback[reason] += 1

    def collect(self, row: int, prompt_hidden: torch.Tensor, reply_hidden: torch.Tensor) -> None:
        prompt, reply = self._rm.pop(row)
        pk = prompt_digest(prompt)
        if pk not in self.store and pk not in self.pending:
            self.pending[pk] = prompt_hidden.to(self.store.dtype)
        self.pending[reply_digest(prompt, reply)] = reply_hidden.to(self.store.dtype)
        self.captured += 1

    # -- writing --------------------------------------------------------------------------------------
    def flush(self) -> int:
        """Write the entries recorded since the last flush into the store; returns how many."""
        written = self.store.put(self.pending) if self.pending else 0
        self.pending = {}
        return written

    def report(self) -> str:
        lost = sum(self.fallback.values())
        text = f"captured {self.captured} replies' bottom states ({self.present} already stored)"
        if lost:
            reasons = "; ".join(f"{n} x {why}" for why, n in self.fallback.most_common())
            text += f"; {lost} left to the plain store build: {reasons}"
        return text


def rm_encoder(rm_tokenizer, decode: Callable[[list[int]], str], messages: Callable[[int], list[dict]],
               stop_ids, max_length: int | None = None):
    """``encode(row, generated)`` for ``StoreCapture.begin``: what scoring the sample does
    (``rmlib.model.score_cache.score_samples`` -> ``encode_prompt_replies``) to (row's prompt messages, the
    reply text ``decode`` makes of the generated ids before the first stop token, as ``split_response``)."""
    stops = {int(t) for t in stop_ids}

    def encode(row: int, generated: list[int]):
        reply = generated[: next((k for k, t in enumerate(generated) if t in stops), len(generated))]
        prompt_ids, reply_ids = encode_prompt_replies(rm_tokenizer, [messages(row)], [decode(reply)], max_length)
        return prompt_ids[0], reply_ids[0]

    return encode
