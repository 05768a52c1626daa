"""The offline sparse-probing tasks (docs/methods.md §A.4, §E.2), built from text that ships with Python.

SAEBench's datasets need downloads, so the suite uses only text that ships with the running interpreter:
stdlib `.py` sources, `pydoc_data.topics` (English prose), licence files (stdlib LICENSE.txt, site-packages)
and structured data (json/toml/cfg/ini/csv/xml/yaml in stdlib and site-packages). Paths are sorted and draws
seeded: one environment always yields the same suite, another a different one. Train and test snippets never
come from the same file. Fitting and scoring the probes lives in trainer/evaluation/probing.py.
"""

from __future__ import annotations

import ast
import functools
import itertools
import math
import os
import random
import re
import sysconfig
import textwrap
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

STRUCTURED_SUFFIXES = (".json", ".toml", ".cfg", ".ini", ".csv", ".xml", ".yaml", ".yml")
_LICENCE_NAME = re.compile(r"licen[cs]e|copying", re.IGNORECASE)
_LICENCE_SUFFIXES = ("", ".txt", ".md", ".rst")
_TEST_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "__pycache__"})
_MIN_LINE_CHARS = 24  # comment/code lines shorter than this carry too few tokens to probe
_WORD = re.compile(r"[A-Za-z]{2,}")

Group = tuple[str, dict[int, list[str]]]  # (file, candidate snippets per class)


@dataclass(frozen=True)
class ProbeTask:
    """One probing task; label i names classes[i]. Train and test texts come from disjoint files."""

    name: str
    train_texts: list[str]
    train_labels: list[int]
    test_texts: list[str]
    test_labels: list[int]
    classes: list[str]



def _roots() -> tuple[Path, list[Path]]:
    """The stdlib directory and the distinct site-packages directories of the running interpreter."""
    paths = sysconfig.get_paths()
    stdlib = Path(paths["stdlib"])
    sites = sorted({Path(paths["purelib"]), Path(paths["platlib"])} - {stdlib})
    return stdlib, sites


