"""Property-based fuzzing of every request message of every RPC against a live in-process server.

Each property draws requests that mix plausible values (real stage names, feature ids in range, known
enums) with hostile ones (uint32/uint64 extremes, NaN and inf, unknown enum numbers, missing messages, huge
lists, text with NULs and odd code points), plus raw bytes that are not a valid message at all (bad UTF-8
in string fields, corrupt wire format). Whatever it sends, the server must answer with a status a client
can act on (never INTERNAL, UNKNOWN, UNAVAILABLE or a hang), a successful stream must be well formed, health
stays SERVING and the process's memory stays bounded. The number of requests tried is reported at the end
of the session (conftest.py); FEATUREWIRE_FUZZ_EXAMPLES sets the examples per property.
"""

from __future__ import annotations

import grpc
import pytest
from featurewire.v1 import featurewire_pb2 as pb
from featurewire.v1 import types_pb2 as t
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.reliability.conftest import FUZZ_EXAMPLES, FUZZ_LIMITS, TRIED, ServedProcess, World

SERVICE = "/featurewire.v1.Featurewire/"
FORBIDDEN = {grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN, grpc.StatusCode.UNAVAILABLE,
             grpc.StatusCode.UNIMPLEMENTED, grpc.StatusCode.DATA_LOSS, grpc.StatusCode.DEADLINE_EXCEEDED}
TIMEOUT_S = 60.0
RSS_GROWTH_BOUND = 256 << 20  # the server process alone, from after its first requests to after every property
FUZZ = settings(max_examples=FUZZ_EXAMPLES, deadline=None, database=None, derandomize=False,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                       HealthCheck.function_scoped_fixture])

U32 = st.one_of(st.integers(0, 16), st.integers(0, 2**32 - 1), st.sampled_from([2**31 - 1, 2**31, 2**32 - 1]))
U64 = st.one_of(st.integers(0, 2**64 - 1), st.sampled_from([0, 2**63, 2**64 - 1]))
F32 = st.one_of(st.floats(width=32), st.sampled_from([float("nan"), float("inf"), -float("inf"), 3.4e38, -0.0]))
ODD_TEXT = ["", " ", "\x00", "\x00" * 64, "\ufffd", "<bos>", "<eos><pad>", "a" * 5000, "\U0001f4a5" * 200,
            "\u202e\u200b\ufeff", "x" * 3073, "\n\t\r" * 40]
TEXT = st.one_of(st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=80), st.sampled_from(ODD_TEXT))


def enum_numbers(wrapper: type) -> st.SearchStrategy[int]:
    """Known values of a proto enum, or any int32 (unknown numbers survive the wire in proto3)."""
    return st.one_of(st.sampled_from(list(wrapper.values())), st.integers(-(2**31), 2**31 - 1))


def big_list(n: int) -> list[int]:
    return [1] * n


# ------------------------------------------------------------------------------------------- strategies
# Every composite takes `sane`: True draws values a careful client would send (so that requests reach the
# engine: decode steps, interventions, conditions, splices), False mixes in everything hostile.

SANE_F32 = st.floats(-8, 8, width=32)
SANE_TEXT = st.text(alphabet=st.characters(codec="ascii", categories=("L", "N", "Zs", "P")), min_size=1, max_size=60)


def f32(sane: bool) -> st.SearchStrategy[float]:
    return SANE_F32 if sane else st.one_of(SANE_F32, F32)


def known(wrapper: type, sane: bool) -> st.SearchStrategy[int]:
    values = [v for v in wrapper.values() if v]
    return st.sampled_from(values) if sane else enum_numbers(wrapper)


def names(w: World, sane: bool = False) -> st.SearchStrategy[str]:
    return st.sampled_from(w.stages) if sane else st.one_of(st.sampled_from(w.stages), TEXT)


