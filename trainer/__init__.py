"""featurewire trainer: turns a host LM plus a text corpus into an SAE stack, offline, on top of `core`.

Grouped by concern: `data` (corpus, activation store), `training` (config, loop, optimisation,
checkpoints, distributed, ReSAE fit, meta-SAE, error-predictor fit), `evaluation`, `interop`
(import, ONNX export) and `report`. Kept import-light on purpose: importing the package (or its CLI
and corpus modules) must not pull in torch or transformers, so `featurewire-train --help` and corpus
inspection stay instant.
"""

from core import __version__

__all__ = ["__version__"]
