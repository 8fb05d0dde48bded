"""Fast path for frozen bottoms vs the plain RewardModel forward (values, gradients), and the bottom store."""

from __future__ import annotations

import copy
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from conftest import make_tiny_lm
from datasets import Dataset

from rmlib.model import bottom_store, layers
from rmlib.model.bottom_store import (
    BottomStore,
    CachedPairCollator,
    forward_cached,
    pair_groups,
    store_for,
)
from rmlib.model.encoding import PairCollator, encode_pairs
from rmlib.model.layers import (
    bottom_forward,
    check_frozen_below,
    frozen_prefix,
    top_forward,
)
from rmlib.model.reward_model import ModelSpec, build_reward_model
from rmlib.model.scoring import score_pairs, score_replies
from rmlib.reward.losses import LossSpec, compute_loss

LAYERS = 4


def _user(text):
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def pairs():
    """Pairs of very different prompt and reply lengths; the long one gets its prompt cut at 64 tokens."""
    return Dataset.from_dict({
        "id": ["a", "b", "c", "d"],
        "prompt": [_user("Hi there"), _user("Tell me a story about a cat and a dog who became friends. " * 3),
                   _user("x"), _user("What is 2 + 2?")],
        "chosen": ["Sure thing, here it is.", "Once upon a time.", "A much longer reply that goes on and on " * 2,
                   "4"],
        "rejected": ["No.", "I would rather not talk about cats or dogs today.", "y", "5, I think."],
    })


@pytest.fixture(scope="module")
def encoded(pairs, tokenizer):
    enc, stats = encode_pairs(pairs, tokenizer, max_length=64)
    assert stats.prompt_truncated == 1 and len(set(enc["length"])) == len(enc)
    return enc


def _topk_model(tokenizer, seed=0, top_k=2):
    lm = make_tiny_lm(tokenizer, seed=seed, layers=LAYERS)
    return build_reward_model(ModelSpec(backbone="tiny-llama", mode="topk", top_k_layers=top_k), lm=lm, seed=seed)


def _store(model, tmp_path, encoded, batch_tokens=4096, **kw):
    kw = {"dtype": torch.float32, "bf16_autocast": False, **kw}
    store = BottomStore.for_model(model, root=tmp_path / f"store-{kw['dtype']}-{kw['bf16_autocast']}", **kw)
    store.ensure(pair_groups(encoded), batch_tokens=batch_tokens, progress=False)
    return store


class TestTopForward:
    @pytest.mark.parametrize("start", [0, 1, LAYERS - 1, LAYERS])
    def test_equals_plain_decoder_from_any_layer(self, tokenizer, encoded, start):
        model = _topk_model(tokenizer).eval()
        batch = PairCollator(tokenizer.pad_token_id)(list(encoded))  # right-padded, 4 lengths
        ids, mask = batch["input_ids"], batch["attention_mask"]
        assert (mask == 0).any()
        with torch.no_grad():
            plain = model.decoder(input_ids=ids, attention_mask=mask, output_hidden_states=True)
            mine = bottom_forward(model, ids, mask, start)
            if start < LAYERS:  # HF's own record of what enters layer `start` (its last entry is post-norm)
                torch.testing.assert_close(mine, plain.hidden_states[start], atol=1e-5, rtol=1e-5)
            hidden_in = plain.hidden_states[start] if start < LAYERS else mine
            out = top_forward(model, hidden_in, mask, start)
        torch.testing.assert_close(out, plain.last_hidden_state, atol=1e-5, rtol=1e-5)

    def test_unsupported_decoder_is_named(self):
        from transformers import Gemma3TextConfig, Gemma3TextModel

        cfg = Gemma3TextConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                               num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                               layer_types=["sliding_attention", "full_attention"])
        decoder = Gemma3TextModel(cfg)
        assert not layers.supported(decoder)
        with pytest.raises(NotImplementedError, match="sliding-window"):
            top_forward(decoder, torch.zeros(1, 3, 16), torch.ones(1, 3, dtype=torch.long), 1)