def features(w: World, sane: bool = False) -> st.SearchStrategy[int]:
    in_range = st.integers(0, min(w.d_sae) - 1)
    return in_range if sane else st.one_of(in_range, U32)


@st.composite
def inputs(draw: st.DrawFn, w: World, sane: bool) -> t.Input | None:
    kinds = ["text", "ids"] if sane else ["none", "empty", "text", "ids", "huge"]
    kind = draw(st.sampled_from(kinds))
    if kind == "none":
        return None
    msg = t.Input()
    if kind == "text":
        msg.text = draw(SANE_TEXT if sane else TEXT)
    elif kind == "ids":
        token = st.integers(0, w.vocab - 1) if sane else st.one_of(st.integers(0, w.vocab - 1), U32)
        msg.token_ids.ids.extend(draw(st.lists(token, min_size=2 if sane else 0, max_size=40 if sane else 64)))
    elif kind == "huge":  # 300k ids are > 1 MiB on the wire: over the message limit
        msg.token_ids.ids.extend(big_list(draw(st.sampled_from([49, 2_000, 100_000, 300_000]))))
    if draw(st.booleans()):
        msg.add_special_tokens = draw(st.booleans())
    return msg


@st.composite
def positions(draw: st.DrawFn, sane: bool) -> t.Positions | None:
    if draw(st.booleans()):
        return None
    if sane:
        scope = draw(st.sampled_from([t.POSITION_SCOPE_PROMPT, t.POSITION_SCOPE_GENERATED, t.POSITION_SCOPE_ALL,
                                      t.POSITION_SCOPE_RANGE]))
        if scope != t.POSITION_SCOPE_RANGE:
            return t.Positions(scope=scope)
        start = draw(st.integers(0, 40))
        return t.Positions(scope=scope, start=start, end=draw(st.one_of(st.just(0), st.integers(start + 1, 60))))
    return t.Positions(scope=draw(enum_numbers(t.PositionScope)), start=draw(U32), end=draw(U32))


@st.composite
def interventions(draw: st.DrawFn, w: World, condition_ids: list[str], sane: bool) -> t.Intervention:
    ref = st.sampled_from(["", *condition_ids]) if sane else st.one_of(st.sampled_from(["", *condition_ids]), TEXT)
    lo, hi = sorted([draw(f32(sane)), draw(f32(sane))]) if sane else (draw(F32), draw(F32))
    msg = t.Intervention(stage=draw(names(w, sane)), feature=draw(features(w, sane)),
                         op=draw(known(t.InterventionOp, sane)), value=draw(f32(sane)), lo=lo, hi=hi,
                         condition_id=draw(ref))
    if (p := draw(positions(sane))) is not None:
        msg.positions.CopyFrom(p)
    return msg


@st.composite
def steering_vectors(draw: st.DrawFn, w: World, sane: bool) -> t.SteeringVector:
    name, d = draw(st.sampled_from(w.hookpoints))
    hookpoint = name if sane else draw(st.one_of(st.just(name), TEXT))
    width = d if sane else draw(st.sampled_from([d, d, 0, d + 1, 100_000]))
    if width > d + 1 or draw(st.booleans()):
        values = [draw(f32(sane))] * width
    else:
        values = draw(st.lists(f32(sane), min_size=width, max_size=width))
    msg = t.SteeringVector(hookpoint=hookpoint, values=values,
                           condition_id="" if sane else draw(st.sampled_from(["", "c0", "?"])))
    if draw(st.booleans()):
        msg.scale = draw(f32(sane))
    if (p := draw(positions(sane))) is not None:
        msg.positions.CopyFrom(p)
    return msg


@st.composite
def conditions(draw: st.DrawFn, w: World, sane: bool, index: int) -> t.Condition:
    ident = f"c{index}" if sane else draw(st.one_of(st.sampled_from(["c0", "c1", "c0"]), TEXT))
    msg = t.Condition(id=ident, stage=draw(names(w, sane)), feature=draw(features(w, sane)),
                      comparison=draw(known(t.Comparison, sane)), threshold=draw(f32(sane)),
                      action=draw(known(t.ConditionAction, sane)))
    if (p := draw(positions(sane))) is not None:
        msg.positions.CopyFrom(p)
    return msg


