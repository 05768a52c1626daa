"""The synchronous Client against the in-process server: every method, streaming order and content."""

from __future__ import annotations

import featurewire as fw
import pytest
from featurewire import Condition, Intervention, Positions, Vector

from tests.clients.conftest import STAGES

PROMPT = "The cat sat on the mat"


@pytest.fixture(scope="module")
def client(target):
    with fw.Client(target) as c:
        yield c


def test_info_and_stacks_describe_the_model_and_the_stack(client):
    info = client.info()
    assert info.model is not None and info.model.name == "tiny-random" and info.model.d_model == 64
    assert info.capabilities.mode == "FULL" and {"Decompose", "Generate", "Score"} <= set(info.capabilities.rpcs)
    assert set(info.capabilities.intervention_ops) == {"ADD", "SET", "SCALE", "CLAMP", "ABLATE"}
    assert info.limits.default_top_k > 0 and info.versions.api == "v1"
    assert any(h.name == "blocks.1.hook_resid_post" and h.kind == "RESID_POST" and h.d == 64 for h in info.hookpoints)
    stack = info.stack()
    assert stack.name == "tiny" and tuple(s.name for s in stack.stages) == STAGES
    assert stack.stage("signed").signed and stack.stage("resid3").residual_of == 0
    assert stack.stage("resid1").residual_of is None and "fve" in stack.stage("resid1").metrics
    assert client.stacks() == info.stacks
    with pytest.raises(KeyError, match="no stage"):
        stack.stage("nope")


def test_tokenize_and_feature(client):
    tokens = client.tokenize("hello world")
    assert tokens.tokens[0] == "<bos>" and len(tokens) == len(tokens.ids) > 2
    assert client.tokenize("hello world", add_special_tokens=False).ids == tokens.ids[1:]
    feature = client.feature("", "resid1", 3, top_n=4)
    assert (feature.stack, feature.stage, feature.stage_index, feature.feature) == ("tiny", "resid1", 0, 3)
    assert feature.decoder_norm > 0 and len(feature.top_tokens) == len(feature.bottom_tokens) == 4
    assert feature.top_tokens[0].score >= feature.top_tokens[-1].score and feature.density is None
    assert client.feature("tiny", "resid1", 3, top_n=4) == feature


def test_decompose_streams_every_token_in_order_with_named_stages(client):
    stream = client.decompose(PROMPT, top_k=3, chunk_tokens=2)
    header = stream.header()
    assert header.stack == "tiny" and header.top_k == 3 and tuple(s.name for s in header.stages) == STAGES
    tokens = list(stream)
    assert [t.position for t in tokens] == list(range(header.num_tokens))
    assert [t.id for t in tokens] == list(client.tokenize(PROMPT).ids)
    for token in tokens:
        assert [c.name for c in token.features] == list(STAGES)
        for codes in token.features:
            assert len(codes.ids) <= 3 and codes.l0 >= len(codes.ids) and codes.error_norm is not None
            assert [abs(v) for v in codes.values] == sorted((abs(v) for v in codes.values), reverse=True)
    assert any(v < 0 for t in tokens for v in t.stage("signed").values)  # sign-aware codes keep their sign


def test_decompose_options_stages_filter_and_collect(client):
    first = client.decompose(PROMPT, stages=["resid1"], top_k=1).collect()
    watched = first.tokens[1].stage("resid1").ids[0]
    result = client.decompose(PROMPT, stages="mlp2", top_k=1, include_error=False, always={"mlp2": [7]}).collect()
    assert [s.name for s in result.header.stages] == ["mlp2"] and len(result) == first.header.num_tokens
    for token in result:
        codes = token.stage("mlp2")
        assert codes.error_norm is None and 7 in codes.ids and token.stage(2) is codes
    trace = first.trace("resid1", watched)
    assert trace[1] == first.tokens[1].stage("resid1").values[0] and len(trace) == len(first)
    ids = list(client.tokenize(PROMPT).ids)
    assert client.decompose(ids, stages="resid1", top_k=1).collect().tokens == first.tokens  # token ids verbatim


