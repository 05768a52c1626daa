"""`make demo`: the service end to end, as an operator and a client would see it.

Starts `featurewire-serve serve` in a subprocess with a stack, waits for readiness over grpc.health.v1,
then, as a client using only the generated stubs: reads the server info, decomposes a prompt (top
features per token and stage, actual vs predicted error norm), finds the feature a concept text activates
most with SearchFeatures, prints its dashboard (GetFeature), steers a generation with it next to the
unsteered DEFAULT branch in the same call, scores a sentence with that stage spliced, prints a few
Prometheus metrics, and shuts the server down with SIGTERM (graceful drain).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections import defaultdict
from pathlib import Path

import grpc
from featurewire.v1 import featurewire_pb2 as pb
from featurewire.v1 import featurewire_pb2_grpc as pb_grpc
from featurewire.v1 import types_pb2 as t
from grpc_health.v1 import health_pb2, health_pb2_grpc

from core.config import ModelConfig

PROMPT = "I think that dogs are"
CONCEPT = "We cooked dinner together: fresh bread, cheese, tomato soup, apples and a chocolate cake."
"""The demo's concept text; the Makefile passes the same text to `featurewire-train steerability --text`."""
STEER_STAGE = -1  # the last stage: output features sit mostly in later layers (Arad, Mueller & Belinkov, 2025)
STEER_MULTIPLE = 2.0  # without a measured strength: SET the feature to this multiple of its held-out max
MAX_DENSITY = 0.02
MEASURED_MATCHES = 12  # SearchFeatures matches whose steerability the demo reads
READY_TIMEOUT_S = 600


