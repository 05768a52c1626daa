"""Every link and repository path the READMEs and docs/ name exists, so the docs cannot drift from the tree.

Checked: relative Markdown links `[text](path#anchor)` (the file, and the heading for anchors into Markdown
files), and every token that looks like a repository path (it starts with a top-level file or directory of the
repository, e.g. `core/stack/reader.py`, `k8s/overlays/dev-cpu`, `Makefile`), in prose, inline code and code
blocks alike. Paths that commands create at run time (`runs/...`, `exports/...`) are exempt by prefix. A README
in a subdirectory (bench/, k8s/) also names files relative to itself: its inline-code tokens that look like
files or directories (`hook_overhead.py`, `base/config.env`) must exist under its directory.
"""

from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted([ROOT / "README.md", ROOT / "bench" / "README.md", ROOT / "k8s" / "README.md",
               *(ROOT / "docs").glob("*.md")])

TOP_LEVEL_DIRS = ("core", "trainer", "service", "clients", "tests", "bench", "docs", "k8s", "protos", "examples",
                  ".ci")
TOP_LEVEL_FILES = ("Makefile", "README.md", "Dockerfile", "pyproject.toml", "constraints.txt", "LICENSE",
                   ".dockerignore", ".gitignore")
RUNTIME_PREFIXES = ("runs/", "exports/", "stacks/", "bench/out/")
"""Written by the commands the docs show (training runs, exports, imported stacks, benchmark output)."""

_NAMES = "|".join(re.escape(name) for name in (*TOP_LEVEL_FILES, *(f"{d}/" for d in TOP_LEVEL_DIRS)))
# A path token: a top-level name not preceded by a path character (so `.venv/bin`, `/stacks/x`, `~/.cache/...`
# and `runs/demo/stack` never match), then path characters. Placeholders (`<run>`, `{i}`, `N`) end the match.
_PATH = re.compile(rf"(?<![\w./~<>{{}}$-])(?:{_NAMES})[\w./*-]*")
_LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.MULTILINE)
_PLACEHOLDER_TAIL = re.compile(r"[\w.-]*[<{$]")
_BARE_MARKDOWN = re.compile(r"(?<![\w./-])[A-Za-z][\w-]*\.md\b")
_LOCAL_FILE = re.compile(r"`([\w-][\w./-]*(?:\.(?:py|sh|md|toml|ya?ml|json|txt|env|proto)|/))`")


