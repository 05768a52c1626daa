"""Corpus mixing specs: parsing and its errors, weighted shares, stable membership, and the [corpus] config."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainer.data.corpus import Document, load_corpus, load_corpus_mix, split_documents
from trainer.data.mixing import MixPart, mix_documents, parse_mix, uses_generated
from trainer.training.config import config_from_dict


def _docs(prefix: str, n: int, chars: int) -> list[Document]:
    return [Document(f"{prefix}{i}", "x" * chars, prefix) for i in range(n)]


def test_parse_mix() -> None:
    assert parse_mix("default") == [MixPart("default", 1.0)]
    assert parse_mix(" generated:0.7 , pydocs:0.3") == [MixPart("generated", 0.7), MixPart("pydocs", 0.3)]
    assert parse_mix("notes:v2.txt") == [MixPart("notes:v2.txt", 1.0)]  # not a weight: part of the path
    assert parse_mix("dir/a.jsonl:2,generated:0") == [MixPart("dir/a.jsonl", 2.0), MixPart("generated", 0.0)]
    assert uses_generated("generated:1,pydocs:1") and not uses_generated("generated:0,pydocs:1")
    assert not uses_generated("pydocs") and not uses_generated("generated:-1")


@pytest.mark.parametrize(("spec", "message"), [
    ("", "corpus spec is empty; expected comma-separated SOURCE"),
    ("generated:0.5,,pydocs", "has an empty item"),
    ("generated:-1,pydocs:1", "weight must be a finite number >= 0, got -1"),
    ("generated:inf", "weight must be a finite number >= 0, got inf"),
    ("generated:0,pydocs:0", "all weights are zero; give at least one source a weight > 0"),
    ("generated:lots", "weight 'lots' is not a number"),
    ("pydocs:1,pydocs:2", "names a source twice"),
    ("default,pydocs", "'default' and 'pydocs' are one source"),
])
def test_bad_specs_say_what_is_allowed(spec: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_mix(spec)


def test_weights_set_character_shares() -> None:
    docs = {"a": _docs("a", 400, 100), "b": _docs("b", 50, 400)}  # a: 40,000 chars, b: 20,000 chars
    mixed, report = mix_documents([MixPart("a", 0.75), MixPart("b", 0.25)], docs, seed=1)
    assert report["a"]["share_actual"] == pytest.approx(0.75, abs=0.01)
    assert report["a"]["characters"] == 40_000  # a is the scarce source at its share: all of it
    assert report["b"]["characters"] == pytest.approx(40_000 / 3, abs=400)
    assert len(mixed) == report["a"]["documents"] + report["b"]["documents"]
    again, _ = mix_documents([MixPart("a", 0.75), MixPart("b", 0.25)], docs, seed=1)
    assert again == mixed
    # Membership follows a per-document rank: new documents can only displace old ones, never bring another in.
    grown = {"a": docs["a"], "b": docs["b"] + _docs("b_new", 10, 400)}
    bigger, _ = mix_documents([MixPart("a", 0.75), MixPart("b", 0.25)], grown, seed=1)
    kept = {d.doc_id for d in mixed if d.source == "b"}
    old_in_bigger = {d.doc_id for d in bigger if d.source == "b" and not d.doc_id.startswith("b_new")}
    assert old_in_bigger <= kept
    zero, report = mix_documents([MixPart("a", 1.0), MixPart("b", 0.0)], docs)
    assert {d.source for d in zero} == {"a"} and report["b"]["documents"] == 0


def test_empty_source_and_duplicate_ids_are_refused() -> None:
    with pytest.raises(ValueError, match="source 'b' has no documents"):
        mix_documents([MixPart("a", 1), MixPart("b", 1)], {"a": _docs("a", 2, 5), "b": []})
    with pytest.raises(ValueError, match="document id 'x0' occurs in two sources"):
        mix_documents([MixPart("a", 1), MixPart("b", 1)], {"a": _docs("x", 2, 5), "b": _docs("x", 2, 5)})


def test_load_corpus_mix_with_files(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for i in range(30):
        (tmp_path / "a" / f"a{i}.txt").write_text(f"alpha document {i} " * 20)
        (tmp_path / "b" / f"b{i}.txt").write_text(f"beta document {i} " * 20)
    docs, report = load_corpus_mix(f"{tmp_path / 'a'}:3,{tmp_path / 'b'}:1")
    assert report[str(tmp_path / "a")]["share_actual"] == pytest.approx(0.75, abs=0.03)
    single = load_corpus(str(tmp_path / "a"))
    assert len(single) == 30  # one source: every document, as before mixing existed
    splits = split_documents(docs, eval_fraction=0.2)
    alone = split_documents(single, eval_fraction=0.2)
    assert {d.doc_id for d in alone.eval} >= {d.doc_id for d in splits.eval if d.doc_id.startswith("a")}


def test_unknown_source_and_generated_without_model(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="corpus source 'wikipedia' not found: use 'default', 'pydocs', "
                                                "'generated', a text file"):
        load_corpus("wikipedia:1,pydocs:1")
    with pytest.raises(ValueError, match="'generated' corpus source samples from the host model"):
        load_corpus("generated")
    (tmp_path / "t.txt").write_text("some text here")
    assert len(load_corpus(f"generated:0,{tmp_path / 't.txt'}:1")) == 1  # weight 0: never sampled


def _config(corpus: dict) -> dict:
    return {"stack": {"hookpoints": ["blocks.1.hook_resid_post"]}, "corpus": corpus}


def test_config_corpus_section() -> None:
    plain = config_from_dict(_config({"spec": "default"}))
    with_table = config_from_dict(_config({"spec": "default", "generation": {"temperature": 0.7}}))
    assert plain.fingerprint() == with_table.fingerprint()  # unused generation settings change nothing
    assert "generation" not in plain.to_dict()["corpus"]
    mix = config_from_dict(_config({"spec": "generated:0.7,pydocs:0.3"}))
    assert mix.to_dict()["corpus"]["generation"]["temperature"] == 1.0  # the effective defaults are recorded
    hotter = config_from_dict(_config({"spec": "generated:0.7,pydocs:0.3", "generation": {"temperature": 0.7}}))
    assert len({plain.collection_fingerprint(), mix.collection_fingerprint(), hotter.collection_fingerprint()}) == 3
    with pytest.raises(ValueError, match="weight must be a finite number >= 0"):
        config_from_dict(_config({"spec": "generated:-0.5"}))
    with pytest.raises(ValueError, match=r"generation.top_p must be a number in \(0, 1\]"):
        config_from_dict(_config({"spec": "generated", "generation": {"top_p": 2}}))
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['topp'\] in \[corpus.generation\]"):
        config_from_dict(_config({"spec": "generated", "generation": {"topp": 0.9}}))
