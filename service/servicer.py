"""The Featurewire gRPC servicer: converts and delegates, nothing else.

Each RPC is request → `to_spec.*_spec` (service/convert/requests.py, validation) → `engine.stream/call`
(the worker thread) → `to_proto.*_response` (service/convert/responses.py). Errors are raised as
`ServiceError` subclasses and mapped to status codes by the ErrorInterceptor, so no method here touches
status codes. Until `attach` is called (model and stacks loading) and after `drain` (shutting down), every
RPC answers UNAVAILABLE. EncodeActivations runs the captured activations through the torch stack runtime
on the engine (the activation-only server runs the same stream over ONNX Runtime:
service/activation_servicer.py).
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import grpc
from featurewire.v1 import featurewire_pb2 as pb
from featurewire.v1 import featurewire_pb2_grpc as pb_grpc

from core.errors import NotReady
from core.host.host_model import HostModel
from service.activation_servicer import encode_stream
from service.config import ServerConfig
from service.convert import info as describe
from service.convert import requests as to_spec
from service.convert import responses as to_proto
from service.engine.contract.encode_spec import EncodeSpec, EncodeValidator
from service.engine.contract.feature_specs import Page
from service.engine.contract.specs import (
    DecomposeChunk,
    DecomposeHeader,
    FinishEvent,
    GenerateHeader,
    InterventionSpec,
    StageCodes,
    SteeringSpec,
    TokenEvent,
    TokenFeatures,
)
from service.engine.contract.validation import RequestValidator
from service.engine.execution.engine import Engine, deadline_after
from service.engine.operations.activations import encode_batch, encode_targets
from service.engine.operations.decompose import decompose_events
from service.engine.operations.features import feature_info
from service.engine.operations.generation import generate_events
from service.engine.operations.score import score
from service.engine.operations.search import list_features, search_features
from service.engine.stacks.served import ServedStack
from service.metrics import Metrics

MODE_FULL = "full"
ENCODE_BACKEND = "torch"


@dataclass(frozen=True)
class Runtime:
    """What exists once loading has finished."""

    host: HostModel
    stacks: Mapping[str, ServedStack]
    engine: Engine
    validator: RequestValidator
    encode_validator: EncodeValidator


class FeaturewireServicer(pb_grpc.FeaturewireServicer):
    """featurewire.v1.Featurewire on top of an Engine."""

    def __init__(self, config: ServerConfig, metrics: Metrics | None = None, *, mode: str = MODE_FULL) -> None:
        self.config = config
        self.metrics = metrics
        self.mode = mode
        self._runtime: Runtime | None = None
        self._draining = False

    def attach(self, host: HostModel, stacks: Mapping[str, ServedStack], engine: Engine) -> None:
        """Start serving: the model and stacks are loaded and the engine runs."""
        limits = self.config.limits()
        encode = EncodeValidator({name: encode_targets(s) for name, s in stacks.items()}, limits)
        self._runtime = Runtime(host, dict(stacks), engine, RequestValidator(host, stacks, limits), encode)

    def drain(self) -> None:
        """Refuse new calls (UNAVAILABLE); calls already running continue."""
        self._draining = True

    @property
    def ready(self) -> bool:
        return self._runtime is not None and not self._draining

    def _rt(self) -> Runtime:
        if self._draining:
            raise NotReady("the server is shutting down; retry on another replica")
        if self._runtime is None:
            raise NotReady("the server is starting (loading the model and stacks); retry shortly")
        return self._runtime

    def _deadline(self, context: grpc.aio.ServicerContext) -> float | None:
        remaining = context.time_remaining()
        return deadline_after(self.config.request_timeout_s if remaining is None else remaining)

    # -- metadata -------------------------------------------------------------------------------
    async def GetServerInfo(self, request: pb.GetServerInfoRequest, context: grpc.aio.ServicerContext):
        rt = self._rt()
        return describe.server_info(rt.host, list(rt.stacks.values()), self.config, self.mode,
                                    encode_backend=ENCODE_BACKEND)

    async def ListStacks(self, request: pb.ListStacksRequest, context: grpc.aio.ServicerContext):
        rt = self._rt()
        return describe.list_stacks_response(list(rt.stacks.values()))

    async def Tokenize(self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext):
        """Runs on the event loop: the fast tokenizer is read-only here and cheap next to a queue wait."""
        rt = self._rt()
        text, add_special = to_spec.tokenize_request(request, rt.validator)
        ids = rt.host.tokenizer(text, add_special_tokens=add_special).input_ids
        tokens = [rt.host.decode([i], skip_special_tokens=False) for i in ids]
        return to_proto.tokenize_response(ids, tokens)

    async def GetFeature(self, request: pb.GetFeatureRequest, context: grpc.aio.ServicerContext):
        rt = self._rt()
        stack, stage, feature, top_n = to_spec.feature_request(request, rt.validator)
        info = await rt.engine.call(lambda: feature_info(rt.host, stack, stage, feature, top_n),
                                    deadline=self._deadline(context), method="GetFeature")
        return to_proto.feature_response(info, stack)

    async def SearchFeatures(self, request: pb.SearchFeaturesRequest, context: grpc.aio.ServicerContext):
        rt = self._rt()
        spec = to_spec.search_spec(request, rt.validator)
        stack = rt.stacks[spec.stack]
        result = await rt.engine.call(lambda: search_features(rt.host, stack, spec), deadline=self._deadline(context),
                                      method="SearchFeatures")
        return to_proto.search_response(result, stack, self._next_page(rt, spec.page, result.next_offset))

    async def ListFeatures(self, request: pb.ListFeaturesRequest, context: grpc.aio.ServicerContext):
        rt = self._rt()
        spec = to_spec.list_spec(request, rt.validator)
        stack = rt.stacks[spec.stack]
        result = await rt.engine.call(lambda: list_features(stack, spec), deadline=self._deadline(context),
                                      method="ListFeatures")
        return to_proto.list_response(result, stack, self._next_page(rt, spec.page, result.next_offset))

    @staticmethod
    def _next_page(rt: Runtime, page: Page, offset: int | None) -> str:
        """The signed token of the next page, bound to the request's query; "" after the last page."""
        return "" if offset is None else rt.validator.pages.token(page.query, offset)

    # -- compute --------------------------------------------------------------------------------
    async def Decompose(self, request: pb.DecomposeRequest,
                        context: grpc.aio.ServicerContext) -> AsyncIterator[pb.DecomposeResponse]:
        started = time.perf_counter()
        rt = self._rt()
        spec = to_spec.decompose_spec(request, rt.validator)
        stack = rt.stacks[spec.stack]
        observe = _Observer(self.metrics, "Decompose", stack, started)
        events = rt.engine.stream(lambda: decompose_events(rt.host, stack, spec),
                                  deadline=self._deadline(context), method="Decompose")
        async with contextlib.aclosing(events):  # closing this stream stops the engine job at once
            async for event in events:
                observe(event)
                yield to_proto.decompose_response(event, stack)

    async def Generate(self, request: pb.GenerateRequest,
                       context: grpc.aio.ServicerContext) -> AsyncIterator[pb.GenerateResponse]:
        started = time.perf_counter()
        rt = self._rt()
        spec = to_spec.generate_spec(request, rt.validator)
        stack = rt.stacks.get(spec.stack) if spec.stack else None
        self._count_edits(spec.interventions, spec.steering)
        observe = _Observer(self.metrics, "Generate", stack, started)
        events = rt.engine.stream(lambda: generate_events(rt.host, stack, spec),
                                  deadline=self._deadline(context), method="Generate")
        async with contextlib.aclosing(events):
            async for event in events:
                observe(event)
                yield to_proto.generate_response(event, stack)

    async def Score(self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext):
        rt = self._rt()
        spec = to_spec.score_spec(request, rt.validator)
        stack = rt.stacks.get(spec.stack) if spec.stack else None
        self._count_edits(spec.interventions, spec.steering)
        if self.metrics is not None:
            self.metrics.count_prompt_tokens("Score", len(spec.token_ids))
        result = await rt.engine.call(lambda: score(rt.host, stack, spec), deadline=self._deadline(context),
                                      method="Score")
        return to_proto.score_response(result)

    async def EncodeActivations(self, request_iterator: Any,
                                context: grpc.aio.ServicerContext) -> AsyncIterator[pb.EncodeActivationsResponse]:
        """Batches of captured activations through the torch stack runtime, one engine job per batch."""
        rt = self._rt()

        async def encode(spec: EncodeSpec) -> list[StageCodes]:
            stack = rt.stacks[spec.stack]
            return await rt.engine.call(lambda: encode_batch(stack, spec), deadline=self._deadline(context),
                                        method="EncodeActivations")

        names = {name: stack.stage_names for name, stack in rt.stacks.items()}
        async for response in encode_stream(request_iterator, rt.encode_validator, encode, self.metrics, names):
            yield response

    def _count_edits(self, interventions: Iterable[InterventionSpec], steering: Iterable[SteeringSpec]) -> None:
        if self.metrics is None:
            return
        ops: dict[str, int] = {}
        for intervention in interventions:
            ops[str(intervention.op)] = ops.get(str(intervention.op), 0) + 1
        ops["vector"] = sum(1 for _ in steering)
        self.metrics.count_interventions(ops)