@st.composite
def decompose_options(draw: st.DrawFn, w: World, sane: bool) -> t.DecomposeOptions:
    if sane:
        stages = draw(st.lists(st.sampled_from(w.stages), unique=True, max_size=len(w.stages)))
        filtered = st.sampled_from(stages or list(w.stages))
        filters = draw(st.lists(st.builds(lambda stage, ids: t.FeatureFilter(stage=stage, ids=ids), filtered,
                                          st.lists(features(w, True), max_size=8)), max_size=1))
        return t.DecomposeOptions(stages=stages, top_k=draw(st.integers(0, 32)), include_error=draw(st.booleans()),
                                  feature_filter=filters)
    filters = draw(st.lists(st.builds(lambda stage, ids: t.FeatureFilter(stage=stage, ids=ids), names(w),
                                      st.lists(features(w), max_size=40)), max_size=3))
    return t.DecomposeOptions(stages=draw(st.lists(names(w), max_size=4)), top_k=draw(U32),
                              include_error=draw(st.booleans()), feature_filter=filters)


def stacks(w: World, sane: bool) -> st.SearchStrategy[str]:
    return st.sampled_from(["", w.stack]) if sane else st.one_of(st.just(""), st.just(w.stack), TEXT)


@st.composite
def decompose_requests(draw: st.DrawFn, w: World) -> pb.DecomposeRequest:
    sane = draw(st.booleans())
    msg = pb.DecomposeRequest(stack=draw(stacks(w, sane)),
                              chunk_tokens=draw(st.integers(0, 8) if sane else U32))
    if (i := draw(inputs(w, sane))) is not None:
        msg.input.CopyFrom(i)
    if draw(st.booleans()):
        msg.options.CopyFrom(draw(decompose_options(w, sane)))
    return msg


@st.composite
def sampling(draw: st.DrawFn, sane: bool) -> pb.SamplingParams:
    if sane:
        msg = pb.SamplingParams(max_new_tokens=draw(st.integers(0, 6)), temperature=draw(st.floats(0, 2, width=32)),
                                top_p=draw(st.floats(0, 1, width=32)), top_k=draw(st.integers(0, 50)),
                                stop=draw(st.lists(SANE_TEXT, max_size=3)), ignore_eos=draw(st.booleans()))
    else:
        msg = pb.SamplingParams(max_new_tokens=draw(st.one_of(st.integers(0, 8), U32)), temperature=draw(F32),
                                top_p=draw(F32), top_k=draw(U32), stop=draw(st.lists(TEXT, max_size=20)),
                                ignore_eos=draw(st.booleans()))
    if draw(st.booleans()):
        msg.seed = draw(U64)
    return msg


@st.composite
def generate_requests(draw: st.DrawFn, w: World) -> pb.GenerateRequest:
    sane = draw(st.booleans())
    conds = [draw(conditions(w, sane, i)) for i in range(draw(st.integers(0, 3)))]
    enabling = [c.id for c in conds if c.action == t.CONDITION_ACTION_ENABLE_INTERVENTIONS]
    msg = pb.GenerateRequest(
        stack=draw(stacks(w, sane)),
        interventions=draw(st.lists(interventions(w, enabling, sane), max_size=4 if sane else 8)),
        steering_vectors=draw(st.lists(steering_vectors(w, sane), max_size=2)), conditions=conds,
        with_default=draw(st.booleans()))
    if (i := draw(inputs(w, sane))) is not None:
        msg.prompt.CopyFrom(i)
    if draw(st.booleans()):
        msg.sampling.CopyFrom(draw(sampling(sane)))
    if draw(st.booleans()):
        msg.decompose.CopyFrom(draw(decompose_options(w, sane)))
    return msg