def _section(title: str) -> None:
    print(f"\n== {title} " + "=" * max(0, 70 - len(title)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(channel: grpc.Channel, server: subprocess.Popen) -> None:
    health = health_pb2_grpc.HealthStub(channel)
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with code {server.returncode} before it was ready")
        try:
            status = health.Check(health_pb2.HealthCheckRequest(service="readiness"), timeout=2).status
            if status == health_pb2.HealthCheckResponse.SERVING:
                return
        except grpc.RpcError:
            pass
        time.sleep(0.5)
    raise SystemExit(f"the server was not ready within {READY_TIMEOUT_S} s")


def _show_info(stub: pb_grpc.FeaturewireStub) -> pb.GetServerInfoResponse:
    info = stub.GetServerInfo(pb.GetServerInfoRequest(), timeout=30)
    m = info.model
    _section("server")
    print(f"{m.name}: {m.architecture}, {m.num_layers} layers, d_model {m.d_model}, {m.dtype} on {m.device}")
    for stack in info.stacks:
        print(f"stack {stack.name!r} ({stack.digest[:12]}):")
        for s in stack.stages:
            source = f"residual of stage {s.residual_of}" if s.HasField("residual_of") else "plain"
            print(f"  {s.index} {s.name:<26} {s.architecture:<8} d_sae {s.d_sae:<5} {source:<20} "
                  f"FVE {s.metrics.get('fve', float('nan')):.3f}  L0 {s.metrics.get('l0', float('nan')):.1f}")
    return info


def _decompose(stub: pb_grpc.FeaturewireStub, text: str, top_k: int, stages: list[str] | None = None
               ) -> tuple[list[pb.DecomposeHeader | t.Token], list[t.TokenFeatures]]:
    request = pb.DecomposeRequest(input=t.Input(text=text), options=t.DecomposeOptions(
        top_k=top_k, include_error=True, stages=stages or []))
    header, tokens = None, []
    for message in stub.Decompose(request, timeout=120):
        if message.HasField("header"):
            header = message.header
        else:
            tokens.extend(message.chunk.tokens)
    return header, tokens


def _show_decomposition(stub: pb_grpc.FeaturewireStub) -> None:
    header, tokens = _decompose(stub, PROMPT, top_k=3)
    _section(f"Decompose {PROMPT!r}: top 3 features per stage, error norm (actual / predicted)")
    for token in tokens[1:]:  # BOS is not decomposed meaningfully
        cells = []
        for codes in token.features:
            feats = " ".join(f"{i}:{v:+.1f}" for i, v in zip(codes.ids, codes.values, strict=True))
            predicted = f"{codes.predicted_error_norm:.1f}" if codes.HasField("predicted_error_norm") else "n/a"
            cells.append(f"[{_short(header.stages[codes.stage].name)}] {feats} | err {codes.error_norm:.1f}"
                         f"/{predicted}")
        print(f"{token.token.text!r:>10}  " + "   ".join(cells))


def _steerability(stub: pb_grpc.FeaturewireStub, stage: str, feature: int) -> pb.Steerability | None:
    answer = stub.GetFeature(pb.GetFeatureRequest(stage=stage, feature=feature, top_n=1), timeout=60)
    return answer.steerability if answer.HasField("steerability") else None


def _short(stage: str) -> str:
    """blocks.3.hook_resid_post -> 3; a stage named otherwise keeps its name."""
    parts = stage.split(".")
    return parts[1] if len(parts) > 2 and parts[0] == "blocks" else stage


def _pick_feature(stub: pb_grpc.FeaturewireStub, stage: str,
                  concept: str) -> tuple[pb.FeatureMatch, pb.Steerability | None]:
    """SearchFeatures on the concept text at `stage`, then the match whose measured steerability is best: among
    the matches that steer (lift at bounded fluency cost), the one with the largest lift at its best strength;
    without any, the strongest specific match (density at most MAX_DENSITY) and no measured strength."""
    request = pb.SearchFeaturesRequest(text=pb.TextQuery(text=concept, reduction=pb.REDUCTION_MAX), stages=[stage],
                                       page_size=50)
    matches = list(stub.SearchFeatures(request, timeout=120).features)
    _section(f"SearchFeatures {concept!r} at {stage}: strongest matches and their measured steerability")
    measured = []
    for rank, match in enumerate(matches[:MEASURED_MATCHES]):
        record = _steerability(stub, stage, match.feature)
        density = f"{match.density:.4f}" if match.HasField("density") else "n/a"
        verdict = "not measured"
        if record is not None:
            measured.append((rank, match, record))
            verdict = (f"steers: {record.best.op.upper()} {record.best.value:g}x {record.best.unit}, lift "
                       f"{record.best.lift:.2f}, fluency cost {record.best.fluency_cost:+.2f} nats/token"
                       if record.steers else "does not steer at any measured strength")
        print(f"  #{rank + 1:<2} feature {match.feature:<5} max |z| {match.score:6.2f}  density {density}  {verdict}")
    steering = [(rank, m, r) for rank, m, r in measured if r.steers]
    if steering:
        rank, picked, record = max(steering, key=lambda item: item[2].best.lift)
        print(f"picked the match that steers best: feature {picked.feature} (rank {rank + 1})")
        return picked, record
    specific = [m for m in matches if m.HasField("density") and 0 < m.density <= MAX_DENSITY]
    picked = (specific or matches)[0]
    which = f"fires on at most {MAX_DENSITY:.0%} of held-out tokens" if specific else "is strongest (none is specific)"
    print(f"no measured match steers (`featurewire-train steerability --text` measures them); falling back to the "
          f"match that {which}: feature {picked.feature}")
    return picked, None


def _marked(example: pb.DashboardExample) -> str:
    return "".join(f"[[{tok.text}]]" if i == example.index else tok.text for i, tok in enumerate(example.tokens))


def _show_feature(stub: pb_grpc.FeaturewireStub, stage: str, match: pb.FeatureMatch) -> pb.DashboardSide:
    """The feature's dashboard summary; returns the side (sign) the concept text activated."""
    feature = stub.GetFeature(pb.GetFeatureRequest(stage=stage, feature=match.feature, top_n=8), timeout=60)
    sign = match.sign if match.sign != pb.SIGN_UNSPECIFIED else pb.SIGN_POSITIVE
    side = next(s for s in feature.dashboard.sides if s.sign == sign or len(feature.dashboard.sides) == 1)
    _section(f"GetFeature {stage} #{match.feature} ({pb.Sign.Name(sign).removeprefix('SIGN_').lower()} side)")
    print(f"density {side.density:.4f} over {feature.dashboard.tokens:,} held-out tokens, mean {side.mean:.2f}, "
          f"max {side.max:.2f}")
    if side.HasField("label"):
        print("token label: " + ", ".join(f"{tok.text!r} {tok.share:.0%}" for tok in side.label.tokens[:8])
              + f" (F1 {side.label.f1:.2f})")
    print("top examples (firing token in [[ ]]):")
    for example in side.top_examples[:4]:
        print(f"  {example.value:+.2f}  {_marked(example)!r}")
    lens = feature.top_tokens if sign == pb.SIGN_POSITIVE else feature.bottom_tokens
    print("logit lens (tokens it promotes): " + ", ".join(repr(s.text) for s in lens[:8]))
    if feature.dashboard.neighbours:
        nearest = ", ".join(f"#{n.feature} ({n.cosine:.2f})" for n in feature.dashboard.neighbours[:4])
        print(f"nearest features: {nearest}")
    return side


def _top_tokens(side: pb.DashboardSide) -> list[str]:
    """The feature's top dashboard tokens: its label's tokens, else the firing tokens of its top examples."""
    if side.HasField("label"):
        texts = [tok.text for tok in side.label.tokens]
    else:
        texts = [ex.tokens[ex.index].text for ex in side.top_examples if ex.index < len(ex.tokens)]
    return list(dict.fromkeys(t for t in texts if t.strip()))


def _edit(side: pb.DashboardSide, record: pb.Steerability | None) -> tuple[int, float, str]:
    """(op, value, description): the measured best strength, else SET to STEER_MULTIPLE x the held-out max."""
    if record is not None and record.steers:
        op = t.INTERVENTION_OP_ADD if record.best.op == "add" else t.INTERVENTION_OP_SET
        return op, record.best.amount, f"{record.best.op.upper()} {record.best.amount:+.2f} (measured best: " \
            f"{record.best.value:g}x {record.best.unit})"
    value = STEER_MULTIPLE * side.max * (-1 if side.sign == pb.SIGN_NEGATIVE else 1)
    return t.INTERVENTION_OP_SET, value, f"SET to {value:+.2f} ({STEER_MULTIPLE}x its max; no measured strength)"


def _show_steering(stub: pb_grpc.FeaturewireStub, info: pb.GetServerInfoResponse, concept: str) -> None:
    stages = info.stacks[0].stages
    stage = stages[STEER_STAGE if -len(stages) <= STEER_STAGE < len(stages) else -1].name
    match, record = _pick_feature(stub, stage, concept)
    side = _show_feature(stub, stage, match)
    op, value, described = _edit(side, record)
    _section(f"Generate: feature {match.feature} of {stage}, {described}, next to the unsteered DEFAULT branch")
    request = pb.GenerateRequest(
        prompt=t.Input(text=PROMPT), sampling=pb.SamplingParams(max_new_tokens=20, temperature=0.0, seed=0),
        interventions=[t.Intervention(stage=stage, feature=match.feature, op=op, value=value,
                                      positions=t.Positions(scope=t.POSITION_SCOPE_ALL))],
        decompose=t.DecomposeOptions(stages=[stage], top_k=1, include_error=True), with_default=True)
    texts: dict[int, str] = defaultdict(str)
    errors: list[tuple[float, str]] = []
    for message in stub.Generate(request, timeout=600):
        if message.HasField("token"):
            texts[message.token.branch] += message.token.text
            if message.token.branch == t.BRANCH_STEERED and message.token.features:
                codes = message.token.features[0]
                predicted = f"{codes.predicted_error_norm:.2f}" if codes.HasField("predicted_error_norm") else "n/a"
                errors.append((codes.error_norm, predicted))
    print(f"steered: {PROMPT}|{texts[t.BRANCH_STEERED]!r}")
    print(f"default: {PROMPT}|{texts[t.BRANCH_DEFAULT]!r}")
    tokens = _top_tokens(side)
    print("the feature's top dashboard tokens: " + ", ".join(repr(tok) for tok in tokens[:12]))
    for branch, name in ((t.BRANCH_STEERED, "steered"), (t.BRANCH_DEFAULT, "default")):
        text = texts[branch].lower()
        seen = [tok for tok in tokens if tok.strip().lower() in text]
        print(f"top tokens in the {name} continuation: {', '.join(repr(tok) for tok in seen) or 'none'}")
    print("steered tokens' error norm at that stage (actual / predicted): "
          + ", ".join(f"{a:.1f}/{p}" for a, p in errors[:8]) + (" …" if len(errors) > 8 else ""))
    sentence = "The quick brown fox jumps over the lazy dog because it wants to play."
    score = stub.Score(pb.ScoreRequest(input=t.Input(text=sentence), splice_stages=[stage]), timeout=120)
    print(f"Score with {stage} spliced: CE {score.clean_ce:.3f} → {score.edited_ce:.3f} nats/token, "
          f"KL {score.kl:.3f} over {score.scored_tokens} tokens")


def _show_gateway(http_port: int) -> None:
    """One call through the HTTP/JSON gateway, as curl would make it."""
    request = urllib.request.Request(f"http://127.0.0.1:{http_port}/v1/Tokenize", data=b'{"text": "Hello, world"}',
                                     headers={"Content-Type": "application/json"}, method="POST")
    with urllib.request.urlopen(request, timeout=30) as response:
        print(f"POST /v1/Tokenize -> {response.status}: {response.read().decode()[:160]}")


def _show_metrics(metrics_port: int) -> None:
    _section("Prometheus metrics (a few)")
    body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    wanted = ("featurewire_rpcs_total{", "featurewire_generated_tokens_total", "featurewire_interventions_total{",
              "featurewire_time_to_first_token_seconds_count", "featurewire_stack_self_check_passed")
    for line in body.splitlines():
        if line.startswith(wanted) and not line.endswith(" 0.0"):
            print(line)


def _keep_serving(http_port: int) -> None:
    _section("explorer")
    print(f"the server keeps serving: open http://127.0.0.1:{http_port}/ in a browser; Ctrl-C stops it")
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass


def run_demo(stack: str | Path, model: ModelConfig, *, keep_serving: bool = False, concept: str | None = None) -> int:
    concept = concept or CONCEPT
    port, metrics_port, http_port = _free_port(), _free_port(), _free_port()
    command = [sys.executable, "-m", "service", "serve", "--model", model.name, "--stack", str(stack),
               "--host", "127.0.0.1", "--port", str(port), "--metrics-port", str(metrics_port),
               "--http-port", str(http_port)]
    print("$ featurewire-serve " + " ".join(command[3:]))
    started = time.perf_counter()
    server = subprocess.Popen(command, env={**os.environ, "FEATUREWIRE_DEVICE": model.device})
    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
            _wait_ready(channel, server)
            print(f"ready (SERVING) after {time.perf_counter() - started:.1f}s: model loaded, stack self-checked, "
                  "warmed up")
            print(f"HTTP/JSON gateway: http://127.0.0.1:{http_port}/v1/<Method>, e.g.\n  curl -s -X POST "
                  f"http://127.0.0.1:{http_port}/v1/GetServerInfo -d '{{}}'\n"
                  f"explorer: http://127.0.0.1:{http_port}/ (`make explorer` keeps it up after the demo)")
            _show_gateway(http_port)
            stub = pb_grpc.FeaturewireStub(channel)
            info = _show_info(stub)
            _show_decomposition(stub)
            _show_steering(stub, info, concept)
            _show_metrics(metrics_port)
            if keep_serving:
                _keep_serving(http_port)
    finally:
        _section("shutdown")
        server.send_signal(signal.SIGTERM)
        code = server.wait(timeout=120)
        print(f"SIGTERM: drained and exited with code {code}")
    return 0
