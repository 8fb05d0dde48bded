"""The saved artifacts (reward-model exports, the cached base copy) keep bf16 weights on disk but load
as float32 with transformers' default ``dtype="auto"`` and in TRL's path loading, so a client on a CPU
without native bf16 computes in float32 (``assets.record_load_dtype``; README, "Loading the artifacts
elsewhere"). rmlib's own loaders pick their dtype explicitly and are unaffected."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from conftest import make_tiny_lm
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

from rmlib.model import assets
from rmlib.model.encoding import format_prompt
from rmlib.model.reward_model import (
    ModelSpec,
    build_reward_model,
    load_reward_model,
    save_reward_model,
)


def _stored_dtypes(folder: Path) -> dict[str, set[torch.dtype]]:
    """{weights file: the dtypes of its tensors, as stored}."""
    return {f.name: {t.dtype for t in load_file(str(f)).values()} for f in sorted(folder.glob("*.safetensors"))}


def _param_dtypes(model) -> set[torch.dtype]:
    return {p.dtype for p in model.parameters()}


def _config(folder) -> dict:
    return json.loads((Path(folder) / "config.json").read_text())


def _texts(tokenizer) -> list[str]:
    prompt = format_prompt(tokenizer, [{"role": "user", "content": "A short poem about rain."}])
    return [prompt + "Rain taps on the roof." + tokenizer.eos_token, prompt + "No.",
            prompt + "Drops all night, soft and slow, the gutters sing."]


def _rmlib_ids(enc, tokenizer) -> torch.Tensor:
    """The export tokenizer's batch with the base pad id in the padding (``load_reward_model`` drops the
    export pad token's embedding row; rmlib pools on the attention mask)."""
    return enc["input_ids"].masked_fill(enc["attention_mask"] == 0, tokenizer.pad_token_id)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_linear_export_loads_float32_with_auto_and_scores_like_rmlib(tmp_path, tokenizer, tiny_backbone):
    from transformers import AutoTokenizer

    model = build_reward_model(ModelSpec(backbone=tiny_backbone), seed=0).eval()
    out = save_reward_model(model, tmp_path / "rm", tokenizer)  # default storage dtype: bf16
    assert _stored_dtypes(out) == {"model.safetensors": {torch.bfloat16}}  # metadata only: the weights stay bf16
    assert _config(out)["dtype"] == _config(out)["torch_dtype"] == "float32"

    hf_tok = AutoTokenizer.from_pretrained(out)
    enc = hf_tok(_texts(tokenizer), add_special_tokens=False, padding=True, return_tensors="pt")
    ours = load_reward_model(out)  # rmlib's loader: float32, chosen explicitly
    assert _param_dtypes(ours) == {torch.float32}
    with torch.no_grad():
        expected = ours(_rmlib_ids(enc, tokenizer), enc["attention_mask"]).rewards
        for kwargs in ({"dtype": "auto"}, {}):  # {}: transformers 5's default is dtype="auto"
            hf = AutoModelForSequenceClassification.from_pretrained(out, **kwargs).eval()
            assert _param_dtypes(hf) == {torch.float32}, kwargs
            torch.testing.assert_close(hf(**enc).logits.squeeze(-1), expected, atol=1e-5, rtol=1e-5)
        bf16 = AutoModelForSequenceClassification.from_pretrained(out, dtype=torch.bfloat16).eval()
        assert _param_dtypes(bf16) == {torch.bfloat16}  # bf16-native users still opt in explicitly
        # bf16 compute is distinguishable at this tolerance: the float32 check above can fail
        assert not torch.allclose(bf16(**enc).logits.squeeze(-1).float(), expected, atol=1e-5, rtol=1e-5)


def test_mlp_export_loads_float32_causal_lm_with_auto(tmp_path, tokenizer, tiny_backbone):
    model = build_reward_model(ModelSpec(backbone=tiny_backbone, head="mlp"), seed=0).eval()
    out = save_reward_model(model, tmp_path / "rm", tokenizer)
    assert _stored_dtypes(out) == {"model.safetensors": {torch.bfloat16}, "reward_head.safetensors": {torch.bfloat16}}
    assert _config(out)["dtype"] == "float32"

    enc = tokenizer(_texts(tokenizer), add_special_tokens=False, padding=True, return_tensors="pt")
    hf = AutoModelForCausalLM.from_pretrained(out, dtype="auto").eval()
    assert _param_dtypes(hf) == {torch.float32}
    ours = load_reward_model(out)
    with torch.no_grad():
        torch.testing.assert_close(hf(**enc).logits, ours.causal_lm(**enc).logits, atol=1e-5, rtol=1e-5)


def _fake_cached_copy(cache: Path, tokenizer) -> Path:
    """A cached copy of smollm2-135m-instruct as ``dequantize_gguf`` wrote it before config.json recorded
    float32 (tiny weights in place of the real ones): bf16 weights, config ``dtype: bfloat16``, marker."""
    folder = cache / "models" / "smollm2-135m-instruct-bfloat16"
    make_tiny_lm(tokenizer, layers=2).to(torch.bfloat16).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    (folder / assets.CACHE_MARKER).write_text("source=test\ndtype=torch.bfloat16\n")
    assert _config(folder)["dtype"] == "bfloat16"
    return folder


