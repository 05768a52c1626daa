"""The client version, in one place (read by the package and the user agent)."""

__version__ = "0.1.0"
