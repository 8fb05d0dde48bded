"""A saved rmlib reward model as a TRL reward function (``RewardModelFunction``).

Each (prompt messages, completion) is formatted with the RM's OWN tokenizer and chat template
exactly as Best-of-N scores samples (``rmlib.model.scoring.score_texts``: prompt cut from
the left at ``max_length``), then scored by ``rmlib.model.scoring``. Policy, proxy and gold
tokenizers may all differ.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from rmlib.core.precision import resolve_bf16
from rmlib.model.reward_model import load_reward_model
from rmlib.model.scoring import reward_tokenizer, score_texts


# -- reward models as TRL reward functions ------------------------------------------------------------
def check_reward_model_dir(path, role: str = "reward model", hint: str = "") -> Path:
    """``path`` as a Path if it holds an rmlib reward model (``rmlib_reward.json``); else a
    FileNotFoundError naming the folder, its role, and ``hint`` (what produces it)."""
    p = Path(path)
    if not (p / "rmlib_reward.json").exists():
        what = "does not exist" if not p.exists() else "is not an rmlib reward model (no rmlib_reward.json)"
        raise FileNotFoundError(f"{role} folder {p} {what}" + (f"; {hint}" if hint else ""))
    return p


class RewardModelFunction:
    """An rmlib reward model as a TRL reward function: ``f(prompts, completions, **kw) -> list[float]``.

    ``prompts``: chat messages per row; ``completions``: TRL's conversational completions
    (``[{"role": "assistant", "content": text}]``) or plain strings. The RM scores
    prompt + reply formatted with ITS tokenizer's chat template (``rmlib.model.scoring.score_texts``),
    the prompt cut from the left at ``max_length``. Not an ``nn.Module`` on purpose: TRL would
    then re-tokenize with its own pooling (first pad id), which is wrong when pad == eos.
    """

    def __init__(self, model, tokenizer, name: str = "reward", max_length: int | None = 512, batch_size: int = 16,
                 bf16: bool | str = "auto"):
        if max_length is not None and max_length < 16:
            raise ValueError(f"max_length={max_length} must be >= 16 (or None: no truncation)")
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.__name__ = name  # TRL logs rewards/<name>/mean
        self.max_length = max_length
        self.batch_size = batch_size
        self.bf16 = resolve_bf16(bf16, next(model.parameters()).device)

    @classmethod
    def from_dir(cls, path, name: str = "reward", device=None, hint: str = "", dtype: torch.dtype | None = None,
                 **kwargs) -> "RewardModelFunction":
        """Load a folder written by ``rmlib.model.reward_model.save_reward_model`` (any head, GRM included).
        ``dtype``: default bfloat16 when ``bf16`` resolves true (the saved precision; no casts per call), else float32."""

        path = check_reward_model_dir(path, name, hint)
        if dtype is None:
            dtype = torch.bfloat16 if resolve_bf16(kwargs.get("bf16", "auto"), device) else torch.float32
        model = load_reward_model(path, dtype=dtype)
        if device is not None:
            model.to(device)
        return cls(model, reward_tokenizer(path), name=name, **kwargs)

    def score(self, prompts: list[list[dict]], replies: list[str], progress: bool = False) -> np.ndarray:
        """Rewards of (messages, reply text) rows, in order: (N,) float32."""
        for p in prompts:
            if not (isinstance(p, list) and p and isinstance(p[0], dict)):
                raise TypeError(f"prompts must be chat messages (lists of {{'role', 'content'}} dicts), got {p!r:.80}")
        # whole sequences (use_store=False): RL completions are new at every step, caching their bottom won't pay
        return score_texts(self.model, prompts, replies, tokenizer=self.tokenizer, max_length=self.max_length,
                           batch_size=self.batch_size, bf16=self.bf16, use_store=False, progress=progress,
                           desc=f"scoring ({self.__name__})")

    def __call__(self, prompts, completions, **kwargs) -> list[float]:
        replies = [c[-1]["content"] if isinstance(c, list) else str(c) for c in completions]
        return [float(x) for x in self.score(list(prompts), replies)]
