"""Text corpora for SAE training: the embedded default corpus, user files, weighted mixes, and stable splits.

The default corpus is text that ships with Python itself (the pydoc topic pages and the standard
library's docstrings), so training works offline with nothing downloaded. Splits are decided per
document by a seeded hash of its id, so growing a corpus never moves an existing document from
train into calibration or eval (which would leak held-out text into training).
"""

from __future__ import annotations

import ast
import contextlib
import gc
import hashlib
import json
import os
import sysconfig
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from trainer.data import mixing

DEFAULT_SPEC = "default"
TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIX = ".jsonl"
# Default-corpus texts shorter than this are boilerplate ("Module docs."), not prose worth a document.
MIN_DEFAULT_CHARS = 80
# Standard-library directories that hold tests, third-party code, or compiled/build artefacts.
_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__",
                        "lib-dynload"})
_DOC_NODES = (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)
_BODY_FIELDS = ("body", "orelse", "finalbody", "handlers", "cases")


@dataclass(frozen=True)
class Document:
    """One unit of text; `doc_id` is unique within a corpus and decides the document's split."""

    doc_id: str
    text: str
    source: str


@dataclass(frozen=True)
class Splits:
    """Disjoint train / calibration (ReSAE predictors, error probes) / eval document lists."""

    train: list[Document]
    calibration: list[Document]
    eval: list[Document]

    def items(self) -> list[tuple[str, list[Document]]]:
        """(name, documents) in a fixed order, for reports."""
        return [("train", self.train), ("calibration", self.calibration), ("eval", self.eval)]


def _pydoc_topic_documents() -> list[Document]:
    """One document per pydoc topic page (the language reference prose shipped with Python)."""
    try:  # a stdlib data module, but some distributions split it out; imported only when asked
        from pydoc_data.topics import topics
    except ImportError:
        return []

    return [
        Document(doc_id=f"pydoc:{name}", text=topics[name].strip(), source="pydoc_data.topics")
        for name in sorted(topics)
        if len(topics[name].strip()) >= MIN_DEFAULT_CHARS
    ]


def _stdlib_source_files(root: Path) -> Iterator[tuple[str, Path]]:
    """(module name, path) of the stdlib's .py files, sorted, without tests or installed packages."""
    found: list[tuple[str, Path]] = []
    for dirpath, dirnames, filenames in os.walk(root):
        # Prune in place so os.walk never descends into test suites or site-packages (most of the tree).
        dirnames[:] = [d for d in dirnames if d not in _SKIP_DIRS and not d.startswith(("test_", "config-"))]
        for name in filenames:
            if not name.endswith(".py") or name.startswith("test_") or name == "conftest.py":
                continue
            path = Path(dirpath, name)
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            if parts:
                found.append((".".join(parts), path))
    yield from sorted(found)


def _docstrings(tree: ast.Module) -> list[str]:
    """Module, class and function docstrings in source order (nested definitions included).

    Only statement bodies are visited, not every expression node: definitions live nowhere else,
    and skipping expressions makes this several times cheaper than `ast.walk` on the whole stdlib.
    """
    out: list[str] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, _DOC_NODES):
            doc = ast.get_docstring(node)
            if doc and doc.strip():
                out.append(doc.strip())
        for field in _BODY_FIELDS:
            children = getattr(node, field, None)
            if isinstance(children, list):
                for child in children:
                    visit(child)

    visit(tree)
    return out


@contextlib.contextmanager
def _gc_paused() -> Iterator[None]:
    """Pause the cyclic GC: parsing allocates millions of acyclic AST nodes, and in a process that
    already holds torch and transformers each triggered collection rescans all of them (2-3x slower).
    Refcounting still frees every tree as soon as it is dropped."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def _stdlib_docstring_documents() -> list[Document]:
    """One document per stdlib module: its docstrings joined. Parses sources; imports nothing."""
    root = Path(sysconfig.get_paths()["stdlib"])
    with _gc_paused():
        return [doc for module, path in _stdlib_source_files(root) if (doc := _module_document(module, path))]


def _module_document(module: str, path: Path) -> Document | None:
    """The joined docstrings of one source file, or None when it does not parse or says too little."""
    try:
        with warnings.catch_warnings():  # old escapes in stdlib sources warn on some versions
            warnings.simplefilter("ignore")
            tree = ast.parse(path.read_bytes(), filename=str(path))
    except (SyntaxError, ValueError, OSError):
        return None
    text = "\n\n".join(_docstrings(tree))
    if len(text) < MIN_DEFAULT_CHARS:
        return None
    return Document(doc_id=f"stdlib:{module}", text=text, source="stdlib-docstrings")


def default_corpus() -> list[Document]:
    """The embedded default corpus: pydoc topics, then stdlib module docstrings, each sorted by name."""
    docs = _pydoc_topic_documents() + _stdlib_docstring_documents()
    if not docs:
        raise FileNotFoundError(
            "the default corpus is empty: this Python ships neither pydoc_data nor standard-library "
            "sources; pass a corpus file or directory instead"
        )
    return docs


def _read_text(path: Path) -> str:
    """Read UTF-8 text; a decoding failure becomes a ValueError that names the file."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc


