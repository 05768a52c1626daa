"""EncodeActivations, shared by both serving modes, and the servicer of the activation-only mode.

The stream: each request is validated (`EncodeValidator`), encoded, and answered with exactly one
response carrying its `sequence`, in request order. A bad request ends the stream with its status code
(INVALID_ARGUMENT, NOT_FOUND, ...); the responses sent before it stand. Why not skip it and go on: a
response stream has no per-message status, so a skipped batch would be indistinguishable from a lost
one; ending the call makes the failure and its message impossible to miss, and the client can resume
from the sequence number it has seen answered.

The activation-only servicer (`serve --no-model`) imports neither torch nor transformers: its stacks are
ONNX Runtime sessions (service/engine/stacks/onnx_runtime.py), run one at a time on one worker thread (a
bounded queue like the engine's: RESOURCE_EXHAUSTED when full). Every RPC that needs the host model
answers UNIMPLEMENTED and says why.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, NoReturn, TypeVar

import grpc
from featurewire.v1 import featurewire_pb2 as pb
from featurewire.v1 import featurewire_pb2_grpc as pb_grpc

from core.errors import DeadlineExceeded, NotReady, Overloaded, Unsupported
from service.config import ServerConfig
from service.convert import info as describe
from service.convert import requests as to_spec
from service.convert import responses as to_proto
from service.engine.contract.encode_spec import EncodeSpec, EncodeValidator
from service.engine.contract.specs import StageCodes
from service.engine.stacks.onnx_runtime import OnnxStack
from service.metrics import Metrics

T = TypeVar("T")
MODE_ACTIVATION_ONLY = "activation_only"
NEEDS_MODEL = ("{rpc} needs the host model, and this server runs without one (activation-only mode, "
               "`serve --no-model`); it serves GetServerInfo, ListStacks and EncodeActivations")


async def encode_stream(requests: AsyncIterator[pb.EncodeActivationsRequest], validator: EncodeValidator,
                        encode: Callable[[EncodeSpec], Awaitable[list[StageCodes]]], metrics: Metrics | None,
                        stage_names: Mapping[str, list[str]]) -> AsyncIterator[pb.EncodeActivationsResponse]:
    """One response per request, in order; the first bad request raises and so ends the stream."""
    async for request in requests:
        spec = to_spec.encode_spec(request, validator)
        rows = await encode(spec)
        if metrics is not None:
            errors = [r.error_norm for r in rows if r.error_norm is not None] if spec.include_error else None
            metrics.observe_stage(spec.stack, stage_names[spec.stack][spec.stage], [r.l0 for r in rows], errors)
        yield to_proto.encode_response(spec.sequence, rows)


class EncodeWorker:
    """One thread that runs every ONNX Runtime call (sessions use all cores each, so one at a time), with a
    bounded queue and deadlines; the asyncio side of it lives on the server's event loop."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="featurewire-onnx")
        self._pending = 0  # submitted and not finished (the running one included)
        self._closed = False

    @property
    def queue_depth(self) -> int:
        return max(0, self._pending - 1)

    async def run(self, fn: Callable[[], T], *, deadline: float | None, method: str) -> T:
        if self._closed:
            raise NotReady("the server is shutting down; retry on another replica")
        if self._pending > self.capacity:
            raise Overloaded(f"the encode queue is full ({self.capacity} requests waiting); retry later")

        def job() -> T:
            if deadline is not None and time.monotonic() >= deadline:
                raise DeadlineExceeded(f"{method}: the deadline passed before the work started")
            return fn()

        future = asyncio.get_running_loop().run_in_executor(self._executor, job)
        self._pending += 1
        future.add_done_callback(self._finished)
        timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
        try:
            return await asyncio.wait_for(asyncio.shield(future), timeout)
        except TimeoutError:
            raise DeadlineExceeded(f"{method}: the deadline passed before the work finished") from None
        finally:
            future.cancel()  # drops it if it has not started (a cancelled call, a deadline); no-op once done

    def _finished(self, _: Any) -> None:
        self._pending -= 1

    def shutdown(self) -> None:
        self._closed = True
        self._executor.shutdown(wait=True, cancel_futures=True)


