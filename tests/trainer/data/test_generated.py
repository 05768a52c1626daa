"""The generated corpus on the tiny model: seeded determinism, the cache keyed by settings, atomic writes,
openings, filters at work, and provenance in the activation manifest."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch

import trainer.data.generated as generated_mod
from core.host.host_model import HostModel
from trainer.data.activations import ActivationManifest, collect_activations
from trainer.data.corpus import load_corpus_mix
from trainer.data.generated import GeneratedSource, cache_directory, cache_key, generated_corpus
from trainer.data.generation_settings import GenerationSettings, load_openings

SMALL = GenerationSettings(tokens=96, max_new_tokens=12, min_new_tokens=2, batch_size=4, seed=3)


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread() -> Iterator[None]:
    """Tiny batches: a second intra-op thread only adds overhead, 10-50x on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _corpus_dirs(cache: Path) -> list[str]:
    root = cache / "corpus"
    return sorted(p.name for p in root.iterdir()) if root.is_dir() else []


def test_same_seed_same_text_other_seed_other_text(tiny_gemma: HostModel, tmp_path: Path) -> None:
    a = generated_corpus(tiny_gemma, SMALL, tmp_path / "a", progress=False)
    b = generated_corpus(tiny_gemma, SMALL, tmp_path / "b", progress=False)
    assert not a.cache_hit and not b.cache_hit
    assert a.documents == b.documents
    assert sum(len(tiny_gemma.tokenizer(d.text).input_ids) for d in a.documents) > 0
    other = generated_corpus(tiny_gemma, replace(SMALL, seed=4), tmp_path / "a", progress=False)
    assert [d.text for d in other.documents] != [d.text for d in a.documents]
    stats = a.provenance["stats"]
    assert stats["kept_tokens"] >= SMALL.tokens and stats["kept"] == len(a.documents)
    assert stats["samples"] == stats["kept"] + stats["dropped"] and stats["samples"] % SMALL.batch_size == 0
    assert len({d.doc_id for d in a.documents}) == len(a.documents)