class _Observer:
    """Turns a stream's events into metrics: prompt tokens, time to first token, decode speed, stage stats."""

    def __init__(self, metrics: Metrics | None, method: str, stack: ServedStack | None, started: float) -> None:
        self.metrics, self.method, self.stack, self.started = metrics, method, stack, started
        self.first_at: float | None = None

    def __call__(self, event: object) -> None:
        m = self.metrics
        if m is None:
            return
        if isinstance(event, DecomposeHeader):
            m.count_prompt_tokens(self.method, event.num_tokens)
        elif isinstance(event, GenerateHeader):
            m.count_prompt_tokens(self.method, len(event.prompt))
        elif isinstance(event, DecomposeChunk):
            self._first()
            self._stages(event.tokens)
        elif isinstance(event, TokenEvent):
            self._first()
            if event.features:
                self._stages([event])
        elif isinstance(event, FinishEvent):
            elapsed = time.perf_counter() - (self.first_at or self.started)
            m.observe_generation(event.generated_tokens, elapsed)

    def _first(self) -> None:
        if self.first_at is None:
            self.first_at = time.perf_counter()
            if self.metrics is not None:
                self.metrics.observe_first_token(self.method, self.first_at - self.started)

    def _stages(self, tokens: Iterable[TokenFeatures | TokenEvent]) -> None:
        """One numpy binning call per stage per chunk, never one per token."""
        if self.stack is None or self.metrics is None:
            return
        l0s: dict[int, list[int]] = {}
        errors: dict[int, list[float]] = {}
        for token in tokens:
            for codes in token.features:
                l0s.setdefault(codes.stage, []).append(codes.l0)
                if codes.error_norm is not None:
                    errors.setdefault(codes.stage, []).append(codes.error_norm)
        names = self.stack.stage_names
        for stage, values in l0s.items():
            name = names[stage] if 0 <= stage < len(names) else str(stage)
            self.metrics.observe_stage(self.stack.name, name, values, errors.get(stage))
