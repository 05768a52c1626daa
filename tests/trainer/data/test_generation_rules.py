"""Generation settings (ranges, config table), the shipped openings, the degenerate-sample rules and exact
nucleus sampling."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch

from trainer.data import sample_filters
from trainer.data.generation_settings import GenerationSettings, load_openings
from trainer.data.sampling import CANDIDATE_TIERS, nucleus_sample


@pytest.mark.parametrize(("field", "value", "message"), [
    ("temperature", 0.0, r"temperature must be a number in \(0, 2\], got 0.0"),
    ("temperature", 2.5, r"temperature must be a number in \(0, 2\]"),
    ("temperature", float("nan"), r"temperature must be a number"),
    ("top_p", 0.0, r"top_p must be a number in \(0, 1\]"),
    ("top_p", 1.01, r"top_p must be a number in \(0, 1\]"),
    ("tokens", 0, r"tokens must be an integer in \[1, "),
    ("tokens", 1.5, r"tokens must be an integer"),
    ("max_new_tokens", 4, r"max_new_tokens must be an integer in \[8, 2048\]"),
    ("min_new_tokens", 500, r"min_new_tokens must be an integer in \[1, 120\]"),
    ("batch_size", 0, r"batch_size must be an integer in \[1, 512\]"),
    ("bos_share", -0.1, r"bos_share must be a number in \[0, 1\]"),
    ("seed", -1, r"seed must be an integer in \[0, "),
    ("max_repeat_share", 0.0, r"max_repeat_share must be a number in \(0, 1\]"),
    ("min_distinct_share", 1.5, r"min_distinct_share must be a number in \[0, 1\]"),
    ("tokens", True, r"tokens must be an integer"),
])
def test_settings_out_of_range_name_the_allowed_range(field: str, value: object, message: str) -> None:
    with pytest.raises(ValueError, match=f"generation.{message}"):
        GenerationSettings(**{field: value})


def test_settings_table_refuses_unknown_keys() -> None:
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['temprature'\] in \[corpus.generation\]; allowed: .*"
                                         r"temperature"):
        GenerationSettings.from_dict({"temprature": 0.8})
    assert GenerationSettings.from_dict({"top_p": 0.9}).top_p == 0.9


def test_shipped_openings_are_many_and_varied() -> None:
    openings = load_openings()
    assert openings.origin == "shipped" and len(openings.texts) >= 300
    counts = Counter(openings.categories)
    assert {"everyday", "narrative", "dialogue", "news", "science", "instructions", "languages", "code"} <= set(counts)
    assert min(counts.values()) >= 15
    assert len(set(openings.texts)) == len(openings.texts)
    assert all(0 < len(t) <= 200 for t in openings.texts)
    assert load_openings().sha256 == openings.sha256


@pytest.mark.parametrize(("content", "message"), [
    (b"\xff\xfe not utf-8", "not UTF-8 JSON"),
    (b"[1, 2]", "no non-empty 'openings' object"),
    (b'{"openings": {}}', "no non-empty 'openings' object"),
    (b'{"openings": {"a": ["ok", ""]}}', "category 'a' must be a list of non-empty strings"),
    (b'{"openings": {"a": "text"}}', "category 'a' must be a list"),
])
def test_bad_openings_files(tmp_path: Path, content: bytes, message: str) -> None:
    file = tmp_path / "o.json"
    file.write_bytes(content)
    with pytest.raises(ValueError, match=message):
        load_openings(str(file))
    with pytest.raises(ValueError, match="cannot be read"):
        load_openings(str(tmp_path / "missing.json"))
    good = tmp_path / "good.json"
    good.write_text(json.dumps({"openings": {"x": ["One", "Two"], "y": ["Three"]}}))
    assert load_openings(str(good)).categories == ("x", "x", "y")


def test_filter_rules() -> None:
    loop = [5, 6, 7, 8] * 10
    assert sample_filters.repeated_ngram_share(loop) == pytest.approx(33 / 37)
    assert sample_filters.repeated_ngram_share(list(range(40))) == 0.0
    assert sample_filters.repeated_ngram_share([1, 2]) == 0.0
    assert sample_filters.distinct_share([1, 1, 2, 2]) == 0.5
    rules = {"min_tokens": 8, "max_repeat_share": 0.3, "min_distinct_share": 0.3}
    assert sample_filters.rejection(list(range(5)), "short", **rules) == sample_filters.TOO_SHORT
    assert sample_filters.rejection(list(range(20)), "   ", **rules) == sample_filters.TOO_SHORT
    assert sample_filters.rejection(loop, "loop", **rules) == sample_filters.REPETITIVE
    few = [1, 2, 1, 3, 2, 1, 1, 3, 2, 2, 3, 1, 3, 3, 2, 1, 2, 3, 1, 1]  # 3 distinct tokens, few repeated 4-grams
    assert sample_filters.repeated_ngram_share(few) <= 0.3
    assert sample_filters.rejection(few, "few", **rules) == sample_filters.LOW_VARIETY
    assert sample_filters.rejection(list(range(20)), "fine text", **rules) is None


def _frequencies(logits: torch.Tensor, top_p: float, draws: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    tokens = nucleus_sample(logits.expand(draws, -1), 1.0, top_p, generator)
    return torch.bincount(tokens, minlength=logits.shape[-1]).float() / draws


def test_nucleus_sampling_is_exact_top_p() -> None:
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    freq = _frequencies(probs.log()[None], 0.7, 20_000)  # nucleus {0, 1}: 0.5 < 0.7 <= 0.8
    assert freq[2:].sum() == 0
    assert freq[0].item() == pytest.approx(0.5 / 0.8, abs=0.02)
    full = _frequencies(probs.log()[None], 1.0, 20_000)
    assert torch.allclose(full, probs, atol=0.02)
    # A flat distribution over more tokens than the candidate set: the full-sort fallback keeps them all.
    flat = torch.zeros(1, 3 * CANDIDATE_TIERS[0])
    wide = _frequencies(flat, 0.9, 4_000)
    assert (wide > 0).sum() > 1.2 * CANDIDATE_TIERS[0]
    peaked = torch.cat([torch.full((1, 1), 12.0), torch.zeros(1, 3 * CANDIDATE_TIERS[0])], dim=1)  # tier 1 suffices
    rows = torch.cat([torch.zeros_like(peaked), peaked]).repeat(500, 1)  # flat and peaked rows in one batch
    mixed = nucleus_sample(rows, 1.0, 0.9, torch.Generator().manual_seed(1))
    assert (mixed[1::2] == 0).all() and len(set(mixed[0::2].tolist())) > 300


def test_nucleus_sampling_follows_temperature_and_seed() -> None:
    logits = torch.tensor([[2.0, 1.0, 0.0]]).expand(4000, -1)
    cold = nucleus_sample(logits, 0.25, 1.0, torch.Generator().manual_seed(0))
    hot = nucleus_sample(logits, 2.0, 1.0, torch.Generator().manual_seed(0))
    assert (cold == 0).float().mean() > 0.95 > (hot == 0).float().mean()
    again = nucleus_sample(logits, 2.0, 1.0, torch.Generator().manual_seed(0))
    assert torch.equal(hot, again)
