"""Model resolver: short names, local folders and GGUF files, hub ids, clear errors."""

from __future__ import annotations

import importlib.metadata

import pytest
import torch

from rmlib.model import assets


def test_unknown_path_names_the_accepted_forms():
    with pytest.raises(assets.ModelNotFoundError, match="smollm2-135m-instruct"):
        assets.resolve_model("./no/such/model")
    with pytest.raises(assets.ModelNotFoundError, match="hub id"):
        assets.resolve_model("runs/missing/final/model")


def test_hub_id_and_local_folder_pass_through(tmp_path):
    assert assets.resolve_model("HuggingFaceTB/SmolLM2-360M-Instruct") == "HuggingFaceTB/SmolLM2-360M-Instruct"
    assert assets.resolve_model(tmp_path) == str(tmp_path)


def test_short_name_without_wheel_falls_back_to_hub_id(monkeypatch):
    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(assets.importlib.metadata, "distribution", missing)
    assert assets.resolve_model("smollm2-135m-instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert assets.resolve_model("gemma-3-270m") == "google/gemma-3-270m"


@pytest.mark.slow
def test_gguf_to_cached_copy_gives_same_logits(tmp_path, monkeypatch):
    """The real SmolLM2 GGUF -> dequantized bf16 cache (loaded as float32 by dtype="auto") -> the same
    weights and logits."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("RMLIB_CACHE_DIR", str(tmp_path))
    gguf = assets._locate_wheel_gguf(assets.MODELS["smollm2-135m-instruct"])
    assert gguf is not None and gguf.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    cached = assets.resolve_model("smollm2-135m-instruct")
    assert cached.startswith(str(tmp_path)) and (tmp_path / "models").is_dir()
    assert assets.resolve_model("smollm2-135m-instruct") == cached  # second resolve: cache hit

    ref = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()
    copy = AutoModelForCausalLM.from_pretrained(cached, dtype=torch.float32).eval()
    # bf16 on disk, float32 for dtype="auto" (transformers' default, TRL's policy path): record_load_dtype
    assert {t.dtype for t in load_file(f"{cached}/model.safetensors").values()} == {torch.bfloat16}
    auto = AutoModelForCausalLM.from_pretrained(cached, dtype="auto")
    assert {p.dtype for p in auto.parameters()} == {torch.float32}
    for (name, a), (_, b) in zip(auto.state_dict().items(), copy.state_dict().items()):
        assert torch.equal(a, b), name
    del auto
    cfg = copy.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.vocab_size) == (30, 576, 49152)
    assert sum(p.numel() for p in copy.parameters()) == 134_515_008
    for (name, a), (_, b) in zip(ref.state_dict().items(), copy.state_dict().items()):
        assert torch.equal(a.to(torch.bfloat16).float(), b), name  # exactly the bf16 rounding of the GGUF
    tok = AutoTokenizer.from_pretrained(cached)
    assert tok.chat_template and tok.pad_token_id == tok.eos_token_id == 2
    ids = tok("The capital of France is", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref.to(torch.bfloat16)  # the same bf16 weights -> the same logits
        torch.testing.assert_close(copy.to(torch.bfloat16)(ids).logits, ref(ids).logits, atol=0, rtol=0)
