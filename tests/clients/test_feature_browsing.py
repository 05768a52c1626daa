"""Feature browsing from the client side: Client/AsyncClient.feature (the dashboard), search_features and
list_features, and the `featurewire feature|search|features` commands with and without --json, against an
in-process server whose stack has dashboards, explanations and a meta-SAE."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import featurewire as fw
import pytest
from featurewire.cli import main
from featurewire.v1 import featurewire_pb2 as pb

from tests.service.conftest import Running, ServerLoop, server_config, start_server
from tests.service.engine.tiny_stacks import EXPLANATIONS, write_dashboard_stack

TEXT = "The cat sat on the mat"
CLIENT_ROOT = Path(__file__).resolve().parents[2] / "clients" / "python"


@pytest.fixture(scope="module")
def dash_server(client_loop: ServerLoop, tiny_gemma, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    stack = write_dashboard_stack(tiny_gemma, tmp_path_factory.mktemp("client-dash") / "stack")
    running = start_server(client_loop, server_config(stack, self_check=False))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def client(dash_server: Running) -> Iterator[fw.Client]:
    with fw.Client(dash_server.target) as c:
        yield c


def busiest(dash_server: Running, stage: str) -> int:
    """The feature of `stage` with the highest density (its dashboard has every part)."""
    listed = dash_server.stub.ListFeatures(pb.ListFeaturesRequest(stage=stage, descending=True, page_size=1),
                                           timeout=10)
    return listed.features[0].feature


def test_feature_returns_the_dashboard_explanation_and_meta_latents(client: fw.Client, dash_server: Running):
    info = client.info()
    resid1, signed = info.stack().stage("resid1"), info.stack().stage("signed")
    assert resid1.has_dashboard and resid1.has_explanations and resid1.has_meta_sae and not signed.has_meta_sae
    assert info.limits.max_page_size == 200 and info.limits.default_page_size == 20
    number = busiest(dash_server, "signed")
    feature = client.feature("", "signed", number)
    raw = dash_server.stub.GetFeature(pb.GetFeatureRequest(stage="signed", feature=number), timeout=10)
    d = feature.dashboard
    assert d is not None and d.tokens == raw.dashboard.tokens and d.corpus == "default" and d.context == 3
    assert [s.sign for s in d.sides] == ["POSITIVE", "NEGATIVE"] and d.side("negative") is d.sides[1]
    for side, raw_side in zip(d.sides, raw.dashboard.sides, strict=True):
        assert (side.count, side.max, side.histogram_counts) == (raw_side.count, raw_side.max,
                                                                 tuple(raw_side.histogram.counts))
        assert len(side.top_examples) == len(raw_side.top_examples) > 0
        x = side.top_examples[0]
        assert x.marked().count("[[") == 1 and x.marked().replace("[[", "").replace("]]", "") == x.text
        assert f"[[{x.tokens[x.index].text}]]" in x.marked() and (x.value < 0) == (side.sign == "NEGATIVE")
        label, raw_label = side.label, raw_side.label
        assert label is not None and raw_side.HasField("label") and 1 <= label.rule_size <= len(label.tokens)
        assert [(t.id, t.text, t.firings) for t in label.tokens] == [(t.id, t.text, t.firings)
                                                                     for t in raw_label.tokens]
        assert (label.f1, label.precision, label.recall) == (raw_label.f1, raw_label.precision, raw_label.recall)
        assert label.rule == label.tokens[: label.rule_size] and f"token F1 {label.f1:.2f}" in label.describe()
    assert [n.feature for n in d.neighbours] == [n.feature for n in raw.dashboard.neighbours]
    assert feature.density == pytest.approx(raw.density) and feature.meta_latents is None
    noted = client.feature("", "resid1", 3)
    assert noted.explanation == EXPLANATIONS["resid1"][3] and noted.meta_latents is not None
    assert noted.meta_latents.width == 32 and len(noted.meta_latents.ids) == len(noted.meta_latents.values) > 0
    with pytest.raises(KeyError, match="no NEGATIVE side"):
        noted.dashboard.side("NEGATIVE")


def test_search_features_by_text_token_and_explanation(client: fw.Client, dash_server: Running):
    found = client.search_features(TEXT, span=(3, 7), reduce="mean", stages="resid1", page_size=5)
    raw = dash_server.stub.SearchFeatures(pb.SearchFeaturesRequest(
        text=pb.TextQuery(text=TEXT, span=pb.Span(start=3, end=7), reduction=pb.REDUCTION_MEAN), stages=["resid1"],
        page_size=5), timeout=10)
    assert [(m.stage, m.feature, m.score) for m in found.features] == [(m.stage, m.feature, m.score)
                                                                       for m in raw.features]
    assert found.total == raw.total and found.tokens[0].text == "<bos>" and found.next_page_token
    following = client.search_features(TEXT, span=(3, 7), reduce="mean", stages=["resid1"],
                                       page_token=found.next_page_token)
    assert following.features[0].score <= found.features[-1].score
    by_text = client.search_features(token=" the", stages=["resid1", "mlp2"], page_size=3)
    token = client.tokenize(" the", add_special_tokens=False).ids[0]
    assert client.search_features(token=token, stages=["resid1", "mlp2"], page_size=3).features == by_text.features
    lowest = client.search_features(token=token, direction="suppresses", page_size=3)
    assert lowest.features[0].score < 0 < by_text.features[0].score and lowest.total == 896
    notes = client.search_features(explanation="cat food")
    assert [(m.stage, m.feature, m.score) for m in notes.features] == [("mlp2", 1, 2.0), ("resid1", 5, 1.0)]
    assert notes.features[0].explanation == EXPLANATIONS["mlp2"][1] and notes.features[0].density is not None
    for bad in ({}, {"text": TEXT, "token": 3}, {"token": 3, "span": (0, 1)}, {"text": TEXT, "reduce": "median"},
                {"token": 3, "direction": "up"}):
        with pytest.raises(ValueError):
            client.search_features(**bad)
    with pytest.raises(fw.InvalidArgument, match="page_token"):
        client.search_features(explanation="cat", page_token=found.next_page_token)


def test_list_features_pages_and_filters(client: fw.Client):
    whole = client.list_features("mlp2", sort="max", descending=True, page_size=200)
    pieces, token = [], ""
    while True:
        page = client.list_features("mlp2", sort="max", descending=True, page_size=50, page_token=token)
        pieces += page.features
        token = page.next_page_token
        if not token:
            break
    assert tuple(pieces[:200]) == whole.features and len(pieces) == whole.total == 256 and whole.stage_index == 2
    assert [f.max for f in pieces] == sorted((f.max for f in pieces), reverse=True)
    dense = client.list_features("mlp2", min_density=0.05, max_density=1.0)
    assert all(0.05 <= f.density <= 1 for f in dense.features) and dense.tokens == whole.tokens
    by_f1 = client.list_features("mlp2", sort="label_f1", descending=True, page_size=200)
    f1s = [f.label_f1 for f in by_f1.features]
    assert None not in f1s and f1s == sorted(f1s, reverse=True) and f1s[0] > 0
    with pytest.raises(ValueError, match="sort must be one of density, max, label_f1"):
        client.list_features("mlp2", sort="mean")
    with pytest.raises(fw.InvalidArgument, match="min_density"):
        client.list_features("mlp2", min_density=-1)


def test_async_client_matches_the_sync_client(client: fw.Client, dash_server: Running):
    async def body() -> tuple:
        async with fw.AsyncClient(dash_server.target) as a:
            return (await a.feature("", "resid1", 3), await a.search_features(TEXT, stages="signed"),
                    await a.list_features("signed", max_density=0.05, page_size=7))

    feature, found, listed = asyncio.run(body())
    assert feature == client.feature("", "resid1", 3)
    assert found == client.search_features(TEXT, stages="signed")
    assert listed == client.list_features("signed", max_density=0.05, page_size=7)


# ------------------------------------------------------------------------------------------------- CLI


@pytest.fixture
def cli(dash_server: Running, capsys):
    def run(*argv: str) -> tuple[int, str, str]:
        code = main(["--target", dash_server.target, *argv], environ={})
        out, err = capsys.readouterr()
        return code, out, err

    return run


def test_feature_command_prints_the_dashboard(cli, dash_server: Running):
    number = busiest(dash_server, "signed")
    code, out, _ = cli("feature", "signed", str(number))
    assert code == 0 and out.startswith(f"feature {number} of stage signed (index 1) in stack tiny")
    assert "dashboard:" in out and "  POSITIVE: density" in out and "  NEGATIVE: density" in out
    assert "[[" in out and "]]" in out and "promotes:" in out and "neighbours:" in out and "co-occurs with:" in out
    assert out.count("    label: ") == 2 and "(token F1 " in out
    code, out, _ = cli("feature", "tiny", "resid1", "3")
    assert code == 0 and f"explanation: {EXPLANATIONS['resid1'][3]}" in out and "meta-latents (of 32):" in out
    code, out, _ = cli("feature", "-", "resid1", "3", "--json")
    (feature,) = [json.loads(line) for line in out.splitlines()]
    assert feature["explanation"] == EXPLANATIONS["resid1"][3] and feature["meta_latents"]["width"] == 32
    assert feature["dashboard"]["sides"][0]["sign"] == "POSITIVE"
    for argv in (["feature", "resid1"], ["feature", "resid1", "x"], ["feature", "a", "b", "c", "1"]):
        code, _, err = cli(*argv)
        assert code == 2 and "usage:" in err, argv


def test_search_command(cli):
    code, out, _ = cli("search", TEXT, "--span", "3:7", "--stages", "resid1,mlp2", "--page-size", "4")
    lines = out.splitlines()
    assert code == 0 and "matches in stack tiny (more: --page-token" in lines[0] and len(lines) == 5
    assert all(line.split(":")[0] in ("resid1", "mlp2") and " at " in line for line in lines[1:])
    code, out, _ = cli("search", "--token-text", " the", "--suppresses", "--stages", "signed", "--json", "--page-size",
                       "50", "--all")
    pages = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and len(pages) == 3 and sum(len(p["features"]) for p in pages) == pages[0]["total"] == 128
    scores = [m["score"] for p in pages for m in p["features"]]
    assert scores == sorted(scores)
    code, out, _ = cli("search", "--explanation", "cat food")
    assert code == 0 and out.splitlines()[1].startswith("mlp2:1") and "Cat food, dog food" in out
    code, _, err = cli("search", "--explanation", "cat", "--stack", "nope")
    assert code == 1 and "NOT_FOUND" in err
    for argv in (["search"], ["search", TEXT, "--span", "3"], ["search", "--token-id", "2", "--explanation", "x"]):
        code, _, err = cli(*argv)
        assert code == 2 and "usage:" in err, argv


def test_features_command(cli, client: fw.Client):
    code, out, _ = cli("features", "mlp2", "--max-density", "0.01", "--sort", "max", "--descending")
    lines = out.splitlines()
    assert code == 0 and "features of stage mlp2 in stack tiny" in lines[0] and lines[1].split()[0] == "feature"
    expected = client.list_features("mlp2", max_density=0.01, sort="max", descending=True)
    assert [int(line.split()[0]) for line in lines[2:]] == [f.feature for f in expected.features]
    code, out, _ = cli("features", "mlp2", "--sort", "label_f1", "--descending", "--page-size", "5")
    lines = out.splitlines()
    assert code == 0 and "label F1" in lines[1]
    expected = client.list_features("mlp2", sort="label_f1", descending=True, page_size=5)
    assert [line.split()[4] for line in lines[2:]] == [f"{f.label_f1:.2f}" for f in expected.features]
    code, out, _ = cli("features", "resid1", "--json", "--all", "--page-size", "100")
    pages = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and len(pages) == 3 and [p["next_page_token"] == "" for p in pages] == [False, False, True]
    densities = [f["density"] for p in pages for f in p["features"]]
    assert len(densities) == 256 and densities == sorted(densities)
    code, _, err = cli("features", "resid1", "--min-density", "2")
    assert code == 1 and "INVALID_ARGUMENT: min_density 2.0 is out of range" in err


def test_the_installed_command_runs_as_a_process(dash_server: Running):
    result = subprocess.run([sys.executable, "-m", "featurewire.cli", "--target", dash_server.target, "features",
                             "signed", "--page-size", "3", "--json"], capture_output=True, text=True, timeout=60,
                            cwd=CLIENT_ROOT)
    assert result.returncode == 0, result.stderr
    (page,) = [json.loads(line) for line in result.stdout.splitlines()]
    assert page["stage"] == "signed" and len(page["features"]) == 3 and page["total"] == 128
