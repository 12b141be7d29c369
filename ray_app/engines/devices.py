"""Device and dtype choice for every engine: one rule, documented in the README.

`dtype: auto` is bf16 where bf16 is native (a GPU, or a CPU with AVX512-BF16 or AMX: twice as
fast as fp32 there, measured on Qwen2.5-1.5B), fp32 elsewhere (AVX2-only CPUs emulate bf16 and
are several times slower in it). bf16 scores move with batch composition (up to 0.005 for
Qwen-1.5B, 0.04 for SmolLM2-135M, measured): ask for `float32` where scores must be
reproducible to the last digit.
"""

from __future__ import annotations

from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" or native_bf16() else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not one of {['auto', *DTYPES]}")
    return DTYPES[dtype]


def native_bf16(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """A GPU, or a CPU whose flags include bf16 arithmetic (AVX512-BF16 or AMX)."""
    if torch.cuda.is_available():
        return True
    try:
        flags = Path(cpuinfo).read_text()
    except OSError:  # not Linux: stay with fp32, always correct
        return False
    return any(flag in flags.split() for flag in ("avx512_bf16", "amx_bf16"))
