"""The synchronous client: `Client(target, ...)` with one method per RPC, results as frozen dataclasses.

    with Client("localhost:50051") as fw:
        for tok in fw.decompose("The cat sat", top_k=5):
            print(tok.text, tok.features[0].top(3))
        for event in fw.generate("My favourite food is", interventions=[Intervention.set(stage, 123, 8.0)]):
            ...

Streams open lazily, on the first iteration (or `header()` / `collect()`), and errors surface there as
`FeaturewireError` subclasses. Idempotent calls are retried on UNAVAILABLE (see RetryPolicy); a
Decompose or Generate stream only until its first message arrives, never once it streams.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import grpc

from featurewire import _requests as rq
from featurewire import events as ev
from featurewire import results as rs
from featurewire._transport import (
    DEFAULT,
    DEFAULT_KEEPALIVE_S,
    DEFAULT_STREAM_TIMEOUT_S,
    DEFAULT_TARGET,
    DEFAULT_TIMEOUT_S,
    NO_RETRY,
    Deadline,
    RetryPolicy,
    Settings,
    next_delay,
)
from featurewire.builders import Condition, Edit
from featurewire.errors import from_rpc_error
from featurewire.v1 import featurewire_pb2 as pb
from featurewire.v1 import featurewire_pb2_grpc as pb_grpc


class _Stream:
    """A server-streaming call opened on first use, retried on UNAVAILABLE until its first message."""

    def __init__(self, client: Client, method: str, request: Any, timeout: Any, *, retry: bool) -> None:
        self._client, self._method, self._request = client, method, request
        self._timeout = client.settings.timeout_for(timeout, stream=True)
        self._policy = client.settings.retry if retry else NO_RETRY
        self._call: Any = None
        self._first: list[Any] = []

    def _open(self) -> None:
        if self._call is not None:
            return
        deadline, stub_method, retry = Deadline(self._timeout), getattr(self._client.stub, self._method), 0
        while True:
            call = stub_method(self._request, timeout=deadline.remaining(), metadata=self._client.settings.metadata)
            try:
                self._first = [next(call)]
            except StopIteration:
                self._first = []
            except grpc.RpcError as error:
                delay = next_delay(error, self._policy, retry, deadline)
                if delay is None:
                    self._call = call
                    raise from_rpc_error(error, self._method) from None
                time.sleep(delay)
                retry += 1
                continue
            self._call = call
            return

    def _messages(self) -> Iterator[Any]:
        self._open()
        while self._first:
            yield self._first.pop(0)
        try:
            yield from self._call
        except grpc.RpcError as error:
            raise from_rpc_error(error, self._method) from None

    def cancel(self) -> None:
        """Stop the call; the server stops its work within one step."""
        if self._call is not None:
            self._call.cancel()

    def __enter__(self) -> _Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()


class DecomposeStream(_Stream):
    """Iterates over TokenFeatures, in position order; `header()` names the stages and token count."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header: ev.DecomposeHeader | None = None
        self._iter = self._messages()

    def header(self) -> ev.DecomposeHeader:
        if self._header is None:
            message = next(self._iter, None)
            if message is None or message.WhichOneof("event") != "header":
                raise RuntimeError("the Decompose stream did not start with a header")
            self._header = ev.decompose_header(message.header)
        return self._header

    def __iter__(self) -> Iterator[ev.TokenFeatures]:
        names = {s.index: s.name for s in self.header().stages}
        for message in self._iter:
            if message.WhichOneof("event") == "chunk":
                for token in message.chunk.tokens:
                    yield ev.token_features(token, names)

    def collect(self) -> ev.Decomposition:
        """Read the whole stream."""
        header = self.header()
        return ev.Decomposition(header, tuple(self))


