"""Report subsection "Corpus sources": read from the cached generated corpora's own provenance."""

from __future__ import annotations

from pathlib import Path

import torch

from core.host.host_model import HostModel
from trainer.data.generated import generated_corpus
from trainer.data.generation_settings import GenerationSettings
from trainer.report.corpus_sources import section


def test_section_lists_cached_corpora_with_their_counts(tiny_gemma: HostModel, tmp_path: Path) -> None:
    assert "No generated corpus is cached yet" in section(tmp_path, model="tiny-random")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        result = generated_corpus(tiny_gemma, GenerationSettings(tokens=40, max_new_tokens=10, min_new_tokens=2,
                                                                 batch_size=4), tmp_path, progress=False)
    finally:
        torch.set_num_threads(threads)
    text = section(tmp_path, model="tiny-random")
    stats = result.provenance["stats"]
    assert f"| tiny-random | {stats['kept_tokens']:,} | {stats['samples']:,} | {stats['dropped_share']:.1%} |" in text
    assert f"Excerpts of `{result.directory.name}`" in text and "- `generated/" in text
    assert "No generated corpus" in section(tmp_path, model="default")  # other models' corpora are left out
