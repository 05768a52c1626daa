"""Report subsection "Corpus sources" (under section 5): every generated corpus in the cache, from its own
provenance.json (settings, samples, dropped share by reason, wall time, tokens/s) and a few excerpts of its
text, so the report shows what the demo's text source costs and what it reads like."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from core.config import default_cache_dir
from trainer.data.generated import DOCUMENTS_FILE, PROVENANCE_FILE, SOURCE
from trainer.data.generation_settings import GenerationSettings
from trainer.report.markdown import Table, fmt

EXCERPT_CHARS = 160
EXCERPTS = 4


def _cached(cache_dir: Path, model: str) -> list[tuple[Path, dict[str, Any]]]:
    root = cache_dir / "corpus"
    found = sorted(root.glob(f"{SOURCE}-*/{PROVENANCE_FILE}")) if root.is_dir() else []
    records = [(p.parent, json.loads(p.read_text(encoding="utf-8"))) for p in found]
    return [(d, p) for d, p in records if p["model"]["name"] == model]


def _excerpts(directory: Path) -> list[str]:
    """The first document of each of a few categories (BOS first), cut to EXCERPT_CHARS, on one line."""
    by_source: dict[str, str] = {}
    with (directory / DOCUMENTS_FILE).open(encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            by_source.setdefault(record["source"], record["text"])
    chosen = sorted(by_source.items(), key=lambda kv: (kv[0] != f"{SOURCE}/bos", kv[0]))[:EXCERPTS]
    return [f"- `{source}`: {' '.join(text.split())[:EXCERPT_CHARS]!r}" for source, text in chosen]


def _command(provenance: dict[str, Any] | None, model: str) -> str:
    """The `corpus` command that samples (or reads) this corpus: its settings that differ from the defaults."""
    settings = provenance["settings"] if provenance else {"tokens": 150_000}
    flags = {"tokens": "--gen-tokens", "temperature": "--temperature", "top_p": "--top-p",
             "max_new_tokens": "--max-new-tokens", "min_new_tokens": "--min-new-tokens",
             "batch_size": "--gen-batch-size", "bos_share": "--bos-share", "seed": "--gen-seed",
             "openings": "--openings"}
    defaults = GenerationSettings().to_dict()
    extra = "".join(f" {flag} {settings[key]}" for key, flag in flags.items()
                    if key in settings and settings[key] != defaults[key])
    return f"featurewire-train corpus --corpus generated --model {model}{extra}   # samples once, cached"


def section(cache_dir: Path | None = None, model: str = "default") -> str:
    """Markdown for every generated corpus of `model` in the cache, or a line saying how to make one."""
    cache_dir = cache_dir or default_cache_dir(os.environ)
    cached = _cached(cache_dir, model)
    lines = ["### Corpus sources", "", "```sh"]
    lines += [_command(p, model) for _, p in cached] or [_command(None, model)]
    lines += ["```", ""]
    if not cached:
        return "\n".join([*lines, "No generated corpus is cached yet.", ""])
    table = Table(["model", "tokens kept", "samples", "dropped", "too short / repetitive / low variety",
                   "batch", "temperature", "top-p", "seconds", "tokens/s", "threads", "load"])
    for _, p in cached:
        st, se = p["stats"], p["settings"]
        reasons = " / ".join(str(st["dropped_by_reason"].get(r, 0)) for r in ("too_short", "repetitive", "low_variety"))
        table.add([p["model"]["name"], f"{st['kept_tokens']:,}", f"{st['samples']:,}", f"{st['dropped_share']:.1%}",
                   reasons, str(se["batch_size"]), fmt(se["temperature"], 2), fmt(se["top_p"], 2),
                   f"{st['seconds']:,.0f}", fmt(st["tokens_per_second"], 1), str(st.get("torch_threads", "–")),
                   fmt(st.get("load_average_1min"), 1)])
    lines += ["Generated corpora in the cache (each sampled once, on this machine; seconds include the filters; "
              "threads and the 1-minute load average at the end of sampling, – where not recorded):", "",
              table.render(), ""]
    for directory, p in cached:
        lines += [f"Excerpts of `{directory.name}` ({p['model']['name']}, seed {p['settings']['seed']}):", "",
                  *_excerpts(directory), ""]
    return "\n".join(lines)
