"""The on-disk activation store: safetensors shards + `manifest.json`, and a seeded shuffling reader.

A store is a directory written once by `trainer.data.activations.collect_activations` (through
`trainer.data.shard_writer`, by one process or by every torchrun rank, with the same bytes either way):

- `shard-00000.safetensors`, ...: one tensor per hookpoint, (n_tokens, d) each, plus per-row
  metadata (`token_ids`, `doc_index`, `doc_position`, int32). Row r of every tensor in a shard is the
  same token, so every stage of a stack can train from ONE activation pass.
- `manifest.json`: what was collected (model, hookpoints, dtype, context length), each shard with its
  token count and sha256 (verified at load), and per-hookpoint statistics: E‖x‖² and the scale
  s = sqrt(d / E‖x‖²) that makes E‖s·x‖² = d (docs/methods.md, notation), which training applies and the
  stack stores.

Files are written under a temporary name and renamed, and the manifest last, so an interrupted
collection never leaves a directory that loads.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from torch import Tensor

from core.stack.manifest import file_sha256

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
SHARD_PATTERN = "shard-{:05d}.safetensors"

TOKEN_IDS = "token_ids"
DOC_INDEX = "doc_index"
DOC_POSITION = "doc_position"
METADATA_KEYS = (TOKEN_IDS, DOC_INDEX, DOC_POSITION)
"""Per-row int32 tensors stored beside the activations: the token, its document (index into the
document sequence given to the collector) and its position among that document's tokens."""

STORAGE_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


class ActivationStoreError(ValueError):
    """An activation directory that is missing, corrupt, or does not hold what was asked for."""


@dataclass(frozen=True)
class ShardInfo:
    file: str  # name relative to the store directory
    tokens: int
    sha256: str


@dataclass(frozen=True)
class HookpointStats:
    d: int
    mean_squared_norm: float  # E‖x‖² over every stored row
    scale: float  # sqrt(d / E‖x‖²): multiply x by this so that E‖s·x‖² = d


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