class ActivationOnlyServicer(pb_grpc.FeaturewireServicer):
    """featurewire.v1.Featurewire without a host model: stacks info and EncodeActivations over ONNX Runtime."""

    def __init__(self, config: ServerConfig, metrics: Metrics | None = None) -> None:
        self.config = config
        self.metrics = metrics
        self.mode = MODE_ACTIVATION_ONLY
        self._stacks: dict[str, OnnxStack] | None = None
        self._worker: EncodeWorker | None = None
        self._validator: EncodeValidator | None = None
        self.backend = ""
        self._draining = False

    def attach(self, stacks: Mapping[str, OnnxStack], worker: EncodeWorker) -> None:
        self._stacks, self._worker = dict(stacks), worker
        self._validator = EncodeValidator({n: s.targets for n, s in stacks.items()}, self.config.limits())
        providers = sorted({s.provider for s in stacks.values()})
        self.backend = "onnxruntime:" + ",".join(providers)

    def drain(self) -> None:
        self._draining = True

    @property
    def ready(self) -> bool:
        return self._stacks is not None and not self._draining

    def _loaded(self) -> tuple[dict[str, OnnxStack], EncodeWorker, EncodeValidator]:
        if self._draining:
            raise NotReady("the server is shutting down; retry on another replica")
        if self._stacks is None or self._worker is None or self._validator is None:
            raise NotReady("the server is starting (loading the stacks' ONNX graphs); retry shortly")
        return self._stacks, self._worker, self._validator

    async def GetServerInfo(self, request: pb.GetServerInfoRequest, context: grpc.aio.ServicerContext):
        stacks, _, _ = self._loaded()
        return describe.server_info(None, list(stacks.values()), self.config, self.mode, encode_backend=self.backend)

    async def ListStacks(self, request: pb.ListStacksRequest, context: grpc.aio.ServicerContext):
        stacks, _, _ = self._loaded()
        return describe.list_stacks_response(list(stacks.values()))

    async def EncodeActivations(self, request_iterator: Any, context: grpc.aio.ServicerContext):
        stacks, worker, validator = self._loaded()
        remaining = context.time_remaining()

        async def encode(spec: EncodeSpec) -> list[StageCodes]:
            left = context.time_remaining() if remaining is not None else self.config.request_timeout_s
            return await worker.run(lambda: stacks[spec.stack].encode(spec), deadline=time.monotonic() + left,
                                    method="EncodeActivations")

        names = {name: stack.stage_names for name, stack in stacks.items()}
        async for response in encode_stream(request_iterator, validator, encode, self.metrics, names):
            yield response

    # -- what needs the host model ---------------------------------------------------------------
    async def GetFeature(self, request: pb.GetFeatureRequest, context: grpc.aio.ServicerContext):
        self._unsupported("GetFeature")

    async def SearchFeatures(self, request: pb.SearchFeaturesRequest, context: grpc.aio.ServicerContext):
        self._unsupported("SearchFeatures")

    async def ListFeatures(self, request: pb.ListFeaturesRequest, context: grpc.aio.ServicerContext):
        self._unsupported("ListFeatures")

    async def Tokenize(self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext):
        self._unsupported("Tokenize")

    async def Score(self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext):
        self._unsupported("Score")

    async def Decompose(self, request: pb.DecomposeRequest, context: grpc.aio.ServicerContext):
        self._unsupported("Decompose")
        yield pb.DecomposeResponse()  # pragma: no cover - makes this an async generator (a streaming handler)

    async def Generate(self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext):
        self._unsupported("Generate")
        yield pb.GenerateResponse()  # pragma: no cover

    def _unsupported(self, rpc: str) -> NoReturn:
        self._loaded()
        raise Unsupported(NEEDS_MODEL.format(rpc=rpc))
