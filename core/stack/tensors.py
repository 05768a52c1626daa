"""Hashed safetensors files of a stack: written from CPU fp32 copies, read back only after their hash and
header (dtypes and shapes against what the config implies) are checked, so hostile files never allocate."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load as load_safetensors_bytes
from safetensors.torch import save_file
from torch import Tensor

from core.sae.base import SAEConfig
from core.sae.registry import build_sae
from core.stack.manifest import StackError, file_sha256

MAX_HEADER_BYTES = 100 << 20  # the safetensors format's own limit
ST_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64",
             torch.int64: "I64", torch.int32: "I32", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
Header = dict[str, tuple[str, tuple[int, ...]]]  # tensor name -> (safetensors dtype, shape)


def write_tensors(directory: Path, file: str, tensors: Mapping[str, Tensor]) -> dict[str, Any]:
    """Save CPU fp32 (or integer) copies; return the file's {file, sha256, bytes} record."""
    copies = {k: v.detach().to("cpu", torch.float32 if v.is_floating_point() else v.dtype).contiguous().clone()
              for k, v in tensors.items()}
    save_file(copies, str(directory / file))
    return {"file": file, "sha256": file_sha256(directory / file), "bytes": (directory / file).stat().st_size}


def header(data: bytes, file: str) -> Header:
    """name -> (dtype, shape) from a safetensors header, parsed without touching the tensor data."""
    n = int.from_bytes(data[:8], "little") if len(data) >= 8 else -1
    try:
        if not 0 < n <= min(len(data) - 8, MAX_HEADER_BYTES):
            raise ValueError("bad header length")
        header = json.loads(data[8 : 8 + n])
        header.pop("__metadata__", None)
        return {k: (str(v["dtype"]), tuple(int(d) for d in v["shape"])) for k, v in header.items()}
    except (ValueError, TypeError, KeyError, AttributeError, RecursionError) as exc:
        raise StackError(f"stack file {file!r} is not a valid safetensors file: {exc!s:.200}") from None


def read_tensors(root: Path, file: str, sha256: str, want: Header, what: str) -> dict[str, Tensor]:
    """Read once and re-hash (what is loaded is what was verified); check the header; only then load.
    A `want` dtype of None accepts any supported dtype."""
    data = (root / file).read_bytes()
    if hashlib.sha256(data).hexdigest() != sha256:
        raise StackError(f"stack file {file!r} changed while the stack was being read")
    got = header(data, file)
    problems = [f"{k} is {got[k][0]} {got[k][1]}, expected {want[k][0] or 'a supported dtype'} {want[k][1]}"
                for k in sorted(got.keys() & want.keys())
                if got[k][1] != want[k][1] or got[k][0] not in ({want[k][0]} - {None} or set(ST_DTYPES.values()))]
    problems += [f"missing {k}" for k in sorted(want.keys() - got.keys())]
    problems += [f"unexpected {k}" for k in sorted(got.keys() - want.keys())]
    if problems:
        raise StackError(f"stack file {file!r} does not match {what}: {'; '.join(problems)}")
    try:
        return load_safetensors_bytes(data)
    except Exception as exc:  # safetensors raises its own error type (e.g. for inconsistent offsets)
        raise StackError(f"stack file {file!r} could not be read: {exc}") from None


def expected_state(cfg: SAEConfig) -> Header:
    """The tensors a stage file must hold, from the SAE built on the meta device (nothing allocated)."""
    with torch.device("meta"):
        state = build_sae(cfg).state_dict()
    return {k: (ST_DTYPES.get(torch.float32 if v.is_floating_point() else v.dtype, "?"), tuple(v.shape))
            for k, v in state.items()}
