"""Served steerability: GetFeature returns the stored record, ListFeatures filters and sorts by it, through a real
in-process server on the tiny model; the records are measured by the trainer on the same stack first."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from featurewire.v1 import featurewire_pb2 as pb

from core.host.host_model import HostModel
from core.stack.reader import read_stack
from tests.service.conftest import Running, ServerLoop, server_config, start_server
from tests.service.engine.tiny_stacks import one_thread, write_dashboard_stack
from trainer.steerability.build import Selection, read_openings, run_steerability, targets_for
from trainer.steerability.measure import SteerSettings
from trainer.steerability.schedule import parse_strengths

STAGE = 0


@pytest.fixture(scope="module", autouse=True)
def _single_thread() -> Iterator[None]:
    with one_thread():
        yield


@pytest.fixture(scope="module")
def measured(tiny_gemma: HostModel, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    stack = write_dashboard_stack(tiny_gemma, tmp_path_factory.mktemp("steer-served") / "stack")
    stage = read_stack(stack).stages[STAGE]
    fired = [f for f in range(stage.sae.d_sae) if int(stage.dashboard["count"][:, f].sum()) > 0][:4]
    settings = SteerSettings(tuple(parse_strengths(["add:max:0,8,32", "set:max:8"])), max_new_tokens=6, samples=0)
    run_steerability(stack, tiny_gemma, [Selection(STAGE, tuple(fired))], settings, read_openings()[:3],
                     progress=False)
    return stack, read_stack(stack).stages[STAGE].steerability


@pytest.fixture(scope="module")
def serving(server_loop: ServerLoop, measured) -> Iterator[Running]:
    stack, _ = measured
    running = start_server(server_loop, server_config(stack, self_check=False))
    yield running
    running.stop()


def test_get_feature_returns_the_record(serving: Running, measured):
    stack, stored = measured
    name = read_stack(stack).stages[STAGE].name
    for feature, record in stored["features"].items():
        got = serving.stub.GetFeature(pb.GetFeatureRequest(stage=name, feature=feature), timeout=30).steerability
        assert got.steers == record["verdict"]["steers"]
        want = [(p["op"], p["unit"], p["value"]) for p in record["curve"]]
        assert [(p.op, p.unit, p.value) for p in got.curve] == want
        assert [p.expression for p in got.curve] == pytest.approx([p["expression"] for p in record["curve"]])
        assert [p.fluency_cost for p in got.curve] == pytest.approx([p["fluency_cost"] for p in record["curve"]])
        assert got.output_score == pytest.approx(record["output_score"])
        assert got.fluency_threshold == pytest.approx(1.0) and got.expression_threshold == pytest.approx(0.25)
        assert got.repetition_threshold == pytest.approx(0.5)
        assert got.HasField("best") == (record["verdict"]["best"] is not None)
    unmeasured = next(f for f in range(64) if f not in stored["features"])
    assert not serving.stub.GetFeature(pb.GetFeatureRequest(stage=name, feature=unmeasured),
                                       timeout=30).HasField("steerability")


def test_list_features_sorts_and_filters_by_steerability(serving: Running, measured):
    stack, stored = measured
    name = read_stack(stack).stages[STAGE].name
    records = stored["features"]
    listed = serving.stub.ListFeatures(pb.ListFeaturesRequest(stage=name, sort=pb.FEATURE_SORT_OUTPUT_SCORE,
                                                              descending=True), timeout=30)
    expected = sorted(records, key=lambda f: (-records[f]["output_score"], f))
    assert [x.feature for x in listed.features] == expected and listed.total == len(records)
    for x in listed.features:
        assert x.HasField("steers") and x.steers == records[x.feature]["verdict"]["steers"]
        assert x.output_score == pytest.approx(records[x.feature]["output_score"])
    steering = serving.stub.ListFeatures(pb.ListFeaturesRequest(stage=name, sort=pb.FEATURE_SORT_STEERING,
                                                                descending=True), timeout=30)

    def key(f):
        return max(p["lift"] for p in records[f]["curve"] if p["fluency_cost"] <= 1.0)

    assert [x.feature for x in steering.features] == sorted(records, key=lambda f: (-key(f), f))
    only = serving.stub.ListFeatures(pb.ListFeaturesRequest(stage=name, steerable_only=True), timeout=30)
    assert sorted(x.feature for x in only.features) == sorted(f for f, r in records.items() if r["verdict"]["steers"])
    plain = serving.stub.ListFeatures(pb.ListFeaturesRequest(stage=name), timeout=30)
    assert plain.total > len(records)
    assert {x.feature for x in plain.features if x.HasField("steers")} <= set(records)


def test_steering_sorts_need_records(serving: Running, measured):
    stack, _ = measured
    other = read_stack(stack).stages[1].name
    with pytest.raises(grpc.RpcError) as err:
        serving.stub.ListFeatures(pb.ListFeaturesRequest(stage=other, sort=pb.FEATURE_SORT_STEERING), timeout=10)
    assert err.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "has no steerability records" in err.value.details() and "featurewire-train steerability" in \
        err.value.details()


def test_targets_of_the_served_stage_fired(measured):
    stack, stored = measured
    stage = read_stack(stack).stages[STAGE]
    assert all(t.max_activation for t in targets_for(stage, list(stored["features"])))


def test_client_methods_and_cli_lines_show_it(serving: Running, measured, capsys):
    import featurewire as fw
    from featurewire.cli import main as client_main
    from featurewire.render import feature_lines, feature_list_lines

    stack, stored = measured
    name = read_stack(stack).stages[STAGE].name
    feature, record = next(iter(stored["features"].items()))
    with fw.Client(serving.target) as client:
        got = client.feature("", name, feature)
        listed = client.list_features(name, sort="output_score", descending=True, steerable_only=False)
    assert got.steerability is not None and got.steerability.steers == record["verdict"]["steers"]
    assert [p.value for p in got.steerability.curve] == [p["value"] for p in record["curve"]]
    text = "\n".join(feature_lines(got))
    assert "steerability: " in text and "add:max:8" in text and "set:max:8" in text
    assert all(f.output_score is not None for f in listed.features)
    assert "output" in feature_list_lines(listed)[1]
    assert client_main(["--target", serving.target, "features", name, "--sort", "steering", "--descending"]) == 0
    assert "steers" in capsys.readouterr().out
