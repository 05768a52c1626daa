"""The trainer's corpus: embedded default corpus, file/jsonl/directory loading, stable splits."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from trainer.data.corpus import Document, corpus_stats, default_corpus, load_corpus, split_documents


@pytest.fixture(scope="session")
def default_docs() -> list[Document]:
    """Parsing the stdlib takes a couple of seconds: do it once per test session."""
    return default_corpus()


def _docs(n: int, prefix: str = "d") -> list[Document]:
    return [Document(doc_id=f"{prefix}{i}", text=f"text {i}", source="test") for i in range(n)]


def test_default_corpus_is_large_english_text(default_docs: list[Document]) -> None:
    stats = corpus_stats(default_docs)
    assert stats["documents"] > 400
    assert stats["characters"] > 400_000
    sources = {d.source for d in default_docs}
    assert sources == {"pydoc_data.topics", "stdlib-docstrings"}
    ids = [d.doc_id for d in default_docs]
    assert len(ids) == len(set(ids))
    assert "pydoc:assignment" in ids and "stdlib:json" in ids
    # Test suites are excluded; docstrings of a known module are present, joined in source order.
    assert not any(i.startswith("stdlib:test.") or ".tests" in i or "idle_test" in i for i in ids)
    json_doc = next(d for d in default_docs if d.doc_id == "stdlib:json")
    assert json_doc.text.startswith("JSON (JavaScript Object Notation)")
    assert "Serialize ``obj`` to a JSON formatted ``str``." in json_doc.text
    assert all(len(d.text) >= 80 for d in default_docs)


def test_default_corpus_is_deterministic(default_docs: list[Document]) -> None:
    again = default_corpus()
    assert again == default_docs
    topic_ids = [d.doc_id for d in default_docs if d.source == "pydoc_data.topics"]
    module_ids = [d.doc_id for d in default_docs if d.source == "stdlib-docstrings"]
    assert topic_ids == sorted(topic_ids) and module_ids == sorted(module_ids)


def test_load_default_spec(default_docs: list[Document], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("trainer.data.corpus.default_corpus", lambda: default_docs)
    assert load_corpus("default") is default_docs


def test_splits_are_deterministic_disjoint_and_complete(default_docs: list[Document]) -> None:
    a = split_documents(default_docs, calibration_fraction=0.1, eval_fraction=0.1, seed=3)
    b = split_documents(default_docs, calibration_fraction=0.1, eval_fraction=0.1, seed=3)
    assert a == b
    ids = [{d.doc_id for d in part} for _, part in a.items()]
    assert sum(len(s) for s in ids) == len(default_docs)
    assert set().union(*ids) == {d.doc_id for d in default_docs}
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    # Hash-based, so sizes are near (not exactly) the fractions; a different seed moves documents.
    n = len(default_docs)
    assert 0.05 * n < len(a.calibration) < 0.15 * n and 0.05 * n < len(a.eval) < 0.15 * n
    assert split_documents(default_docs, 0.1, 0.1, seed=4).eval != a.eval


def test_splits_are_stable_when_documents_are_added() -> None:
    old = _docs(500)
    before = split_documents(old)
    after = split_documents(old + _docs(300, prefix="new"))
    for (_, part_before), (_, part_after) in zip(before.items(), after.items(), strict=True):
        kept = [d for d in part_after if d.doc_id.startswith("d")]
        assert kept == part_before  # same documents, same order
    assert corpus_stats(after.train)["documents"] > corpus_stats(before.train)["documents"]


def test_zero_fractions_put_everything_in_train() -> None:
    docs = _docs(50)
    splits = split_documents(docs, calibration_fraction=0.0, eval_fraction=0.0)
    assert splits.train == docs and splits.calibration == [] and splits.eval == []


@pytest.mark.parametrize(
    ("cal", "ev", "message"),
    [(-0.1, 0.05, "calibration_fraction"), (0.05, 1.0, "eval_fraction"), (0.5, 0.5, "must be < 1")],
)
def test_split_fraction_validation(cal: float, ev: float, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        split_documents(_docs(3), calibration_fraction=cal, eval_fraction=ev)


def test_text_file_is_one_document(tmp_path: Path) -> None:
    path = tmp_path / "notes.txt"
    path.write_text("First paragraph.\n\nSecond paragraph.\n", encoding="utf-8")
    assert load_corpus(str(path)) == [
        Document(doc_id="notes.txt", text="First paragraph.\n\nSecond paragraph.\n", source=str(path))
    ]


def test_jsonl_loading_with_text_field(tmp_path: Path) -> None:
    path = tmp_path / "data.jsonl"
    rows = [{"body": "alpha", "id": 1}, {"body": "  "}, {"body": "gamma"}]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    docs = load_corpus(str(path), text_field="body")
    assert [(d.doc_id, d.text) for d in docs] == [("data.jsonl:1", "alpha"), ("data.jsonl:3", "gamma")]
    with pytest.raises(ValueError, match=r"data\.jsonl:1: no 'text' field"):
        load_corpus(str(path))


@pytest.mark.parametrize(
    ("bad_line", "message"),
    [("{not json", "invalid JSON"), ('{"other": "x"}', "no 'text' field"),
     ('{"text": 5}', "field 'text' is int, not a string"), ('["text"]', "no 'text' field")],
)
def test_jsonl_errors_name_file_and_line(tmp_path: Path, bad_line: str, message: str) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n\n' + bad_line + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.jsonl:3: " + message):
        load_corpus(str(path))


def test_non_utf8_file_is_a_value_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="latin1.txt: not UTF-8"):
        load_corpus(str(path))


def test_directory_loading_is_recursive_sorted_and_filtered(tmp_path: Path) -> None:
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "z.md").write_text("# heading\nmarkdown body", encoding="utf-8")
    (tmp_path / "a.txt").write_text("plain text", encoding="utf-8")
    (tmp_path / "c.jsonl").write_text('{"text": "one"}\n{"text": "two"}\n', encoding="utf-8")
    (tmp_path / "empty.txt").write_text("   \n", encoding="utf-8")
    (tmp_path / "ignored.py").write_text("print('not corpus')", encoding="utf-8")
    (tmp_path / "ignored.json").write_text('{"text": "no"}', encoding="utf-8")
    docs = load_corpus(str(tmp_path))
    assert [d.doc_id for d in docs] == ["a.txt", "b/z.md", "c.jsonl:1", "c.jsonl:2"]
    assert [d.text for d in docs] == ["plain text", "# heading\nmarkdown body", "one", "two"]
    assert corpus_stats(docs) == {"documents": 4, "characters": 10 + 23 + 3 + 3}


def test_unknown_path_says_what_is_accepted(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="use 'default', 'pydocs', 'generated', a text file, a .jsonl file"):
        load_corpus(str(tmp_path / "missing.jsonl"))


def test_corpus_stats_of_empty_corpus() -> None:
    assert corpus_stats([]) == {"documents": 0, "characters": 0}
