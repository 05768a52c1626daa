"""Python client for the featurewire service.

The client depends only on grpcio and protobuf, so applications can call the service without
pulling torch or the host model's stack into their environment.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
