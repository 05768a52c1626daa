"""The explorer's feature view with measured steerability, in Debian's Chromium against a real server on the tiny
model (the stack with a planted token feature of tests/trainer/steerability): the curve charts hold one point per
measured strength, and "Steer with it" starts from the measured best strength (op and amount), or from 2x max for a
feature without a record."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from featurewire.v1 import featurewire_pb2 as pb

from core.stack.reader import read_stack
from tests import browser
from tests.service.conftest import Running, ServerLoop, server_config, start_server
from tests.service.test_explorer import Page, chromium  # noqa: F401  (the module-scoped browser fixture)
from tests.trainer.steerability.test_build import PLANTED, planted_stack
from trainer.steerability.build import Selection, read_openings, run_steerability
from trainer.steerability.measure import SteerSettings
from trainer.steerability.schedule import parse_strengths

pytestmark = pytest.mark.skipif(browser.missing() is not None, reason=browser.missing() or "")

STAGE = 0
STRENGTHS = ("add:max:0,8,32,64", "set:max:8")
NAMES: list[str] = []  # the stack's stage names, filled by `served`


@pytest.fixture(scope="module")
def served(server_loop: ServerLoop, tiny_gemma: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Running]:
    stack, _ = planted_stack(tiny_gemma, tmp_path_factory.mktemp("explorer-steer") / "stack", dashboards=True)
    stage = read_stack(stack).stages[STAGE]
    fired = [PLANTED] + [f for f in range(1, stage.sae.d_sae) if int(stage.dashboard["count"][:, f].sum()) > 0][:3]
    settings = SteerSettings(tuple(parse_strengths(list(STRENGTHS))), max_new_tokens=6, samples=0)
    run_steerability(stack, tiny_gemma, [Selection(STAGE, tuple(fired))], settings, read_openings()[:3],
                     progress=False)
    running = start_server(server_loop, server_config(stack, http_port=0, self_check=False, queue_size=4))
    NAMES[:] = [s.name for s in read_stack(stack).stages]
    yield running
    running.stop()


@pytest.fixture
def page(chromium: Any, served: Running) -> Iterator[Page]:  # noqa: F811
    opened = Page(chromium, served)
    yield opened
    opened.tab.close()
    assert opened.errors == [], f"the page raised: {opened.errors}"


def test_curve_charts_and_steer_from_the_measured_strength(page: Page, served: Running) -> None:
    name = NAMES[STAGE]
    listed = served.stub.ListFeatures(pb.ListFeaturesRequest(stage=name, sort=pb.FEATURE_SORT_STEERING,
                                                             descending=True)).features
    steering = [f.feature for f in listed if f.steers]
    assert steering, "no measured feature steers on the tiny stack at these strengths"
    feature = steering[0]
    truth = served.stub.GetFeature(pb.GetFeatureRequest(stage=name, feature=feature)).steerability
    tab = page.open(f"#feature/{name}/{feature}")
    tab.wait_for_selector("#feature-steerability")
    assert tab.get_attribute("#feature-steerability", "data-steers") == "1"
    charts = tab.locator("#feature-steerability svg[data-chart=lines]")
    assert charts.count() == len({(p.op, p.unit) for p in truth.curve}) == 2
    dots = tab.locator("#feature-steerability circle.dot.actual").count()
    assert dots == len(truth.curve)
    tab.click("#feature-steer")
    tab.wait_for_selector("#view-steer:not([hidden]) .intervention")
    op = tab.input_value("#view-steer .intervention .op")
    value = float(tab.input_value("#view-steer .intervention .value"))
    assert op == {"add": "INTERVENTION_OP_ADD", "set": "INTERVENTION_OP_SET"}[truth.best.op]
    assert value == pytest.approx(truth.best.amount, rel=1e-3)


def test_an_unmeasured_feature_starts_from_twice_its_max(page: Page, served: Running) -> None:
    name = NAMES[1]  # a stage with no steerability records
    feature = served.stub.ListFeatures(pb.ListFeaturesRequest(stage=name, sort=pb.FEATURE_SORT_MAX,
                                                              descending=True, page_size=1)).features[0]
    tab = page.open(f"#feature/{name}/{feature.feature}")
    tab.wait_for_selector(f".dashboard[data-feature='{feature.feature}']")
    assert tab.locator("#feature-steerability").count() == 0
    tab.click("#feature-steer")
    tab.wait_for_selector("#view-steer:not([hidden]) .intervention")
    assert float(tab.input_value("#view-steer .intervention .value")) == pytest.approx(2 * feature.max, rel=1e-3)