def _load_jsonl(path: Path, doc_prefix: str, text_field: str) -> list[Document]:
    """One document per non-blank line; ids are `<prefix>:<line number>`."""
    docs = []
    for lineno, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{lineno}: invalid JSON ({exc.msg})") from exc
        if not isinstance(record, dict) or text_field not in record:
            raise ValueError(f"{path}:{lineno}: no {text_field!r} field (choose one with --text-field)")
        text = record[text_field]
        if not isinstance(text, str):
            raise ValueError(f"{path}:{lineno}: field {text_field!r} is {type(text).__name__}, not a string")
        if text.strip():
            docs.append(Document(doc_id=f"{doc_prefix}:{lineno}", text=text, source=str(path)))
    return docs


def _load_file(path: Path, doc_id: str, text_field: str) -> list[Document]:
    """A .jsonl file gives one document per line; any other file is one document."""
    if path.suffix.lower() == JSONL_SUFFIX:
        return _load_jsonl(path, doc_id, text_field)
    text = _read_text(path)
    return [Document(doc_id=doc_id, text=text, source=str(path))] if text.strip() else []


def _load_path(spec: str, text_field: str) -> list[Document]:
    """A text file, a .jsonl file, or a directory of .txt/.md/.jsonl files.

    Directory document ids are paths relative to the directory, so moving a corpus keeps its splits.
    """
    path = Path(spec).expanduser()
    if path.is_file():
        return _load_file(path, path.name, text_field)
    if path.is_dir():
        docs: list[Document] = []
        suffixes = (*TEXT_SUFFIXES, JSONL_SUFFIX)
        for file in sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes):
            docs += _load_file(file, file.relative_to(path).as_posix(), text_field)
        return docs
    named = ", ".join(repr(n) for n in mixing.NAMED_SOURCES)
    raise FileNotFoundError(
        f"corpus source {spec!r} not found: use {named}, a text file, a .jsonl file "
        f"(one JSON object per line with a text field), or a directory of .txt/.md/.jsonl files"
    )


def load_corpus_mix(spec: str, text_field: str = "text", *, generated: Callable[[], list[Document]] | None = None,
                    mix_seed: int = 0) -> tuple[list[Document], dict[str, dict[str, float]]]:
    """The documents of a corpus spec (`trainer.data.mixing`: one source or a weighted mix) and, per source,
    what it contributed. `generated` supplies the generated source (it needs the host model)."""

    def load_source(source: str) -> list[Document]:
        if source in (mixing.DEFAULT, mixing.PYDOCS):
            return default_corpus()
        if source == mixing.GENERATED:
            if generated is None:
                raise ValueError("the 'generated' corpus source samples from the host model: use it where a model "
                                 "is loaded (`train`, or `corpus --model ...`)")
            return generated()
        return _load_path(source, text_field)

    return mixing.load_mix(spec, load_source, seed=mix_seed)


def load_corpus(spec: str, text_field: str = "text", *, generated: Callable[[], list[Document]] | None = None,
                mix_seed: int = 0) -> list[Document]:
    """Load `default`/`pydocs`, `generated`, a text file, a .jsonl file, a directory of .txt/.md/.jsonl files,
    or a weighted mix of them (`generated:0.7,pydocs:0.3`; see `trainer.data.mixing`)."""
    return load_corpus_mix(spec, text_field, generated=generated, mix_seed=mix_seed)[0]


def _unit_interval(seed: int, doc_id: str) -> float:
    """Map (seed, doc_id) to [0, 1) with sha256: stable across runs, platforms and Python versions."""
    digest = hashlib.sha256(f"{seed}\x00{doc_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_documents(
    docs: Sequence[Document],
    calibration_fraction: float = 0.05,
    eval_fraction: float = 0.05,
    seed: int = 0,
) -> Splits:
    """Assign each document to train, calibration or eval by a seeded hash of its id.

    A document's split depends only on (seed, doc_id, fractions), never on the other documents.
    Input order is kept within each split.
    """
    for name, value in (("calibration_fraction", calibration_fraction), ("eval_fraction", eval_fraction)):
        if not 0.0 <= value < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {value}")
    if calibration_fraction + eval_fraction >= 1.0:
        raise ValueError(
            f"calibration_fraction + eval_fraction must be < 1 to leave training data, "
            f"got {calibration_fraction} + {eval_fraction}"
        )
    train: list[Document] = []
    calibration: list[Document] = []
    evaluation: list[Document] = []
    for doc in docs:
        u = _unit_interval(seed, doc.doc_id)
        if u < calibration_fraction:
            calibration.append(doc)
        elif u < calibration_fraction + eval_fraction:
            evaluation.append(doc)
        else:
            train.append(doc)
    return Splits(train=train, calibration=calibration, eval=evaluation)


def corpus_stats(docs: Sequence[Document]) -> dict[str, int]:
    """Document and character counts, for reports and the CLI."""
    return {"documents": len(docs), "characters": sum(len(d.text) for d in docs)}
