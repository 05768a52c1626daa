"""EncodeActivations requests: plain values in, a checked spec out, and codes rows from top-k arrays.

Torch-free (numpy only), because the activation-only server imports it and must not load torch. Like
`RequestValidator`, every error names the field as the proto spells it and the allowed range:
InvalidRequest for a malformed batch (wrong vector length or dtype, NaN/inf, empty, too many rows,
`previous` missing for a residualized stage or given for a plain one), NotFound for an unknown stack or
stage, FailedPrecondition when the server has no stack at all.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from core.errors import FailedPrecondition, InvalidRequest, NotFound
from service.engine.contract.inputs import Limits
from service.engine.contract.specs import StageCodes

RAW_DTYPES = {"FLOAT32": ("<f4", 4), "FLOAT16": ("<f2", 2), "BFLOAT16": ("<u2", 2)}
"""DType name -> (numpy little-endian dtype of the bytes, itemsize); bfloat16 is read as uint16 and widened."""


@dataclass(frozen=True)
class MatrixIn:
    """A Matrix message's fields; `dtype` is the DType name without prefix, None for UNSPECIFIED."""

    rows: int
    cols: int
    values: Sequence[float] = ()
    raw: bytes = b""
    dtype: str | None = None


@dataclass(frozen=True)
class EncodeTarget:
    """What validation needs to know of a stage."""

    index: int
    name: str
    d_in: int
    d_sae: int
    residual_of: int | None = None


@dataclass(frozen=True, eq=False)
class EncodeSpec:
    """One checked batch: float32 arrays, C-contiguous, finite."""

    sequence: int
    stack: str
    stage: int
    activations: np.ndarray  # (N, d_in) float32
    previous: np.ndarray | None  # (N, d_prev) float32 for a residualized stage
    top_k: int
    include_error: bool

    @property
    def rows(self) -> int:
        return int(self.activations.shape[0])


def _decode(m: MatrixIn, field: str) -> np.ndarray:
    """The matrix as (rows, cols) float32, after checking that its data has exactly rows · cols elements."""
    count = m.rows * m.cols
    if len(m.values) and len(m.raw):
        raise InvalidRequest(f"{field}: set either values or raw (+ dtype), not both")
    if len(m.values):
        if len(m.values) != count:
            raise InvalidRequest(f"{field}.values has {len(m.values)} elements; rows × cols = {m.rows} × {m.cols} "
                                 f"= {count}")
        return np.asarray(m.values, dtype=np.float32).reshape(m.rows, m.cols)
    if not len(m.raw):
        raise InvalidRequest(f"{field} has no data: set values (float32) or raw with a dtype")
    if m.dtype is None:
        raise InvalidRequest(f"{field}.dtype is required with raw: one of {', '.join(RAW_DTYPES)}")
    if m.dtype not in RAW_DTYPES:
        raise InvalidRequest(f"{field}.dtype {m.dtype} is not supported; use one of {', '.join(RAW_DTYPES)}")
    layout, size = RAW_DTYPES[m.dtype]
    if len(m.raw) != count * size:
        raise InvalidRequest(f"{field}.raw has {len(m.raw)} bytes; {m.rows} × {m.cols} {m.dtype} elements take "
                             f"{count * size} (is dtype right?)")
    data = np.frombuffer(m.raw, dtype=layout)
    if m.dtype == "BFLOAT16":
        data = (data.astype(np.uint32) << 16).view(np.float32)
    return data.astype(np.float32).reshape(m.rows, m.cols)  # a copy: writable, not a view of the message


def _finite(array: np.ndarray, field: str) -> np.ndarray:
    finite = np.isfinite(array)
    if not finite.all():
        row, col = (int(i) for i in np.argwhere(~finite)[0])
        raise InvalidRequest(f"{field} has a non-finite value ({array[row, col]}) at row {row}, column {col}; "
                             "activations must be finite")
    return np.ascontiguousarray(array)