def test_generate_streams_header_then_steps_then_one_finish_per_branch(client):
    stream = client.generate(PROMPT, with_default=True, max_new_tokens=6, seed=3, ignore_eos=True,
                             interventions=[Intervention.set("resid1", 3, 10.0, positions="generated")])
    events = list(stream)
    assert isinstance(events[0], fw.Started) and events[0].seed == 3 and events[0].branches == ("STEERED", "DEFAULT")
    assert events[0].prompt_tokens == len(events[0].prompt) == len(client.tokenize(PROMPT))
    tokens = [e for e in events if isinstance(e, fw.Token)]
    steered = [t for t in tokens if t.branch == "STEERED"]
    default = [t for t in tokens if t.branch == "DEFAULT"]
    assert [t.index for t in steered] == [t.index for t in default] == list(range(6))
    assert [t.branch for t in tokens[:2]] == ["STEERED", "DEFAULT"]  # per step: steered first, then default
    assert all(t.logprob <= 0 and t.features == () for t in tokens)
    finished = [e for e in events if isinstance(e, fw.Finished)]
    assert {f.branch for f in finished} == {"STEERED", "DEFAULT"} and all(f.reason == "LENGTH" for f in finished)
    assert isinstance(events[-1], fw.Finished)
    result = stream.collect()  # after iterating: built from the events already seen
    assert result.text == "".join(t.text for t in steered) and result.default_text == "".join(t.text for t in default)
    assert result.seed == 3 and result.tokens == tuple(steered) and result.default_finished is not None


def test_generate_text_is_deterministic_and_edits_change_it(client):
    plain = client.generate_text(PROMPT, max_new_tokens=8, seed=1, ignore_eos=True)
    assert plain.default_text is None and plain.finished.generated_tokens == 8
    assert client.generate_text(PROMPT, max_new_tokens=8, seed=1, ignore_eos=True) == plain
    pinned = client.generate_text(PROMPT, max_new_tokens=8, seed=1, ignore_eos=True, with_default=True,
                                  interventions=[Intervention.set("resid1", 3, 10.0)])
    assert pinned.default_text == plain.text and pinned.text != plain.text


def test_generate_with_features_conditions_and_vectors(client):
    free = client.generate_text(PROMPT, max_new_tokens=6, seed=0, ignore_eos=True, decompose=["resid1"])
    assert free.started.stages[0].name == "resid1" and all(t.stage("resid1").l0 > 0 for t in free.tokens)
    feature, value = free.tokens[2].stage("resid1").top(1)[0]
    stop = Condition.above("resid1", feature, value / 2).stop()
    stopped = client.generate_text(PROMPT, max_new_tokens=6, seed=0, ignore_eos=True, conditions=[stop])
    assert stopped.finished.reason == "FEATURE_CONDITION" and stopped.finished.trigger.condition_id == stop.id
    assert stopped.conditions and stopped.conditions[0].action == "STOP"
    assert stopped.finished.generated_tokens <= 3
    enable = Condition.above("resid1", feature, value / 2).enable(Intervention.ablate("resid1", feature),
                                                                  Vector("blocks.2.hook_resid_post", [0.5] * 64))
    enabled = client.generate_text(PROMPT, max_new_tokens=6, seed=0, ignore_eos=True, conditions=[enable])
    assert enabled.conditions[0].action == "ENABLE_INTERVENTIONS" and enabled.finished.reason == "LENGTH"


def test_score_clean_and_edited(client):
    clean = client.score(PROMPT)
    assert not clean.edited and clean.scored_tokens == clean.num_tokens - 1 == len(clean.clean_ce_per_token)
    assert clean.kl == 0 and clean.delta_ce == 0
    spliced = client.score(PROMPT, splice="resid1")
    assert spliced.edited and spliced.kl > 0 and spliced.clean_ce == pytest.approx(clean.clean_ce)
    edited = client.score(PROMPT, interventions=[Intervention.scale("resid1", 140, 0.0, positions=Positions.all()),
                                                 Vector("blocks.1.hook_resid_post", [1.0] * 64, scale=2.0)])
    assert edited.edited and len(edited.kl_per_token) == edited.scored_tokens


def test_encode_activations_answers_per_batch_or_is_unimplemented(client):
    np = pytest.importorskip("numpy")
    batches = [np.zeros((2, 64), dtype=np.float32), np.ones((3, 64), dtype=np.float16)]
    if "EncodeActivations" not in client.info().capabilities.rpcs:
        with pytest.raises(fw.Unimplemented):
            list(client.encode_activations(batches, stage="resid1"))
        return
    results = list(client.encode_activations(batches, stage="resid1", top_k=4))
    assert [r.sequence for r in results] == [0, 1] and [len(r.rows) for r in results] == [2, 3]
    assert all(row.name == "resid1" and len(row.ids) <= 4 for r in results for row in r.rows)


def test_numpy_helpers(client):
    np = pytest.importorskip("numpy")
    result = client.decompose(PROMPT, stages="signed", top_k=4).collect()
    dense = fw.feature_matrix(result, "signed")
    assert dense.shape == (len(result), 128) and (dense < 0).any()
    first = result.tokens[0].stage("signed")
    row = fw.to_numpy(first, 128)
    assert np.array_equal(row, dense[0]) and row[first.ids[0]] == pytest.approx(first.values[0])
    assert (np.count_nonzero(dense, axis=1) <= 4).all()
