"""Channel construction and the retry policy shared by Client and AsyncClient.

- Round-robin over every address a `dns:///` target resolves to (a headless Kubernetes Service lists
  one address per pod), chosen automatically for `dns:` targets; pick-first otherwise.
- Keepalive pings while a call is open, every 5 minutes by default: gRPC servers by default refuse
  pings more often than that on a quiet connection (GOAWAY "too_many_pings"), and a long queue wait or
  a long prefill is quiet.
- Retries: UNAVAILABLE only (loading, draining, connection refused), on idempotent calls only, with
  exponential backoff and jitter, inside the call's one overall deadline.
"""

from __future__ import annotations

import abc
import json
import random
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import grpc

from featurewire._version import __version__

if TYPE_CHECKING:
    from featurewire._requests import Call

DEFAULT_TARGET = "localhost:50051"
DEFAULT_TIMEOUT_S = 60.0
"""Deadline of unary calls (info, stacks, feature, tokenize, score)."""
DEFAULT_STREAM_TIMEOUT_S = 600.0
"""Deadline of streaming calls (decompose, generate, encode_activations): generation on a CPU is slow."""
DEFAULT_KEEPALIVE_S = 300.0
MAX_MESSAGE_BYTES = 64 * 1024 * 1024
USER_AGENT = f"featurewire-python/{__version__}"


class _Unset:
    """The default of a per-call `timeout`: use the client's."""

    def __repr__(self) -> str:
        return "DEFAULT"


DEFAULT: Any = _Unset()


@dataclass(frozen=True)
class RetryPolicy:
    """Attempts of an idempotent call that fails UNAVAILABLE; delays grow by `multiplier` up to `max_backoff_s`.

    Each delay is the backoff times a random factor in [1 - jitter, 1], so clients that failed together
    do not retry together.
    """

    max_attempts: int = 5
    initial_backoff_s: float = 0.2
    max_backoff_s: float = 5.0
    multiplier: float = 2.0
    jitter: float = 0.5
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.max_attempts < 1:
            raise ValueError("max_attempts must be >= 1 (1 = no retries)")
        if not 0.0 <= self.jitter <= 1.0:
            raise ValueError("jitter must be in [0, 1]")

    def delay(self, retry: int) -> float:
        """Seconds to wait before retry number `retry` (0-based)."""
        backoff = min(self.max_backoff_s, self.initial_backoff_s * self.multiplier**retry)
        return backoff * (1.0 - self.jitter * self.rng.random())


NO_RETRY = RetryPolicy(max_attempts=1)


def retry_policy(retries: int | RetryPolicy | None) -> RetryPolicy:
    """An int n means n retries after the first attempt; None or 0 means none."""
    if isinstance(retries, RetryPolicy):
        return retries
    return RetryPolicy(max_attempts=1 + int(retries)) if retries else NO_RETRY


def retryable(error: grpc.RpcError) -> bool:
    code = getattr(error, "code", None)
    return callable(code) and code() == grpc.StatusCode.UNAVAILABLE


class Deadline:
    """One overall deadline for a call and all its retries; None = no deadline."""

    def __init__(self, timeout: float | None) -> None:
        self.at = None if timeout is None else time.monotonic() + timeout

    def remaining(self) -> float | None:
        return None if self.at is None else max(0.0, self.at - time.monotonic())

    def allows(self, delay: float) -> bool:
        """Whether waiting `delay` seconds still leaves time for another attempt."""
        return self.at is None or time.monotonic() + delay < self.at


def channel_options(target: str, *, load_balancing: str | None = None, keepalive_s: float | None = DEFAULT_KEEPALIVE_S,
                    extra: Sequence[tuple[str, Any]] | dict[str, Any] = ()) -> list[tuple[str, Any]]:
    """gRPC channel arguments; `extra` wins over the defaults key by key."""
    policy = load_balancing or ("round_robin" if target.startswith("dns:") else None)
    options: dict[str, Any] = {
        "grpc.primary_user_agent": USER_AGENT,
        "grpc.max_receive_message_length": MAX_MESSAGE_BYTES,
        "grpc.max_send_message_length": MAX_MESSAGE_BYTES,
    }
    if policy:
        options["grpc.lb_policy_name"] = policy
        options["grpc.service_config"] = json.dumps({"loadBalancingConfig": [{policy: {}}]})
    if keepalive_s:
        options["grpc.keepalive_time_ms"] = int(keepalive_s * 1000)
        options["grpc.keepalive_timeout_ms"] = 20_000
        options["grpc.keepalive_permit_without_calls"] = 0
        options["grpc.http2.max_pings_without_data"] = 0
    options.update(dict(extra))
    return list(options.items())