class EncodeValidator:
    """Checks EncodeActivations requests against the served stacks (first = default) and the limits."""

    def __init__(self, stacks: Mapping[str, Sequence[EncodeTarget]], limits: Limits) -> None:
        self.stacks = {name: list(stages) for name, stages in stacks.items()}
        self.limits = limits

    def _stage(self, stack: str, stage: str) -> tuple[str, EncodeTarget]:
        if stack and stack not in self.stacks:
            loaded = ", ".join(map(repr, self.stacks)) or "none"
            raise NotFound(f"stack {stack!r} is not loaded; loaded stacks: {loaded}")
        if not self.stacks:
            raise FailedPrecondition("EncodeActivations needs an SAE stack, but this server has none loaded")
        name = stack or next(iter(self.stacks))
        stages = self.stacks[name]
        names = ", ".join(repr(s.name) for s in stages)
        if not stage:
            raise InvalidRequest(f"stage is required: a stage name of stack {name!r} ({names})")
        found = next((s for s in stages if s.name == stage), None)
        if found is None:
            raise NotFound(f"stage {stage!r} is not a stage of stack {name!r}; stages: {names}")
        return name, found

    def matrix(self, m: MatrixIn | None, field: str, *, cols: int, what: str, rows: int | None = None) -> np.ndarray:
        """Shape first (cheap, before any data is touched), then the data, then finiteness."""
        if m is None:
            raise InvalidRequest(f"{field} is required: a Matrix of 1..{self.limits.max_batch_vectors} rows of "
                                 f"{cols} values ({what})")
        if m.rows == 0 or m.cols == 0:
            raise InvalidRequest(f"{field} is an empty batch ({m.rows} rows × {m.cols} cols); send at least one row "
                                 f"of {cols} values")
        if m.rows > self.limits.max_batch_vectors:
            raise InvalidRequest(f"{field}.rows {m.rows} exceeds Limits.max_batch_vectors "
                                 f"({self.limits.max_batch_vectors}); split the batch")
        if rows is not None and m.rows != rows:
            raise InvalidRequest(f"{field}.rows {m.rows} must equal activations.rows {rows} (one row per token)")
        if m.cols != cols:
            raise InvalidRequest(f"{field}.cols {m.cols} is the wrong vector length: {what} has width {cols}")
        return _finite(_decode(m, field), field)

    def encode(self, sequence: int, stack: str, stage: str, activations: MatrixIn | None,
               previous: MatrixIn | None, top_k: int, include_error: bool) -> EncodeSpec:
        name, target = self._stage(stack, stage)
        if top_k and not 0 < top_k <= self.limits.max_top_k:
            raise InvalidRequest(f"top_k {top_k} is out of range: 1..{self.limits.max_top_k} (Limits.max_top_k), "
                                 "or 0 for the default")
        h = self.matrix(activations, "activations", cols=target.d_in, what=f"stage {target.name!r}")
        prev = None
        if target.residual_of is None and previous is not None:
            raise InvalidRequest(f"previous is only for residualized stages; stage {target.name!r} is not one "
                                 "(leave previous unset)")
        if target.residual_of is not None:
            source = self.stacks[name][target.residual_of]
            what = f"stage {source.name!r}, whose activation residualized stage {target.name!r} predicts from"
            prev = self.matrix(previous, "previous", cols=source.d_in, what=what, rows=h.shape[0])
        k = int(top_k) or self.limits.default_top_k
        return EncodeSpec(int(sequence), name, target.index, h, prev, min(k, target.d_sae), bool(include_error))


def codes_rows(stage: int, values: np.ndarray, indices: np.ndarray, l0: np.ndarray, error: np.ndarray | None,
               predicted: np.ndarray | None) -> list[StageCodes]:
    """values/indices (N, K) ranked by |value|, l0 (N,), errors (N,) or None -> N StageCodes; zero values are
    dropped, as `service.engine.operations.codes.stage_codes` does on the torch path."""
    out = []
    for row in range(values.shape[0]):
        keep = values[row] != 0
        out.append(StageCodes(
            stage=stage, ids=tuple(indices[row][keep].tolist()), values=tuple(values[row][keep].tolist()),
            l0=int(l0[row]), error_norm=None if error is None else float(error[row]),
            predicted_error_norm=None if predicted is None else float(predicted[row])))
    return out


def top_k_by_magnitude(z: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """numpy twin of core.sae.base.top_k_by_magnitude: values (N, k) signed, indices (N, k), by |z| desc."""
    k = min(k, z.shape[1])
    magnitude = np.abs(z)
    part = np.argpartition(-magnitude, k - 1, axis=1)[:, :k]  # (N, k) unordered
    order = np.argsort(-np.take_along_axis(magnitude, part, axis=1), axis=1, kind="stable")
    indices = np.take_along_axis(part, order, axis=1)
    return np.take_along_axis(z, indices, axis=1), indices
