"""The explorer page in a real browser (Debian's Chromium driven by Playwright) against a real in-process server:
the tiny model with a stack that has dashboards, explanations and a meta-SAE, the HTTP gateway on a free port.

Every check reads what a person would see (token cells, heatmap colours, example rows, the two continuations)
and compares it with the same request made over gRPC, so a blank or stale page cannot pass.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from featurewire.v1 import featurewire_pb2 as pb
from featurewire.v1 import types_pb2 as t

from core.stack.explanations import merge_records
from tests import browser
from tests.service.conftest import Running, ServerLoop, server_config, slow_generation, start_server
from tests.service.engine.tiny_stacks import write_dashboard_stack

pytestmark = pytest.mark.skipif(browser.missing() is not None, reason=browser.missing() or "")

STAGE = "resid1"
SCORED = 11  # a feature without an imported explanation
SCORED_RECORD = {"text": "tables of figures", "source": "llm", "explainer": "some-model", "scorer": "some-model",
                 "prompt_version": "featurewire-explain-v1", "examples": "x", "date": "2026-12-08T01:02:03Z",
                 "scores": {"detection": {"balanced_accuracy": 0.75, "examples": 20, "unparsed": 1},
                            "fuzzing": {"balanced_accuracy": 0.5, "examples": 18, "unparsed": 0}}}
TEXT = "The cat sat on the mat. One, two, three."
HOSTILE = '<script>window.__xss = 1</script><img src=x onerror="window.__xss = 2"> done'


def shown(text: str) -> str:
    """The explorer's rendering of a token text (dom.js showToken)."""
    if text == "":
        return "∅"
    text = text.replace("\n", "↵").replace("\t", "⇥")
    if text.startswith(" "):
        text = "·" + text[1:]
    if text.endswith(" "):
        text = text[:-1] + "·"
    return text


