"""A scripted in-process Featurewire server for what the real one cannot do on demand: fail N times with
UNAVAILABLE then succeed, break a stream after its first message, answer slowly, refuse EncodeActivations.

It is a plain synchronous grpc server on a thread pool (no model, no event loop), so these tests are fast
and deterministic; every call is recorded with its metadata.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import Any

import grpc
from featurewire.v1 import featurewire_pb2 as pb
from featurewire.v1 import featurewire_pb2_grpc as pb_grpc
from featurewire.v1 import types_pb2 as t


@dataclass
class Script:
    """What the fake does: `failures[method]` UNAVAILABLE answers before succeeding, and the rest."""

    failures: dict[str, int] = field(default_factory=dict)
    break_generate_after_header: bool = False
    delay_s: float = 0.0
    calls: Counter[str] = field(default_factory=Counter)
    metadata: list[dict[str, str]] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)


class FakeServicer(pb_grpc.FeaturewireServicer):
    def __init__(self, script: Script) -> None:
        self.script = script

    def _enter(self, method: str, context: grpc.ServicerContext) -> None:
        s = self.script
        with s.lock:
            s.calls[method] += 1
            s.metadata.append({k: v for k, v in context.invocation_metadata() if isinstance(v, str)})
            failing = s.calls[method] <= s.failures.get(method, 0)
        if failing:
            context.abort(grpc.StatusCode.UNAVAILABLE, f"{method}: still loading (attempt {s.calls[method]})")
        if s.delay_s:
            time.sleep(s.delay_s)

    def GetServerInfo(self, request: Any, context: grpc.ServicerContext) -> pb.GetServerInfoResponse:
        self._enter("GetServerInfo", context)
        return pb.GetServerInfoResponse(instance="fake", versions=pb.Versions(server="fake"))

    def ListStacks(self, request: Any, context: grpc.ServicerContext) -> pb.ListStacksResponse:
        self._enter("ListStacks", context)
        return pb.ListStacksResponse(stacks=[pb.StackInfo(name="fake")])

    def Tokenize(self, request: Any, context: grpc.ServicerContext) -> pb.TokenizeResponse:
        self._enter("Tokenize", context)
        return pb.TokenizeResponse(ids=[1, 2], tokens=["a", "b"])

    def Decompose(self, request: Any, context: grpc.ServicerContext) -> Iterator[pb.DecomposeResponse]:
        self._enter("Decompose", context)
        yield pb.DecomposeResponse(header=pb.DecomposeHeader(stack="fake", num_tokens=1, top_k=1,
                                                             stages=[t.StageRef(index=0, name="s0")]))
        token = pb.TokenFeatures(token=t.Token(position=0, id=5, text="x"),
                                 features=[t.StageCodes(stage=0, ids=[3], values=[1.5], l0=1)])
        yield pb.DecomposeResponse(chunk=pb.DecomposeChunk(tokens=[token]))

    def Generate(self, request: Any, context: grpc.ServicerContext) -> Iterator[pb.GenerateResponse]:
        self._enter("Generate", context)
        yield pb.GenerateResponse(header=pb.GenerateHeader(stack="fake", prompt_tokens=1, branches=[t.BRANCH_STEERED]))
        if self.script.break_generate_after_header:
            context.abort(grpc.StatusCode.UNAVAILABLE, "connection to the replica lost")
        yield pb.GenerateResponse(token=pb.TokenEvent(branch=t.BRANCH_STEERED, position=1, text="y"))
        yield pb.GenerateResponse(finish=pb.FinishEvent(branch=t.BRANCH_STEERED, reason=pb.FINISH_REASON_LENGTH,
                                                        generated_tokens=1, text="y"))
    # EncodeActivations stays the generated base class's: UNIMPLEMENTED at once, without reading a request.


@dataclass
class Fake:
    server: grpc.Server
    script: Script
    target: str

    def stop(self) -> None:
        self.server.stop(0)


def start_fake(script: Script | None = None) -> Fake:
    script = script or Script()
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
    pb_grpc.add_FeaturewireServicer_to_server(FakeServicer(script), server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    return Fake(server, script, f"127.0.0.1:{port}")
