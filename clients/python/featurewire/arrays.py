"""numpy conversions, imported lazily: the client runs without numpy, and uses it when present.

- `to_numpy(codes, d_sae)`: sparse codes (one StageCodes or a sequence of them) to a dense array;
- `feature_matrix(decomposition, stage)`: a whole Decompose result at one stage, tokens x d_sae;
- `matrix(array)`: a (rows, cols) activation array to the wire's `Matrix` (raw little-endian bytes for
  numpy float32/float16/bfloat16 arrays, packed floats for plain lists).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from featurewire.v1 import types_pb2 as t

if TYPE_CHECKING:
    import numpy as np

    from featurewire.events import Decomposition, StageCodes

RAW_DTYPES = {"float32": t.DTYPE_FLOAT32, "float16": t.DTYPE_FLOAT16, "bfloat16": t.DTYPE_BFLOAT16}


def _numpy() -> Any:
    try:
        import numpy
    except ImportError:  # pragma: no cover - depends on the environment
        raise ImportError("this helper needs numpy: pip install numpy") from None
    return numpy


def to_numpy(codes: StageCodes | Sequence[StageCodes], d_sae: int, *, dtype: Any = "float32") -> np.ndarray:
    """Dense codes: shape (d_sae,) for one StageCodes, (n, d_sae) for a sequence; unreported features are 0."""
    np = _numpy()
    single = not isinstance(codes, Sequence)
    rows = [codes] if single else list(codes)
    out = np.zeros((len(rows), d_sae), dtype=dtype)
    for r, c in enumerate(rows):
        if c.ids:
            out[r, np.asarray(c.ids, dtype=np.int64)] = np.asarray(c.values, dtype=dtype)
    return out[0] if single else out


def feature_matrix(decomposition: Decomposition, stage: str | int, *, dtype: Any = "float32") -> np.ndarray:
    """(num_tokens, d_sae) codes of one stage of a collected Decompose result."""
    ref = next((s for s in decomposition.header.stages if stage in (s.name, s.index)), None)
    if ref is None:
        raise KeyError(f"stage {stage!r} was not reported; reported: {[s.name for s in decomposition.header.stages]}")
    return to_numpy([tok.stage(ref.index) for tok in decomposition.tokens], ref.d_sae, dtype=dtype)


def _is_array(value: Any) -> bool:
    return hasattr(value, "shape") and hasattr(value, "dtype")


def matrix(array: Any) -> t.Matrix:
    """A 1-D or 2-D array (numpy, anything numpy can read, or nested lists) as a Matrix message."""
    if _is_array(array) or "numpy" in sys.modules:
        np = _numpy()
        a = np.asarray(array)
        if a.ndim == 1:
            a = a[None, :]
        if a.ndim != 2:
            raise ValueError(f"activations must be 1-D or 2-D (rows, d_in), got shape {a.shape}")
        name = a.dtype.name if a.dtype.name in RAW_DTYPES else "float32"
        if name == "float32":
            a = a.astype("<f4", copy=False)
        elif a.dtype.byteorder == ">":
            a = a.byteswap().view(a.dtype.newbyteorder("<"))
        return t.Matrix(rows=a.shape[0], cols=a.shape[1], raw=np.ascontiguousarray(a).tobytes(),
                        dtype=RAW_DTYPES[name])
    rows = [array] if array and not isinstance(array[0], Sequence) else list(array)
    cols = len(rows[0]) if rows else 0
    if any(len(r) != cols for r in rows):
        raise ValueError("activations must be a rectangular (rows, d_in) array")
    return t.Matrix(rows=len(rows), cols=cols, values=[float(v) for r in rows for v in r])
