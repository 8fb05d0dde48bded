"""Fast path for frozen-bottom modes (``topk``, ``frozen``): run the frozen bottom once, ever.

In mode ``topk`` the embeddings and decoder layers ``[0, s)`` (s = L - k) never change, so the
hidden state entering layer ``s`` is a fixed function of the token ids. ``BottomStore`` keeps
these activations on disk, content-addressed: one store per frozen bottom (weights digest, start
layer, storage dtype, autocast), one entry per prompt and per (prompt, reply). Every reward
model built from the same backbone with the same ``s`` shares it: each loss of a sweep, each
seed, each notebook, training pairs, held-out pairs, benchmark pairs, scenario responses and
Best-of-N samples. Only the top ``L - s`` layers run per model (``RewardModel.forward`` with
``hidden_in``); ``CachedPairCollator`` batches a pair dataset like ``PairCollator`` (chosen rows
first) with the cached inputs; ``rmlib.model.scoring.score_replies`` scores any (prompt, reply) list
through it.

Exactness: a causal decoder's hidden state at a real token depends only on the tokens before it,
and right-padded rows use position ids 0..T-1 (as ``LlamaModel.forward``), so a sequence cached
alone gives the same top-layer inputs as the sequence inside a padded batch. Prompts run once
with a KV cache and every reply of that prompt runs on it (positions continue after the prompt).
Stored in fp32 the cached path matches the plain one to ~1e-6; the default bf16 storage rounds
the layer-s input once (relative ~4e-3), the same order as bf16 autocast itself.

Storage: ``<cache_dir>/bottom/<store key>/`` holds ``meta.json`` (what the key covers) and
shards ``shard-*/`` {``hidden.bin`` (rows, H) raw memmap (bf16 as its uint16 bit pattern),
``index.npz`` (entry keys, row offsets, lengths), ``meta.json`` written last}. A shard is written
in a temp folder and renamed into place, at most every ``shard_rows`` rows, so a killed build
keeps every finished shard and a rerun computes only what is missing. Entry keys are BLAKE2b
digests of the token ids (a reply's key covers its prompt: its activations depend on it).

Entries can also come from elsewhere (``BottomStore.put``): ``rmlib.model.bottom_capture`` records
them while the base policy samples, when its bottom is this store's (the key is checked).

Ours because no library does it: transformers and peft cache keys/values within one generate call,
never a frozen bottom's activations across models, runs and processes.

Supported decoders: Llama-style (``model_type`` in ``SUPPORTED_MODEL_TYPES``). Others raise
``NotImplementedError``; Gemma-3 in particular interleaves sliding-window and full-attention
layers, each type with its own mask and its own rotary embedding.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm import tqdm
from transformers import DynamicCache

from rmlib.core.atomic_io import write_json_atomic
from rmlib.core.paths import cache_dir
from rmlib.core.precision import autocast, resolve_bf16
from rmlib.model import assets
from rmlib.model.encoding import pad_sequences, with_margins
from rmlib.model.layers import (
    check_supported,
    decoder_of,
    frozen_prefix,
    run_layers,
    supported,
)
from rmlib.model.reward_model import RewardModel, RewardOutput

logger = logging.getLogger(__name__)


STORE_FORMAT = 2


_STORAGE = {torch.bfloat16: np.uint16, torch.float32: np.float32}  # torch dtype -> numpy storage dtype


# -- store key ----------------------------------------------------------------------------------------
# config fields that change what the bottom computes (a sequence-classification export and the
# causal LM it came from differ in other fields, e.g. architectures and num_labels, but not in these)
_CONFIG_KEYS = ("model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "hidden_act", "rms_norm_eps", "rope_theta", "rope_scaling",
                "rope_parameters", "attention_bias", "mlp_bias", "vocab_size", "max_position_embeddings")


@torch.no_grad()
def _weights_digest(decoder: nn.Module, start_layer: int, samples: int = 1 << 16) -> str:
    """A cheap digest of the embeddings and layers [0, start_layer): name, shape, dtype and a strided
    sample of ``samples`` values of every tensor (catches other weights under the same name; a few
    ms for SmolLM2, so it is safe to call per scoring call)."""
    h = hashlib.sha256()
    modules = [decoder.embed_tokens, *decoder.layers[:start_layer]]
    for m_i, module in enumerate(modules):
        for name, p in module.named_parameters():
            flat = p.detach().reshape(-1)
            step = max(1, flat.numel() // samples)
            h.update(f"{m_i}.{name}:{tuple(p.shape)}:{p.dtype}".encode())
            h.update(flat[::step].float().cpu().numpy().tobytes())
    return h.hexdigest()


def store_key(model: nn.Module, start_layer: int, *, dtype: torch.dtype = torch.bfloat16,
              bf16_autocast: bool = True) -> dict:
    """What a store's activations depend on: the bottom's config and weights, the start layer, the
    attention implementation, the storage dtype and autocast. ``key["store"]`` hashes it all."""
    decoder = decoder_of(model)
    config = decoder.config.to_dict()
    key = {
        "format": STORE_FORMAT,
        "config": {k: config.get(k) for k in _CONFIG_KEYS if k in config},
        "attn_implementation": str(getattr(decoder.config, "_attn_implementation", None)),
        "weights_sha": _weights_digest(decoder, start_layer),
        "start_layer": int(start_layer),
        "dtype": str(dtype).removeprefix("torch."),
        "bf16_autocast": bool(bf16_autocast),
    }
    key["store"] = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
    return key


def prompt_digest(prompt: list[int]) -> str:
    """Entry key of a prompt's activations: BLAKE2b-128 of its token ids."""
    return _digest(b"p", prompt)


