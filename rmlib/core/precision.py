"""Which precision to compute in: bf16 autocast where the hardware runs bf16 fast, else float32.

bf16 autocast roughly halves training time on a CPU with native bf16 matrix instructions
(AVX-512 BF16 / AMX, used by oneDNN) and on bf16 GPUs. On an AVX2-only CPU PyTorch emulates bf16
matmuls: measured on such a 2-core AMD EPYC, 512^3 matmul fp32 96 GFLOP/s, bf16 1.4 GFLOP/s
(~70x slower). So every ``bf16`` parameter in rmlib takes ``"auto"`` (the default): bf16 where it
is fast, float32 elsewhere. ``True``/``False`` force it; the environment variable
``RMLIB_BF16=0|1`` overrides ``"auto"`` for a whole run.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

AUTO = "auto"


@functools.lru_cache(maxsize=None)
def bf16_is_fast(device_type: str = "cpu") -> bool:
    """True where bf16 matmuls run natively: a CUDA GPU with bf16 support, or a CPU on which
    oneDNN supports bf16 (AVX-512 core or newer; ``torch.ops.mkldnn._is_mkldnn_bf16_supported``)."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device_type != "cpu":
        return False
    try:
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without the op: be safe, fp32 is never slow
        return False


def resolve_bf16(bf16: bool | str | None, device: torch.device | str | None = None) -> bool:
    """``True``/``False`` as given; ``"auto"`` (or None): ``RMLIB_BF16`` if set, else whether bf16 is
    fast on ``device`` (default: CUDA if available, else CPU)."""
    if isinstance(bf16, bool):
        return bf16
    if bf16 is not None and bf16 != AUTO:
        raise ValueError(f"bf16={bf16!r}: allowed True, False or 'auto'")
    env = os.environ.get("RMLIB_BF16", "").strip()
    if env:
        if env not in ("0", "1"):
            raise ValueError(f"RMLIB_BF16={env!r}: allowed 0 or 1")
        return env == "1"
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return bf16_is_fast(torch.device(device).type)


def describe() -> str:
    """One line for reports: which precision 'auto' picks here and why."""
    fast = bf16_is_fast("cpu")
    return (f"CPU capability {torch.backends.cpu.get_cpu_capability()}; bf16 matmul "
            f"{'native (auto -> bf16 autocast)' if fast else 'emulated (auto -> float32)'}")


def autocast(device: torch.device | str, bf16: bool | str):
    """bf16 autocast on CPU or GPU (``bf16=False``: plain fp32; ``"auto"``: ``rmlib.core.precision``)."""
    device_type = torch.device(device).type
    if not resolve_bf16(bf16, device):
        return contextlib.nullcontext()
    return torch.autocast(device_type=device_type, dtype=torch.bfloat16)
