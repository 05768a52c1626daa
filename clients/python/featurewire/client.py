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
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import grpc

from featurewire import _requests as rq
from featurewire import events as ev
from featurewire import feature_results as fr
from featurewire import results as rs
from featurewire._transport import DEFAULT, ClientBase, Deadline, StreamBase, next_delay
from featurewire.builders import Condition, Edit
from featurewire.errors import from_rpc_error
from featurewire.v1 import featurewire_pb2 as pb
from featurewire.v1 import featurewire_pb2_grpc as pb_grpc


class _Stream(StreamBase):
    """A server-streaming call opened on first use, retried on UNAVAILABLE until its first message."""

    def _open(self) -> None:
        if self._call is not None:
            return
        deadline, stub_method, retry = Deadline(self._timeout), getattr(self._client.stub, self._rpc.method), 0
        while True:
            call = stub_method(self._rpc.request, timeout=deadline.remaining(), metadata=self._client.settings.metadata)
            try:
                self._first = [next(call)]
            except StopIteration:
                self._first = []
            except grpc.RpcError as error:
                delay = next_delay(error, self._policy, retry, deadline)
                if delay is None:
                    self._call = call
                    raise from_rpc_error(error, self._rpc.method) from None
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
            raise from_rpc_error(error, self._rpc.method) from None

    def __enter__(self) -> _Stream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.cancel()


class DecomposeStream(_Stream):
    """Iterates over TokenFeatures, in position order; `header()` names the stages and token count."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._reader = ev.DecomposeReader()
        self._iter = self._messages()

    def header(self) -> ev.DecomposeHeader:
        if self._reader.header is None:
            self._reader.start(next(self._iter, None))
        return self._reader.header

    def __iter__(self) -> Iterator[ev.TokenFeatures]:
        self.header()
        for message in self._iter:
            yield from self._reader.tokens(message)

    def collect(self) -> ev.Decomposition:
        """Read the whole stream."""
        header = self.header()
        return ev.Decomposition(header, tuple(self))


class GenerateStream(_Stream):
    """Iterates over Generate events: Started, then Token / ConditionFired per step, Finished per branch."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._reader = ev.GenerateReader()
        self.events = self._reader.events
        self._iter = self._events()

    def _events(self) -> Iterator[ev.GenerateEvent]:
        for message in self._messages():
            event = self._reader.event(message)
            if event is not None:
                yield event

    def __iter__(self) -> Iterator[ev.GenerateEvent]:
        return self._iter

    def collect(self) -> ev.Generation:
        """Read the rest of the stream; the result also covers the events already iterated."""
        for _ in self._iter:
            pass
        return self._reader.generation()