def reply_digest(prompt: list[int], reply: list[int]) -> str:
    """Entry key of a reply's activations, which depend on its prompt too."""
    return _digest(b"r", prompt, reply)


def _digest(kind: bytes, *parts) -> str:
    h = hashlib.blake2b(kind, digest_size=16)
    for part in parts:
        a = np.asarray(part, dtype=np.int64)
        h.update(len(a).to_bytes(8, "little"))
        h.update(a.tobytes())
    return h.hexdigest()


def pair_groups(encoded) -> list[tuple[list[int], list[list[int]]]]:
    """An encoded pair dataset (``encode_pairs``) as store groups: (prompt, [chosen, rejected])."""
    return [(list(p), [list(c), list(r)]) for p, c, r in
            zip(encoded["prompt_ids"], encoded["chosen_ids"], encoded["rejected_ids"])]


# -- the store ----------------------------------------------------------------------------------------
class BottomStore:
    """Content-addressed activations entering layer ``start_layer`` of one frozen bottom (module
    docstring). Open with ``BottomStore.for_model``; ``ensure`` computes what is missing."""

    def __init__(self, root: Path, key: dict, hidden_size: int, model: nn.Module | None = None):
        self.root = Path(root)
        self.key = key
        self.hidden_size = int(hidden_size)
        self.model = model  # computes missing entries (None: read-only)
        self.entries: dict[str, tuple[int, int, int]] = {}  # key -> (shard number, first row, rows)
        self.shards: list[Path] = []
        self._maps: list[np.memmap | None] = []

    # -- opening -----------------------------------------------------------------------------------
    @classmethod
    def for_model(cls, model: nn.Module, start_layer: int | None = None, *, root: str | os.PathLike | None = None,
                  dtype: torch.dtype = torch.bfloat16, bf16_autocast: bool = True) -> BottomStore:
        """The store of ``model``'s frozen bottom (layers below ``start_layer``, default: the first
        layer with a trainable parameter), created if new. ``root`` defaults to
        ``cache_dir()/bottom/<key>``; a ``root`` holding another key is refused."""
        decoder = decoder_of(model)
        check_supported(decoder)
        if dtype not in _STORAGE:
            raise ValueError(f"dtype={dtype} is not supported; allowed: {list(_STORAGE)}")
        start_layer = frozen_prefix(model) if start_layer is None else int(start_layer)
        if not 0 <= start_layer <= len(decoder.layers):
            raise ValueError(f"start_layer={start_layer} must be in [0, {len(decoder.layers)}]")
        key = store_key(model, start_layer, dtype=dtype, bf16_autocast=bf16_autocast)
        root = Path(root) if root is not None else cache_dir() / "bottom" / key["store"][:24]
        meta_file = root / "meta.json"
        if meta_file.exists():
            found = json.loads(meta_file.read_text())
            if found.get("store") != key["store"]:
                raise ValueError(f"{root} holds the bottom store of another model/start layer/dtype "
                                 f"({found.get('store', '?')[:12]} != {key['store'][:12]}); use another root")
        else:
            root.mkdir(parents=True, exist_ok=True)
            meta = {**key, "hidden_size": decoder.config.hidden_size, "num_layers": len(decoder.layers),
                    "model": str(getattr(model, "base_model", "") or decoder.config._name_or_path)}

            write_json_atomic(meta_file, meta)
        store = cls(root, key, decoder.config.hidden_size, model)
        return store.refresh()

    @property
    def start_layer(self) -> int:
        return int(self.key["start_layer"])

    @property
    def dtype(self) -> torch.dtype:
        return getattr(torch, self.key["dtype"])

    @property
    def rows(self) -> int:
        """Rows stored over all shards."""
        return sum(n for _, _, n in self.entries.values())

    def refresh(self) -> BottomStore:
        """Read the index of every complete shard not read yet (also those other processes wrote)."""
        known = {p.name for p in self.shards}
        for shard in sorted(self.root.glob("shard-*")):
            if shard.name in known or not (shard / "meta.json").exists():
                continue
            try:
                with np.load(shard / "index.npz") as index:
                    keys, offsets, lengths = index["keys"], index["offsets"], index["lengths"]
            except (OSError, ValueError, KeyError, zipfile.BadZipFile):
                logger.warning("skipping unreadable bottom-store shard %s", shard)
                continue
            number = len(self.shards)
            self.shards.append(shard)
            self._maps.append(None)
            for k, off, n in zip(keys.tolist(), offsets.tolist(), lengths.tolist()):
                self.entries.setdefault(k, (number, off, n))
        return self

    def __contains__(self, key: str) -> bool:
        return key in self.entries

    def __getstate__(self):  # memmaps are reopened lazily (e.g. in a dataloader worker)
        state = dict(self.__dict__)
        state["_maps"] = [None] * len(self._maps)
        return state

    # -- reading -----------------------------------------------------------------------------------
    def _rows(self, key: str) -> np.ndarray:
        shard, off, n = self.entries[key]
        if self._maps[shard] is None:
            meta = json.loads((self.shards[shard] / "meta.json").read_text())
            self._maps[shard] = np.memmap(self.shards[shard] / "hidden.bin", dtype=_STORAGE[self.dtype], mode="r",
                                          shape=(int(meta["rows"]), self.hidden_size))
        return self._maps[shard][off : off + n]

    def sequence(self, prompt: list[int], reply: list[int]) -> torch.Tensor:
        """Stored input of layer ``start_layer`` for prompt + reply: (len(prompt) + len(reply), H)."""
        pk, rk = prompt_digest(prompt), reply_digest(prompt, reply)
        if pk not in self.entries or rk not in self.entries:
            raise KeyError(f"a sequence ({len(prompt)} prompt + {len(reply)} reply tokens) is not in the bottom "
                           f"store {self.root}: call ensure() with it first")
        rows = np.concatenate([self._rows(pk), self._rows(rk)])
        hidden = torch.from_numpy(rows)
        return hidden.view(torch.bfloat16) if self.dtype == torch.bfloat16 else hidden

    def check_model(self, model: nn.Module) -> None:
        """Raise ValueError if ``model``'s bottom is not this store's (other weights or config)."""
        key = store_key(model, self.start_layer, dtype=self.dtype, bf16_autocast=self.key["bf16_autocast"])
        if key["store"] != self.key["store"]:
            raise ValueError(f"bottom store {self.root} was built from other bottom weights/config than this model's")

    # -- computing ---------------------------------------------------------------------------------
    def missing(self, groups) -> list[tuple[list[int], bool, list[list[int]]]]:
        """What ``ensure`` would compute: [(prompt, prompt rows missing, missing replies)]."""
        todo: dict[str, tuple[list[int], bool, dict[str, list[int]]]] = {}
        for g, (prompt, replies) in enumerate(groups):
            prompt = [int(t) for t in prompt]
            if len(prompt) == 0:
                raise ValueError(f"group {g}: empty prompt (the store keys replies by their prompt)")
            pk = prompt_digest(prompt)
            entry = todo.get(pk)
            for r, reply in enumerate(replies):
                if len(reply) == 0:
                    raise ValueError(f"group {g}, reply {r}: empty reply")
                reply = [int(t) for t in reply]
                rk = reply_digest(prompt, reply)
                if rk in self.entries:
                    continue
                if entry is None:
                    entry = todo[pk] = (prompt, pk not in self.entries, {})
                entry[2][rk] = reply
            if entry is None and pk not in self.entries:
                todo[pk] = (prompt, True, {})
        return [(p, need, list(replies.values())) for p, need, replies in todo.values()]

    @torch.no_grad()
    def ensure(self, groups, *, batch_tokens: int = 4096, shard_rows: int = 1 << 17, progress: bool = True,
               desc: str = "") -> int:
        """Compute and store every (prompt, reply) of ``groups`` = [(prompt ids, [reply ids, ...])] not
        stored yet; returns the number of replies computed. ``batch_tokens`` bounds the padded reply
        tokens (and prompt tokens) of one forward; a shard is committed every ``shard_rows`` rows."""
        if self.model is None:
            raise RuntimeError(f"bottom store {self.root} was opened without a model: it cannot compute")
        self.refresh()
        todo = self.missing(groups)
        if not todo:
            return 0
        _remove_dead_temp_dirs(self.root)
        batches = _plan_batches(todo, batch_tokens)
        n_replies = sum(len(b[2]) for batch in batches for b in batch)
        bar = tqdm(total=n_replies, unit="seq", disable=not progress,
                   desc=desc or f"caching the input of layer {self.start_layer}")
        decoder = decoder_of(self.model)
        was_training = self.model.training
        self.model.eval()
        try:
            shard: list = []
            rows = 0
            for batch in batches:
                shard.append(batch)
                rows += sum(len(p) * need + sum(len(r) for r in replies) for p, need, replies in batch)
                if rows >= shard_rows:
                    self._write_shard(decoder, shard, rows, bar)
                    shard, rows = [], 0
            if shard:
                self._write_shard(decoder, shard, rows, bar)
        finally:
            bar.close()
            self.model.train(was_training)
        self.refresh()
        return n_replies

    def put(self, entries: dict[str, torch.Tensor]) -> int:
        """Store precomputed entries {entry key (``prompt_digest``/``reply_digest``): (n, H) states entering
        ``start_layer``} as one new shard, skipping keys already stored; returns the number written. The
        caller answers for the states being this store's (``rmlib.model.bottom_capture`` checks the key)."""
        self.refresh()
        todo = [(k, h) for k, h in entries.items() if k not in self.entries]
        if not todo:
            return 0
        for k, h in todo:
            if h.ndim != 2 or h.shape[1] != self.hidden_size or h.shape[0] == 0:
                raise ValueError(f"entry {k}: states of shape {tuple(h.shape)}, expected (n >= 1, {self.hidden_size})")
        _remove_dead_temp_dirs(self.root)
        self._save_shard(sum(h.shape[0] for _, h in todo), iter(todo))
        return len(todo)

    def _write_shard(self, decoder: nn.Module, batches: list, rows: int, bar) -> None:
        def computed():
            device = decoder.embed_tokens.weight.device
            for batch in batches:
                prompts = [p for p, _, _ in batch]
                replies = [r for _, _, rs in batch for r in rs]
                owner = [i for i, (_, _, rs) in enumerate(batch) for _ in rs]
                with autocast(device, bool(self.key["bf16_autocast"])):
                    h_prompt, h_reply = bottom_prompt_replies(decoder, prompts, replies, owner, self.start_layer)
                for i, (p, need, _) in enumerate(batch):
                    if need:
                        yield prompt_digest(p), h_prompt[i, : len(p)]
                for j, reply in enumerate(replies):
                    yield reply_digest(prompts[owner[j]], reply), h_reply[j, : len(reply)]
                bar.update(len(replies))

        self._save_shard(rows, computed())

    def _save_shard(self, rows: int, items) -> None:
        """Write ``items`` = iterable of (entry key, (n, H) states), ``rows`` rows in all, as a new shard."""
        name = f"shard-{time.time_ns():020d}-{os.getpid()}-{os.urandom(3).hex()}"  # sorts in creation order

        def write(tmp: Path) -> None:
            (tmp / "builder.pid").write_text(str(os.getpid()))
            out = np.memmap(tmp / "hidden.bin", dtype=_STORAGE[self.dtype], mode="w+", shape=(rows, self.hidden_size))
            keys, offsets, lengths = [], [], []
            cursor = 0
            for key, h in items:  # (n, H) -> the next n rows
                h = h.to(self.dtype).cpu()
                out[cursor : cursor + h.shape[0]] = (h.view(torch.uint16) if self.dtype == torch.bfloat16 else h).numpy()
                keys.append(key)
                offsets.append(cursor)
                lengths.append(h.shape[0])
                cursor += h.shape[0]
            assert cursor == rows, (cursor, rows)
            out.flush()
            del out
            np.savez(tmp / "index.npz", keys=np.array(keys), offsets=np.array(offsets, np.int64),
                     lengths=np.array(lengths, np.int64))
            (tmp / "builder.pid").unlink()
            (tmp / "meta.json").write_text(json.dumps({"rows": rows, "entries": len(keys),
                                                       "created": time.strftime("%Y-%m-%dT%H:%M:%S")}))

        assets._atomic_save_dir(self.root / name, write)
        self.refresh()