@st.composite
def score_requests(draw: st.DrawFn, w: World) -> pb.ScoreRequest:
    sane = draw(st.booleans())
    splice = st.lists(st.sampled_from(w.stages), unique=True, max_size=2) if sane else st.lists(names(w), max_size=3)
    msg = pb.ScoreRequest(stack=draw(stacks(w, sane)),
                          interventions=draw(st.lists(interventions(w, [], sane), max_size=4 if sane else 8)),
                          steering_vectors=draw(st.lists(steering_vectors(w, sane), max_size=2)),
                          splice_stages=draw(splice))
    if sane:  # Score has no generated tokens
        for x in msg.interventions:
            if x.positions.scope == t.POSITION_SCOPE_GENERATED:
                x.ClearField("positions")
        for v in msg.steering_vectors:
            if v.positions.scope == t.POSITION_SCOPE_GENERATED:
                v.ClearField("positions")
    if (i := draw(inputs(w, sane))) is not None:
        msg.input.CopyFrom(i)
    return msg


@st.composite
def feature_requests(draw: st.DrawFn, w: World) -> pb.GetFeatureRequest:
    sane = draw(st.booleans())
    return pb.GetFeatureRequest(stack=draw(stacks(w, sane)), stage=draw(names(w, sane)),
                                feature=draw(features(w, sane)), top_n=draw(st.one_of(st.integers(0, 120), U32)))


PAGE_TOKENS = ["", "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", "not a token", "\x00", "=" * 64, "A" * 5000]


def page_fields(draw: st.DrawFn, sane: bool) -> dict:
    if sane:
        return {"page_size": draw(st.integers(0, 30)), "page_token": ""}
    return {"page_size": draw(st.one_of(st.integers(0, 250), U32)),
            "page_token": draw(st.one_of(st.sampled_from(PAGE_TOKENS), TEXT))}


@st.composite
def search_requests(draw: st.DrawFn, w: World) -> pb.SearchFeaturesRequest:
    sane = draw(st.booleans())
    stages = st.lists(st.sampled_from(w.stages), unique=True, max_size=2) if sane else st.lists(names(w), max_size=3)
    msg = pb.SearchFeaturesRequest(stack=draw(stacks(w, sane)), stages=draw(stages), **page_fields(draw, sane))
    kind = draw(st.sampled_from(["text", "token", "explanation"] + ([] if sane else ["none"])))
    if kind == "text":
        text = draw(SANE_TEXT if sane else TEXT)
        query = pb.TextQuery(text=text, reduction=draw(known(pb.Reduction, sane)))
        if draw(st.booleans()):
            if sane and len(text) > 1:
                start = draw(st.integers(0, len(text) - 1))
                query.span.CopyFrom(pb.Span(start=start, end=draw(st.integers(start + 1, len(text)))))
            elif not sane:
                query.span.CopyFrom(pb.Span(start=draw(U32), end=draw(U32)))
        if draw(st.booleans()):
            query.add_special_tokens = draw(st.booleans())
        msg.text.CopyFrom(query)
    elif kind == "token":
        query = pb.TokenQuery(direction=draw(known(pb.TokenDirection, sane)))
        if draw(st.booleans()):
            query.id = draw(st.integers(0, w.vocab - 1) if sane else st.one_of(st.integers(0, w.vocab - 1), U32))
        elif sane or draw(st.booleans()):
            query.text = draw(st.sampled_from([" the", "the", "a", ".", " "]) if sane else TEXT)
        msg.token.CopyFrom(query)
    elif kind == "explanation":
        msg.explanation = draw(st.sampled_from(["cats", "the Dogs", "word"]) if sane else TEXT)
    return msg


