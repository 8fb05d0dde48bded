"""Reward model: pooling with pad == eos, heads, modes, response log-probs, checkpoints."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from rmlib.model.encoding import format_prompt, format_reply, pad_sequences
from rmlib.model.logprobs import response_logps
from rmlib.model.reward_model import (
    ModelSpec,
    RewardModel,
    build_reward_model,
    last_token_index,
    load_reward_model,
    save_reward_model,
)


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

    def test_linear_head_init_std_is_one_over_sqrt_hidden(self):
        # BSR code (modules/utils.py): normal_(score.weight, 0, 1/sqrt(H)); at H = 4 that is std 0.5,
        # far from sqrt(1/(H+1)) = 0.447 (the estimate's standard error here is ~0.0025)
        from rmlib.model.reward_model import make_head

        torch.manual_seed(0)
        w = torch.cat([make_head("linear", 4).weight.flatten() for _ in range(5000)])
        assert abs(w.std().item() - 0.5) < 0.01 and abs(w.mean().item()) < 0.01
        assert make_head("linear", 575).bias is None


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
        ids = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, hf.config.pad_token_id)  # the export's pad
        with torch.no_grad():
            theirs = hf(input_ids=ids, attention_mask=batch["attention_mask"]).logits.squeeze(-1)
            again = load_reward_model(out)(batch["input_ids"], batch["attention_mask"]).rewards
        torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(again, ours, atol=1e-5, rtol=1e-5)

    def test_transformers_scores_like_rmlib_on_sequences_ending_with_the_pad_token(self, tmp_path, tokenizer,
                                                                                    tiny_backbone):
        # pad == eos == <|im_end|> (id 2): transformers pools the rightmost non-pad token, so with pad id 2 a
        # reply ending in eos (format_reply's fallback, a generated sample) was scored one token early
        from transformers import AutoTokenizer

        model = build_reward_model(ModelSpec(backbone=tiny_backbone), seed=0).eval()
        p_text = format_prompt(tokenizer, [{"role": "user", "content": "A short poem about rain."}])
        eos = tokenizer.eos_token
        texts = [p_text + "Rain taps." + eos, p_text + "No." + eos + eos, p_text + "Drops on the roof, all night." + eos,
                 p_text + "Soft rain." + eos + "\n"]
        seqs = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        assert [s[-1] == tokenizer.pad_token_id for s in seqs] == [True, True, True, False]
        with torch.no_grad():
            ours = torch.stack([model(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)).rewards[0]
                                for s in seqs])
        out = save_reward_model(model, tmp_path / "rm", tokenizer, dtype=torch.float32)
        assert tokenizer.pad_token == eos  # the caller's tokenizer is left as it is
        hf_tok = AutoTokenizer.from_pretrained(out)  # what a transformers user scores with
        assert hf_tok.pad_token_id not in {t for s in seqs for t in s}
        enc = hf_tok(texts, add_special_tokens=False, padding=True, return_tensors="pt")
        assert [row[m.bool()].tolist() for row, m in zip(enc["input_ids"], enc["attention_mask"])] == seqs
        hf = AutoModelForSequenceClassification.from_pretrained(out).eval()
        assert hf.config.pad_token_id == hf_tok.pad_token_id
        with torch.no_grad():
            theirs = hf(**enc).logits.squeeze(-1)
            enc_eos = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, tokenizer.pad_token_id)
            hf.config.pad_token_id = tokenizer.pad_token_id  # the old export: pad id 2
            old = hf(input_ids=enc_eos, attention_mask=enc["attention_mask"]).logits.squeeze(-1)
        torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
        assert not torch.allclose(old[:3], ours[:3], atol=1e-3)  # what the fix is about
        loaded = load_reward_model(out)  # the pad token's embedding row is dropped again
        assert loaded.decoder.embed_tokens.weight.shape == model.decoder.embed_tokens.weight.shape
        assert loaded.config.pad_token_id == model.config.pad_token_id

    def test_linear_export_needs_the_tokenizer(self, tmp_path, tiny_backbone):
        model = build_reward_model(ModelSpec(backbone=tiny_backbone), seed=0)
        with pytest.raises(ValueError, match="tokenizer"):
            save_reward_model(model, tmp_path / "rm")

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

    def test_loading_a_linear_export_reports_nothing_unexpected(self, tmp_path, tokenizer, tiny_backbone, capfd,
                                                                caplog):
        # reading the sequence-classification export as a causal LM made transformers log a load
        # report with "score.weight | UNEXPECTED", which reads like a broken checkpoint
        import logging

        from transformers import AutoModelForCausalLM

        model = build_reward_model(ModelSpec(backbone=tiny_backbone), seed=0)
        out = save_reward_model(model, tmp_path / "rm", tokenizer, dtype=torch.float32)
        records: list[logging.LogRecord] = []
        handler = logging.Handler(logging.DEBUG)
        handler.emit = records.append
        hf_logger = logging.getLogger("transformers")
        hf_logger.addHandler(handler)
        try:
            capfd.readouterr()
            with caplog.at_level(logging.DEBUG):
                loaded = load_reward_model(out)
            printed = capfd.readouterr()
            text = printed.out + printed.err + caplog.text + "".join(r.getMessage() for r in records)
            records.clear()
            AutoModelForCausalLM.from_pretrained(out)  # the old way: this check sees its report
        finally:
            hf_logger.removeHandler(handler)
        assert any("UNEXPECTED" in r.getMessage() for r in records)
        assert "UNEXPECTED" not in text and "MISSING" not in text and "LOAD REPORT" not in text
        want, got = model.state_dict(), loaded.state_dict()
        assert set(got) == set(want)
        for k in want:
            torch.testing.assert_close(got[k], want[k], atol=0, rtol=0, msg=k)

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


class TestLogitsPath:
    """response_logps = the backbone's own log-softmax logits, or the backbone is refused at build time."""

    def test_check_reads_softcapping_and_names_unsupported_fields(self):
        from transformers import CohereConfig, Gemma2Config, GraniteConfig, LlamaConfig

        from rmlib.model.logprobs import final_logit_softcap

        assert final_logit_softcap(Gemma2Config(final_logit_softcapping=30.0)) == 30.0
        assert final_logit_softcap(Gemma2Config(final_logit_softcapping=None)) is None
        assert final_logit_softcap(LlamaConfig()) is None
        assert final_logit_softcap(GraniteConfig(logits_scaling=1.0)) is None  # the identity is harmless
        with pytest.raises(ValueError, match=r"logits_scaling=8\.0.*regularizer='none'"):
            final_logit_softcap(GraniteConfig(logits_scaling=8.0))
        with pytest.raises(ValueError, match="logit_scale"):
            final_logit_softcap(CohereConfig())

    def test_a_keep_lm_head_model_on_such_a_backbone_is_refused_at_build(self):
        from transformers import GraniteConfig, GraniteForCausalLM

        cfg = GraniteConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                            num_attention_heads=2, num_key_value_heads=2, logits_scaling=4.0)
        lm = GraniteForCausalLM(cfg)
        RewardModel(lm)  # a reward model alone never touches the LM head
        with pytest.raises(ValueError, match="logits_scaling"):
            RewardModel(lm, keep_lm_head=True)

    def test_softcapped_logps_equal_the_gemma2_models_own_logits(self):
        from transformers import Gemma2Config, Gemma2ForCausalLM

        torch.manual_seed(0)
        cfg = Gemma2Config(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                           num_attention_heads=2, num_key_value_heads=1, head_dim=8, final_logit_softcapping=0.05,
                           pad_token_id=0)
        model = RewardModel(Gemma2ForCausalLM(cfg).eval(), keep_lm_head=True).eval()
        ids = torch.tensor([[5, 9, 13, 21, 7, 3], [5, 11, 2, 8, 0, 0]])
        mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
        resp = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 1, 1, 1, 0, 0]])
        with torch.no_grad():
            ours = model(ids, mask, resp, return_logps=True).logps
            logits = model.causal_lm(input_ids=ids, attention_mask=mask).logits.float()
            raw = response_logps(model.lm_head, model.decoder(input_ids=ids, attention_mask=mask).last_hidden_state,
                                 ids, resp)
        logp = logits.log_softmax(-1)
        want = torch.stack([sum(logp[i, t - 1, ids[i, t]] for t in range(1, 6) if resp[i, t]) for i in range(2)])
        torch.testing.assert_close(ours, want, atol=1e-4, rtol=1e-5)
        assert (raw - want).abs().min() > 0.01  # the cap matters here (100x the tolerance)
