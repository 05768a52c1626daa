"""A finished stack with its host model and the held-out (eval) split of the corpus it was trained on: what `eval`,
co-occurrence and `dashboards` all start from."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from core.config import ModelConfig
from core.host.host_model import HostModel
from core.host.loading import load_host_model
from core.stack.identity import HostModelIdentity
from core.stack.reader import LoadedStack, read_stack
from trainer.data.corpus import Document, load_corpus, split_documents
from trainer.data.generated import GeneratedSource
from trainer.data.generation_settings import GenerationSettings


@dataclass(frozen=True)
class HeldOut:
    host: HostModel
    stack: LoadedStack
    corpus: str  # the corpus spec the documents come from
    documents: list[Document]  # its eval split
    context_length: int  # the windows training used
    batch_size: int


def recorded_generated_source(host: HostModel, corpus_cfg: dict, cache_dir: Path) -> GeneratedSource:
    """The generated source with the settings a stack's training config recorded: the cache it wrote is hit, or
    the same text is sampled again (same model, settings and machine type)."""
    recorded = corpus_cfg.get("generation")
    settings = GenerationSettings.from_dict(dict(recorded)) if recorded else GenerationSettings()
    return GeneratedSource(host, settings, cache_dir, progress=False)


def open_held_out(stack_dir: str | Path, *, model: str | None = None, corpus: str | None = None,
                  model_config: ModelConfig | None = None) -> HeldOut:
    """Load the host model the stack names (or `model`, or `model_config`), check it is the one the stack was
    trained on, and split the stack's training corpus (or `corpus`) as training did."""
    peek = read_stack(stack_dir)
    config = model_config or ModelConfig.from_env(os.environ, name=model or peek.identity.name)
    host = load_host_model(config)
    stack = read_stack(stack_dir, expect_model=HostModelIdentity.from_model(host.model, host.name), device=host.device)
    training = stack.stages[0].training.get("config", {})
    corpus_cfg, activations = training.get("corpus", {}), training.get("activations", {})
    spec = corpus or corpus_cfg.get("spec", "default")
    documents = load_corpus(spec, text_field=corpus_cfg.get("text_field", "text"),
                            generated=recorded_generated_source(host, corpus_cfg, config.cache_dir),
                            mix_seed=corpus_cfg.get("split_seed", 0))
    splits = split_documents(documents, calibration_fraction=corpus_cfg.get("calibration_fraction", 0.05),
                             eval_fraction=corpus_cfg.get("eval_fraction", 0.05), seed=corpus_cfg.get("split_seed", 0))
    return HeldOut(host, stack, spec, list(splits.eval), int(activations.get("context_length", 128)),
                   int(activations.get("batch_size", 8)))