@st.composite
def list_requests(draw: st.DrawFn, w: World) -> pb.ListFeaturesRequest:
    sane = draw(st.booleans())
    msg = pb.ListFeaturesRequest(stack=draw(stacks(w, sane)), stage=draw(names(w, sane)),
                                 sort=draw(known(pb.FeatureSort, sane)), descending=draw(st.booleans()),
                                 **page_fields(draw, sane))
    density = st.floats(0, 1) if sane else st.one_of(st.floats(0, 1), st.floats(), st.just(float("nan")))
    low, high = sorted([draw(density), draw(density)]) if sane else (draw(density), draw(density))
    if draw(st.booleans()):
        msg.min_density = low
    if draw(st.booleans()):
        msg.max_density = high
    return msg


@st.composite
def tokenize_requests(draw: st.DrawFn) -> pb.TokenizeRequest:
    msg = pb.TokenizeRequest(text=draw(st.one_of(TEXT, st.sampled_from(["y" * 3072, "z" * 3073, "w" * 500_000]))))
    if draw(st.booleans()):
        msg.add_special_tokens = draw(st.booleans())
    return msg


@st.composite
def matrices(draw: st.DrawFn, cols: int, sane: bool, rows: int | None = None) -> t.Matrix:
    if sane:
        n = rows or draw(st.integers(1, 4))
        return t.Matrix(rows=n, cols=cols, values=draw(st.lists(SANE_F32, min_size=n * cols, max_size=n * cols)))
    rows = draw(st.one_of(st.integers(0, 4), U32))
    width = draw(st.one_of(st.just(cols), U32))
    msg = t.Matrix(rows=rows, cols=width, dtype=draw(enum_numbers(t.DType)))
    kind = draw(st.sampled_from(["values", "raw", "both", "none"]))
    count = rows * width if rows * width <= 4 * cols + 1 else draw(st.integers(0, 64))
    if kind in ("values", "both"):
        msg.values.extend(draw(st.lists(F32, min_size=count, max_size=count)) if draw(st.booleans())
                          else [draw(F32)] * count)
    if kind in ("raw", "both"):
        size = draw(st.sampled_from([4, 2, 3]))
        msg.raw = draw(st.one_of(st.binary(min_size=count * size, max_size=count * size), st.binary(max_size=64)))
    return msg


@st.composite
def encode_requests(draw: st.DrawFn, w: World) -> list[pb.EncodeActivationsRequest]:
    out = []
    for sequence in range(draw(st.integers(0, 3))):
        sane = draw(st.booleans())
        index = draw(st.integers(0, len(w.stages) - 1))
        msg = pb.EncodeActivationsRequest(
            sequence=sequence if sane else draw(st.one_of(st.just(sequence), U64)), stack=draw(stacks(w, sane)),
            stage=w.stages[index] if sane else draw(st.one_of(st.just(w.stages[index]), names(w))),
            top_k=draw(st.integers(0, 32) if sane else U32), include_error=draw(st.booleans()))
        if not sane or draw(st.integers(0, 4)):
            msg.activations.CopyFrom(draw(matrices(w.d_in[index], sane)))
        if draw(st.booleans()):
            msg.previous.CopyFrom(draw(matrices(w.d_in[0], sane, msg.activations.rows or None)))
        out.append(msg)
    return out


# ------------------------------------------------------------------------------------------------ checks


def outcome(rpc: str, call) -> tuple[grpc.StatusCode, list]:
    """Run one call, count it, and return (code, responses); a forbidden code fails with its details."""
    try:
        result = call()
        responses = list(result) if not hasattr(result, "ListFields") else [result]
        code = grpc.StatusCode.OK
    except grpc.RpcError as exc:
        code, responses = exc.code(), []
        TRIED[rpc, code.name] += 1
        assert code not in FORBIDDEN, f"{rpc}: {code.name}: {exc.details()}"
        assert exc.details(), f"{rpc}: {code.name} without a message"
        return code, responses
    TRIED[rpc, code.name] += 1
    return code, responses


