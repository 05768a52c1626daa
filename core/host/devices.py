"""Resolve the `auto` device and dtype settings to concrete torch objects."""

from __future__ import annotations

import torch

from core.errors import FailedPrecondition, InvalidRequest

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_device(spec: str = "auto") -> torch.device:
    """`auto` picks cuda when one is visible, else cpu; `cpu`, `cuda`, `cuda:N` are taken as given."""
    spec = spec.strip().lower()
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError as exc:
        raise InvalidRequest(f"unknown device {spec!r}; use auto, cpu, cuda or cuda:N") from exc
    if device.type not in ("cpu", "cuda"):
        raise InvalidRequest(f"unsupported device {spec!r}; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise FailedPrecondition(f"device {spec!r} requested but no CUDA device is available")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise FailedPrecondition(
                f"device {spec!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist"
            )
    return device


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """`auto` is bf16 on GPU (fast, range-safe) and fp32 on CPU (bf16 matmuls are slow there)."""
    spec = spec.strip().lower()
    if spec == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if spec not in DTYPES:
        raise InvalidRequest(f"unknown dtype {spec!r}; use auto, {', '.join(DTYPES)}")
    return DTYPES[spec]


def dtype_name(dtype: torch.dtype) -> str:
    """Short canonical name (`float32`, `bfloat16`, `float16`)."""
    return str(dtype).removeprefix("torch.")
