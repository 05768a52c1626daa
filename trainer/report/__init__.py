"""The research report (`featurewire-train report --out docs/results.md`): trains what is missing, measures,
and writes markdown tables plus PNG plots. Each section is cached as markdown under RUNS/sections, so a
report can be rebuilt section by section (`--sections`) and reassembled without retraining."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path

from trainer.report.runs import ReportSettings

logger = logging.getLogger(__name__)

HEADER = """# Results

Numbers measured by this repository's own code on the embedded default model (Gemma 3 270M, CPU, fp32)
and the default corpus (text that ships with Python); nothing in the numbered sections is typed in by hand
(the summary table below is a digest of them). Regenerate with

```sh
.venv/bin/featurewire-train report --out docs/results.md            # every section (trains what is missing)
.venv/bin/featurewire-train report --out docs/results.md --sections 3   # one section, the rest from cache
```

Runs live under `runs/` (report runs under `runs/report`) and are reused when their settings match.
Each section states its model, hookpoints, tokens, widths and seeds, and the published figure it is
compared with. All runs are one seed at budgets that finish on a 2-core CPU, far below the papers'
budgets: a disagreement below is a measurement at this budget, not a refutation.
"""
SUMMARY_START = "<!-- summary: kept as it is when the report is regenerated -->"
SUMMARY_END = "<!-- /summary -->"


Section = Callable[[ReportSettings, Path, str], str | None]
"""A section's markdown, or None to keep the cached one (section 1b without budgets)."""


def _sections() -> dict[str, tuple[str, Section]]:
    from trainer.report import architectures, budgets, demo, error_norm, meta, resae, steerability

    return {
        "1": ("architectures", architectures.section),
        "1b": ("budgets", budgets.section),
        "2": ("resae", lambda s, _img, _rel: resae.section(s)),
        "3": ("error-norm", error_norm.section),
        "4": ("meta-sae", meta.section),
        "5": ("demo", lambda s, _img, _rel: demo.section(s)),
        "6": ("steerability", lambda s, _img, _rel: steerability.section(s)),
    }


def kept_summary(out: Path) -> list[str]:
    """The hand-kept summary block of an existing report (between SUMMARY_START and SUMMARY_END), to carry over:
    the sections are regenerated, the digest of them is not."""
    text = out.read_text() if out.is_file() else ""
    start, end = text.find(SUMMARY_START), text.find(SUMMARY_END)
    return [text[start:end + len(SUMMARY_END)] + "\n"] if 0 <= start < end else []


def build_report(out: Path, settings: ReportSettings, only: Sequence[str] | None = None) -> Path:
    """Regenerate the chosen sections (all by default), then assemble `out` from every cached section."""
    sections = _sections()
    unknown = set(only or ()) - set(sections)
    if unknown:
        raise ValueError(f"unknown section(s) {sorted(unknown)}; choose from {', '.join(sections)}")
    if "1b" in (only or ()) and not settings.budgets:
        raise ValueError("section 1b needs the training budgets, e.g. --budgets 100000,400000,1600000")
    img_dir = out.parent / "img"
    img_rel = os.path.relpath(img_dir, out.parent)
    cache = settings.runs_dir / "sections"
    cache.mkdir(parents=True, exist_ok=True)
    for key in only or sections:
        name, make = sections[key]
        logger.info("section %s (%s)", key, name)
        text = make(settings, img_dir, img_rel)
        if text is not None:
            (cache / f"{key}-{name}.md").write_text(text)
    parts = [HEADER, *kept_summary(out)]
    for key, (name, _) in sections.items():
        cached = cache / f"{key}-{name}.md"
        parts.append(cached.read_text() if cached.is_file() else
                     f"## {key}. {name}\n\nNot generated yet: `featurewire-train report --sections {key}`.\n")
    out.write_text("\n".join(parts))
    return out