def check_decompose(responses: list[pb.DecomposeResponse]) -> None:
    assert responses[0].HasField("header")
    header = responses[0].header
    positions_seen = [tf.token.position for r in responses[1:] for tf in r.chunk.tokens]
    assert positions_seen == list(range(header.num_tokens))
    d_sae = {stage.index: stage.d_sae for stage in header.stages}
    for r in responses[1:]:
        for tf in r.chunk.tokens:
            assert [codes.stage for codes in tf.features] == sorted(d_sae)
            for codes in tf.features:
                assert len(codes.ids) == len(codes.values) and all(i < d_sae[codes.stage] for i in codes.ids)


def check_generate(responses: list[pb.GenerateResponse]) -> None:
    assert responses[0].HasField("header")
    branches = list(responses[0].header.branches)
    finished = [r.finish.branch for r in responses if r.HasField("finish")]
    assert sorted(finished) == sorted(branches)


@pytest.fixture(scope="module", autouse=True)
def keeps_serving_with_bounded_memory(fuzz_server: ServedProcess):
    """Around every property of this module: health stays SERVING and the server's RSS grows by less than the bound
    (measured on the server process, after a first real request has warmed it up)."""
    fuzz_server.stub.Score(pb.ScoreRequest(input=t.Input(text="warm up")), timeout=TIMEOUT_S)
    before = fuzz_server.rss()
    assert before > 0
    yield
    assert fuzz_server.health() == "SERVING"
    assert fuzz_server.health("readiness") == fuzz_server.health("liveness") == "SERVING"
    growth = fuzz_server.rss() - before
    print(f"fuzz server RSS: {before >> 20} MiB before, {fuzz_server.rss() >> 20} MiB after "
          f"({sum(TRIED.values())} requests)")
    assert growth < RSS_GROWTH_BOUND, f"the server's RSS grew by {growth >> 20} MiB while fuzzing"
    # still answers real work after everything above
    ok = fuzz_server.stub.Score(pb.ScoreRequest(input=t.Input(text="still serving")), timeout=TIMEOUT_S)
    assert ok.num_tokens >= 2


# ------------------------------------------------------------------------------------------- properties


@FUZZ
@given(data=st.data())
def test_decompose(fuzz_server: ServedProcess, world: World, data: st.DataObject) -> None:
    request = data.draw(decompose_requests(world))
    code, responses = outcome("Decompose", lambda: fuzz_server.stub.Decompose(request, timeout=TIMEOUT_S))
    if code == grpc.StatusCode.OK:
        check_decompose(responses)


@FUZZ
@given(data=st.data())
def test_generate(fuzz_server: ServedProcess, world: World, data: st.DataObject) -> None:
    request = data.draw(generate_requests(world))
    code, responses = outcome("Generate", lambda: fuzz_server.stub.Generate(request, timeout=TIMEOUT_S))
    if code == grpc.StatusCode.OK:
        check_generate(responses)
        assert all(r.token.index < FUZZ_LIMITS["max_new_tokens"] for r in responses if r.HasField("token"))


@FUZZ
@given(data=st.data())
def test_score(fuzz_server: ServedProcess, world: World, data: st.DataObject) -> None:
    request = data.draw(score_requests(world))
    code, responses = outcome("Score", lambda: fuzz_server.stub.Score(request, timeout=TIMEOUT_S))
    if code == grpc.StatusCode.OK:
        score = responses[0]
        assert score.scored_tokens == score.num_tokens - 1 and score.kl >= 0


