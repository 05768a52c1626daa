"""Writing an activation store's shards (the format is in `trainer.data.shards`), alone or from several ranks.

Shard k always holds the store's global rows [k·S, (k+1)·S) (S = shard_tokens), whoever computed them, so the
layout depends only on the rows, never on how many processes wrote them. A `ShardWriter` owns one contiguous
range of global rows: every shard that lies wholly inside its range it writes itself; the rows of a shard
it shares with a neighbouring rank go into a piece file, and `assemble_pieces` later joins a shard's pieces
(in row order) into the same bytes one writer would have written. The normalisation statistics are summed
per batch and then exactly (`math.fsum`), so they do not depend on the order ranks report them in either.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor

from core.stack.manifest import file_sha256
from trainer.data.shards import (
    MANIFEST_NAME,
    METADATA_KEYS,
    SHARD_PATTERN,
    STORAGE_DTYPES,
    TOKEN_IDS,
    ActivationStoreError,
    HookpointStats,
    ShardInfo,
)


@dataclass(frozen=True)
class Piece:
    """Rows [start, start + tokens) of shard `shard`, written by a rank that holds only part of that shard."""

    shard: int
    start: int  # global row index of the piece's first row
    tokens: int
    file: str


def prepare_directory(directory: Path, *, overwrite: bool) -> None:
    """Create `directory`; an existing store is refused unless `overwrite`, then removed first."""
    manifest = directory / MANIFEST_NAME
    if manifest.exists():
        if not overwrite:
            raise FileExistsError(f"{directory} already holds an activation store; pass overwrite=True to replace it")
        manifest.unlink()  # first, so a crash below never leaves a manifest listing stale shards
    directory.mkdir(parents=True, exist_ok=True)
    for stale in directory.glob("shard-*.safetensors*"):  # shards, pieces and temporary files
        stale.unlink()


def write_shard(directory: Path, index: int, tensors: Mapping[str, Tensor]) -> ShardInfo:
    """Save shard `index` under a temporary name, rename it, and hash it."""
    name = SHARD_PATTERN.format(index)
    path = directory / name
    tmp = path.with_name(name + ".tmp")
    save_file(dict(tensors), str(tmp), metadata={"format": "pt"})
    os.replace(tmp, path)
    return ShardInfo(file=name, tokens=len(tensors[TOKEN_IDS]), sha256=file_sha256(path))


class ShardWriter:
    """Accumulates rows (the same rows across hookpoints) for a contiguous range of the store's global rows
    that starts at `first_row`, and writes shards of `shard_tokens` rows (pieces where its range cuts a
    shard); records each batch's sum of ‖x‖² per hookpoint, in float64, for the normalisation statistics.

    `ends_store`: the range runs to the end of the store, so a last partial shard that starts in it is whole.
    """

    def __init__(self, directory: Path, dims: Mapping[str, int], dtype: str, shard_tokens: int, *,
                 first_row: int = 0, ends_store: bool = True) -> None:
        if dtype not in STORAGE_DTYPES:
            raise ValueError(f"unknown storage dtype {dtype!r}; use {', '.join(STORAGE_DTYPES)}")
        if shard_tokens < 1:
            raise ValueError(f"shard_tokens must be >= 1, got {shard_tokens}")
        self.directory, self.dims, self.dtype = directory, dict(dims), dtype
        self.torch_dtype = STORAGE_DTYPES[dtype]
        self.shard_tokens, self.ends_store = shard_tokens, ends_store
        self.shards: dict[int, ShardInfo] = {}  # shard index -> the whole shards written here
        self.pieces: list[Piece] = []
        self.batch_sums: dict[int, dict[str, float]] = {}  # batch index -> hookpoint -> Σ‖x‖² over its rows
        self.total_tokens = 0
        self._next = first_row  # global index of the first pending row
        self._pending: dict[str, list[Tensor]] = {key: [] for key in (*dims, *METADATA_KEYS)}
        self._pending_rows = 0

    def add(self, rows: Mapping[str, Tensor], metadata: Mapping[str, Tensor], batch: int | None = None) -> None:
        """rows: hookpoint -> (n, d) on any device; metadata: METADATA_KEYS -> (n,); one call per batch."""
        sums = {}
        for name in self.dims:
            x = rows[name].to(self.torch_dtype)  # (n, d), cast first so stats describe what is stored
            sq = x.float().pow(2).sum(dim=1).double().sum().item()
            if not math.isfinite(sq):
                hint = " (float16 overflowed: store bfloat16 or float32)" if self.dtype == "float16" else ""
                raise ActivationStoreError(f"non-finite activations at {name}{hint}")
            sums[name] = sq
            self._pending[name].append(x.cpu())
        self.batch_sums[len(self.batch_sums) if batch is None else batch] = sums
        for key in METADATA_KEYS:
            self._pending[key].append(metadata[key].to(device="cpu", dtype=torch.int32))
        n = len(metadata[TOKEN_IDS])
        self._pending_rows += n
        self.total_tokens += n
        while self._pending_rows and self._pending_rows >= self._to_boundary():
            self._flush(self._to_boundary(), whole_tail=False)

    def _to_boundary(self) -> int:
        """Rows from the next pending row to the end of its shard."""
        return self.shard_tokens - self._next % self.shard_tokens

    def _flush(self, n: int, *, whole_tail: bool) -> None:
        joined = {key: torch.cat(parts) for key, parts in self._pending.items()}
        rows = {key: value[:n].contiguous() for key, value in joined.items()}
        self._pending = {key: [value[n:]] if len(value) > n else [] for key, value in joined.items()}
        self._pending_rows -= n
        index, start = divmod(self._next, self.shard_tokens)
        if start == 0 and (n == self.shard_tokens or whole_tail):
            self.shards[index] = write_shard(self.directory, index, rows)
        else:  # a shard shared with a neighbouring rank's range
            piece = Piece(index, self._next, n, f"{SHARD_PATTERN.format(index)}.part-{self._next:012d}")
            save_file(rows, str(self.directory / piece.file), metadata={"format": "pt"})
            self.pieces.append(piece)
        self._next += n

    def close(self) -> None:
        """Write what is pending: the store's last shard when this range ends the store, else a piece."""
        if self._pending_rows:
            self._flush(self._pending_rows, whole_tail=self.ends_store)