def test_cached_copy_made_before_is_fixed_in_place_and_loads_float32(tmp_path, monkeypatch, tokenizer):
    from trl.trainer.utils import create_model_from_path

    monkeypatch.setenv("RMLIB_CACHE_DIR", str(tmp_path))
    folder = _fake_cached_copy(tmp_path, tokenizer)
    weights = _sha(folder / "model.safetensors")
    old = AutoModelForCausalLM.from_pretrained(folder, dtype="auto")
    assert _param_dtypes(old) == {torch.bfloat16}  # what a client got: bf16 compute

    assert assets.resolve_model("smollm2-135m-instruct") == str(folder)  # the cache hit fixes the metadata
    assert _config(folder)["dtype"] == _config(folder)["torch_dtype"] == "float32"
    assert _sha(folder / "model.safetensors") == weights  # the weights file is untouched
    assert _stored_dtypes(folder) == {"model.safetensors": {torch.bfloat16}}
    stamp = (folder / "config.json").stat().st_mtime_ns
    assets.resolve_model("smollm2-135m-instruct")
    assert (folder / "config.json").stat().st_mtime_ns == stamp  # already fixed: not rewritten

    enc = tokenizer(_texts(tokenizer), add_special_tokens=False, padding=True, return_tensors="pt")
    ours = assets.load_causal_lm("smollm2-135m-instruct").eval()  # rmlib's loader: float32, explicitly
    with torch.no_grad():
        expected = ours(**enc).logits
        for loaded in (AutoModelForCausalLM.from_pretrained(folder, dtype="auto"),
                       create_model_from_path(str(folder), dtype="auto")):  # TRL's policy loader
            assert _param_dtypes(loaded) == {torch.float32}
            torch.testing.assert_close(loaded.eval()(**enc).logits, expected, atol=1e-5, rtol=1e-5)


def test_fresh_cached_copy_records_float32(tmp_path, monkeypatch, tokenizer):
    """``dequantize_gguf`` end to end, the GGUF read stubbed with a tiny model (the real one: the slow
    ``test_assets.test_gguf_to_cached_copy_gives_same_logits``)."""
    lm = make_tiny_lm(tokenizer, layers=2)

    class FromGGUF:
        def __init__(self, obj):
            self.obj = obj

        def from_pretrained(self, *args, **kwargs):
            assert kwargs.get("gguf_file") == "x.gguf"
            return self.obj

    monkeypatch.setattr(assets, "AutoModelForCausalLM", FromGGUF(lm))
    monkeypatch.setattr(assets, "AutoTokenizer", FromGGUF(tokenizer))
    out = assets.dequantize_gguf(tmp_path / "x.gguf", tmp_path / "copy")
    assert _stored_dtypes(out) == {"model.safetensors": {torch.bfloat16}}
    assert _config(out)["dtype"] == "float32"
    assert _param_dtypes(AutoModelForCausalLM.from_pretrained(out, dtype="auto")) == {torch.float32}


def test_record_load_dtype_leaves_a_read_only_cache_usable(tmp_path, monkeypatch, tokenizer):
    monkeypatch.setenv("RMLIB_CACHE_DIR", str(tmp_path))
    folder = _fake_cached_copy(tmp_path, tokenizer)

    def refuse(*args, **kwargs):
        raise PermissionError("read-only")

    monkeypatch.setattr(assets, "write_json_atomic", refuse)
    assert assets.resolve_model("smollm2-135m-instruct") == str(folder)
    assert _config(folder)["dtype"] == "bfloat16"


def test_trl_rloo_loads_the_policy_and_reward_model_paths_in_float32(tmp_path, monkeypatch, tokenizer, tiny_backbone):
    """The README recipe: ``RLOOTrainer(model=<cached copy>, reward_funcs=<export>)`` with ``bf16=False``."""
    from datasets import Dataset
    from trl import RLOOConfig, RLOOTrainer

    monkeypatch.setenv("RMLIB_CACHE_DIR", str(tmp_path))
    _fake_cached_copy(tmp_path, tokenizer)
    policy = assets.resolve_model("smollm2-135m-instruct")  # the cached copy's folder
    rm = build_reward_model(ModelSpec(backbone=tiny_backbone), seed=0).eval()
    export = save_reward_model(rm, tmp_path / "rm", tokenizer)
    prompts = Dataset.from_list([{"prompt": [{"role": "user", "content": "Say hi."}]}] * 2)
    for init_kwargs in (None, {"dtype": "auto"}):  # TRL's default (float32) and "auto" (the config: float32)
        args = RLOOConfig(output_dir=str(tmp_path / "out"), use_cpu=True, bf16=False, report_to="none",
                          per_device_train_batch_size=2, num_generations=2, max_steps=1,
                          max_completion_length=4, model_init_kwargs=init_kwargs)
        trainer = RLOOTrainer(model=policy, reward_funcs=str(export), args=args, train_dataset=prompts)
        reward_model = trainer.reward_funcs[0]
        for m in (trainer.model, trainer.ref_model, reward_model):
            assert _param_dtypes(m) == {torch.float32}, init_kwargs
        assert not hasattr(reward_model, "_original_forward")  # bf16=False: accelerate wraps no bf16 autocast
        texts = _texts(tokenizer)
        enc = trainer.reward_processing_classes[0](text=texts, return_tensors="pt", padding=True,
                                                   padding_side="right", add_special_tokens=False)
        with torch.inference_mode():  # as RLOOTrainer._calculate_rewards scores
            theirs = reward_model(**enc).logits[:, 0]
            ours = load_reward_model(export)(_rmlib_ids(enc, tokenizer), enc["attention_mask"]).rewards
        torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)