@FUZZ
@given(data=st.data())
def test_get_feature_and_tokenize(fuzz_server: ServedProcess, world: World, data: st.DataObject) -> None:
    feature = data.draw(feature_requests(world))
    code, responses = outcome("GetFeature", lambda: fuzz_server.stub.GetFeature(feature, timeout=TIMEOUT_S))
    if code == grpc.StatusCode.OK:
        assert responses[0].feature == feature.feature
    tokenize = data.draw(tokenize_requests())
    code, responses = outcome("Tokenize", lambda: fuzz_server.stub.Tokenize(tokenize, timeout=TIMEOUT_S))
    if code == grpc.StatusCode.OK:
        assert len(responses[0].ids) == len(responses[0].tokens)


def check_page(response, request, d_sae: dict[str, int], limit: int) -> None:
    assert len(response.features) <= (request.page_size or 20) <= limit
    for item in response.features:
        stage = getattr(item, "stage", None) or request.stage
        assert item.feature < d_sae[stage]


@FUZZ
@given(data=st.data())
def test_search_and_list_features(fuzz_server: ServedProcess, world: World, data: st.DataObject) -> None:
    """Any page that comes back is well formed, and its next_page_token is accepted for the same query."""
    d_sae = dict(zip(world.stages, world.d_sae, strict=True))
    search = data.draw(search_requests(world))
    code, responses = outcome("SearchFeatures", lambda: fuzz_server.stub.SearchFeatures(search, timeout=TIMEOUT_S))
    if code == grpc.StatusCode.OK:
        check_page(responses[0], search, d_sae, 200)
        if not search.HasField("token"):  # text and explanation matches come best first
            scores = [m.score for m in responses[0].features]
            assert scores == sorted(scores, reverse=True)
        if responses[0].next_page_token:
            search.page_token = responses[0].next_page_token
            code, _ = outcome("SearchFeatures", lambda: fuzz_server.stub.SearchFeatures(search, timeout=TIMEOUT_S))
            assert code == grpc.StatusCode.OK
    listing = data.draw(list_requests(world))
    code, responses = outcome("ListFeatures", lambda: fuzz_server.stub.ListFeatures(listing, timeout=TIMEOUT_S))
    if code == grpc.StatusCode.OK:
        check_page(responses[0], listing, d_sae, 200)
        low = listing.min_density if listing.HasField("min_density") else 0.0
        high = listing.max_density if listing.HasField("max_density") else 1.0
        assert all(low <= f.density <= high for f in responses[0].features)
        if responses[0].next_page_token:
            listing.page_token = responses[0].next_page_token
            code, _ = outcome("ListFeatures", lambda: fuzz_server.stub.ListFeatures(listing, timeout=TIMEOUT_S))
            assert code == grpc.StatusCode.OK


@FUZZ
@given(data=st.data())
def test_encode_activations(fuzz_server: ServedProcess, world: World, data: st.DataObject) -> None:
    requests = data.draw(encode_requests(world))
    code, responses = outcome("EncodeActivations",
                              lambda: fuzz_server.stub.EncodeActivations(iter(requests), timeout=TIMEOUT_S))
    if code == grpc.StatusCode.OK:
        assert [r.sequence for r in responses] == [r.sequence for r in requests]
        assert all(len(r.rows) == q.activations.rows for r, q in zip(responses, requests, strict=True))


METHODS = ("GetServerInfo", "ListStacks", "GetFeature", "Tokenize", "Decompose", "Generate", "Score",
           "EncodeActivations", "SearchFeatures", "ListFeatures")


@st.composite
def wire_bytes(draw: st.DrawFn) -> bytes:
    """Bytes that are rarely a valid message: random, a string field with bad UTF-8, truncated or bogus tags."""
    field = draw(st.integers(1, 8))
    garbage = draw(st.binary(min_size=1, max_size=8).filter(lambda b: not _is_utf8(b)))
    bad_utf8 = bytes([field << 3 | 2, len(garbage)]) + garbage
    return draw(st.one_of(st.binary(max_size=64), st.just(bad_utf8),
                          st.just(b"\x12\x05\x0a\x03\xff\xfe\xfd"),  # Input.text (nested) with bad UTF-8
                          st.just(b"\x0a\xff\xff\xff\xff\x0f"),  # a length far past the end
                          st.just(b"\x00"), st.just(b"\xff" * 11)))