class TestCachedPath:
    @pytest.mark.parametrize("batch_tokens", [16, 4096])
    def test_fp32_values_and_gradients_equal_plain(self, tokenizer, encoded, tmp_path, batch_tokens):
        model = _topk_model(tokenizer)
        store = _store(model, tmp_path, batch_tokens=batch_tokens, encoded=encoded)
        assert store.start_layer == frozen_prefix(model) == model.frozen_layers == LAYERS - 2
        features = list(encoded)
        plain_batch = PairCollator(tokenizer.pad_token_id)(features)
        batch = CachedPairCollator(store, tokenizer.pad_token_id)(features)
        for key in plain_batch:  # same layout as PairCollator, chosen rows first
            assert torch.equal(batch[key], plain_batch[key]), key
        assert batch["hidden_in"].shape == (*plain_batch["input_ids"].shape, 32)

        def run(fn):
            model.zero_grad()
            out = fn()
            b = out.rewards.shape[0] // 2
            loss, _ = compute_loss(LossSpec(reward="bt"), out.rewards[:b], out.rewards[b:])
            (loss + 1e-3 * out.logps.sum()).backward()  # a GRM-like term, so the LM head path is checked too
            grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
            return out, grads

        ref, ref_grads = run(lambda: model(plain_batch["input_ids"], plain_batch["attention_mask"],
                                           plain_batch["response_mask"], return_logps=True))
        got, grads = run(lambda: forward_cached(model, batch, return_logps=True))
        for name in ("rewards", "hidden", "logps"):
            torch.testing.assert_close(getattr(got, name), getattr(ref, name), atol=1e-5, rtol=1e-5)
        assert grads.keys() == ref_grads.keys() and any("layers.3." in n for n in grads)
        assert not any("layers.1." in n for n in grads)
        for name in grads:
            torch.testing.assert_close(grads[name], ref_grads[name], atol=1e-5, rtol=1e-5, msg=name)

    def test_adamw_steps_follow_the_plain_trajectory(self, tokenizer, encoded, tmp_path):
        """Three optimizer steps from the store end at the same weights as three plain steps (fp32)."""
        features = list(encoded)
        batches = [features[:2], features[2:], features[1:3]]
        final = {}
        for cached in (False, True):
            model = _topk_model(tokenizer)
            assert layers.supported(model)
            collate = (CachedPairCollator(_store(model, tmp_path, encoded=encoded), tokenizer.pad_token_id) if cached
                       else PairCollator(tokenizer.pad_token_id))
            # eps far above the gradients' fp32 rounding: where |g| ~ eps (default 1e-8) Adam's g / (|g| + eps)
            # turns a 1e-10 gradient difference into a weight difference of ~1e-5 (it did, after a head-init change)
            opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, eps=1e-3)
            for feats in batches:
                batch = collate(feats)
                out = forward_cached(model, batch) if cached else model(batch["input_ids"], batch["attention_mask"])
                b = len(feats)
                compute_loss(LossSpec(reward="bt"), out.rewards[:b], out.rewards[b:])[0].backward()
                opt.step()
                opt.zero_grad()
            final[cached] = model.trainable_state_dict()
        for name, value in final[False].items():
            torch.testing.assert_close(final[True][name], value, atol=1e-5, rtol=1e-5, msg=name)

    def test_bf16_store_under_autocast_within_bf16_tolerance(self, tokenizer, encoded, tmp_path):
        model = _topk_model(tokenizer)
        store = _store(model, tmp_path, encoded=encoded, dtype=torch.bfloat16, bf16_autocast=True)
        features = list(encoded)
        plain_batch = PairCollator(tokenizer.pad_token_id)(features)
        batch = CachedPairCollator(store, tokenizer.pad_token_id)(features)
        assert batch["hidden_in"].dtype == torch.bfloat16
        with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
            ref = model(plain_batch["input_ids"], plain_batch["attention_mask"], plain_batch["response_mask"],
                        return_logps=True)
            got = forward_cached(model, batch, return_logps=True)
        for name in ("rewards", "hidden", "logps"):
            a, b = getattr(got, name).float(), getattr(ref, name).float()
            torch.testing.assert_close(a, b, rtol=2e-2, atol=2e-2 * float(b.abs().max()))

    def test_refuses_a_model_whose_bottom_trains_or_differs(self, tokenizer, encoded, tmp_path):
        store = _store(_topk_model(tokenizer), tmp_path, encoded=encoded)
        full = build_reward_model(ModelSpec(backbone="tiny-llama", mode="full"), lm=make_tiny_lm(tokenizer, layers=4))
        batch = CachedPairCollator(store, tokenizer.pad_token_id)(list(encoded))
        with pytest.raises(ValueError, match="frozen"):
            forward_cached(full, batch)
        with pytest.raises(ValueError, match="frozen"):
            check_frozen_below(full, 1)
        with pytest.raises(ValueError, match="other bottom weights"):
            store.check_model(_topk_model(tokenizer, seed=1))
        store.check_model(_topk_model(tokenizer))

    def test_collator_names_a_pair_missing_from_the_store(self, tokenizer, encoded, tmp_path):
        store = _store(_topk_model(tokenizer), tmp_path, encoded=encoded.select([0, 1]))
        with pytest.raises(KeyError, match="not in the bottom store"):
            CachedPairCollator(store, tokenizer.pad_token_id)(list(encoded))

    def test_collator_emits_the_per_pair_margins_of_scored_pairs(self, tokenizer, encoded, tmp_path):
        store = _store(_topk_model(tokenizer), tmp_path, encoded=encoded)
        scored = encoded.add_column("chosen_score", [1.0, 5.0, 2.0, 0.0]).add_column("rejected_score",
                                                                                     [3.0, 1.0, 2.0, 0.5])
        cached = CachedPairCollator(store, tokenizer.pad_token_id)(list(scored))
        plain = PairCollator(tokenizer.pad_token_id)(list(scored))
        torch.testing.assert_close(cached["margin"], torch.tensor([2.0, 4.0, 0.0, 0.5]))
        torch.testing.assert_close(cached["margin"], plain["margin"])
        assert "margin" not in CachedPairCollator(store, tokenizer.pad_token_id)(list(encoded))


