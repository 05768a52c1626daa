"""Every Prometheus metric the service exports, in one class bound to one registry.

Labels are bounded by construction: method names come from a fixed table, codes from
`grpc.StatusCode`, intervention ops from a fixed set, and stack/stage labels only from stacks that
were registered at load time (bounded by configuration). Prompts, tokens and feature ids never
become labels. Per-token stage statistics arrive as arrays and are binned with numpy in one call,
so a 2k-token Decompose costs a few microseconds of metrics work per stage, not one call per token.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any
from wsgiref.simple_server import WSGIServer

import grpc
import numpy as np
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.exposition import start_http_server
from prometheus_client.metrics_core import HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

SERVICE = "featurewire.v1.Featurewire"
FEATUREWIRE_METHODS = (
    "GetServerInfo", "ListStacks", "GetFeature", "Tokenize", "Decompose", "Generate", "Score", "EncodeActivations",
    "SearchFeatures", "ListFeatures",
)
_OTHER_SERVICES = {
    "grpc.health.v1.Health": "Health.",
    "grpc.reflection.v1alpha.ServerReflection": "Reflection.",
    "grpc.reflection.v1.ServerReflection": "Reflection.",
}
METHOD_LABELS = frozenset(
    FEATUREWIRE_METHODS
    + ("Health.Check", "Health.Watch", "Health.List", "Reflection.ServerReflectionInfo", "other")
)
CODES = frozenset(code.name for code in grpc.StatusCode)
GRPC, HTTP, OPENAI = "grpc", "http", "openai"
TRANSPORTS = (GRPC, HTTP, OPENAI)  # the `transport` label: a gRPC client, the HTTP/JSON gateway or the OpenAI API
INTERVENTION_OPS = frozenset({"add", "set", "scale", "clamp", "ablate", "vector", "other"})
OTHER = "other"
PREFILL, DECODE = "prefill", "decode"
PHASES = (PREFILL, DECODE)  # the `phase` label of the batcher's forward steps

# Buckets sized for a model server: sub-millisecond metadata calls up to multi-minute generations.
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0,
                   160.0, 320.0)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
TOKENS_PER_S_BUCKETS = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0, 2000.0, 5000.0, 10000.0)
L0_BUCKETS = (0.0, 1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0, 128.0, 256.0, 512.0, 1024.0, 2048.0, 4096.0, 8192.0)
ERROR_NORM_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 1000.0)
# Rows per forward step: 1 is an unbatched step; the top buckets cover max_batch_size well past its default 16.
STEP_ROWS_BUCKETS = (1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0, 24.0, 32.0, 48.0, 64.0, 128.0)
# One forward step: a sub-millisecond decode on a GPU up to a long prompt's prefill on a CPU.
STEP_SECONDS_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
# Waiting for the worker: one cycle (milliseconds) up to the request timeout (300 s by default).
QUEUE_WAIT_BUCKETS = (0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0, 160.0,
                      320.0)


def method_label(method: str) -> str:
    """Map `/pkg.Service/Method` (or an already-short label) onto the fixed label set."""
    if method in METHOD_LABELS:
        return method
    service, _, name = method.lstrip("/").rpartition("/")
    if service == SERVICE and name in FEATUREWIRE_METHODS:
        return name
    prefix = _OTHER_SERVICES.get(service)
    if prefix is not None and prefix + name in METHOD_LABELS:
        return prefix + name
    return OTHER


def code_label(code: grpc.StatusCode | str | None) -> str:
    """`grpc.StatusCode` (or its name) → its name; None (nothing set) means OK."""
    if code is None:
        return "OK"
    name = code.name if isinstance(code, grpc.StatusCode) else str(code).upper()
    return name if name in CODES else "UNKNOWN"


class _StageHistograms(Collector):
    """A collector of per-(stack, stage) histograms that bins whole arrays at once.

    prometheus_client's Histogram observes one value per call; per-token statistics arrive in
    thousands, so this keeps numpy bucket counts under a lock and exposes them at scrape time.
    """

    def __init__(self, name: str, documentation: str, buckets: tuple[float, ...]) -> None:
        self.name, self.documentation = name, documentation
        self.bounds = np.asarray(buckets, dtype=np.float64)
        self._counts: dict[tuple[str, str], np.ndarray] = {}
        self._sums: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()

    def observe(self, key: tuple[str, str], values: Any) -> None:
        array = np.asarray(values, dtype=np.float64).ravel()
        array = array[np.isfinite(array)]
        if array.size == 0:
            return
        counts = np.bincount(np.searchsorted(self.bounds, array, side="left"), minlength=self.bounds.size + 1)
        total = float(array.sum())
        with self._lock:
            if key not in self._counts:
                self._counts[key] = np.zeros(self.bounds.size + 1, dtype=np.int64)
                self._sums[key] = 0.0
            self._counts[key] += counts
            self._sums[key] += total

    def describe(self) -> Iterator[Metric]:
        yield HistogramMetricFamily(self.name, self.documentation, labels=("stack", "stage"))

    def collect(self) -> Iterator[Metric]:
        family = HistogramMetricFamily(self.name, self.documentation, labels=("stack", "stage"))
        with self._lock:
            snapshot = [(key, counts.cumsum(), self._sums[key]) for key, counts in self._counts.items()]
        for (stack, stage), cumulative, total in sorted(snapshot, key=lambda item: item[0]):
            buckets = [(_le(bound), float(count)) for bound, count in zip(self.bounds, cumulative[:-1], strict=True)]
            buckets.append(("+Inf", float(cumulative[-1])))
            family.add_metric([stack, stage], buckets, total)
        yield family


def _le(bound: float) -> str:
    return repr(float(bound))


class Metrics:
    """Every featurewire metric, registered on `registry` (a fresh one per server and per test)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        r = registry
        self.rpcs = Counter("featurewire_rpcs", "Finished RPCs by method, gRPC status code and transport (grpc, "
                            "http for calls made by the HTTP/JSON gateway, openai for the OpenAI-compatible API).",
                            ("method", "code", "transport"), registry=r)
        self.rpc_duration = Histogram("featurewire_rpc_duration_seconds", "RPC wall time until the status is sent, "
                                      "by method and transport.", ("method", "transport"), buckets=LATENCY_BUCKETS,
                                      registry=r)
        self.in_flight = Gauge("featurewire_in_flight_requests", "RPCs currently being handled.", ("method",),
                               registry=r)
        self.time_to_first_token = Histogram(
            "featurewire_time_to_first_token_seconds", "From request arrival to the first streamed token or chunk.",
            ("method",), buckets=TTFT_BUCKETS, registry=r)
        self.prompt_tokens = Counter("featurewire_prompt_tokens", "Prompt or input tokens processed.", ("method",),
                                     registry=r)
        self.generated_tokens = Counter("featurewire_generated_tokens", "Tokens generated by Generate.", registry=r)
        self.generation_speed = Histogram(
            "featurewire_generation_tokens_per_second", "Decode speed of each finished generation (tokens/s).",
            buckets=TOKENS_PER_S_BUCKETS, registry=r)
        self.queue_depth = Gauge("featurewire_queue_depth", "Requests waiting for the engine worker.", registry=r)
        self.queue_wait = Histogram(
            "featurewire_queue_wait_seconds", "From a job's submission to the engine until the worker first works on "
            "it (waiting in the queue for a batch slot, then for its turn in the cycle).", ("method",),
            buckets=QUEUE_WAIT_BUCKETS, registry=r)
        self.step_rows = Histogram("featurewire_step_rows", "Rows (sequences) in each batched forward step, by phase.",
                                   ("phase",), buckets=STEP_ROWS_BUCKETS, registry=r)
        self.step_duration = Histogram(
            "featurewire_step_duration_seconds", "Time of each batched forward step, by phase (on CUDA the GPU's "
            "time from the step's start to its end, read from events).", ("phase",), buckets=STEP_SECONDS_BUCKETS,
            registry=r)
        # Children bound once: the worker observes every step, and both phases are exported from the start.
        self._step_rows = {phase: self.step_rows.labels(phase) for phase in PHASES}
        self._step_duration = {phase: self.step_duration.labels(phase) for phase in PHASES}
        self.queue_capacity = Gauge("featurewire_queue_capacity", "Engine queue size beyond which requests are "
                                    "refused with RESOURCE_EXHAUSTED.", registry=r)
        self.interventions = Counter("featurewire_interventions", "Interventions applied, by operation.", ("op",),
                                     registry=r)
        self.model_load = Gauge("featurewire_model_load_seconds", "Time the host model took to load.", registry=r)
        self.stack_load = Gauge("featurewire_stack_load_seconds", "Time each stack took to load and verify.",
                                ("stack",), registry=r)
        self.self_check_passed = Gauge("featurewire_stack_self_check_passed",
                                       "1 when the stack's self-check matched its recorded FVE and L0, else 0.",
                                       ("stack",), registry=r)
        self.self_check_fve = Gauge("featurewire_stack_self_check_fve", "FVE measured by the self-check per stage.",
                                    ("stack", "stage"), registry=r)
        self.build = Info("featurewire_build", "Version, host model, device and dtype of this server.", registry=r)
        self.stage_l0 = _StageHistograms("featurewire_stage_l0", "Active features per token per stage.", L0_BUCKETS)
        self.stage_error_norm = _StageHistograms(
            "featurewire_stage_error_norm", "SAE reconstruction error norm |x - x_hat| per token per stage.",
            ERROR_NORM_BUCKETS)
        r.register(self.stage_l0)
        r.register(self.stage_error_norm)
        self._stages: set[tuple[str, str]] = set()

    # -- RPCs ---------------------------------------------------------------------------------------
    def observe_rpc(self, method: str, code: grpc.StatusCode | str | None, seconds: float,
                    transport: str = GRPC) -> None:
        """Count one finished RPC and its latency; unknown methods fold into `other`, unknown transports into grpc."""
        label, via = method_label(method), transport if transport in TRANSPORTS else GRPC
        self.rpcs.labels(label, code_label(code), via).inc()
        self.rpc_duration.labels(label, via).observe(max(0.0, seconds))

    def track_in_flight(self, method: str, delta: int) -> None:
        self.in_flight.labels(method_label(method)).inc(delta)

    def observe_first_token(self, method: str, seconds: float) -> None:
        self.time_to_first_token.labels(method_label(method)).observe(max(0.0, seconds))

    def count_prompt_tokens(self, method: str, n: int) -> None:
        if n > 0:
            self.prompt_tokens.labels(method_label(method)).inc(n)

    def observe_generation(self, tokens: int, seconds: float) -> None:
        """One finished generation: its token count and decode speed."""
        if tokens <= 0:
            return
        self.generated_tokens.inc(tokens)
        if seconds > 0:
            self.generation_speed.observe(tokens / seconds)

    # -- engine -------------------------------------------------------------------------------------
    def set_queue(self, depth: int, capacity: int | None = None) -> None:
        self.queue_depth.set(depth)
        if capacity is not None:
            self.queue_capacity.set(capacity)

    def queue_depth_from(self, depth: Callable[[], float], capacity: int) -> None:
        """Read the depth from the scheduler at scrape time, so the gauge is never stale."""
        self.queue_depth.set_function(depth)
        self.queue_capacity.set(capacity)

    def observe_queue_wait(self, method: str, seconds: float) -> None:
        """How long a job waited between its submission and the worker's first work on it."""
        self.queue_wait.labels(method_label(method)).observe(max(0.0, seconds))

    def observe_step_rows(self, phase: str, rows: int) -> None:
        """The rows of one batched forward step (`prefill` or `decode`)."""
        self._step_rows[phase].observe(rows)

    def observe_step_seconds(self, phase: str, seconds: float) -> None:
        """The time of one batched forward step; apart from its rows because on CUDA it is read later."""
        self._step_duration[phase].observe(max(0.0, seconds))

    def count_interventions(self, ops: Iterable[str] | Mapping[str, int]) -> None:
        """Count interventions by op name (`add`, `set`, `scale`, `clamp`, `ablate`, `vector`)."""
        items = ops.items() if isinstance(ops, Mapping) else ((op, 1) for op in ops)
        for op, n in items:
            name = str(op).lower()
            if n > 0:
                self.interventions.labels(name if name in INTERVENTION_OPS else OTHER).inc(n)

    # -- stacks -------------------------------------------------------------------------------------
    def register_stack(self, stack: str, stages: Iterable[str], load_seconds: float | None = None) -> None:
        """Admit a loaded stack's stage names as label values; other names are reported as `other`."""
        self._stages.update((stack, stage) for stage in stages)
        if load_seconds is not None:
            self.stack_load.labels(stack).set(load_seconds)

    def record_self_check(self, stack: str, passed: bool, fve_by_stage: Mapping[str, float] | None = None) -> None:
        self.self_check_passed.labels(stack).set(1.0 if passed else 0.0)
        for stage, fve in (fve_by_stage or {}).items():
            self.self_check_fve.labels(*self._stage_key(stack, stage)).set(fve)

    def observe_stage(self, stack: str, stage: str, l0_values: Any, error_norms: Any = None) -> None:
        """Bin per-token L0 and error norms (lists, numpy arrays or CPU tensors) for one stage."""
        key = self._stage_key(stack, stage)
        self.stage_l0.observe(key, l0_values)
        if error_norms is not None:
            self.stage_error_norm.observe(key, error_norms)

    def _stage_key(self, stack: str, stage: str) -> tuple[str, str]:
        return (stack, stage) if (stack, stage) in self._stages else (OTHER, OTHER)

    # -- process ------------------------------------------------------------------------------------
    def set_model_load_time(self, seconds: float) -> None:
        self.model_load.set(seconds)

    def set_build_info(self, version: str, model: str, device: str, dtype: str = "") -> None:
        self.build.info({"version": version, "model": model, "device": device, "dtype": dtype})

    def exposition(self) -> bytes:
        """The text format a scrape would return (for the demo and tests)."""
        return generate_latest(self.registry)


def start_metrics_server(
    port: int, registry: CollectorRegistry, addr: str = "0.0.0.0"
) -> tuple[WSGIServer, threading.Thread]:
    """Serve `/metrics` on a daemon thread; returns (server, thread). Stop with `server.shutdown()`.

    Port 0 picks a free port: read it back from `server.server_port`.
    """
    return start_http_server(port, addr=addr, registry=registry)