@pytest.fixture(scope="module")
def explorer(server_loop: ServerLoop, tiny_gemma: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    stack = write_dashboard_stack(tiny_gemma, tmp_path_factory.mktemp("explorer") / "stack")
    merge_records(stack, {STAGE: {SCORED: SCORED_RECORD}})  # an LLM explanation with its scores
    running = start_server(server_loop, server_config(stack, http_port=0, self_check=False, queue_size=4))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def chromium() -> Iterator[Any]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = browser.launch(playwright)
        yield launched
        launched.close()


class Page:
    """A browser tab on the explorer that records page errors and every URL it requested."""

    def __init__(self, chromium: Any, running: Running) -> None:
        self.base = f"http://127.0.0.1:{running.server.http_port}/"
        self.tab = chromium.new_page(viewport={"width": 1400, "height": 900})
        self.errors: list[str] = []
        self.requests: list[str] = []
        self.tab.on("pageerror", lambda exc: self.errors.append(str(exc)))
        self.tab.on("request", lambda request: self.requests.append(request.url))

    def open(self, route: str = "") -> Any:
        self.tab.goto(self.base + route)
        self.tab.wait_for_selector("body[data-ready=true]", timeout=30_000)
        return self.tab

    def texts(self, selector: str) -> list[str]:
        return self.tab.eval_on_selector_all(selector, "els => els.map(e => e.textContent)")


@pytest.fixture
def page(chromium: Any, explorer: Running) -> Iterator[Page]:
    opened = Page(chromium, explorer)
    yield opened
    opened.tab.close()
    assert opened.errors == [], f"the page raised: {opened.errors}"
    foreign = [url for url in opened.requests if not url.startswith(opened.base)]
    assert foreign == [], f"the page reached outside its server (it must work offline): {foreign}"


def decompose(running: Running, text: str, options: t.DecomposeOptions) -> list[pb.TokenFeatures]:
    responses = running.stub.Decompose(pb.DecomposeRequest(input=t.Input(text=text), options=options))
    return [token for r in responses if r.HasField("chunk") for token in r.chunk.tokens]


def test_the_page_is_served_with_a_strict_policy_and_shows_the_server(page: Page, explorer: Running) -> None:
    tab = page.open()
    response = tab.request.get(page.base)
    assert "script-src 'self'" in response.headers["content-security-policy"]
    assert tab.title() == "featurewire explorer"
    assert "tiny-random" in tab.text_content("#server")
    info = explorer.stub.GetServerInfo(pb.GetServerInfoRequest())
    assert page.texts("#stack option") == [f"{s.name} ({len(s.stages)} stages)" for s in info.stacks]
    assert page.texts("#decompose-stage option") == [f"{s.index}: {s.name}" for s in info.stacks[0].stages]


def test_decompose_shows_tokens_features_heatmap_and_charts(page: Page, explorer: Running) -> None:
    tab = page.open("#decompose")
    tab.fill("#decompose-text", TEXT)
    tab.select_option("#decompose-stage", STAGE)
    tab.fill("#decompose-topk", "8")
    tab.click("#decompose-run")
    tab.wait_for_selector("#decompose-tokens .tok")
    tokens = explorer.stub.Tokenize(pb.TokenizeRequest(text=TEXT))
    assert page.texts("#decompose-tokens .tok") == [shown(text) for text in tokens.tokens]

    expected = decompose(explorer, TEXT, t.DecomposeOptions(stages=[STAGE], top_k=8, include_error=True))
    tab.click("#decompose-tokens .tok >> nth=2")
    listed = tab.eval_on_selector_all("#token-features button.feature", "els => els.map(e => +e.dataset.feature)")
    assert listed == list(expected[2].features[0].ids)

    feature = listed[0]
    tab.click("#token-features button.feature >> nth=0")
    tab.wait_for_selector("#heatmap-legend")
    assert f"feature {feature}" in tab.text_content("#heatmap-legend")
    cells = tab.eval_on_selector_all("#decompose-tokens .tok",
                                     "els => els.map(e => [+e.dataset.value, e.style.backgroundColor])")
    filtered = decompose(explorer, TEXT, t.DecomposeOptions(
        stages=[STAGE], top_k=1, feature_filter=[t.FeatureFilter(stage=STAGE, ids=[feature])]))
    truth = [dict(zip(tok.features[0].ids, tok.features[0].values, strict=True)).get(feature, 0.0) for tok in filtered]
    assert [value for value, _ in cells] == pytest.approx(truth, rel=1e-6, abs=1e-7)
    assert truth[2] != 0  # the clicked token's own feature
    assert all(bool(colour) == (value != 0) for value, colour in cells), "coloured cells must be the firing ones"

    assert tokens.tokens[0] == "<bos>"  # the charts leave it out (its norm would flatten the rest)
    assert tab.locator("svg[data-chart=bars] rect").count() == len(tokens.ids) - 1
    l0 = [int(float(x)) for x in tab.eval_on_selector_all(
        "svg[data-chart=bars] rect title", "els => els.map(e => e.textContent.split(': ').pop())")]
    assert l0 == [tok.features[0].l0 for tok in expected[1:]]
    assert tab.locator("svg[data-chart=lines] polyline.actual").count() == 1


def test_strongest_features_leave_special_tokens_out(page: Page, explorer: Running) -> None:
    """"Strongest features in this text" ranks only the text's own tokens: BOS fires the same features whatever
    the text (at a far larger norm), so two unrelated texts listed the same features before."""
    tab = page.open("#decompose")
    listed: dict[str, list[int]] = {}
    for text in (TEXT, "<p>Quarterly revenue rose 4%</p>"):
        tab.fill("#decompose-text", text)
        tab.select_option("#decompose-stage", STAGE)
        tab.fill("#decompose-topk", "4")
        tab.click("#decompose-run")
        count = len(explorer.stub.Tokenize(pb.TokenizeRequest(text=text)).ids)
        tab.wait_for_function(f"() => document.querySelectorAll('#decompose-tokens .tok').length === {count}")
        listed[text] = tab.eval_on_selector_all("#text-features button.feature",
                                                "els => els.map(e => +e.dataset.feature)")
        tokens = decompose(explorer, text, t.DecomposeOptions(stages=[STAGE], top_k=4))
        assert tokens[0].token.special and not any(tok.token.special for tok in tokens[1:])
        best: dict[int, float] = {}
        for tok in tokens[1:]:
            for feature, value in zip(tok.features[0].ids, tok.features[0].values, strict=True):
                best[feature] = max(best.get(feature, 0.0), abs(value))
        ranked = sorted(best, key=lambda f: -best[f])[:24]
        assert sorted(listed[text]) == sorted(ranked)  # ties may order either way
    assert listed[TEXT] != listed["<p>Quarterly revenue rose 4%</p>"]


def test_the_feature_view_shows_the_dashboard_and_searches(page: Page, explorer: Running) -> None:
    densest = explorer.stub.ListFeatures(pb.ListFeaturesRequest(stage=STAGE, sort=pb.FEATURE_SORT_DENSITY,
                                                                descending=True, page_size=1)).features[0].feature
    truth = explorer.stub.GetFeature(pb.GetFeatureRequest(stage=STAGE, feature=densest, top_n=12))
    tab = page.open(f"#feature/{STAGE}/{densest}")
    tab.wait_for_selector(f".dashboard[data-feature='{densest}']")
    side = truth.dashboard.sides[0]
    examples = tab.locator(".side-positive .top-examples .example")
    assert examples.count() == len(side.top_examples) > 0
    first = side.top_examples[0]
    assert examples.nth(0).locator(".tok.firing").text_content() == shown(first.tokens[first.index].text)
    assert page.texts(".side-positive .top-examples .example >> nth=0 >> .tok") == [shown(x.text) for x in first.tokens]
    assert tab.locator(".side-positive svg[data-chart=histogram] rect").count() == len(side.histogram.counts)
    lens = tab.eval_on_selector_all("#top-tokens li", "els => els.map(e => e.firstChild.textContent)")
    assert lens == [shown(x.text) for x in truth.top_tokens] and len(lens) == 12
    assert tab.text_content("#feature-explanation") == (truth.explanation or "(no explanation stored)")
    label = side.label  # the token label: the rule's tokens and its F1, as GetFeature returns them
    assert side.HasField("label") and label.rule_size >= 1
    chips = tab.eval_on_selector_all("#label-positive li", "els => els.map(e => e.firstChild.textContent)")
    assert chips == [shown(x.text) for x in label.tokens[: label.rule_size]]
    scores = tab.text_content("#label-positive .label-scores")
    assert scores.startswith(f"token F1 {float(f'{label.f1:.3g}'):g} (precision ") and "recall" in scores
    assert tab.locator(".side-negative .token-label").count() == 0  # resid1 is unsigned: one side, one label

    tab.select_option("#search-mode", "explanation")
    tab.fill("#search-query", "cat")
    tab.click("#search-run")
    tab.wait_for_selector("#search-results tr.result")
    found = explorer.stub.SearchFeatures(pb.SearchFeaturesRequest(explanation="cat", page_size=20))
    rows = tab.eval_on_selector_all("#search-results tr.result", "els => els.map(e => +e.dataset.feature)")
    assert rows == [m.feature for m in found.features]
    f1s = tab.eval_on_selector_all("#search-results tr.result", "els => els.map(e => e.children[4].textContent)")
    assert f1s == [f"{float(f'{m.label_f1:.3g}'):g}" if m.label_f1 else "0" for m in found.features]
    tab.click("#search-results tr.result >> nth=0 >> button")
    tab.wait_for_selector(f".dashboard[data-feature='{found.features[0].feature}']")
    assert tab.text_content("#feature-explanation") == found.features[0].explanation

    tab.click("#feature-monitor")  # the same feature coloured over the decompose view's text
    tab.wait_for_selector("#heatmap-legend")
    assert f"{found.features[0].stage} feature {found.features[0].feature}" in tab.text_content("#heatmap-legend")


def steered_request(prompt: str, stage: str, feature: int, value: float, tokens: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(
        prompt=t.Input(text=prompt), with_default=True,
        sampling=pb.SamplingParams(max_new_tokens=tokens, temperature=0, seed=0),
        interventions=[t.Intervention(stage=stage, feature=feature, op=t.INTERVENTION_OP_SET, value=value,
                                      positions=t.Positions(scope=t.POSITION_SCOPE_ALL))])


def test_the_feature_page_shows_an_llm_explanations_source_and_scores(page: Page, explorer: Running) -> None:
    tab = page.open(f"#feature/{STAGE}/{SCORED}")
    tab.wait_for_selector(f".dashboard[data-feature='{SCORED}']")
    assert tab.text_content("#feature-explanation") == "tables of figures"
    assert tab.text_content("#explanation-source") == (
        "by some-model (featurewire-explain-v1, 2026-12-08): detection 0.75 (20 examples), fuzzing 0.5 (18 examples)")
    tab = page.open(f"#feature/{STAGE}/3")  # an imported explanation has no source line
    tab.wait_for_selector(".dashboard[data-feature='3']")
    assert tab.locator("#explanation-source").count() == 0


def test_a_steered_generation_fills_both_columns_as_grpc_does(page: Page, explorer: Running) -> None:
    tab = page.open(f"#feature/{STAGE}/3")
    tab.wait_for_selector(".dashboard[data-feature='3']")
    tab.click("#feature-steer")
    tab.wait_for_selector("#view-steer:not([hidden]) .intervention")
    value = float(tab.input_value(".intervention .value"))
    assert tab.input_value(".intervention .feature") == "3" and tab.input_value(".intervention .stage") == STAGE
    tab.fill("#steer-prompt", "My favourite animal is")
    tab.fill("#steer-max-tokens", "12")
    tab.click("#steer-run")
    tab.wait_for_selector("#steer-status:has-text('Done')", timeout=60_000)
    steered, default = ("".join(page.texts(f"#{column} .gen")) for column in ("steered-output", "default-output"))
    finishes = {e.finish.branch: e.finish.text for e in explorer.stub.Generate(
        steered_request("My favourite animal is", STAGE, 3, value, 12)) if e.HasField("finish")}
    assert (steered, default) == (finishes[t.BRANCH_STEERED], finishes[t.BRANCH_DEFAULT])
    assert steered != default, "the edit changed nothing visible"
    assert tab.locator("#steered-output .gen").count() == tab.locator("#default-output .gen").count() == 12
    assert int(tab.get_attribute("#view-steer", "data-first-token-ms")) > 0


def test_conditions_are_marked_where_they_fire(page: Page, explorer: Running) -> None:
    tab = page.open("#steer")
    tab.fill("#steer-prompt", TEXT)
    tab.fill("#steer-max-tokens", "8")
    tab.click("#add-condition")
    row = tab.locator(".condition").nth(0)
    row.locator(".stage").select_option(STAGE)
    row.locator(".comparison").select_option("COMPARISON_BELOW")
    row.locator(".threshold").fill("1000")  # fires at the first generated token
    tab.click("#steer-run")
    tab.wait_for_selector("#steer-status:has-text('Done')", timeout=60_000)
    assert "⚑ c1" in tab.text_content("#steered-output .condition-event")
    assert "feature_condition after 1 tokens" in tab.text_content("#steered-output .finish")


def test_stop_cancels_the_generation_on_the_server(page: Page, explorer: Running,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    record = slow_generation(monkeypatch, 0.05)
    tab = page.open("#steer")
    tab.fill("#steer-max-tokens", "300")
    tab.click("#steer-run")
    tab.wait_for_selector("#steered-output .gen", state="attached")
    tab.click("#steer-stop")
    tab.wait_for_selector("#steer-status:has-text('Stopped.')")
    assert record["closed"].wait(10), "the generation kept running after Stop"
    assert record["events"] < 200
    assert explorer.stub.Tokenize(pb.TokenizeRequest(text="still serving")).ids


def test_text_from_users_and_models_is_never_html(page: Page, explorer: Running) -> None:
    tab = page.open("#decompose")
    tab.fill("#decompose-text", HOSTILE)
    tab.click("#decompose-run")
    tab.wait_for_selector("#decompose-tokens .tok")
    assert "<script>" in "".join(page.texts("#decompose-tokens .tok"))
    assert tab.locator("#decompose-tokens img, #decompose-tokens script").count() == 0
    tab.goto(page.base + "#steer")
    tab.fill("#steer-prompt", HOSTILE)
    tab.fill("#steer-max-tokens", "2")
    tab.click("#steer-run")
    tab.wait_for_selector("#steer-status:has-text('Done')", timeout=60_000)
    assert '<img src=x onerror="window.__xss = 2">' in tab.text_content("#steered-output .prompt")
    assert tab.locator("#view-steer img").count() == 0
    assert tab.evaluate("window.__xss") is None


def test_an_empty_prompt_shows_the_servers_error(page: Page) -> None:
    tab = page.open("#decompose")
    tab.fill("#decompose-text", "")
    tab.click("#decompose-run")
    assert "INVALID_ARGUMENT" in tab.text_content("#decompose-output .error")
    assert "input.text is empty" in tab.text_content("#decompose-output .error")
    tab.goto(page.base + "#steer")
    tab.fill("#steer-prompt", "")
    tab.press("#steer-prompt", "Control+Enter")  # the keyboard way to run
    tab.wait_for_selector("#steer-status .error")
    assert "prompt.text is empty" in tab.text_content("#steer-status .error")
    tab.goto(page.base + "#feature/no-such-stage/1")
    tab.wait_for_selector("#feature-detail .error")
    assert "NOT_FOUND" in tab.text_content("#feature-detail .error")


def test_a_server_with_auth_asks_for_the_token(chromium: Any, server_loop: ServerLoop, tmp_path: Path,
                                               tiny_gemma: Any) -> None:
    stack = write_dashboard_stack(tiny_gemma, tmp_path / "stack", tokens=500)
    running = start_server(server_loop, server_config(stack, http_port=0, self_check=False, auth_token="s3cret"))
    try:
        page = Page(chromium, running)
        tab = page.tab
        tab.goto(page.base)
        tab.wait_for_selector("#notice .error")
        assert "UNAUTHENTICATED" in tab.text_content("#notice .error")
        tab.fill("#token", "wrong")
        tab.click("#notice button")
        tab.wait_for_selector("#notice .error")
        assert tab.get_attribute("body", "data-ready") is None
        tab.fill("#token", "s3cret")
        tab.click("#notice button")
        tab.wait_for_selector("body[data-ready=true]")
        tab.click("#decompose-run")
        tab.wait_for_selector("#decompose-tokens .tok")
        assert page.errors == []
        with pytest.raises(grpc.RpcError):
            running.stub.Tokenize(pb.TokenizeRequest(text="no token"))
    finally:
        running.stop()
