"""featurewire service: the gRPC server (and its engine) on top of `core`."""

from core import __version__

__all__ = ["__version__"]