def test_cache_hit_reads_without_sampling_and_settings_change_the_key(
        tiny_gemma: HostModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    first = generated_corpus(tiny_gemma, SMALL, tmp_path, progress=False)
    monkeypatch.setattr(generated_mod, "sample_batch", lambda *a, **k: pytest.fail("sampled on a cache hit"))
    again = generated_corpus(tiny_gemma, SMALL, tmp_path, progress=False)
    assert again.cache_hit and again.documents == first.documents and again.directory == first.directory
    assert again.provenance == json.loads(json.dumps(first.provenance))
    openings = load_openings()
    keys = {cache_key(tiny_gemma, s, openings) for s in (SMALL, replace(SMALL, temperature=0.7),
                                                          replace(SMALL, top_p=0.9), replace(SMALL, tokens=97))}
    assert len(keys) == 4
    monkeypatch.undo()
    generated_corpus(tiny_gemma, replace(SMALL, temperature=0.7), tmp_path, progress=False)
    assert len(_corpus_dirs(tmp_path)) == 2


def test_failed_generation_leaves_no_cache(tiny_gemma: HostModel, tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []
    real = generated_mod.sample_batch

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("killed mid-generation")
        return real(*args, **kwargs)

    monkeypatch.setattr(generated_mod, "sample_batch", failing)
    with pytest.raises(RuntimeError, match="killed mid-generation"):
        generated_corpus(tiny_gemma, SMALL, tmp_path, progress=False)
    assert _corpus_dirs(tmp_path) == []

    def half_written(staging: Path, documents, provenance) -> None:
        (staging / generated_mod.DOCUMENTS_FILE).write_text("{}\n")
        raise OSError("disk full")

    monkeypatch.setattr(generated_mod, "sample_batch", real)
    monkeypatch.setattr(generated_mod, "_write_files", half_written)
    with pytest.raises(OSError, match="disk full"):
        generated_corpus(tiny_gemma, SMALL, tmp_path, progress=False)
    assert _corpus_dirs(tmp_path) == []  # neither the target nor the staging directory is left
    monkeypatch.undo()
    assert not generated_corpus(tiny_gemma, SMALL, tmp_path, progress=False).cache_hit


def test_openings_and_bos_share(tiny_gemma: HostModel, tmp_path: Path) -> None:
    file = tmp_path / "openings.json"
    file.write_text(json.dumps({"openings": {"weather": ["It rained on"]}}))
    only = replace(SMALL, openings=str(file), bos_share=0.0)
    docs = generated_corpus(tiny_gemma, only, tmp_path, progress=False).documents
    assert docs and all(d.text.startswith("It rained on") and d.source == "generated/weather" for d in docs)
    from_bos = generated_corpus(tiny_gemma, replace(SMALL, bos_share=1.0), tmp_path, progress=False).documents
    assert {d.source for d in from_bos} == {"generated/bos"}
    mixed = generated_corpus(tiny_gemma, replace(SMALL, tokens=400), tmp_path, progress=False).documents
    assert len({d.source for d in mixed}) > 3  # BOS and several shipped categories


def test_filters_drop_and_report(tiny_gemma: HostModel, tmp_path: Path) -> None:
    strict = replace(SMALL, min_new_tokens=12, min_distinct_share=0.99, max_new_tokens=12, tokens=24)
    result = generated_corpus(tiny_gemma, strict, tmp_path, progress=False)
    stats = result.provenance["stats"]
    assert stats["dropped"] > 0 and 0 < stats["dropped_share"] < 1
    assert sum(stats["dropped_by_reason"].values()) == stats["dropped"]
    assert stats["dropped_share"] == pytest.approx(stats["dropped"] / stats["samples"])


def test_unreadable_openings_file_is_a_clear_error(tiny_gemma: HostModel, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="cannot be read.*shipped list"):
        generated_corpus(tiny_gemma, replace(SMALL, openings=str(tmp_path / "none.json")), tmp_path)
    assert _corpus_dirs(tmp_path) == []


def test_mix_and_manifest_provenance(tiny_gemma: HostModel, tmp_path: Path) -> None:
    notes = tmp_path / "notes.txt"
    notes.write_text("A short note about the weather and the garden. " * 20)
    source = GeneratedSource(tiny_gemma, SMALL, tmp_path / "cache", progress=False)
    docs, shares = load_corpus_mix(f"generated:1,{notes}:3", generated=source)
    assert {d.source for d in docs} >= {str(notes)} and source.result is not None
    assert shares[str(notes)]["documents"] == 1 and shares["generated"]["documents"] > 0
    provenance = {"spec": "generated:1,notes", "sources": shares, "generated": source.result.provenance}
    manifest = collect_activations(tiny_gemma, docs, ["blocks.1.hook_resid_post"], out_dir=tmp_path / "store",
                                   context_length=16, batch_size=4, max_tokens=64, progress=False, corpus=provenance)
    loaded = ActivationManifest.load(manifest.directory)
    assert loaded.corpus == json.loads(json.dumps(provenance))
    assert loaded.corpus["generated"]["cache_key"] == cache_key(tiny_gemma, SMALL, load_openings())
    assert cache_directory(tmp_path / "cache", loaded.corpus["generated"]["cache_key"]).is_dir()


def test_banned_tokens_are_never_sampled(tiny_gemma: HostModel) -> None:
    tokenizer = tiny_gemma.tokenizer
    eos = {tokenizer.eos_token_id}
    banned = generated_mod.banned_token_ids(tokenizer, eos)
    assert tokenizer.bos_token_id in banned and tokenizer.eos_token_id not in banned
    vocab = tiny_gemma.model.config.vocab_size
    allowed = {10, 11, 12, tokenizer.eos_token_id}
    ids = torch.tensor([[tokenizer.bos_token_id, 20, 21]])
    out = generated_mod.sample_batch(tiny_gemma.model, ids, torch.ones_like(ids), max_new_tokens=16, temperature=1.0,
                                     top_p=1.0, eos_ids=eos, pad_id=tokenizer.pad_token_id, seed=0,
                                     banned_ids=[i for i in range(vocab) if i not in allowed])
    assert set(out[0].tolist()) <= allowed | {tokenizer.pad_token_id}