def _is_utf8(data: bytes) -> bool:
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


@FUZZ
@given(method=st.sampled_from(METHODS), payload=wire_bytes())
def test_raw_bytes_never_break_a_method(fuzz_server: ServedProcess, method: str, payload: bytes) -> None:
    channel = fuzz_server.channel
    if method == "EncodeActivations":
        call = channel.stream_stream(SERVICE + method)
        code, _ = outcome("raw:" + method, lambda: call(iter([payload, payload]), timeout=TIMEOUT_S))
    elif method in ("Decompose", "Generate"):
        code, _ = outcome("raw:" + method, lambda: channel.unary_stream(SERVICE + method)(payload, timeout=TIMEOUT_S))
    else:
        code, _ = outcome("raw:" + method, lambda: channel.unary_unary(SERVICE + method)(payload, timeout=TIMEOUT_S))
    assert code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
                    grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED)


def test_the_health_service_survives_garbage_too(fuzz_server: ServedProcess) -> None:
    call = fuzz_server.channel.unary_unary("/grpc.health.v1.Health/Check")
    code, _ = outcome("raw:Health.Check", lambda: call(b"\x0a\x02\xff\xfe", timeout=TIMEOUT_S))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert fuzz_server.health() == "SERVING"


@pytest.mark.parametrize("method", ["Tokenize", "Decompose", "EncodeActivations"])
def test_a_message_with_bad_utf8_is_invalid_argument(fuzz_server: ServedProcess, method: str) -> None:
    """Regression: grpc answered a request that does not parse with UNKNOWN and the exception's text (INTERNAL in
    a request stream); service/interceptors.py DecodeInterceptor makes it INVALID_ARGUMENT, in every call shape."""
    payload = b"\x0a\x02\xff\xfe" if method != "EncodeActivations" else b"\x12\x02\xff\xfe"  # a string field
    channel = fuzz_server.channel
    with pytest.raises(grpc.RpcError) as refused:
        if method == "Tokenize":
            channel.unary_unary(SERVICE + method)(payload, timeout=TIMEOUT_S)
        elif method == "Decompose":
            list(channel.unary_stream(SERVICE + method)(payload, timeout=TIMEOUT_S))
        else:
            list(channel.stream_stream(SERVICE + method)(iter([payload]), timeout=TIMEOUT_S))
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "cannot be parsed" in refused.value.details() and "bad UTF-8" in refused.value.details()


# ------------------------------------------------------------------- regressions found by the long profile


def test_the_smallest_normal_temperature_samples_instead_of_failing(fuzz_server: ServedProcess) -> None:
    """logits / 1.17549435e-38 overflowed float32 and torch.multinomial raised on NaN probabilities (INTERNAL)."""
    request = pb.GenerateRequest(prompt=t.Input(text="0"), sampling=pb.SamplingParams(
        temperature=1.17549435e-38, max_new_tokens=3, seed=1))
    code, responses = outcome("Generate", lambda: fuzz_server.stub.Generate(request, timeout=TIMEOUT_S))
    assert code == grpc.StatusCode.OK and responses[-1].HasField("finish")


def test_steering_that_overflows_the_model_is_a_client_error(fuzz_server: ServedProcess, world: World) -> None:
    hookpoint, d = world.hookpoints[0]
    huge = t.SteeringVector(hookpoint=hookpoint, values=[3e38] * d, scale=3e38)
    request = pb.GenerateRequest(prompt=t.Input(text="Hello there"), steering_vectors=[huge],
                                 sampling=pb.SamplingParams(max_new_tokens=2))
    with pytest.raises(grpc.RpcError) as error:
        list(fuzz_server.stub.Generate(request, timeout=TIMEOUT_S))
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "smaller intervention or steering values" in error.value.details()
