"""Activation collection and the shard store: rows match a direct forward pass, the manifest round-trips
and is verified, normalisation, and the seeded shuffling reader (determinism, coverage, resume)."""

from __future__ import annotations

import json
from collections import Counter
from itertools import islice
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from core.errors import NotFound
from core.host.host_model import HostModel
from trainer.data.activations import (
    ActivationManifest,
    ActivationStoreError,
    batch_windows,
    collect_activations,
    iter_windows,
    iterate_batches,
    special_token_ids,
)
from trainer.data.corpus import Document
from trainer.data.shards import DOC_INDEX, DOC_POSITION, MANIFEST_NAME, TOKEN_IDS

CONTEXT = 16
HOOKPOINTS = ["blocks.1.hook_resid_post", "blocks.2.hook_resid_pre", "blocks.2.hook_mlp_out", "blocks.0.hook_attn_out"]
TEXTS = [
    "A sparse autoencoder reads an activation vector from the residual stream of a language model.",
    "The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.",
    "",  # no tokens: no windows
    "Short.",
    "def forward(self, x):\n    return self.decode(self.encode(x))\n<eos> and a literal special token",
    "How vexingly quick daft zebras jump! The five boxing wizards jump quickly. " * 3,
]
DOCS = [Document(doc_id=f"doc{i}", text=t, source="test") for i, t in enumerate(TEXTS)]


def _collect(host: HostModel, out_dir: Path, **overrides) -> ActivationManifest:
    options = dict(context_length=CONTEXT, batch_size=3, dtype="float32", shard_tokens=40, progress=False)
    options.update(overrides)
    return collect_activations(host, DOCS, HOOKPOINTS, out_dir=out_dir, **options)


@pytest.fixture(scope="module")
def store(tiny_gemma: HostModel, tmp_path_factory: pytest.TempPathFactory) -> ActivationManifest:
    return _collect(tiny_gemma, tmp_path_factory.mktemp("acts"))


def _all_rows(manifest: ActivationManifest, keys: list[str]) -> dict[str, torch.Tensor]:
    """Every stored row in collection order, in the stored dtype."""
    parts = [manifest.read_shard(s, keys) for s in manifest.shards]
    return {k: torch.cat([p[k] for p in parts]) for k in keys}