class TestStore:
    def test_computes_only_what_is_missing_and_stores_each_prompt_once(self, tokenizer, encoded, tmp_path):
        model = _topk_model(tokenizer)
        store = BottomStore.for_model(model, root=tmp_path / "s", dtype=torch.float32, bf16_autocast=False)
        groups = pair_groups(encoded)
        assert store.ensure(groups[:2], progress=False) == 4
        assert store.ensure(groups[:2], progress=False) == 0
        assert store.ensure(groups, progress=False) == 4  # only the two new pairs
        assert len(store.entries) == 4 + 8  # 4 prompts + 8 replies
        tokens = sum(len(p) + len(c) + len(r) for p, (c, r) in groups)
        assert store.rows == tokens  # prompt rows once per pair, not once per side
        shared = [(groups[0][0], [groups[0][1][0], [5, 6, 7]])]  # a stored prompt with a new reply
        assert store.ensure(shared, progress=False) == 1 and store.rows == tokens + 3
        # a fresh handle (another process, a later session) sees everything
        again = BottomStore.for_model(model, root=tmp_path / "s", dtype=torch.float32, bf16_autocast=False)
        where = lambda s: {k: (s.shards[i].name, off, n) for k, (i, off, n) in s.entries.items()}  # noqa: E731
        assert where(again) == where(store) and again.ensure(groups, progress=False) == 0

    def test_shared_by_models_with_the_same_bottom_only(self, tokenizer, tmp_path, monkeypatch):
        monkeypatch.setenv("RMLIB_CACHE_DIR", str(tmp_path))
        lm = make_tiny_lm(tokenizer, layers=LAYERS)
        a = build_reward_model(ModelSpec(backbone="tiny-llama", mode="topk", top_k_layers=2), lm=copy.deepcopy(lm), seed=0)
        b = build_reward_model(ModelSpec(backbone="tiny-llama", mode="topk", top_k_layers=2, head="mlp"),
                               lm=copy.deepcopy(lm), seed=5)  # another head and seed: same bottom
        with torch.no_grad():  # top layers may differ: they are not part of the key
            b.decoder.layers[-1].mlp.up_proj.weight.mul_(2)
        roots = {BottomStore.for_model(m, dtype=torch.float32, bf16_autocast=False).root for m in (a, b)}
        assert len(roots) == 1 and next(iter(roots)).parent == tmp_path / "bottom"
        others = [
            BottomStore.for_model(_topk_model(tokenizer, seed=1), dtype=torch.float32, bf16_autocast=False),
            BottomStore.for_model(a, start_layer=1, dtype=torch.float32, bf16_autocast=False),
            BottomStore.for_model(a, dtype=torch.bfloat16, bf16_autocast=False),
            BottomStore.for_model(a, dtype=torch.float32, bf16_autocast=True),
        ]
        assert len(roots | {s.root for s in others}) == 5
        with pytest.raises(ValueError, match="another model"):
            BottomStore.for_model(_topk_model(tokenizer, seed=1), root=others[1].root)

    def test_store_for_picks_the_path(self, tokenizer, tmp_path, monkeypatch):
        monkeypatch.setenv("RMLIB_CACHE_DIR", str(tmp_path))
        lm = make_tiny_lm(tokenizer, layers=LAYERS)
        assert store_for(build_reward_model(ModelSpec(backbone="t", mode="full"), lm=copy.deepcopy(lm))) is None
        assert store_for(build_reward_model(ModelSpec(backbone="t", mode="lora"), lm=copy.deepcopy(lm))) is None
        frozen = build_reward_model(ModelSpec(backbone="t", mode="frozen"), lm=copy.deepcopy(lm))
        assert store_for(frozen).start_layer == LAYERS
        topk = _topk_model(tokenizer)
        assert store_for(topk).start_layer == LAYERS - 2
        monkeypatch.setenv("RMLIB_FASTPATH", "0")
        assert store_for(topk) is None

    def test_a_model_with_fewer_trainable_layers_reuses_a_lower_store(self, tokenizer, encoded, tmp_path, monkeypatch):
        monkeypatch.setenv("RMLIB_CACHE_DIR", str(tmp_path))
        lm = make_tiny_lm(tokenizer, layers=LAYERS)
        top2 = build_reward_model(ModelSpec(backbone="t", mode="topk", top_k_layers=2), lm=copy.deepcopy(lm))
        top1 = build_reward_model(ModelSpec(backbone="t", mode="topk", top_k_layers=1), lm=copy.deepcopy(lm))
        assert store_for(top1, bf16_autocast=False).start_layer == LAYERS - 1  # nothing below: its own layer
        low = store_for(top2, bf16_autocast=False)
        assert low.start_layer == LAYERS - 2  # its own: nothing between
        assert store_for(top1, bf16_autocast=False).start_layer == LAYERS - 1  # the highest existing one
        low.ensure(pair_groups(encoded), progress=False)  # the lower store holds the data, the exact one not:
        assert store_for(top1, bf16_autocast=False, groups=pair_groups(encoded)).start_layer == LAYERS - 2
        other = lambda k: build_reward_model(ModelSpec(backbone="t", mode="topk", top_k_layers=k),  # noqa: E731
                                             lm=make_tiny_lm(tokenizer, seed=3, layers=LAYERS))
        assert store_for(other(1), bf16_autocast=False).start_layer == LAYERS - 1  # another bottom: not shared
        assert store_for(other(2), bf16_autocast=False).start_layer == LAYERS - 2  # a second store at that layer
        import shutil
        shutil.rmtree(store_for(top1, bf16_autocast=False).root)
        assert store_for(top1, bf16_autocast=False).start_layer == LAYERS - 2  # reuses the top-2 store
        got = score_pairs(top1, encoded, bf16=False, progress=False)
        ref = score_pairs(top1, encoded, bf16=False, progress=False, use_store=False)
        np.testing.assert_allclose(got["chosen"], ref["chosen"], rtol=1e-5, atol=1e-5)
        features = list(encoded)  # training through the lower store: frozen layer 2 runs without gradient
        batch = CachedPairCollator(low, tokenizer.pad_token_id)(features)
        out = forward_cached(top1, batch)
        out.rewards.sum().backward()
        assert all(p.grad is None for p in top1.decoder.layers[2].parameters())
        assert all(p.grad is not None for p in top1.decoder.layers[3].parameters())

    @pytest.mark.parametrize("mode", ["topk", "frozen"])
    def test_scores_many_replies_per_prompt_like_the_plain_path(self, tokenizer, tmp_path, monkeypatch, mode):
        """Best-of-N-like groups (one prompt, many replies of different lengths), fp32."""
        monkeypatch.setenv("RMLIB_CACHE_DIR", str(tmp_path))
        model = build_reward_model(ModelSpec(backbone="t", mode=mode, top_k_layers=2), lm=make_tiny_lm(tokenizer, layers=LAYERS))
        rng = np.random.default_rng(0)
        prompts = [rng.integers(3, 500, size=n).tolist() for n in (5, 17, 9)]
        replies = [rng.integers(3, 500, size=int(rng.integers(1, 30))).tolist() for _ in range(24)]
        owner = [i % 3 for i in range(24)]
        plain, h_plain = score_replies(model, [prompts[o] for o in owner], replies, batch_size=5, bf16=False,
                                       progress=False, return_hidden=True, use_store=False)
        fast, h_fast = score_replies(model, [prompts[o] for o in owner], replies, batch_size=5, bf16=False,
                                     progress=False, return_hidden=True)
        assert store_for(model, bf16_autocast=False).rows == sum(map(len, prompts)) + sum(map(len, replies))
        np.testing.assert_allclose(fast, plain, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(h_fast, h_plain, rtol=1e-5, atol=1e-5)

    def test_a_loaded_model_scores_through_the_same_store(self, tokenizer, encoded, tmp_path, monkeypatch):
        monkeypatch.setenv("RMLIB_CACHE_DIR", str(tmp_path))
        from rmlib.model.reward_model import load_reward_model, save_reward_model
        from rmlib.model.scoring import score_pairs

        model = _topk_model(tokenizer)
        store = store_for(model, bf16_autocast=False)
        store.ensure(pair_groups(encoded), progress=False)
        save_reward_model(model, tmp_path / "rm", tokenizer, dtype=torch.float32)
        loaded = load_reward_model(tmp_path / "rm")
        assert loaded.frozen_layers == model.frozen_layers
        assert store_for(loaded, bf16_autocast=False).root == store.root
        assert store_for(loaded, bf16_autocast=False).ensure(pair_groups(encoded), progress=False) == 0
        got = score_pairs(loaded, encoded, bf16=False, progress=False)
        ref = score_pairs(model, encoded, bf16=False, progress=False, use_store=False)
        np.testing.assert_allclose(got["chosen"], ref["chosen"], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(got["rejected"], ref["rejected"], rtol=1e-5, atol=1e-5)

    def test_a_killed_build_keeps_finished_shards(self, tokenizer, encoded, tmp_path, monkeypatch):
        model = _topk_model(tokenizer)
        real, calls = layers.run_layers, []

        def dies_on_third_batch(*args, **kwargs):
            calls.append(1)
            if len(calls) > 4:  # two batches (prompt pass + reply pass each) are written; die in the third
                raise KeyboardInterrupt("killed mid-build")
            return real(*args, **kwargs)

        monkeypatch.setattr(bottom_store, "run_layers", dies_on_third_batch)
        store = BottomStore.for_model(model, root=tmp_path / "s", dtype=torch.float32, bf16_autocast=False)
        groups = pair_groups(encoded)
        with pytest.raises(KeyboardInterrupt):
            store.ensure(groups, batch_tokens=1, shard_rows=1, progress=False)  # one reply per batch and shard
        assert len(store.shards) == 2 and not list((tmp_path / "s").glob(".shard-*"))
        monkeypatch.setattr(bottom_store, "run_layers", real)
        assert store.ensure(groups, progress=False) == 6  # the 8 replies but the two committed
        ref = BottomStore.for_model(model, root=tmp_path / "ref", dtype=torch.float32, bf16_autocast=False)
        ref.ensure(groups, progress=False)
        for p, replies in groups:
            for r in replies:
                torch.testing.assert_close(store.sequence(p, r), ref.sequence(p, r), atol=1e-6, rtol=1e-6)

    def test_leftover_of_a_killed_process_is_removed(self, tokenizer, encoded, tmp_path):
        dead = subprocess.Popen([sys.executable, "-c", "pass"])
        dead.wait()
        root = tmp_path / "s"
        store = BottomStore.for_model(_topk_model(tokenizer), root=root, dtype=torch.float32, bf16_autocast=False)
        leftover = root / ".shard-x.tmpkilled"
        leftover.mkdir()
        (leftover / "builder.pid").write_text(str(dead.pid))
        (leftover / "hidden.bin").write_bytes(b"\0" * 16)
        live = root / ".shard-y.tmplive"
        live.mkdir()
        (live / "builder.pid").write_text(str(os.getpid()))  # a build still running: left alone
        store.ensure(pair_groups(encoded), progress=False)
        assert not leftover.exists() and live.exists() and len(store.shards) == 1

    def test_empty_reply_is_named(self, tokenizer, tmp_path):
        store = BottomStore.for_model(_topk_model(tokenizer), root=tmp_path / "s", dtype=torch.float32,
                                      bf16_autocast=False)
        with pytest.raises(ValueError, match="group 1, reply 0: empty reply"):
            store.ensure([([1, 2], [[3]]), ([1, 2], [[]])], progress=False)
