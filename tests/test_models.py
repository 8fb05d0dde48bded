"""Reward model: pooling with pad == eos, heads, modes, response log-probs, checkpoints."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from rmlib.model.encoding import format_prompt, format_reply, pad_sequences
from rmlib.model.reward_model import ModelSpec, build_reward_model, last_token_index, load_reward_model, save_reward_model
from rmlib.model.logprobs import response_logps


def _pair_batch(tokenizer, replies, prompt=None):
    prompt = prompt or [
        {"role": "user", "content": "Hi, can you help me?"},
        {"role": "assistant", "content": "Sure, what do you need?"},  # <|im_end|> (== pad) mid-sequence
        {"role": "user", "content": "A short poem about rain."},
    ]
    p_text = format_prompt(tokenizer, prompt)
    p = tokenizer(p_text, add_special_tokens=False)["input_ids"]
    seqs, masks = [], []
    for reply in replies:
        r = tokenizer(format_reply(tokenizer, prompt, reply, p_text), add_special_tokens=False)["input_ids"]
        seqs.append(p + r)
        masks.append([0] * len(p) + [1] * len(r))
    return pad_sequences(seqs, masks, tokenizer.pad_token_id), seqs


def _randomize_lora(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)


class TestPooling:
    def test_last_token_index_right_and_left_padding(self):
        mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
        assert last_token_index(mask).tolist() == [2, 4, 4]

    def test_pad_equals_eos_pools_the_real_last_token(self, tokenizer, tiny_backbone):
        assert tokenizer.pad_token_id == tokenizer.eos_token_id == 2  # SmolLM2's quirk
        model = build_reward_model(ModelSpec(backbone=tiny_backbone), seed=0).eval()
        batch, seqs = _pair_batch(tokenizer, ["Rain taps softly on the roof.", "No."])
        assert (batch["input_ids"][0, : len(seqs[0])] == 2).sum() >= 2  # eos inside the text
        with torch.no_grad():
            padded = model(batch["input_ids"], batch["attention_mask"]).rewards
            alone = torch.stack([model(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)).rewards[0]
                                 for s in seqs])
            # pooling on the first pad/eos (the bug this guards against) gives other values
            first_eos = (batch["input_ids"][1] == 2).nonzero()[0].item()
        torch.testing.assert_close(padded, alone, atol=1e-5, rtol=1e-5)
        assert first_eos < len(seqs[1]) - 1


class TestModes:
    @pytest.mark.parametrize("mode", ["full", "lora", "topk", "frozen"])
    def test_trainable_parameters(self, tiny_backbone, mode):
        model = build_reward_model(ModelSpec(backbone=tiny_backbone, mode=mode, top_k_layers=1, lora_r=4), seed=0)
        trainable = {n for n, p in model.named_parameters() if p.requires_grad}
        assert {n for n in trainable if n.startswith("head.")} == {"head.weight"}
        others = trainable - {"head.weight"}
        if mode == "full":
            assert len(others) == sum(1 for n, _ in model.lm.named_parameters())
        elif mode == "lora":
            assert others and all("lora_" in n for n in others)
        elif mode == "topk":
            assert others and all(".layers.3." in n or n.endswith("model.norm.weight") for n in others)
        else:
            assert others == set()

    def test_bad_mode_and_head_name_allowed_values(self):
        with pytest.raises(ValueError, match="full, lora, topk, frozen"):
            ModelSpec(mode="half")
        with pytest.raises(ValueError, match="linear, mlp"):
            ModelSpec(head="deep")

    def test_linear_head_init_variance(self):
        from rmlib.model.reward_model import make_head

        torch.manual_seed(0)
        w = torch.cat([make_head("linear", 575).weight.flatten() for _ in range(50)])
        assert abs(w.var().item() - 1 / 576) < 0.1 / 576


class TestResponseLogps:
    def test_matches_full_lm_logits(self, tokenizer, tiny_backbone):
        model = build_reward_model(ModelSpec(backbone=tiny_backbone), seed=0).eval()
        batch, seqs = _pair_batch(tokenizer, ["Drops fall.", "No thanks, I would rather not."])
        with torch.no_grad():
            out = model(batch["input_ids"], batch["attention_mask"], batch["response_mask"], return_logps=True)
            logits = model.causal_lm(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logp = logits.log_softmax(-1)
        for i, s in enumerate(seqs):
            m = batch["response_mask"][i]
            expected = sum(logp[i, t - 1, s[t]] for t in range(1, len(s)) if m[t])
            torch.testing.assert_close(out.logps[i], expected.float(), atol=1e-4, rtol=1e-5)


class TestCheckpoints:
    def test_linear_lora_loads_in_plain_transformers_with_same_scores(self, tmp_path, tokenizer, tiny_backbone):
        model = build_reward_model(ModelSpec(backbone=tiny_backbone, mode="lora", lora_r=4), seed=0)
        _randomize_lora(model)
        model.eval()
        batch, _ = _pair_batch(tokenizer, ["Rain on tin, a drum.", "I can't."])
        with torch.no_grad():
            ours = model(batch["input_ids"], batch["attention_mask"]).rewards
        out = save_reward_model(model, tmp_path / "rm", tokenizer, dtype=torch.float32)
        hf = AutoModelForSequenceClassification.from_pretrained(out).eval()
        with torch.no_grad():
            theirs = hf(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.squeeze(-1)
            again = load_reward_model(out)(batch["input_ids"], batch["attention_mask"]).rewards
        torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(again, ours, atol=1e-5, rtol=1e-5)

    def test_mlp_head_with_lm_head_roundtrip(self, tmp_path, tokenizer, tiny_backbone):
        model = build_reward_model(ModelSpec(backbone=tiny_backbone, head="mlp", keep_lm_head=True), seed=0).eval()
        batch, _ = _pair_batch(tokenizer, ["Soft rain.", "No."])
        with torch.no_grad():
            ours = model(batch["input_ids"], batch["attention_mask"], batch["response_mask"], return_logps=True)
        out = save_reward_model(model, tmp_path / "mlp", tokenizer, dtype=torch.float32)
        assert (out / "reward_head.safetensors").exists()
        loaded = load_reward_model(out)
        with torch.no_grad():
            again = loaded(batch["input_ids"], batch["attention_mask"], batch["response_mask"], return_logps=True)
        torch.testing.assert_close(again.rewards, ours.rewards, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(again.logps, ours.logps, atol=1e-4, rtol=1e-5)

    def test_load_rejects_a_folder_without_rmlib_config(self, tmp_path):
        with pytest.raises(FileNotFoundError, match="rmlib_reward.json"):
            load_reward_model(tmp_path)


def test_reward_model_forward_needs_response_mask_for_logps(tiny_backbone):
    model = build_reward_model(ModelSpec(backbone=tiny_backbone), seed=0)
    ids = torch.tensor([[1, 5, 6]])
    with pytest.raises(ValueError, match="response_mask"):
        model(ids, torch.ones_like(ids), return_logps=True)


def test_response_logps_skips_prompt_tokens():
    head = torch.nn.Linear(4, 10, bias=False)
    hidden = torch.randn(1, 3, 4)
    ids = torch.tensor([[1, 2, 3]])
    none = response_logps(head, hidden, ids, torch.tensor([[0, 0, 0]]))
    assert none.item() == 0.0