def _plan_batches(todo, batch_tokens: int, window: int = 32) -> list[list[tuple[list[int], bool, list[list[int]]]]]:
    """Forward batches for ``todo`` = [(prompt, prompt rows missing, replies)], padding kept small.

    A batch costs (prompts x longest prompt) + (replies x longest reply) tokens. Prompts are sorted
    by length, and within windows of ``window`` batches by their longest reply; a prompt with many
    replies (Best-of-N samples) is split into chunks that fit ``batch_tokens`` (its prompt then runs
    once per chunk, its rows stored once)."""
    items = []
    for prompt, need, replies in todo:
        replies = sorted(replies, key=len, reverse=True)
        if not replies:
            items.append((prompt, need, []))
            continue
        chunk: list[list[int]] = []
        for reply in replies:
            if chunk and (len(chunk) + 1) * len(chunk[0]) > batch_tokens:
                items.append((prompt, need, chunk))
                need, chunk = False, []
            chunk.append(reply)
        items.append((prompt, need, chunk))
    items.sort(key=lambda it: -len(it[0]))
    longest_reply = lambda it: max((len(r) for r in it[2]), default=0)  # noqa: E731
    ordered = []
    step = max(1, window * max(1, batch_tokens // 512))
    for k in range(0, len(items), step):
        ordered += sorted(items[k : k + step], key=lambda it: -longest_reply(it))
    batches, batch = [], []
    max_p = max_r = n_r = 0
    for it in ordered:
        p, r, k = max(max_p, len(it[0])), max(max_r, longest_reply(it)), n_r + len(it[2])
        if batch and ((len(batch) + 1) * p > batch_tokens or k * r > batch_tokens):
            batches.append(batch)
            batch, p, r, k = [], len(it[0]), longest_reply(it), len(it[2])
        batch.append(it)
        max_p, max_r, n_r = p, r, k
    if batch:
        batches.append(batch)
    return batches


def _remove_dead_temp_dirs(root: Path) -> None:
    """Remove temp shard folders whose builder process is gone (a killed build's leftovers)."""

    if not root.is_dir():
        return
    for tmp in root.glob(".shard-*.tmp*"):
        try:
            pid = int((tmp / "builder.pid").read_text())
            os.kill(pid, 0)  # alive: another build in progress, leave it
            continue
        except ProcessLookupError:
            pass
        except (OSError, ValueError):
            if time.time() - tmp.stat().st_mtime < 24 * 3600:
                continue  # no pid yet (just created) and recent: leave it
        shutil.rmtree(tmp, ignore_errors=True)


def _padded(seqs: list[list[int]], device) -> tuple[torch.Tensor, torch.Tensor]:
    batch = pad_sequences(seqs, [[0] * len(s) for s in seqs], pad_token_id=0, pad_to_multiple_of=None)
    return batch["input_ids"].to(device), batch["attention_mask"].to(device)


@torch.no_grad()
def bottom_prompt_replies(decoder: nn.Module, prompts: list[list[int]], replies: list[list[int]], owner: list[int],
                          start_layer: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Hidden states entering ``start_layer`` for P prompts and R replies, reply j continuing
    prompt ``owner[j]``: (P, max prompt, H) and (R, max reply, H), right-padded.

    The prompts run once (P, T_p) keeping their keys/values; the KV rows are gathered per reply
    and the replies run on them (R, T_r) with positions continuing after their prompt."""

    device = decoder.embed_tokens.weight.device
    ids, mask = _padded(prompts, device)  # (P, T_p)
    kv = DynamicCache()
    h_prompt = run_layers(decoder, decoder.embed_tokens(ids), mask, 0, start_layer, past_key_values=kv)
    if not replies:
        return h_prompt, h_prompt.new_zeros(0, 0, h_prompt.shape[-1])
    index = torch.tensor(owner, device=device)
    kv.reorder_cache(index)  # (R, ...): each reply's prompt keys/values
    r_ids, r_mask = _padded(replies, device)  # (R, T_r)
    full_mask = torch.cat([mask[index], r_mask], dim=1)  # (R, T_p + T_r)
    p_len = torch.tensor([len(p) for p in prompts], device=device)[index]
    pos = p_len[:, None] + torch.arange(r_ids.shape[1], device=device)  # (R, T_r)
    h_reply = run_layers(decoder, decoder.embed_tokens(r_ids), full_mask, 0, start_layer, position_ids=pos,
                         past_key_values=kv)
    return h_prompt, h_reply


# -- choosing the path ---------------------------------------------------------------------------------
def store_for(model: nn.Module, *, bf16_autocast: bool | str = "auto", groups=None) -> BottomStore | None:
    """The bottom store a reward model scores and trains through, or None for the plain path.

    Used when the model's bottom is frozen (``model.frozen_layers`` > 0: modes ``topk`` and
    ``frozen``, also after ``load_reward_model``), the decoder is supported, and the environment
    variable ``RMLIB_FASTPATH`` is not ``0``. The storage dtype is bf16 with bf16 autocast, else fp32
    (``bf16_autocast="auto"``: ``rmlib.core.precision.resolve_bf16``).

    Any store of the same bottom at ``frozen_layers`` or BELOW can serve (the frozen layers between
    its layer and the trainable ones then run forward only). With ``groups`` (what is about to be
    scored or trained on) the store that already holds the most of it is taken — recomputing the
    bottom costs far more than those few extra layers — ties going to the higher layer; without,
    the highest existing one. None existing: a new one at ``frozen_layers``."""
    if os.environ.get("RMLIB_FASTPATH", "1") == "0" or not isinstance(model, RewardModel):
        return None
    start = int(getattr(model, "frozen_layers", 0) or 0)
    if start <= 0 or not supported(model):
        return None

    bf16_autocast = resolve_bf16(bf16_autocast, next(model.parameters()).device)
    dtype = torch.bfloat16 if bf16_autocast else torch.float32
    layers = _existing_starts(model, start, dtype, bf16_autocast) or [start]
    stores = [BottomStore.for_model(model, layer, dtype=dtype, bf16_autocast=bf16_autocast) for layer in layers]
    if groups is None or len(stores) == 1:
        return stores[0]
    return min(stores, key=lambda st: (_missing_tokens(st, groups), -st.start_layer))


def _missing_tokens(store: BottomStore, groups) -> int:
    """Tokens ``store.ensure(groups)`` would have to run through the bottom."""
    return sum(len(p) * need + sum(len(r) for r in replies) for p, need, replies in store.missing(groups))


def _existing_starts(model: nn.Module, start: int, dtype: torch.dtype, bf16_autocast: bool) -> list[int]:
    """Start layers <= ``start``, highest first, at which a store of this model's bottom exists."""
    root = cache_dir() / "bottom"
    found: dict[int, set[str]] = {}  # start layer -> store keys there (other bottoms have stores too)
    for meta_file in root.glob("*/meta.json"):
        try:
            meta = json.loads(meta_file.read_text())
        except (OSError, ValueError):
            continue
        if (meta.get("format") == STORE_FORMAT and meta.get("dtype") == str(dtype).removeprefix("torch.")
                and meta.get("bf16_autocast") == bf16_autocast and 0 < int(meta.get("start_layer", -1)) <= start):
            found.setdefault(int(meta["start_layer"]), set()).add(meta.get("store", ""))
    return [layer for layer in sorted(found, reverse=True)
            if store_key(model, layer, dtype=dtype, bf16_autocast=bf16_autocast)["store"] in found[layer]]


# -- batching and the forward --------------------------------------------------------------------------
@dataclass
class CachedPairCollator:
    """Batch B encoded pairs into 2B right-padded sequences, chosen rows first (the layout of
    ``PairCollator``): input_ids, attention_mask, response_mask (2B, T), hidden_in (2B, T, H) in the
    store dtype (zeros on padding), start_layer (int), and ``margin`` (B,) when the pairs carry scores
    (``rmlib.model.encoding.pair_margins``). Every pair must be in the store."""

    store: BottomStore
    pad_token_id: int
    pad_to_multiple_of: int | None = 8

    def __call__(self, features: list[dict]) -> dict:
        seqs, resp, hiddens = [], [], []
        for key in ("chosen_ids", "rejected_ids"):
            for f in features:
                prompt, reply = list(f["prompt_ids"]), list(f[key])
                hiddens.append(self.store.sequence(prompt, reply))
                seqs.append(prompt + reply)
                resp.append([0] * len(prompt) + [1] * len(reply))
        batch = pad_sequences(seqs, resp, self.pad_token_id, self.pad_to_multiple_of)
        return with_margins(with_stored_inputs(batch, hiddens, self.store), features)


def with_stored_inputs(batch: dict, hiddens: list[torch.Tensor], store: BottomStore) -> dict:
    """Add ``hidden_in`` (N, T, H) (row i = ``hiddens[i]``, zeros on padding) and ``start_layer`` to a
    right-padded batch, the extra inputs of ``RewardModel.forward`` on the fast path."""
    n, t = batch["input_ids"].shape
    hidden_in = torch.zeros(n, t, store.hidden_size, dtype=store.dtype)  # (N, T, H)
    for row, h in enumerate(hiddens):
        hidden_in[row, : h.shape[0]] = h
    batch["hidden_in"] = hidden_in
    batch["start_layer"] = store.start_layer
    return batch


def forward_cached(model: RewardModel, batch: dict, response_mask: torch.Tensor | None = None,
                   return_logps: bool = False) -> RewardOutput:
    """``RewardModel.forward`` on a ``CachedPairCollator`` batch (layers [s, L) + norm + head).

    ``response_mask`` defaults to ``batch["response_mask"]``. Autocast is the caller's."""
    response_mask = batch["response_mask"] if response_mask is None else response_mask
    return model(batch["input_ids"], batch["attention_mask"], response_mask, return_logps=return_logps,
                 hidden_in=batch["hidden_in"], start_layer=int(batch["start_layer"]))

