"""featurewire service: the host model runtime and (from the service issue on) the gRPC server."""

__version__ = "0.1.0"