@dataclass(frozen=True)
class ActivationManifest:
    """What one collection wrote; `load` checks every shard against its sha256."""

    directory: Path
    model: str
    hookpoints: tuple[str, ...]  # forward order
    dtype: str  # storage dtype; reads always return float32
    context_length: int
    total_tokens: int
    shards: tuple[ShardInfo, ...]
    stats: Mapping[str, HookpointStats]
    documents: int  # documents consumed (a prefix of the sequence given to the collector)
    windows: int
    bos_token_id: int | None
    skipped_token_ids: tuple[int, ...]  # special tokens that were fed to the model but not stored
    format_version: int = FORMAT_VERSION
    corpus: Mapping[str, Any] | None = None
    """Provenance of the text: the corpus spec, each source's share of the mix and, for the generated source,
    its cache key, sampling settings, model fingerprints and dropped share (absent in older stores)."""

    def scale(self, hookpoint: str) -> float:
        """The normalisation scale s of `hookpoint` (E‖s·x‖² = d)."""
        return self._stats(hookpoint).scale

    def d(self, hookpoint: str) -> int:
        return self._stats(hookpoint).d

    def _stats(self, hookpoint: str) -> HookpointStats:
        try:
            return self.stats[hookpoint]
        except KeyError:
            raise ActivationStoreError(
                f"hookpoint {hookpoint!r} is not in {self.directory}; it holds {', '.join(self.hookpoints)}"
            ) from None

    def check_hookpoints(self, hookpoints: Sequence[str]) -> None:
        for name in hookpoints:
            self._stats(name)

    def shard_path(self, shard: ShardInfo) -> Path:
        return self.directory / shard.file

    def read_shard(self, shard: ShardInfo, keys: Sequence[str]) -> dict[str, Tensor]:
        """Tensors `keys` of one shard, in the stored dtype, on the CPU."""
        with safe_open(self.shard_path(shard), framework="pt", device="cpu") as handle:
            return {key: handle.get_tensor(key) for key in keys}

    def to_json(self) -> dict:
        return {
            "format_version": self.format_version,
            "model": self.model,
            "hookpoints": list(self.hookpoints),
            "dtype": self.dtype,
            "context_length": self.context_length,
            "total_tokens": self.total_tokens,
            "documents": self.documents,
            "windows": self.windows,
            "bos_token_id": self.bos_token_id,
            "skipped_token_ids": list(self.skipped_token_ids),
            "padding": "right",
            "stats": {name: asdict(self.stats[name]) for name in self.hookpoints},
            "shards": [asdict(s) for s in self.shards],
            **({"corpus": dict(self.corpus)} if self.corpus is not None else {}),
        }

    def save(self) -> None:
        _write_atomic(self.directory / MANIFEST_NAME, json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def load(cls, directory: str | Path, *, verify: bool = True) -> ActivationManifest:
        """Read `manifest.json`; with `verify`, refuse any shard whose sha256 does not match."""
        directory = Path(directory)
        path = directory / MANIFEST_NAME
        if not path.is_file():
            raise ActivationStoreError(f"{directory} holds no {MANIFEST_NAME}: not a finished activation store")
        raw = json.loads(path.read_text(encoding="utf-8"))
        if raw.get("format_version") != FORMAT_VERSION:
            raise ActivationStoreError(
                f"{path}: format_version {raw.get('format_version')!r}, this trainer reads {FORMAT_VERSION}"
            )
        manifest = cls(
            directory=directory,
            model=raw["model"],
            hookpoints=tuple(raw["hookpoints"]),
            dtype=raw["dtype"],
            context_length=raw["context_length"],
            total_tokens=raw["total_tokens"],
            shards=tuple(ShardInfo(**s) for s in raw["shards"]),
            stats={name: HookpointStats(**s) for name, s in raw["stats"].items()},
            documents=raw["documents"],
            windows=raw["windows"],
            bos_token_id=raw["bos_token_id"],
            skipped_token_ids=tuple(raw["skipped_token_ids"]),
            corpus=raw.get("corpus"),
        )
        if verify:
            manifest.verify()
        return manifest

    def verify(self) -> None:
        """Every listed shard exists and matches its sha256."""
        for shard in self.shards:
            path = self.shard_path(shard)
            if not path.is_file():
                raise ActivationStoreError(f"activation shard {path} is listed in {MANIFEST_NAME} but missing")
            actual = file_sha256(path)
            if actual != shard.sha256:
                raise ActivationStoreError(
                    f"activation shard {path} is corrupt or was modified: sha256 {actual} != {shard.sha256} "
                    f"recorded in {MANIFEST_NAME}; collect the activations again"
                )


Rows = dict[str, Tensor]


def _num_rows(rows: Rows) -> int:
    return len(next(iter(rows.values())))


def _cat(parts: Sequence[Rows]) -> Rows:
    if len(parts) == 1:
        return parts[0]
    return {key: torch.cat([p[key] for p in parts]) for key in parts[0]}


def _take(rows: Rows, index: Tensor | slice) -> Rows:
    return {key: value[index] for key, value in rows.items()}


class ShuffleBuffer:
    """Mixes rows from different shards: holds up to `capacity` rows; once full it shuffles everything
    it holds and releases all but half, which stays to mix with the next shards (SAELens-style).

    Peak memory is about capacity + one shard of rows, in the stored dtype.
    """

    def __init__(self, capacity: int, generator: torch.Generator) -> None:
        if capacity < 2:
            raise ValueError(f"buffer capacity must be >= 2 rows, got {capacity}")
        self.capacity, self.generator = capacity, generator
        self._parts: list[Rows] = []
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def push(self, rows: Rows) -> list[Rows]:
        """Add rows; returns the shuffled chunks released (possibly none)."""
        self._parts.append(rows)
        self._size += _num_rows(rows)
        released = []
        while self._size >= self.capacity:
            held = _cat(self._parts)
            perm = torch.randperm(self._size, generator=self.generator)
            cut = self._size - self.capacity // 2
            released.append(_take(held, perm[:cut]))
            self._parts = [_take(held, perm[cut:])]
            self._size -= cut
        return released

    def drain(self) -> list[Rows]:
        """Shuffle and release everything held (at the end of an epoch)."""
        if not self._size:
            return []
        held = _cat(self._parts)
        out = _take(held, torch.randperm(self._size, generator=self.generator))
        self._parts, self._size = [], 0
        return [out]


def _shuffled_rows(manifest: ActivationManifest, keys: Sequence[str], buffer_tokens: int,
                   generator: torch.Generator, epochs: int | None) -> Iterator[Rows]:
    """Every row once per epoch: shards in a seeded order per epoch, mixed through a ShuffleBuffer."""
    epoch = 0
    while epochs is None or epoch < epochs:
        buffer = ShuffleBuffer(buffer_tokens, generator)
        for i in torch.randperm(len(manifest.shards), generator=generator).tolist():
            yield from buffer.push(manifest.read_shard(manifest.shards[i], keys))
        yield from buffer.drain()
        epoch += 1


def _cut(chunks: Iterable[Rows], batch_size: int, drop_last: bool) -> Iterator[Rows]:
    """Re-cut a stream of row chunks into batches of exactly `batch_size` rows (the last may be short)."""
    carry: Rows | None = None
    for chunk in chunks:
        rows = chunk if carry is None else _cat([carry, chunk])
        n = _num_rows(rows)
        full = n - n % batch_size
        for start in range(0, full, batch_size):
            yield _take(rows, slice(start, start + batch_size))
        carry = _take(rows, slice(full, n)) if full < n else None
    if carry is not None and not drop_last:
        yield carry


def iterate_batches(
    store: str | Path | ActivationManifest,
    hookpoints: Sequence[str],
    batch_size: int,
    *,
    buffer_tokens: int = 1 << 16,
    seed: int = 0,
    normalize: bool = True,
    device: str | torch.device = "cpu",
    epochs: int | None = 1,
    skip_batches: int = 0,
    drop_last: bool = False,
    metadata: bool = False,
) -> Iterator[dict[str, Tensor]]:
    """Shuffled training batches: {hookpoint: (batch_size, d) float32} with the same rows (tokens)
    across hookpoints, scaled by each hookpoint's normalisation scale when `normalize`.

    Deterministic for a given store, seed, batch_size and buffer_tokens. `epochs=None` loops forever;
    batches run on across epoch boundaries, and each epoch visits every row exactly once.
    `skip_batches` resumes a run: the first batches are re-read and discarded, never moved to `device`.
    With `metadata`, the int64 tensors `token_ids`, `doc_index`, `doc_position` (batch_size,) come too.
    """
    manifest = store if isinstance(store, ActivationManifest) else ActivationManifest.load(store)
    hookpoints = list(dict.fromkeys(hookpoints))
    manifest.check_hookpoints(hookpoints)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if skip_batches < 0:
        raise ValueError(f"skip_batches must be >= 0, got {skip_batches}")
    keys = [*hookpoints, *(METADATA_KEYS if metadata else ())]
    scales = {name: manifest.scale(name) if normalize else 1.0 for name in hookpoints}
    generator = torch.Generator().manual_seed(seed)
    stream = _cut(_shuffled_rows(manifest, keys, buffer_tokens, generator, epochs), batch_size, drop_last)
    for index, batch in enumerate(stream):
        if index < skip_batches:
            continue
        # Out of place: with float32 storage on the CPU `.float()` is a view of the buffer.
        out = {name: batch[name].to(device, non_blocking=True).float() * scales[name] for name in hookpoints}
        if metadata:
            out.update({key: batch[key].to(device=device, dtype=torch.int64) for key in METADATA_KEYS})
        yield out