def assemble_pieces(directory: Path, pieces: Iterable[Piece], shards: Iterable[int]) -> dict[int, ShardInfo]:
    """Join the pieces of each of `shards` in row order into the shard file, and remove the pieces."""
    by_shard: dict[int, list[Piece]] = {}
    for piece in pieces:
        by_shard.setdefault(piece.shard, []).append(piece)
    out = {}
    for index in shards:
        parts = sorted(by_shard[index], key=lambda p: p.start)
        loaded = []
        for piece in parts:
            with safe_open(directory / piece.file, framework="pt", device="cpu") as handle:
                loaded.append({key: handle.get_tensor(key) for key in handle.keys()})  # noqa: SIM118
        out[index] = write_shard(directory, index, {key: torch.cat([p[key] for p in loaded]) for key in loaded[0]})
        for piece in parts:
            (directory / piece.file).unlink()
    return out


def hookpoint_stats(dims: Mapping[str, int], batch_sums: Iterable[Mapping[str, float]],
                    total_tokens: int) -> dict[str, HookpointStats]:
    """E‖x‖² and the scale s = sqrt(d / E‖x‖²) per hookpoint from per-batch sums (summed exactly)."""
    if not total_tokens:
        raise ActivationStoreError("no tokens were collected: the documents produced no non-special tokens")
    sums = list(batch_sums)
    stats = {}
    for name, d in dims.items():
        msn = math.fsum(s[name] for s in sums) / total_tokens
        stats[name] = HookpointStats(d=d, mean_squared_norm=msn, scale=math.sqrt(d / msn) if msn > 0 else 1.0)
    return stats
