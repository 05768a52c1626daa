"""SearchFeatures by explanation ranks equal word counts by the better of the label F1 and the explanation's
stored detection score (`featurewire-train explain` records), through a real server on the tiny model."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import featurewire as fw
import pytest
from featurewire.v1 import featurewire_pb2 as pb

from core.stack.explanations import merge_records, read_records
from core.stack.reader import read_stack
from tests.service.conftest import Running, ServerLoop, server_config, start_server
from tests.service.engine.tiny_stacks import EXPLANATIONS, one_thread, write_dashboard_stack

WORDS = "numbers dates"


def record(text: str, detection: float) -> dict:
    return {"text": text, "source": "llm", "explainer": "m", "scorer": "m", "prompt_version": "v", "examples": "x",
            "date": "2026-12-08T00:00:00Z",
            "scores": {"detection": {"balanced_accuracy": detection, "examples": 20, "unparsed": 0}}}


@pytest.fixture(scope="module")
def stack(tiny_gemma, tmp_path_factory: pytest.TempPathFactory) -> Path:
    with one_thread():
        path = write_dashboard_stack(tiny_gemma, tmp_path_factory.mktemp("ranking") / "stack")
    f1 = read_stack(path).stages[0].dashboard["label_f1"].max(0).values  # (H,) resid1
    low = min((f for f in range(f1.shape[0]) if f not in EXPLANATIONS["resid1"]), key=lambda f: float(f1[f]))
    # two features that match the same words: the one with the lower label F1 gets a near-perfect detection score
    merge_records(path, {"resid1": {low: record("numbers and dates in tables", 0.99)}})
    return path


@pytest.fixture(scope="module")
def served(stack: Path) -> Iterator[Running]:
    loop = ServerLoop()
    running = start_server(loop, server_config(stack, self_check=False))
    yield running
    running.stop()
    loop.close()


def test_scored_explanations_rank_first_among_equal_word_counts(served: Running, stack: Path):
    records = read_records(stack)["resid1"]
    assert records[9] == EXPLANATIONS["resid1"][9]  # the imported string stays as it was
    (scored,) = [f for f, e in records.items() if isinstance(e, dict)]
    found = served.stub.SearchFeatures(pb.SearchFeaturesRequest(explanation=WORDS, stages=["resid1"], page_size=50),
                                       timeout=30)
    two = [m for m in found.features if m.score == 2]
    assert [m.feature for m in two][:2] == [scored, 9]  # 0.99 beats feature 9's label F1 (< 1 on this stack)
    assert two[0].explanation == "numbers and dates in tables" and two[1].label_f1 < 0.99
    assert two[0].label_f1 < two[1].label_f1  # by label F1 alone it would come second


def test_get_feature_returns_the_explanation_source_and_scores(served: Running, stack: Path):
    (scored,) = [f for f, e in read_records(stack)["resid1"].items() if isinstance(e, dict)]
    got = served.stub.GetFeature(pb.GetFeatureRequest(stage="resid1", feature=scored), timeout=30)
    source = got.explanation_source
    assert got.explanation == "numbers and dates in tables" and got.HasField("explanation_source")
    assert (source.explainer, source.scorer, source.prompt_version, source.date) == ("m", "m", "v",
                                                                                    "2026-12-08T00:00:00Z")
    assert [(s.name, s.examples, s.unparsed) for s in source.scores] == [("detection", 20, 0)]
    assert source.scores[0].balanced_accuracy == pytest.approx(0.99)
    imported = served.stub.GetFeature(pb.GetFeatureRequest(stage="resid1", feature=9), timeout=30)
    assert imported.explanation == EXPLANATIONS["resid1"][9] and not imported.HasField("explanation_source")
    with fw.Client(served.target) as client:
        feature = client.feature("", "resid1", scored)
    assert feature.explanation_source is not None
    assert feature.explanation_source.describe() == "by m (v, 2026-12-08): detection 0.99 (20)"


def test_list_features_sorts_by_explanation_score(served: Running, stack: Path):
    import grpc

    (scored,) = [f for f, e in read_records(stack)["resid1"].items() if isinstance(e, dict)]
    listed = served.stub.ListFeatures(pb.ListFeaturesRequest(stage="resid1", sort=pb.FEATURE_SORT_EXPLANATION_SCORE),
                                      timeout=30)
    assert [f.feature for f in listed.features] == [scored] and listed.total == 1  # scored explanations only
    with fw.Client(served.target) as client:
        assert [f.feature for f in client.list_features("resid1", sort="explanation_score").features] == [scored]
    with pytest.raises(grpc.RpcError) as err:
        served.stub.ListFeatures(pb.ListFeaturesRequest(stage="mlp2", sort=pb.FEATURE_SORT_EXPLANATION_SCORE),
                                 timeout=30)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "has no scored explanations" in err.value.details() and "featurewire-train explain" in err.value.details()