class Client(ClientBase):
    """A connection to one featurewire server (or, with `dns:///host:port`, round-robin over its replicas)."""

    def _connect(self) -> None:
        s = self.settings
        self.channel = (grpc.secure_channel(s.target, s.credentials, options=s.options) if s.credentials is not None
                        else grpc.insecure_channel(s.target, options=s.options))
        self.stub = pb_grpc.FeaturewireStub(self.channel)

    def close(self) -> None:
        self.channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _unary(self, rpc: rq.Call, timeout: Any) -> Any:
        deadline, retry = Deadline(self.settings.timeout_for(timeout, stream=False)), 0
        call = getattr(self.stub, rpc.method)
        while True:
            try:
                return rpc.convert(call(rpc.request, timeout=deadline.remaining(), metadata=self.settings.metadata))
            except grpc.RpcError as error:
                delay = next_delay(error, self.settings.retry, retry, deadline)
                if delay is None:
                    raise from_rpc_error(error, rpc.method) from None
            time.sleep(delay)
            retry += 1

    # -- unary ----------------------------------------------------------------------------------
    def info(self, *, timeout: Any = DEFAULT) -> rs.ServerInfo:
        """Model, hookpoints, stacks and stages, capabilities, limits, versions."""
        return self._unary(rq.info(), timeout)

    def stacks(self, *, timeout: Any = DEFAULT) -> tuple[rs.StackInfo, ...]:
        """The loaded stacks; the first is the default."""
        return self._unary(rq.stacks(), timeout)

    def feature(self, stack: str, stage: str, feature: int, *, top_n: int = 0, timeout: Any = DEFAULT) -> rs.Feature:
        """One feature's decoder norm and logit-lens tokens, and its dashboard, explanation and meta-latents when
        the stack has them; stack "" = the default stack."""
        return self._unary(rq.feature(stack, stage, feature, top_n), timeout)

    def search_features(self, text: str | None = None, *, span: tuple[int, int] | None = None,
                        token: str | int | None = None, explanation: str | None = None,
                        stages: Sequence[str] | str | None = None, reduce: str = "max", direction: str = "promotes",
                        stack: str = "", page_size: int = 0, page_token: str = "",
                        add_special_tokens: bool | None = None, timeout: Any = DEFAULT) -> fr.SearchResult:
        """Features a text activates most (`reduce` "max" or "mean" over the text, or over characters `span`
        [start, end) of it), whose logit lens promotes (`direction` "suppresses": lowers) a `token` most (a
        one-token string or an id), or whose explanation contains the `explanation` words. One page; pass
        `next_page_token` back with the same query for the next."""
        return self._unary(rq.search_features(text=text, span=span, token=token, explanation=explanation,
                                              stages=stages, reduce=reduce, direction=direction, stack=stack,
                                              page_size=page_size, page_token=page_token,
                                              add_special_tokens=add_special_tokens), timeout)

    def list_features(self, stage: str, *, min_density: float | None = None, max_density: float | None = None,
                      sort: str = "density", descending: bool = False, stack: str = "", page_size: int = 0,
                      page_token: str = "", steerable_only: bool = False, timeout: Any = DEFAULT) -> fr.FeatureList:
        """A stage's features from its dashboard with density in [min_density, max_density], sorted by "density",
        "max", "label_f1", "steering" or "output_score" (the last two list measured features only; steerable_only
        keeps those whose steerability verdict says they steer). One page, as search_features."""
        return self._unary(rq.list_features(stage, min_density=min_density, max_density=max_density, sort=sort,
                                            descending=descending, stack=stack, page_size=page_size,
                                            page_token=page_token, steerable_only=steerable_only), timeout)

    def tokenize(self, text: str, *, add_special_tokens: bool | None = None, timeout: Any = DEFAULT) -> rs.Tokens:
        return self._unary(rq.tokenize(text, add_special_tokens), timeout)

    def score(self, text: rq.TextOrIds, *, interventions: Iterable[Edit] = (), splice: Sequence[str] | str = (),
              stack: str = "", add_special_tokens: bool | None = None, timeout: Any = DEFAULT) -> rs.ScoreResult:
        """Teacher-forced CE of a text, clean and with edits (interventions, vectors) or spliced stages."""
        return self._unary(rq.score(text, interventions=interventions, splice=splice, stack=stack,
                                    add_special_tokens=add_special_tokens), timeout)

    # -- streams --------------------------------------------------------------------------------
    def decompose(self, text: rq.TextOrIds, *, stages: Sequence[str] | str | None = None, top_k: int = 0,
                  include_error: bool = True, always: dict[str, Sequence[int]] | None = None, stack: str = "",
                  chunk_tokens: int = 0, add_special_tokens: bool | None = None,
                  timeout: Any = DEFAULT) -> DecomposeStream:
        """Features per token and stage (top_k 0 = the server's default), with actual and predicted error
        norms; `always` lists feature ids per stage to report whatever their rank."""
        return DecomposeStream(self, rq.decompose(text, stages=stages, top_k=top_k, include_error=include_error,
                                                  always=always, stack=stack, chunk_tokens=chunk_tokens,
                                                  add_special_tokens=add_special_tokens), timeout)

    def generate(self, prompt: rq.TextOrIds, *, interventions: Iterable[Edit] = (),
                 conditions: Iterable[Condition] = (), decompose: Any = None, with_default: bool = False,
                 stack: str = "", add_special_tokens: bool | None = None, timeout: Any = DEFAULT,
                 **sampling: Any) -> GenerateStream:
        """Stream a continuation. `interventions`: Intervention and Vector edits; `conditions`: Condition.stop()
        or .enable(...); `decompose`: True, a top_k, stage names or DecomposeOptions for per-token features;
        `with_default`: the unsteered branch too. Sampling: max_new_tokens, temperature, top_p, top_k, seed,
        stop, ignore_eos."""
        return GenerateStream(self, rq.generate(prompt, interventions=interventions, conditions=conditions,
                                                decompose=decompose, with_default=with_default, stack=stack,
                                                add_special_tokens=add_special_tokens, options=sampling), timeout)

    def generate_text(self, prompt: rq.TextOrIds, **kwargs: Any) -> ev.Generation:
        """`generate(...)` read to the end: `.text`, and `.default_text` with with_default=True."""
        return self.generate(prompt, **kwargs).collect()

    def encode_activations(self, arrays: Iterable[Any], *, stage: str, stack: str = "",
                           previous: Iterable[Any] | None = None, top_k: int = 0, include_error: bool = False,
                           timeout: Any = DEFAULT) -> Iterator[ev.EncodedBatch]:
        """Encode batches of raw activations (each (rows, d_in), e.g. numpy) at a stage; one result per batch.
        Not retried: the request stream is consumed as it is sent."""
        encoder = rq.Encoder(stage=stage, stack=stack, previous=previous, top_k=top_k, include_error=include_error)
        failure: list[Exception] = []

        def requests() -> Iterator[pb.EncodeActivationsRequest]:
            """grpc consumes this on its own thread and would only report "Exception iterating requests!"."""
            try:
                for array in arrays:
                    yield encoder.request(array)
            except Exception as error:
                failure.append(error)
                raise

        call = getattr(self.stub, encoder.method)(requests(), timeout=self.settings.timeout_for(timeout, stream=True),
                                                  metadata=self.settings.metadata)
        try:
            for message in call:
                yield encoder.result(message)
        except grpc.RpcError as error:
            if failure:
                raise failure[0] from None  # our side went wrong (e.g. a malformed array)
            raise from_rpc_error(error, encoder.method) from None
        finally:
            call.cancel()
