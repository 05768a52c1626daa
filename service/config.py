"""Frozen configuration objects, built once from defaults, environment and flags.

No module reads the environment at import: the CLI calls `ServerConfig.from_env(os.environ, **flags)`.
The host-model settings (`ModelConfig`) live in `core.config`, shared with the trainer.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path

from core.config import ENV_PREFIX
from service.engine.contract.inputs import Limits
from service.engine.contract.settings import EngineSettings

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
_MAX_GRPC_MESSAGE = 2**31 - 1


@dataclass(frozen=True)
class ServerConfig:
    """How the gRPC server listens, what it loads and the limits it enforces on every request.

    Every field `x` is read from `FEATUREWIRE_X` by `from_env`; CLI flags override. `__post_init__`
    validates ranges only, so a bad deployment fails at startup with one clear line, never mid-request.
    """

    host: str = "[::]"
    """Address the gRPC server binds (`[::]` listens on every interface, IPv4 and IPv6)."""
    port: int = 50051
    """gRPC port; 0 picks a free one (tests)."""
    metrics_port: int = 9090
    """Prometheus HTTP port; 0 disables the metrics server."""
    metrics_host: str = "0.0.0.0"
    """Address the metrics HTTP server binds."""
    http_port: int | None = None
    """HTTP/JSON gateway port (binds `host`, like gRPC); None turns the gateway off, 0 picks a free port."""
    stacks: tuple[Path, ...] = ()
    """SAE stack directories to load at startup (env: colon- or comma-separated)."""
    max_message_bytes: int = 64 * 1024 * 1024
    """Largest gRPC message received or sent; also reported in GetServerInfo."""
    queue_size: int = 64
    """Requests waiting for the engine beyond which new ones get RESOURCE_EXHAUSTED."""
    max_batch_size: int = 16
    """Requests the engine runs at once, and sequences in one forward pass (continuous batching)."""
    max_batch_tokens: int = 4096
    """Tokens in one forward pass; prefills beyond it wait for the next step (a longer prompt runs alone)."""
    threads: int = 0
    """CPU threads of the model's torch work; 0 = chosen from the machine (torch's default, i.e. OMP_NUM_THREADS
    or the cores, capped by the CPU affinity and the cgroup CPU quota)."""
    max_new_tokens: int = 512
    """Cap on Generate's max_new_tokens."""
    max_prompt_tokens: int = 2048
    """Longest prompt or text accepted, in tokens."""
    max_top_k: int = 256
    """Largest top_k (features per token per stage) a request may ask for."""
    max_interventions: int = 64
    """Most interventions (plus conditions) in one request."""
    max_batch_vectors: int = 4096
    """Most activation vectors in one EncodeActivations message."""
    request_timeout_s: float = 300.0
    """Deadline applied when the client sets none."""
    drain_grace_s: float = 20.0
    """Seconds in-flight streams get to finish after SIGTERM before they are cancelled."""
    tls_cert: Path | None = None
    """PEM certificate chain; TLS is on when this and `tls_key` are set (both or neither)."""
    tls_key: Path | None = None
    """PEM private key for `tls_cert`."""
    auth_token: str = field(default="", repr=False)
    """Bearer token every call must carry; empty disables auth. Also from FEATUREWIRE_AUTH_TOKEN_FILE."""
    auth_exempt_health: bool = True
    """Health checks and server reflection skip auth (kubelet probes carry no token)."""
    self_check: bool = True
    """Check each stack's FVE and L0 on calibration text at load and refuse a mismatching stack."""
    log_level: str = "INFO"
    """DEBUG, INFO, WARNING, ERROR or CRITICAL."""
    chat_template: Path | None = None
    """Jinja chat template file for the OpenAI-compatible API's chat completions (else the tokenizer's own)."""

    def __post_init__(self) -> None:
        # Normalise types that flags and callers commonly pass as str/list; no I/O here.
        object.__setattr__(self, "stacks", tuple(Path(p) for p in self.stacks))
        for name in ("tls_cert", "tls_key", "chat_template"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, Path):
                object.__setattr__(self, name, Path(value))
        object.__setattr__(self, "log_level", str(self.log_level).upper())
        self._validate()

    def _validate(self) -> None:
        if not self.host.strip():
            raise ValueError("host must not be empty")
        for name in ("port", "metrics_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise ValueError(f"{name} must be in [0, 65535], got {getattr(self, name)}")
        if self.http_port is not None:
            if not 0 <= self.http_port <= 65535:
                raise ValueError(f"http_port must be in [0, 65535], got {self.http_port}")
            if self.http_port and self.http_port in (self.port, self.metrics_port):
                raise ValueError(f"http_port must differ from port and metrics_port, got {self.http_port}")
        if not 4096 <= self.max_message_bytes <= _MAX_GRPC_MESSAGE:
            raise ValueError(f"max_message_bytes must be in [4096, {_MAX_GRPC_MESSAGE}], got {self.max_message_bytes}")
        for name in ("queue_size", "max_new_tokens", "max_prompt_tokens", "max_top_k", "max_interventions",
                     "max_batch_vectors", "max_batch_size", "max_batch_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.threads < 0:
            raise ValueError(f"threads must be 0 (chosen from the machine) or a positive count, got {self.threads}")
        if not (math.isfinite(self.request_timeout_s) and self.request_timeout_s > 0):
            raise ValueError(f"request_timeout_s must be a positive number of seconds, got {self.request_timeout_s}")
        if not (math.isfinite(self.drain_grace_s) and self.drain_grace_s >= 0):
            raise ValueError(f"drain_grace_s must be a non-negative number of seconds, got {self.drain_grace_s}")
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key must be given together (both or neither)")
        if self.auth_token and not all(33 <= ord(c) <= 126 for c in self.auth_token):
            raise ValueError("auth_token must be printable ASCII without spaces (it travels in a gRPC header)")
        if self.log_level not in _LOG_LEVELS:
            raise ValueError(f"log_level must be one of {', '.join(_LOG_LEVELS)}, got {self.log_level!r}")

    def limits(self) -> Limits:
        """The request limits this deployment enforces and GetServerInfo reports."""
        return Limits.from_bounds(max_new_tokens=self.max_new_tokens, max_prompt_tokens=self.max_prompt_tokens,
                                  max_top_k=self.max_top_k, max_interventions=self.max_interventions,
                                  max_batch_vectors=self.max_batch_vectors, max_message_bytes=self.max_message_bytes,
                                  queue_size=self.queue_size)

    def engine_settings(self) -> EngineSettings:
        """The transport-free settings the engine is built with."""
        return EngineSettings(self.limits(), self.max_batch_size, self.max_batch_tokens, self.threads)

    @property
    def address(self) -> str:
        """`host:port` for `server.add_*_port`."""
        return f"{self.host}:{self.port}"

    @property
    def tls_enabled(self) -> bool:
        return self.tls_cert is not None

    @property
    def auth_enabled(self) -> bool:
        return bool(self.auth_token)

    @classmethod
    def from_env(cls, environ: Mapping[str, str], **overrides: object) -> ServerConfig:
        """Defaults, then `FEATUREWIRE_<FIELD>` variables, then explicit (non-None) overrides.

        `auth_token_file` (override or FEATUREWIRE_AUTH_TOKEN_FILE) is read here, never in
        `__post_init__`, so Kubernetes secrets can be mounted as files instead of env values.
        """
        values: dict[str, object] = {}
        for f in fields(cls):
            variable = f"{ENV_PREFIX}{f.name.upper()}"
            if variable in environ:
                values[f.name] = _parse(variable, environ[variable], f.name)
        token_file = overrides.pop("auth_token_file", None)
        if token_file is None and overrides.get("auth_token") is None:
            token_file = environ.get(f"{ENV_PREFIX}AUTH_TOKEN_FILE") or None
            if token_file and f"{ENV_PREFIX}AUTH_TOKEN" in environ:
                raise ValueError("set FEATUREWIRE_AUTH_TOKEN or FEATUREWIRE_AUTH_TOKEN_FILE, not both")
        if token_file:
            if overrides.get("auth_token") is not None:
                raise ValueError("give an auth token or an auth token file, not both")
            values["auth_token"] = _read_token(Path(str(token_file)).expanduser())
        given = {k: v for k, v in overrides.items() if v is not None}
        values.update(given)
        try:
            return cls(**values)  # type: ignore[arg-type]
        except TypeError as exc:  # an unknown override name or a wrongly typed flag: a programming error
            raise ValueError(f"bad server config: {exc}") from None
        except ValueError as exc:  # validation messages start with the field name: point at the variable
            name = str(exc).split(" ", 1)[0]
            if name in values and name not in given and f"{ENV_PREFIX}{name.upper()}" in environ:
                raise ValueError(f"{ENV_PREFIX}{name.upper()}: {exc}") from None
            raise


_INT_FIELDS = frozenset({"port", "metrics_port", "http_port", "max_message_bytes", "queue_size", "max_new_tokens",
                         "max_prompt_tokens", "max_top_k", "max_interventions", "max_batch_vectors",
                         "max_batch_size", "max_batch_tokens", "threads"})
_FLOAT_FIELDS = frozenset({"request_timeout_s", "drain_grace_s"})
_BOOL_FIELDS = frozenset({"auth_exempt_health", "self_check"})


def _parse(variable: str, raw: str, name: str) -> object:
    """Turn one environment value into the field's type, naming the variable when it is malformed."""
    text = raw.strip()
    if name == "http_port" and not text:
        return None  # set but empty: the gateway stays off
    if name in _INT_FIELDS:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{variable} must be an integer, got {raw!r}") from None
    if name in _FLOAT_FIELDS:
        try:
            value = float(text)
        except ValueError:
            raise ValueError(f"{variable} must be a number of seconds, got {raw!r}") from None
        if not math.isfinite(value):
            raise ValueError(f"{variable} must be finite, got {raw!r}")
        return value
    if name in _BOOL_FIELDS:
        if text.lower() in _TRUE:
            return True
        if text.lower() in _FALSE:
            return False
        raise ValueError(f"{variable} must be true/false (1/0, yes/no, on/off), got {raw!r}")
    if name == "stacks":
        return tuple(Path(p).expanduser() for p in re.split(r"[:,]", text) if p.strip())
    if name in ("tls_cert", "tls_key", "chat_template"):
        return Path(text).expanduser() if text else None
    return text


def _read_token(path: Path) -> str:
    try:
        token = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError) as exc:
        reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
        raise ValueError(f"auth token file {str(path)!r} cannot be read: {reason}") from None
    if not token:
        raise ValueError(f"auth token file {str(path)!r} is empty")
    return token
