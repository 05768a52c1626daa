"""The generated corpus: text sampled from the host model itself, once, into a cache.

Training an SAE on the host's own samples keeps its text on the distribution the host was trained on, with
nothing downloaded. Samples start from BOS alone or from a shipped opening (`generation_settings`), are drawn
in batches through a KV-cached loop on the HF model (`sampling`: temperature and exact top-p, no top-k),
and pass the degenerate-sample rules (`sample_filters`) or are dropped, with the share dropped recorded.

The cache lives in CACHE/corpus/generated-<key>, the key hashing the model's fingerprints
(core.stack.identity), dtype, device type, every setting and the openings' bytes. It is written into a
staging directory and renamed only when complete, so a failed or interrupted generation leaves nothing that
loads. Batch i is sampled under its own seed derived from (seed, i): the same settings give the same text on
the same machine type (float rounding differs across CPU kinds and torch builds).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from core.host.host_model import HostModel
from core.stack.identity import HostModelIdentity
from trainer.data.corpus import Document
from trainer.data.generation_settings import GenerationSettings, Openings, load_openings
from trainer.data.sample_filters import REASONS, rejection
from trainer.data.sampling import sample_batch

logger = logging.getLogger(__name__)

SOURCE = "generated"
CACHE_FORMAT = 2  # 2: control, unused and image tokens are never sampled
NON_TEXT_TOKENS = re.compile(r"\[multimodal\]|<(start|end)_of_image>|<image_soft_token>")
"""Added tokens that are not flagged special yet never stand for text (Gemma 3's image markers)."""
DOCUMENTS_FILE = "documents.jsonl"
PROVENANCE_FILE = "provenance.json"  # written last into the staging directory


@dataclass(frozen=True)
class GeneratedCorpus:
    documents: list[Document]
    provenance: dict[str, Any]  # settings, model, openings, counts: what the activation manifest records
    directory: Path
    cache_hit: bool


def cache_key(host: HostModel, settings: GenerationSettings, openings: Openings) -> str:
    """sha256 over everything that decides the text (the openings by content, not by path)."""
    identity = HostModelIdentity.from_model(host.model, host.name)
    parts = {
        "format": CACHE_FORMAT, "model_fingerprint": identity.fingerprint,
        "weights_fingerprint": identity.weights_fingerprint, "dtype": str(host.dtype), "device": host.device.type,
        "settings": {k: v for k, v in settings.to_dict().items() if k != "openings"},
        "openings_sha256": openings.sha256,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def cache_directory(cache_dir: Path, key: str) -> Path:
    return Path(cache_dir) / "corpus" / f"{SOURCE}-{key[:24]}"


def generated_corpus(host: HostModel, settings: GenerationSettings, cache_dir: Path, *,
                     progress: bool = True) -> GeneratedCorpus:
    """The cached corpus for (model, settings), sampling and caching it first on a miss."""
    openings = load_openings(settings.openings)
    key = cache_key(host, settings, openings)
    directory = cache_directory(cache_dir, key)
    if (directory / PROVENANCE_FILE).is_file():
        return GeneratedCorpus(_read_documents(directory), _read_provenance(directory), directory, True)
    documents, provenance = _sample(host, settings, openings, key, progress)
    _write_atomic(directory, documents, provenance)
    return GeneratedCorpus(documents, provenance, directory, False)


def _prompt_plan(settings: GenerationSettings, count: int) -> Iterator[int]:
    """Opening index per sample (-1: BOS alone): each pass over the openings in a fresh seeded order."""
    rng = random.Random(f"featurewire-generated:{settings.seed}")
    order: list[int] = []
    while True:
        if rng.random() < settings.bos_share:
            yield -1
            continue
        if not order:
            order = list(range(count))
            rng.shuffle(order)
        yield order.pop()


def banned_token_ids(tokenizer, eos_ids: set[int]) -> list[int]:
    """Token ids the sampler never draws: special and control tokens (BOS, pad, unused, turn markers) and
    image markers, which a base model now and then samples after BOS; EOS stays allowed (it ends a sample)."""
    ids = set(tokenizer.all_special_ids)
    ids |= {i for i, token in tokenizer.added_tokens_decoder.items()
            if token.special or NON_TEXT_TOKENS.fullmatch(token.content)}
    return sorted(ids - eos_ids)


def _batch_seed(seed: int, batch: int) -> int:
    digest = hashlib.sha256(f"{seed}:{batch}".encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def _left_padded(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.int64)  # (B, T)
    mask = torch.zeros((len(rows), width), dtype=torch.int64)  # (B, T)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(row)
        mask[i, width - len(row) :] = 1
    return ids, mask


def _sample(host: HostModel, settings: GenerationSettings, openings: Openings, key: str,
            progress: bool) -> tuple[list[Document], dict[str, Any]]:
    tokenizer = host.tokenizer
    bos = tokenizer.bos_token_id
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eos = host.model.generation_config.eos_token_id or tokenizer.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos]) - {None}
    banned = banned_token_ids(tokenizer, eos_ids)
    prefix = [bos] if bos is not None else []
    opening_ids = [tokenizer(t, add_special_tokens=False).input_ids for t in openings.texts]
    if not prefix and any(not ids for ids in opening_ids):
        raise ValueError("this tokenizer has no BOS token, so every opening must give at least one token")
    plan = _prompt_plan(settings, len(openings.texts))
    documents: list[Document] = []
    dropped: Counter[str] = Counter()
    kept_tokens = sampled_tokens = samples = 0
    started = time.perf_counter()
    bar = tqdm(total=settings.tokens, unit="tok", unit_scale=True, desc="generating", disable=not progress)
    with bar:
        for batch in range(MAX_BATCHES):
            if kept_tokens >= settings.tokens:
                break
            chosen = [next(plan) for _ in range(settings.batch_size)]
            prompts = [prefix + (opening_ids[c] if c >= 0 else []) for c in chosen]
            if not prefix:  # no BOS: a BOS-alone sample has no prompt, so it takes an opening instead
                prompts = [p or opening_ids[i % len(opening_ids)] for i, p in enumerate(prompts)]
            input_ids, mask = _left_padded(prompts, pad_id)
            new_ids = sample_batch(host.model, input_ids.to(host.device), mask.to(host.device),
                                   max_new_tokens=settings.max_new_tokens, temperature=settings.temperature,
                                   top_p=settings.top_p, eos_ids=eos_ids, pad_id=pad_id,
                                   seed=_batch_seed(settings.seed, batch),
                                   banned_ids=banned).tolist()  # (B, <= max_new_tokens)
            for choice, prompt, row in zip(chosen, prompts, new_ids, strict=True):
                cut = next((i for i, t in enumerate(row) if t in eos_ids), len(row))
                ids = row[:cut]
                sampled_tokens += len(ids)
                text = tokenizer.decode(prompt + ids, skip_special_tokens=True)
                reason = rejection(ids, tokenizer.decode(ids, skip_special_tokens=True),
                                   min_tokens=settings.min_new_tokens, max_repeat_share=settings.max_repeat_share,
                                   min_distinct_share=settings.min_distinct_share)
                if reason:
                    dropped[reason] += 1
                else:
                    category = openings.categories[choice] if choice >= 0 else "bos"
                    documents.append(Document(f"{SOURCE}:{key[:12]}:{samples:06d}", text, f"{SOURCE}/{category}"))
                    kept_tokens += len(ids)
                    bar.update(len(ids))
                samples += 1
        else:
            raise RuntimeError(f"generation kept {kept_tokens} of {settings.tokens} tokens after {MAX_BATCHES} "
                               f"batches: the filters drop nearly everything; loosen them or check the model")
    elapsed = time.perf_counter() - started
    total_dropped = sum(dropped.values())
    stats = {
        "samples": samples, "kept": len(documents), "dropped": total_dropped,
        "dropped_share": total_dropped / samples if samples else 0.0,
        "dropped_by_reason": {r: dropped.get(r, 0) for r in REASONS},
        "sampled_tokens": sampled_tokens, "kept_tokens": kept_tokens, "seconds": round(elapsed, 2),
        "tokens_per_second": round(sampled_tokens / max(elapsed, 1e-9), 1),
        "torch_threads": torch.get_num_threads(), "load_average_1min": round(os.getloadavg()[0], 2),
    }  # threads and machine load at the end: they explain the speed, not the text
    logger.info("generated %d samples (%d tokens) in %.1fs, %.0f tokens/s; dropped %.1f%% (%s)", samples,
                sampled_tokens, elapsed, stats["tokens_per_second"], 100 * stats["dropped_share"],
                ", ".join(f"{r} {n}" for r, n in stats["dropped_by_reason"].items()))
    identity = HostModelIdentity.from_model(host.model, host.name)
    provenance = {
        "source": SOURCE, "cache_key": key, "format": CACHE_FORMAT,
        "model": {"name": host.name, "fingerprint": identity.fingerprint,
                  "weights_fingerprint": identity.weights_fingerprint, "dtype": str(host.dtype).removeprefix("torch."),
                  "device": host.device.type},
        "settings": settings.to_dict(),
        "openings": {"origin": openings.origin, "sha256": openings.sha256, "count": len(openings.texts)},
        "sampling": "ancestral sampling with temperature and exact top-p (no top-k), KV-cached, batched; "
                    f"{len(banned)} special, control and image token ids never sampled",
        "versions": {"torch": torch.__version__, "transformers": _transformers_version()},
        "stats": stats,
    }
    return documents, provenance


MAX_BATCHES = 100_000
"""A bound on the sampling loop: reached only when the filters drop almost every sample."""


def _transformers_version() -> str:
    import transformers

    return transformers.__version__


def _write_atomic(directory: Path, documents: list[Document], provenance: dict[str, Any]) -> None:
    """Write into a staging sibling, then rename: a crash leaves no directory that loads (staging is removed)."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{directory.name}-", dir=directory.parent))
    try:
        _write_files(staging, documents, provenance)
        staging.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        try:
            staging.rename(directory)
        except OSError:
            if not (directory / PROVENANCE_FILE).is_file():  # lost a race to a complete copy: that one stands
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _write_files(staging: Path, documents: list[Document], provenance: dict[str, Any]) -> None:
    with (staging / DOCUMENTS_FILE).open("w", encoding="utf-8") as handle:
        for doc in documents:
            handle.write(json.dumps({"id": doc.doc_id, "source": doc.source, "text": doc.text}, ensure_ascii=False)
                         + "\n")
    (staging / PROVENANCE_FILE).write_text(json.dumps(provenance, indent=2) + "\n", encoding="utf-8")


def _read_documents(directory: Path) -> list[Document]:
    with (directory / DOCUMENTS_FILE).open(encoding="utf-8") as handle:
        return [Document(r["id"], r["text"], r["source"]) for r in map(json.loads, handle)]


def _read_provenance(directory: Path) -> dict[str, Any]:
    return json.loads((directory / PROVENANCE_FILE).read_text(encoding="utf-8"))


class GeneratedSource:
    """The generated corpus as a lazy source for `load_corpus(..., generated=source)`: sampled (or read from the
    cache) on first use only, so a spec that gives it weight 0 never touches the model."""

    def __init__(self, host: HostModel, settings: GenerationSettings, cache_dir: Path, *,
                 progress: bool = True) -> None:
        self.host, self.settings, self.cache_dir, self.progress = host, settings, Path(cache_dir), progress
        self.result: GeneratedCorpus | None = None

    def __call__(self) -> list[Document]:
        if self.result is None:
            self.result = generated_corpus(self.host, self.settings, self.cache_dir, progress=self.progress)
        return self.result.documents