def channel_credentials(tls: Any) -> grpc.ChannelCredentials | None:
    """False/None: plaintext; True: TLS with the system roots; bytes or a path: TLS with that root
    certificate (PEM); a grpc.ChannelCredentials: used as is."""
    if tls is None or tls is False:
        return None
    if tls is True:
        return grpc.ssl_channel_credentials()
    if isinstance(tls, grpc.ChannelCredentials):
        return tls
    if isinstance(tls, bytes):
        return grpc.ssl_channel_credentials(root_certificates=tls)
    if isinstance(tls, str | Path):
        return grpc.ssl_channel_credentials(root_certificates=Path(tls).expanduser().read_bytes())
    raise TypeError(f"tls must be a bool, a root certificate path or bytes, or grpc.ChannelCredentials; got {tls!r}")


@dataclass(frozen=True)
class Settings:
    """What Client and AsyncClient share: where to connect, how to authenticate, deadlines and retries."""

    target: str
    credentials: grpc.ChannelCredentials | None
    options: list[tuple[str, Any]]
    metadata: tuple[tuple[str, str], ...]
    timeout: float | None
    stream_timeout: float | None
    retry: RetryPolicy

    @classmethod
    def build(cls, target: str, *, token: str | None, tls: Any, timeout: float | None, stream_timeout: float | None,
              options: Sequence[tuple[str, Any]] | dict[str, Any], retries: int | RetryPolicy | None,
              metadata: Sequence[tuple[str, str]], load_balancing: str | None, keepalive_s: float | None) -> Settings:
        """With TLS the token travels as call credentials; on a plaintext channel (localhost, tests, a mesh that
        terminates TLS) gRPC refuses call credentials, so it is sent as metadata instead."""
        credentials = channel_credentials(tls)
        extra_metadata = tuple(metadata)
        if token and credentials is not None:
            credentials = grpc.composite_channel_credentials(credentials, grpc.access_token_call_credentials(token))
        elif token:
            extra_metadata += (("authorization", f"Bearer {token}"),)
        return cls(target=target, credentials=credentials,
                   options=channel_options(target, load_balancing=load_balancing, keepalive_s=keepalive_s,
                                           extra=options),
                   metadata=extra_metadata, timeout=timeout, stream_timeout=stream_timeout,
                   retry=retry_policy(retries))

    def timeout_for(self, timeout: Any, *, stream: bool) -> float | None:
        if timeout is DEFAULT:
            return self.stream_timeout if stream else self.timeout
        return timeout


def next_delay(error: grpc.RpcError, policy: RetryPolicy, retry: int, deadline: Deadline) -> float | None:
    """Seconds to wait before retrying a failed attempt, or None when the error is final."""
    if not retryable(error) or retry + 1 >= policy.max_attempts:
        return None
    delay = policy.delay(retry)
    return delay if deadline.allows(delay) else None


class ClientBase(abc.ABC):
    """The constructor Client and AsyncClient share, so both read their arguments the same way."""

    def __init__(self, target: str = DEFAULT_TARGET, *, token: str | None = None, tls: Any = False,
                 timeout: float | None = DEFAULT_TIMEOUT_S, stream_timeout: float | None = DEFAULT_STREAM_TIMEOUT_S,
                 options: Sequence[tuple[str, Any]] | dict[str, Any] = (), retries: int | RetryPolicy | None = None,
                 metadata: Sequence[tuple[str, str]] = (), load_balancing: str | None = None,
                 keepalive_s: float | None = DEFAULT_KEEPALIVE_S) -> None:
        """`tls`: False, True (system roots), a root certificate (path or PEM bytes) or grpc.ChannelCredentials.
        `retries`: None = the default RetryPolicy, 0 = none, n = n retries, or a RetryPolicy."""
        self.settings = Settings.build(target, token=token, tls=tls, timeout=timeout, stream_timeout=stream_timeout,
                                       options=options, retries=RetryPolicy() if retries is None else retries,
                                       metadata=metadata, load_balancing=load_balancing, keepalive_s=keepalive_s)
        self._connect()

    @abc.abstractmethod
    def _connect(self) -> None:
        """Open the channel now (Client) or prepare to open it inside the event loop (AsyncClient)."""


class StreamBase:
    """What Client's and AsyncClient's server streams share: the call to make, its deadline and retry policy."""

    def __init__(self, client: ClientBase, call: Call, timeout: Any) -> None:
        self._client, self._rpc = client, call
        self._timeout = client.settings.timeout_for(timeout, stream=True)
        self._policy = client.settings.retry if call.retry else NO_RETRY
        self._call: Any = None
        self._first: list[Any] = []

    def cancel(self) -> None:
        """Stop the call; the server stops its work within one step."""
        if self._call is not None:
            self._call.cancel()