class GenerateStream(_Stream):
    """Iterates over Generate events: Started, then Token / ConditionFired per step, Finished per branch."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.events: list[ev.GenerateEvent] = []
        self._iter = self._events()

    def _events(self) -> Iterator[ev.GenerateEvent]:
        names: dict[int, str] = {}
        for message in self._messages():
            event = ev.generate_event(message, names)
            if isinstance(event, ev.Started):
                names.update((s.index, s.name) for s in event.stages)
            if event is not None:
                self.events.append(event)
                yield event

    def __iter__(self) -> Iterator[ev.GenerateEvent]:
        return self._iter

    def collect(self) -> ev.Generation:
        """Read the rest of the stream; the result also covers the events already iterated."""
        for _ in self._iter:
            pass
        return ev.collect_generation(self.events)


class Client:
    """A connection to one featurewire server (or, with `dns:///host:port`, round-robin over its replicas)."""

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
        s = self.settings
        self.channel = (grpc.secure_channel(target, s.credentials, options=s.options) if s.credentials is not None
                        else grpc.insecure_channel(target, options=s.options))
        self.stub = pb_grpc.FeaturewireStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _unary(self, method: str, request: Any, convert: Callable[[Any], Any], timeout: Any) -> Any:
        deadline, retry = Deadline(self.settings.timeout_for(timeout, stream=False)), 0
        call = getattr(self.stub, method)
        while True:
            try:
                return convert(call(request, timeout=deadline.remaining(), metadata=self.settings.metadata))
            except grpc.RpcError as error:
                delay = next_delay(error, self.settings.retry, retry, deadline)
                if delay is None:
                    raise from_rpc_error(error, method) from None
            time.sleep(delay)
            retry += 1

    # -- unary ----------------------------------------------------------------------------------
    def info(self, *, timeout: Any = DEFAULT) -> rs.ServerInfo:
        """Model, hookpoints, stacks and stages, capabilities, limits, versions."""
        return self._unary("GetServerInfo", pb.GetServerInfoRequest(), rs.server_info, timeout)

    def stacks(self, *, timeout: Any = DEFAULT) -> tuple[rs.StackInfo, ...]:
        """The loaded stacks; the first is the default."""
        return self._unary("ListStacks", pb.ListStacksRequest(),
                           lambda m: tuple(rs.stack_info(s) for s in m.stacks), timeout)

    def feature(self, stack: str, stage: str, feature: int, *, top_n: int = 0, timeout: Any = DEFAULT) -> rs.Feature:
        """One feature's decoder norm and logit-lens tokens; stack "" = the default stack."""
        return self._unary("GetFeature", rq.feature_request(stack, stage, feature, top_n), rs.feature, timeout)

    def tokenize(self, text: str, *, add_special_tokens: bool | None = None, timeout: Any = DEFAULT) -> rs.Tokens:
        return self._unary("Tokenize", rq.tokenize_request(text, add_special_tokens), rs.tokens, timeout)

    def score(self, text: rq.TextOrIds, *, interventions: Iterable[Edit] = (), splice: Sequence[str] | str = (),
              stack: str = "", add_special_tokens: bool | None = None, timeout: Any = DEFAULT) -> rs.ScoreResult:
        """Teacher-forced CE of a text, clean and with edits (interventions, vectors) or spliced stages."""
        request = rq.score_request(text, stack=stack, interventions=interventions, splice=splice,
                                   add_special_tokens=add_special_tokens)
        return self._unary("Score", request, rs.score, timeout)

    # -- streams --------------------------------------------------------------------------------
    def decompose(self, text: rq.TextOrIds, *, stages: Sequence[str] | str | None = None, top_k: int = 0,
                  include_error: bool = True, always: dict[str, Sequence[int]] | None = None, stack: str = "",
                  chunk_tokens: int = 0, add_special_tokens: bool | None = None,
                  timeout: Any = DEFAULT) -> DecomposeStream:
        """Features per token and stage (top_k 0 = the server's default), with actual and predicted error
        norms; `always` lists feature ids per stage to report whatever their rank."""
        request = rq.decompose_request(text, stack=stack, stages=stages, top_k=top_k, include_error=include_error,
                                       always=always, chunk_tokens=chunk_tokens, add_special_tokens=add_special_tokens)
        return DecomposeStream(self, "Decompose", request, timeout, retry=True)

    def generate(self, prompt: rq.TextOrIds, *, interventions: Iterable[Edit] = (),
                 conditions: Iterable[Condition] = (), decompose: Any = None, with_default: bool = False,
                 stack: str = "", add_special_tokens: bool | None = None, timeout: Any = DEFAULT,
                 **sampling: Any) -> GenerateStream:
        """Stream a continuation. `interventions`: Intervention and Vector edits; `conditions`: Condition.stop()
        or .enable(...); `decompose`: True, a top_k, stage names or DecomposeOptions for per-token features;
        `with_default`: the unsteered branch too. Sampling: max_new_tokens, temperature, top_p, top_k, seed,
        stop, ignore_eos."""
        request = rq.generate_request(prompt, stack=stack, interventions=interventions, conditions=conditions,
                                      decompose=decompose, with_default=with_default,
                                      add_special_tokens=add_special_tokens, options=sampling)
        return GenerateStream(self, "Generate", request, timeout, retry=True)

    def generate_text(self, prompt: rq.TextOrIds, **kwargs: Any) -> ev.Generation:
        """`generate(...)` read to the end: `.text`, and `.default_text` with with_default=True."""
        return self.generate(prompt, **kwargs).collect()

    def encode_activations(self, arrays: Iterable[Any], *, stage: str, stack: str = "",
                           previous: Iterable[Any] | None = None, top_k: int = 0, include_error: bool = False,
                           timeout: Any = DEFAULT) -> Iterator[ev.EncodedBatch]:
        """Encode batches of raw activations (each (rows, d_in), e.g. numpy) at a stage; one result per batch.
        Not retried: the request stream is consumed as it is sent."""
        failure: list[Exception] = []

        def requests() -> Iterator[pb.EncodeActivationsRequest]:
            """grpc consumes this on its own thread and would only report "Exception iterating requests!"."""
            try:
                yield from rq.encode_requests(arrays, stage=stage, stack=stack, previous=previous, top_k=top_k,
                                              include_error=include_error)
            except Exception as error:
                failure.append(error)
                raise

        call = self.stub.EncodeActivations(requests(), timeout=self.settings.timeout_for(timeout, stream=True),
                                           metadata=self.settings.metadata)
        try:
            for message in call:
                yield ev.encoded_batch(message, stage)
        except grpc.RpcError as error:
            if failure:
                raise failure[0] from None  # our side went wrong (e.g. a malformed array)
            raise from_rpc_error(error, "EncodeActivations") from None
        finally:
            call.cancel()