@functools.lru_cache(maxsize=16)
def _walk(root: Path, skip: frozenset[str] = frozenset({"__pycache__"})) -> tuple[Path, ...]:
    """Every file under `root` in sorted order, not descending into directories named in `skip` (cached)."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in skip)
        out += [Path(dirpath, name) for name in sorted(filenames)]
    return tuple(out)


def _read(path: Path) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    return text.replace("\r\n", "\n")


def _python_files() -> list[Path]:
    return [p for p in _walk(_roots()[0], _TEST_DIRS) if p.suffix == ".py"]


def _structured_files() -> list[Path]:
    stdlib, sites = _roots()
    files = [p for p in _walk(stdlib, frozenset({"site-packages", "__pycache__"})) if p.suffix in STRUCTURED_SUFFIXES]
    files += [p for site in sites for p in _walk(site) if p.suffix in STRUCTURED_SUFFIXES]
    return sorted(set(files))


def _licence_files() -> list[Path]:
    stdlib, sites = _roots()
    files = [stdlib / "LICENSE.txt"] if (stdlib / "LICENSE.txt").is_file() else []
    for site in sites:
        files += [p for p in _walk(site) if _LICENCE_NAME.search(p.name) and p.suffix.lower() in _LICENCE_SUFFIXES]
    return files


def _prose_topics() -> list[tuple[str, str]]:
    try:
        from pydoc_data.topics import topics
    except ImportError:  # some distributions strip pydoc_data
        topics = {}
    return sorted(topics.items())


def windows(text: str, size: int) -> list[str]:
    """Non-overlapping snippets of exactly `size` characters, each starting at a non-blank line.

    Snippets that are mostly whitespace are dropped; a fixed length keeps length from being a cue.
    """
    out: list[str] = []
    free = 0  # first character not yet used by a snippet
    for match in re.finditer(r"^[^\n]*\S", text, re.MULTILINE):  # non-blank lines
        start = match.start()
        if start < free:
            continue
        if start + size > len(text):
            break
        snippet = text[start : start + size]
        if len("".join(snippet.split())) >= size // 2:  # non-whitespace characters
            out.append(snippet)
            free = start + size
    return out


def _is_prose(snippet: str) -> bool:
    """Mostly letters and spaces: keeps reST prose, drops code examples and tables from the help topics."""
    return sum(c.isalpha() or c.isspace() for c in snippet) >= 0.85 * len(snippet)


@functools.lru_cache(maxsize=4096)
def _python_parts(path: Path) -> tuple[list[str], list[str], list[str], list[str]]:
    """(full-line comments, pure code lines, docstrings, runs of pure code) of one source file.

    Rows inside multi-line strings are neither comments nor code; a code line holding a `#` anywhere is
    dropped (it may carry a trailing comment), and so are docstring rows.
    """
    source = _read(path)
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return [], [], [], []
    lines = source.split("\n")
    docstrings, string_rows = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node, clean=True)
            if doc is not None:
                docstrings.append(doc)
                string_rows.update(range(node.body[0].lineno, (node.body[0].end_lineno or 0) + 1))
        elif isinstance(node, ast.Constant | ast.JoinedStr) and (node.end_lineno or 0) > node.lineno:
            string_rows.update(range(node.lineno, (node.end_lineno or 0) + 1))
    is_code = [bool(line.strip()) and row not in string_rows and "#" not in line for row, line in enumerate(lines, 1)]
    comments = [line.strip() for row, line in enumerate(lines, 1) if row not in string_rows]
    comments = [c for c in comments if c.startswith("#") and not c.startswith("#!") and len(_WORD.findall(c)) >= 3]
    code = [line.strip() for line, ok in zip(lines, is_code, strict=True) if ok]
    blocks = itertools.groupby(zip(lines, is_code, strict=True), lambda pair: pair[1] or not pair[0].strip())
    runs = ["\n".join(line for line, _ in block) for code_or_blank, block in blocks if code_or_blank]
    return comments, code, docstrings, [textwrap.dedent(run).strip("\n") for run in runs if run.strip()]



def _assign_groups(
    groups: Iterable[Group], n_classes: int, need: tuple[int, int], cap: int, seen: set[str], rng: random.Random
) -> tuple[list[list[list[str]]], list[list[list[str]]]]:
    """Deal whole files to train or test until both splits hold enough snippets for every class.

    A file counts for at most `cap` snippets per class while dealing, so the snippets end up spread over many
    files; a file goes to the split whose classes lack most. Snippets already seen (in an earlier file or
    task class) are dropped, so train and test never share a text. Returns per split, per class, the files'
    shuffled candidate lists.
    """
    splits: tuple[list[list[list[str]]], ...] = ([[] for _ in range(n_classes)], [[] for _ in range(n_classes)])
    have = [[0] * n_classes, [0] * n_classes]
    for _, by_class in groups:
        fresh: dict[int, list[str]] = {}
        for c, texts in by_class.items():
            kept = [t for t in dict.fromkeys(texts) if t not in seen]
            seen.update(kept)
            if kept:
                rng.shuffle(kept)
                fresh[c] = kept
        if not fresh:
            continue
        lack = [sum(max(0, need[s] - have[s][c]) / max(need[s], 1) for c in fresh) for s in (0, 1)]
        if max(lack) <= 0:
            if all(h >= need[s] for s in (0, 1) for h in have[s]):
                break
            continue
        s = 0 if lack[0] >= lack[1] else 1
        for c, kept in fresh.items():
            splits[s][c].append(kept)
            have[s][c] += min(len(kept), cap)
    return splits[0], splits[1]


def _round_robin(lists: list[list[str]], n: int) -> list[str]:
    """Up to n snippets, one per file in turn, so that no file dominates."""
    out: list[str] = []
    for i in range(max((len(x) for x in lists), default=0)):
        out += [x[i] for x in lists if i < len(x)][: n - len(out)]
        if len(out) >= n:
            break
    return out


def _make_task(
    name: str, classes: list[str], split_lists: tuple[list[list[list[str]]], list[list[list[str]]]],
    need: tuple[int, int], rng: random.Random,
) -> ProbeTask | None:
    """Balanced task from the dealt files: every class gets as many snippets as the scarcest class has."""
    drawn = [[_round_robin(split_lists[s][c], need[s]) for c in range(len(classes))] for s in (0, 1)]
    n_train, n_test = (min(len(x) for x in drawn[s]) for s in (0, 1))
    if n_train < 2 or n_test < 2:
        return None
    pairs = [[(t, c) for c in range(len(classes)) for t in drawn[s][c][: (n_train, n_test)[s]]] for s in (0, 1)]
    for p in pairs:
        rng.shuffle(p)
    (tr_x, tr_y), (te_x, te_y) = (zip(*p, strict=True) for p in pairs)
    return ProbeTask(name, list(tr_x), list(tr_y), list(te_x), list(te_y), classes)


def _python_groups(files: Iterable[Path], task: str, max_chars: int) -> Iterator[Group]:
    """Per file: {0: comments, 1: code lines} or {0: docstring windows, 1: code-run windows}."""
    for path in files:
        comments, code, docstrings, runs = _python_parts(path)
        if task == "comment_vs_code":
            keep = [[t for t in texts if _MIN_LINE_CHARS <= len(t) <= max_chars] for texts in (comments, code)]
        else:
            keep = [[w for text in texts for w in windows(text, max_chars)] for texts in (docstrings, runs)]
        yield str(path), dict(enumerate(keep))


def _cap(need: tuple[int, int], n_files: int) -> int:
    """Snippets a file may count for while dealing: about twice the even share, at least 2."""
    return max(2, math.ceil(2 * sum(need) / max(n_files, 1)))


def build_probe_tasks(
    per_class_train: int = 200, per_class_test: int = 100, seed: int = 0, max_chars: int = 200
) -> list[ProbeTask]:
    """The offline suite: `source_kind` (4-way), `comment_vs_code`, `docstring_vs_code`.

    Snippets are `max_chars` characters (~40–60 tokens at the default), except comment/code lines, which are
    single stripped lines of 24 to `max_chars` characters. Tasks that this environment cannot fill with at
    least two snippets per class and split are left out; classes are balanced, possibly below the request.
    """
    need = (per_class_train, per_class_test)
    tasks: list[ProbeTask] = []

    def shuffled(items: Sequence, key: str) -> list:
        items = list(items)
        random.Random(f"{seed}:{key}").shuffle(items)
        return items

    # source_kind: each class has its own files, dealt separately, then merged.
    py_files = shuffled(_python_files(), "source_kind/python")
    prose = shuffled(_prose_topics(), "source_kind/prose")
    licences = shuffled(_licence_files(), "source_kind/licence")
    structured = shuffled(_structured_files(), "source_kind/structured")
    sources: dict[str, tuple[int, Iterable[Group]]] = {
        "python": (len(py_files), ((str(p), {0: windows(_read(p), max_chars)}) for p in py_files)),
        "prose": (len(prose), ((k, {0: [w for w in windows(v, max_chars) if _is_prose(w)]}) for k, v in prose)),
        "licence": (len(licences), ((str(p), {0: windows(_read(p), max_chars)}) for p in licences)),
        "structured": (len(structured), ((str(p), {0: windows(_read(p), max_chars)}) for p in structured)),
    }
    seen: set[str] = set()  # shared across classes: a text can carry only one label
    dealt = [_assign_groups(groups, 1, need, _cap(need, n), seen, random.Random(f"{seed}:{c}"))
             for c, (n, groups) in enumerate(sources.values())]
    split = ([tr[0] for tr, _ in dealt], [te[0] for _, te in dealt])
    task = _make_task("source_kind", list(sources), split, need, random.Random(seed))
    tasks += [task] if task else []

    # Line- and block-level tasks: both classes come from the same files, so files are dealt once per task.
    for name, classes in (("comment_vs_code", ["comment", "code"]), ("docstring_vs_code", ["docstring", "code"])):
        files = shuffled(_python_files(), name)
        groups = _python_groups(files, name, max_chars)
        split = _assign_groups(groups, 2, need, _cap(need, len(files)), set(), random.Random(f"{seed}:{name}"))
        task = _make_task(name, classes, split, need, random.Random(f"{seed}:{name}"))
        tasks += [task] if task else []
    return tasks