def _slug(heading: str) -> str:
    """GitHub's heading anchor: lower case, inline markup and punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[`*_]|\[([^\]]*)\]\([^)]*\)", lambda m: m.group(1) or "", heading).strip().lower()
    kept = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return kept.replace(" ", "-")


def _anchors(markdown: Path) -> set[str]:
    return {_slug(h) for h in _HEADING.findall(_without_fences(markdown.read_text(encoding="utf-8")))}


def _without_fences(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.MULTILINE | re.DOTALL)


def _exists(path: str, base: Path = ROOT) -> bool:
    """At the repository root, or under `base` (a subdirectory README's tree listing: k8s/README.md's `trainer/`)."""
    if "*" in path:
        return any(ROOT.glob(path)) or any(base.glob(path))
    return (ROOT / path).exists() or (base / path).exists()


def repository_paths(text: str) -> set[str]:
    """The repository paths a document names (trailing sentence punctuation dropped; placeholders skipped)."""
    found = set()
    for match in _PATH.finditer(text):
        token = match.group(0).rstrip(".,:;")
        if _PLACEHOLDER_TAIL.match(text, match.end()) or token.startswith(RUNTIME_PREFIXES):
            continue
        found.add(token)
    return found


def local_paths(doc: Path) -> set[str]:
    """What a subdirectory README names in inline code relative to its own directory (not repository paths)."""
    text = doc.read_text(encoding="utf-8")
    return {t for t in _LOCAL_FILE.findall(text) if not _PATH.fullmatch(t)} if doc.parent != ROOT else set()


def _shown(path: Path) -> Path:
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def dangling_links(doc: Path) -> list[str]:
    text = doc.read_text(encoding="utf-8")
    problems = []
    for target in _LINK.findall(_without_fences(text)):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (doc.parent / path).resolve() if path else doc
        if not file.exists():
            problems.append(f"link {target!r}: {_shown(file)} does not exist")
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            problems.append(f"link {target!r}: no heading with anchor #{anchor} in {_shown(file)}")
    return problems


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc: Path) -> None:
    assert dangling_links(doc) == []


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_named_repository_paths_exist(doc: Path) -> None:
    missing = sorted(p for p in repository_paths(doc.read_text(encoding="utf-8")) if not _exists(p, doc.parent))
    assert missing == [], f"{doc.relative_to(ROOT)} names paths that are not in the repository: {missing}"


@pytest.mark.parametrize("doc", [d for d in DOCS if d.parent.name in ("bench", "k8s")],
                         ids=lambda p: str(p.relative_to(ROOT)))
def test_subdirectory_readmes_name_their_own_files(doc: Path) -> None:
    paths = local_paths(doc)
    assert paths, f"{doc.relative_to(ROOT)} names no files of its own: the pattern no longer matches"
    missing = sorted(p for p in paths if not (doc.parent / p).exists())
    assert missing == [], f"{doc.relative_to(ROOT)} names files not under {doc.parent.name}/: {missing}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(ROOT)))
def test_named_markdown_files_exist(doc: Path) -> None:
    """A bare `name.md` (as in "see operations.md") is a doc of this repository, not a file kept elsewhere."""
    names = set(_BARE_MARKDOWN.findall(doc.read_text(encoding="utf-8")))
    missing = sorted(n for n in names if not any((d / n).exists() for d in (ROOT, ROOT / "docs", doc.parent)))
    assert missing == [], f"{doc.relative_to(ROOT)} names Markdown files the repository does not have: {missing}"


def test_cited_docs_and_method_sections_exist() -> None:
    """Code and docs cite `docs/methods.md §B.4`: the doc and the section (a `## B.` or `### B.4` heading) exist."""
    sections = set(re.findall(r"^#{2,3} ([A-Z](?:\.\d+)?)\.? ", (ROOT / "docs" / "methods.md").read_text("utf-8"),
                              re.MULTILINE))
    sources = [p for d in TOP_LEVEL_DIRS for p in (ROOT / d).rglob("*")
               if p.suffix in (".py", ".toml", ".md", ".sh") and ".venv" not in p.parts and p != Path(__file__)]
    problems = []
    for source in [*sources, *DOCS]:
        text = source.read_text(encoding="utf-8", errors="replace")
        problems += [f"{source.relative_to(ROOT)}: {doc}" for doc in set(re.findall(r"\bdocs/[\w-]+\.md", text))
                     if not (ROOT / doc).exists()]
        for cited in re.findall(r"methods\.md\)?((?:[ ,]*§[A-Z](?:\.\d+)?)+)", text):
            problems += [f"{source.relative_to(ROOT)}: methods.md §{x}"
                         for x in re.findall(r"§([A-Z](?:\.\d+)?)", cited) if x not in sections]
    assert len(sections) > 10 and problems == []


def test_every_serve_setting_is_in_the_settings_table() -> None:
    """docs/operations.md "Settings" lists every `serve` flag and every ServerConfig field's FEATUREWIRE_ variable."""
    import argparse
    from dataclasses import fields

    from core.config import ENV_PREFIX
    from service.cli import build_parser
    from service.config import ServerConfig

    text = (ROOT / "docs" / "operations.md").read_text(encoding="utf-8")
    table = text[text.index("\n## Settings\n"):].split("\n## ", 2)[1]
    commands = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    flags = [o for a in commands.choices["serve"]._actions for o in a.option_strings if o not in ("-h", "--help")]
    variables = [f"{ENV_PREFIX}{f.name.upper()}" for f in fields(ServerConfig)]
    variables += [f"{ENV_PREFIX}{name}" for name in ("MODEL", "DEVICE", "DTYPE", "CACHE", "AUTH_TOKEN_FILE")]
    missing = [name for name in (*flags, *variables) if f"`{name}" not in table]
    assert missing == [], f"docs/operations.md, Settings, does not list {missing}"


def test_the_top_level_names_exist() -> None:
    """The prefixes above are the repository's: a renamed top-level entry must be renamed here too."""
    assert [n for n in (*TOP_LEVEL_DIRS, *TOP_LEVEL_FILES) if not (ROOT / n).exists()] == []


def test_the_checks_catch_what_they_should() -> None:
    text = ("see `core/stack/nope.py` and trainer/gone/ or Makefile; not runs/demo/stack, `.venv/bin/python`, "
            "`/stacks/demo`, ~/.cache/featurewire, `k8s/<overlay>` or `blocks.{i}.hook_resid_post`.")
    assert repository_paths(text) == {"core/stack/nope.py", "trainer/gone/", "Makefile"}
    assert _BARE_MARKDOWN.findall("see DESIGN.md §9, docs/api.md and methods.md.") == ["DESIGN.md", "methods.md"]
    assert _slug("2. ReSAE vs plain stack, four layers") == "2-resae-vs-plain-stack-four-layers"
    assert _slug("HTTP/JSON gateway") == "httpjson-gateway"
    assert _slug("`make test` (CPU)") == "make-test-cpu"


def test_dangling_links_are_reported(tmp_path: Path) -> None:
    (tmp_path / "other.md").write_text("# Other\n\n## A section, with words\n", encoding="utf-8")
    doc = tmp_path / "doc.md"
    doc.write_text("[ok](other.md#a-section-with-words) [here](#top) [web](https://example.com) "
                   "[gone](missing.md) [bad anchor](other.md#nope)\n\n# Top\n", encoding="utf-8")
    problems = dangling_links(doc)
    assert len(problems) == 2 and "missing.md" in problems[0] and "#nope" in problems[1]