def _expected_rows(host: HostModel, names: list[str]) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Each window run on its own (no padding, no mask), keeping the non-special positions."""
    special = torch.tensor(special_token_ids(host.tokenizer))
    rows: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    ids = []
    for window in iter_windows(host.tokenizer, DOCS, CONTEXT):
        x = torch.tensor([window.ids])
        keep = ~torch.isin(x[0], special)
        captures = host.forward(x, reads=names).captures
        for n in names:
            rows[n].append(captures[n][0][keep])
        ids.append(x[0][keep])
    return {n: torch.cat(v) for n, v in rows.items()}, torch.cat(ids)


def test_windows_start_with_bos_and_cover_each_document(tiny_gemma: HostModel) -> None:
    tokenizer = tiny_gemma.tokenizer
    windows = list(iter_windows(tokenizer, DOCS, CONTEXT))
    assert {w.doc_index for w in windows} == {0, 1, 3, 4, 5}  # the empty document gives none
    for index, doc in enumerate(DOCS):
        mine = [w for w in windows if w.doc_index == index]
        assert all(w.ids[0] == tokenizer.bos_token_id and len(w.ids) <= CONTEXT for w in mine)
        content = [t for w in mine for t in w.ids[1:]]
        assert content == tokenizer(doc.text, add_special_tokens=False)["input_ids"]
    assert len([w for w in windows if w.doc_index == 5]) > 1  # a long document is split

    batch = next(batch_windows(windows, 3, tokenizer.pad_token_id))
    assert batch.input_ids.shape == batch.attention_mask.shape == (3, max(len(w.ids) for w in windows[:3]))
    assert int(batch.attention_mask.sum()) == sum(len(w.ids) for w in windows[:3])


@pytest.mark.parametrize("tiny_host", ["tiny-random", "tiny-random-neox"], indirect=True)
def test_rows_equal_a_direct_forward_without_special_tokens(tiny_host: HostModel, tmp_path: Path) -> None:
    manifest = _collect(tiny_host, tmp_path)
    names = list(manifest.hookpoints)
    expected, expected_ids = _expected_rows(tiny_host, names)
    stored = _all_rows(manifest, [*names, TOKEN_IDS])

    specials = set(special_token_ids(tiny_host.tokenizer))
    windows = list(iter_windows(tiny_host.tokenizer, DOCS, CONTEXT))
    assert tiny_host.tokenizer.eos_token_id in {t for w in windows for t in w.ids}  # the literal "<eos>"
    non_special = sum(t not in specials for w in windows for t in w.ids)
    assert manifest.total_tokens == non_special == len(expected_ids) == sum(s.tokens for s in manifest.shards)
    assert len(manifest.shards) > 1
    assert torch.equal(stored[TOKEN_IDS].long(), expected_ids)
    for name in names:
        assert stored[name].shape == (non_special, tiny_host.hookpoints.d_model)
        torch.testing.assert_close(stored[name], expected[name], atol=1e-5, rtol=1e-5)


def test_manifest_round_trip(tiny_gemma: HostModel, store: ActivationManifest) -> None:
    loaded = ActivationManifest.load(store.directory)
    assert loaded == store
    raw = json.loads((store.directory / MANIFEST_NAME).read_text())
    assert raw["hookpoints"] == [p.name for p in tiny_gemma.hookpoints.resolve(HOOKPOINTS)]  # forward order
    assert raw["dtype"] == "float32" and raw["context_length"] == CONTEXT and raw["model"] == "tiny-random"
    assert raw["total_tokens"] == sum(s["tokens"] for s in raw["shards"])
    assert all(len(s["sha256"]) == 64 for s in raw["shards"])
    assert raw["stats"]["blocks.2.hook_mlp_out"]["d"] == 64
    assert raw["documents"] == len(DOCS)


def test_tampered_or_missing_shard_is_refused(tiny_gemma: HostModel, tmp_path: Path) -> None:
    manifest = _collect(tiny_gemma, tmp_path)
    victim = manifest.shard_path(manifest.shards[1])
    data = bytearray(victim.read_bytes())
    data[-3] ^= 0xFF
    victim.write_bytes(bytes(data))
    with pytest.raises(ActivationStoreError, match=victim.name):
        ActivationManifest.load(tmp_path)
    victim.unlink()
    with pytest.raises(ActivationStoreError, match=f"{victim.name}.*missing"):
        ActivationManifest.load(tmp_path)
    with pytest.raises(ActivationStoreError, match="no manifest.json"):
        ActivationManifest.load(tmp_path / "nowhere")


def test_normalisation_scale_gives_mean_squared_norm_d(store: ActivationManifest) -> None:
    for name in store.hookpoints:
        x = torch.cat([b[name] for b in iterate_batches(store, [name], 64, buffer_tokens=100, seed=0)])
        assert len(x) == store.total_tokens
        assert x.pow(2).sum(1).double().mean().item() == pytest.approx(store.d(name), rel=1e-4)
        assert store.scale(name) == pytest.approx((store.d(name) / store.stats[name].mean_squared_norm) ** 0.5)
    with pytest.raises(ActivationStoreError, match="not in"):
        store.scale("blocks.3.hook_resid_post")


def _batches(store: ActivationManifest, **options) -> list[dict[str, torch.Tensor]]:
    defaults = dict(buffer_tokens=50, seed=0, metadata=True)
    return list(iterate_batches(store, HOOKPOINTS, 7, **{**defaults, **options}))


def _row_keys(batches: list[dict[str, torch.Tensor]]) -> list[tuple[int, int]]:
    return [(int(d), int(p)) for b in batches for d, p in zip(b[DOC_INDEX], b[DOC_POSITION], strict=True)]


def test_iterate_batches_is_seeded_and_keeps_rows_aligned(store: ActivationManifest) -> None:
    first, again, other = _batches(store), _batches(store), _batches(store, seed=1)
    assert len(first) == -(-store.total_tokens // 7)
    for a, b in zip(first, again, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert _row_keys(first) != _row_keys(other)
    assert _row_keys(first) != sorted(_row_keys(first))  # actually shuffled
    for batch in first:
        assert all(batch[name].dtype == torch.float32 for name in HOOKPOINTS)
        # resid_post of layer 1 *is* resid_pre of layer 2: equal rows prove the tokens line up
        post = batch["blocks.1.hook_resid_post"] / store.scale("blocks.1.hook_resid_post")
        pre = batch["blocks.2.hook_resid_pre"] / store.scale("blocks.2.hook_resid_pre")
        torch.testing.assert_close(post, pre)


def test_every_row_once_per_epoch(store: ActivationManifest) -> None:
    stored = _all_rows(store, [DOC_INDEX, DOC_POSITION])
    every = {(int(d), int(p)) for d, p in zip(stored[DOC_INDEX], stored[DOC_POSITION], strict=True)}
    assert len(every) == store.total_tokens  # (document, position) names a row
    one = _row_keys(_batches(store))
    assert len(one) == store.total_tokens and set(one) == every
    two = _row_keys(_batches(store, epochs=2))
    assert len(two) == 2 * store.total_tokens
    assert set(two[: store.total_tokens]) == every and Counter(two) == Counter({k: 2 for k in every})
    forever = iterate_batches(store, HOOKPOINTS, 7, buffer_tokens=50, epochs=None)
    assert len(list(islice(forever, 3 * len(one)))) == 3 * len(one)


def test_skip_batches_resumes_with_the_next_batch(store: ActivationManifest) -> None:
    full = _batches(store, epochs=2)
    resumed = _batches(store, epochs=2, skip_batches=5)
    assert len(resumed) == len(full) - 5
    for a, b in zip(full[5:], resumed, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_is_stored_and_read_back_as_float32(
    dtype: str, tiny_gemma: HostModel, store: ActivationManifest, tmp_path: Path
) -> None:
    half = _collect(tiny_gemma, tmp_path, dtype=dtype)
    assert half.dtype == dtype and half.total_tokens == store.total_tokens
    with safe_open(half.shard_path(half.shards[0]), framework="pt") as handle:
        assert handle.get_tensor(HOOKPOINTS[0]).dtype == getattr(torch, dtype)
    # Same row counts and seed: the same shuffle, so batches correspond row by row.
    options = dict(normalize=False, seed=3)
    for h, f in zip(_batches(half, **options), _batches(store, **options), strict=True):
        for name in HOOKPOINTS:
            assert h[name].dtype == torch.float32
            assert torch.equal(h[name], f[name].to(getattr(torch, dtype)).float())
    for name in HOOKPOINTS:
        assert half.stats[name].mean_squared_norm == pytest.approx(store.stats[name].mean_squared_norm, rel=1e-2)


def test_max_tokens_overwrite_and_unknown_hookpoints(tiny_gemma: HostModel, tmp_path: Path) -> None:
    first_doc = len(tiny_gemma.tokenizer(TEXTS[0], add_special_tokens=False)["input_ids"])
    manifest = _collect(tiny_gemma, tmp_path, max_tokens=first_doc + 3)
    assert manifest.total_tokens == first_doc + 3 and manifest.documents == 2
    with pytest.raises(FileExistsError, match="overwrite"):
        _collect(tiny_gemma, tmp_path)
    assert _collect(tiny_gemma, tmp_path, overwrite=True, max_tokens=45).total_tokens == 45
    with pytest.raises(NotFound, match="blocks.9"):
        collect_activations(tiny_gemma, DOCS, ["blocks.9.hook_resid_post"], out_dir=tmp_path / "x", progress=False)
    assert not (tmp_path / "x").exists()
