"""featurewire trainer: turns a host LM plus a text corpus into an SAE stack, offline.

Kept import-light on purpose: importing the package (or its CLI and corpus modules) must not pull
in torch or transformers, so `featurewire-train --help` and corpus inspection stay instant.
"""

__version__ = "0.1.0"
