"""The explorer in a real browser: time for the first steered token to appear in the page after the click on
Generate, against the same Generate call over gRPC in the same run; and the three screenshots of the README.

    python bench/explorer.py --model default --stack runs/demo/stack [--repeats 5] [--screenshots docs/img]
    python bench/explorer.py --model tiny-random --stack DIR --repeats 1   # a quick check (a stack with dashboards)

A `featurewire-serve serve --http-port 0` process (bench/http_gateway.py) and Debian's Chromium driven by
Playwright (tests/browser.py). The feature is the one `make demo` steers with: SearchFeatures on the demo's
concept text at stage 0, the strongest match firing on at most 2% of held-out tokens, SET to twice its
held-out max. Per repeat, interleaved: `page` is what the page itself measures from the click to the first
steered token's text node in the DOM (`data-first-token-ms`: the fetch, the gateway, the loopback gRPC call,
prefill, the SSE parsing and rendering); `http` is `POST /v1/Generate` from Python to the first steered token's
SSE event (the gateway without the browser); `grpc` is the stub call to its first STEERED TokenEvent.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import grpc
from featurewire.v1 import featurewire_pb2 as pb
from featurewire.v1 import featurewire_pb2_grpc as pb_grpc
from featurewire.v1 import types_pb2 as t
from google.protobuf import json_format
from http_gateway import ROOT, ServerProcess
from machine import machine_info

sys.path.insert(0, str(ROOT))
from service.demo import CONCEPT, MAX_DENSITY, PROMPT, STEER_MULTIPLE  # noqa: E402
from tests import browser  # noqa: E402

NEW_TOKENS = 24
VIEWPORT = {"width": 1400, "height": 1000}


def pick_feature(stub: pb_grpc.FeaturewireStub, stage: str) -> tuple[pb.FeatureMatch, float]:
    """The demo's feature (service/demo.py) and its held-out max |z| (the slider and SET value scale)."""
    matches = list(stub.SearchFeatures(pb.SearchFeaturesRequest(
        text=pb.TextQuery(text=CONCEPT), stages=[stage], page_size=50)).features)
    specific = [m for m in matches if m.HasField("density") and 0 < m.density <= MAX_DENSITY]
    match = (specific or matches)[0]
    feature = stub.GetFeature(pb.GetFeatureRequest(stage=stage, feature=match.feature))
    return match, max((side.max for side in feature.dashboard.sides), default=match.score)


def grpc_first_token(stub: pb_grpc.FeaturewireStub, request: pb.GenerateRequest) -> float:
    started = time.perf_counter()
    call = stub.Generate(request)
    for event in call:
        if event.HasField("token") and event.token.branch == t.BRANCH_STEERED:
            elapsed = time.perf_counter() - started
            call.cancel()
            return elapsed
    raise RuntimeError("no steered token")


def http_first_token(port: int, request: pb.GenerateRequest) -> float:
    """POST /v1/Generate from Python: the gateway's share of the page's time, without the browser."""
    body = json_format.MessageToJson(request).encode()
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    started = time.perf_counter()
    connection.request("POST", "/v1/Generate", body, {"content-type": "application/json"})
    response = connection.getresponse()
    try:
        for line in response:
            if line.startswith(b"data: ") and b'"BRANCH_STEERED"' in line and b'"token"' in line:
                return time.perf_counter() - started
    finally:
        connection.close()
    raise RuntimeError("no steered token")


def page_first_token(tab: Any) -> float:
    tab.click("#steer-run")
    tab.wait_for_selector("#steer-status:has-text('Done')", timeout=600_000)
    return float(tab.get_attribute("#view-steer", "data-first-token-ms")) / 1000


def report(model: str, stack: Path, repeats: int, screenshots: Path | None) -> dict[str, Any]:
    from playwright.sync_api import sync_playwright

    if browser.missing():
        raise SystemExit(browser.missing())
    server = ServerProcess(model, stack)
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{server.grpc_port}")
        stub = pb_grpc.FeaturewireStub(channel)
        info = stub.GetServerInfo(pb.GetServerInfoRequest())
        stage = info.stacks[0].stages[0].name
        match, top = pick_feature(stub, stage)
        value = STEER_MULTIPLE * top
        request = pb.GenerateRequest(prompt=t.Input(text=PROMPT), with_default=True,
                                     sampling=pb.SamplingParams(max_new_tokens=NEW_TOKENS, temperature=0, seed=0),
                                     interventions=[t.Intervention(stage=stage, feature=match.feature,
                                                                   op=t.INTERVENTION_OP_SET, value=value)])
        with sync_playwright() as playwright:
            chromium = browser.launch(playwright)
            tab = chromium.new_page(viewport=VIEWPORT)
            base = f"http://127.0.0.1:{server.http_port}/"
            tab.goto(base + "#decompose")
            tab.wait_for_selector("body[data-ready=true]")
            shoot_decompose(tab, stage, match, screenshots)
            shoot_feature(tab, stage, match, screenshots)
            tab.click("#feature-steer")  # the feature view's button: SET at twice the max, as in make demo
            tab.wait_for_selector("#view-steer:not([hidden]) .intervention")
            tab.fill(".intervention .value", repr(value))
            tab.fill("#steer-prompt", PROMPT)
            tab.fill("#steer-max-tokens", str(NEW_TOKENS))
            ways = {"page": lambda: page_first_token(tab), "http": lambda: http_first_token(server.http_port, request),
                    "grpc": lambda: grpc_first_token(stub, request)}
            times: dict[str, list[float]] = {name: [] for name in ways}
            for way in ways.values():  # warm-up
                way()
            for repeat in range(repeats):
                for name in list(ways) if repeat % 2 == 0 else reversed(ways):
                    times[name].append(ways[name]())
            steered = "".join(tab.eval_on_selector_all("#steered-output .gen", "els => els.map(e => e.textContent)"))
            default = "".join(tab.eval_on_selector_all("#default-output .gen", "els => els.map(e => e.textContent)"))
            if screenshots:
                tab.screenshot(path=str(screenshots / "explorer-steer.png"), full_page=True)
            chromium.close()
        channel.close()
    finally:
        server.stop()
    return {
        "machine": {**machine_info(), "model": model, "chromium": str(browser.CHROMIUM)},
        "stack": stack.name, "stage": stage, "feature": match.feature, "value": value, "prompt": PROMPT,
        "steered": steered, "default": default, "repeats": repeats,
        "median_seconds": {name: statistics.median(values) for name, values in times.items()},
        "seconds": times,
        "ratios": {name: statistics.median(v / g for v, g in zip(times[name], times["grpc"], strict=True))
                   for name in ("page", "http")},
    }


def shoot_decompose(tab: Any, stage: str, match: pb.FeatureMatch, screenshots: Path | None) -> None:
    """The concept text decomposed at `stage`, the firing token selected and the text coloured by the feature."""
    tab.fill("#decompose-text", CONCEPT)
    tab.select_option("#decompose-stage", stage)
    tab.click("#decompose-run")
    tab.wait_for_selector("#decompose-tokens .tok")
    tab.click(f"#decompose-tokens .tok >> nth={match.position}")
    tab.click(f"#token-features button.feature[data-feature='{match.feature}']")
    tab.wait_for_selector("#heatmap-legend")
    if screenshots:
        tab.screenshot(path=str(screenshots / "explorer-decompose.png"), full_page=True)


def shoot_feature(tab: Any, stage: str, match: pb.FeatureMatch, screenshots: Path | None) -> None:
    """The text search that finds the feature, then its dashboard."""
    tab.click("#nav-feature")
    tab.select_option("#search-mode", "text")
    tab.fill("#search-query", CONCEPT)
    tab.select_option("#search-stage", stage)
    tab.click("#search-run")
    tab.wait_for_selector("#search-results tr.result")
    row = f"#search-results tr.result[data-feature='{match.feature}']"
    while not tab.locator(row).count():  # the demo's pick is the strongest *specific* match: maybe on a later page
        rows = tab.locator("#search-results tr.result").count()
        tab.click("#search-more")
        tab.locator("#search-results tr.result").nth(rows).wait_for(state="attached")
    tab.locator(row).scroll_into_view_if_needed()
    tab.click(f"{row} button")
    tab.wait_for_selector(f".dashboard[data-feature='{match.feature}']")
    if screenshots:
        tab.screenshot(path=str(screenshots / "explorer-feature.png"), full_page=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="default (the default), tiny-random, a directory or .gguf")
    parser.add_argument("--stack", type=Path, default=ROOT / "runs" / "demo" / "stack",
                        help="a stack directory with dashboards (default: runs/demo/stack, `make demo-stack`)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--screenshots", type=Path, help="write explorer-{decompose,feature,steer}.png here")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.screenshots:
        args.screenshots.mkdir(parents=True, exist_ok=True)
    result = report(args.model, args.stack, args.repeats, args.screenshots)
    if args.json:
        print(json.dumps(result, indent=2))
        return
    m, seconds = result["machine"], result["median_seconds"]
    print(f"{m['model']} ({m['cpu']}, {m['cpu_count']} CPUs), stack {result['stack']}, {result['stage']} feature "
          f"{result['feature']} SET {result['value']:.2f}, prompt {result['prompt']!r}, {args.repeats} repeats")
    print(f"first steered token, median ms: page {1000 * seconds['page']:.0f} (click to text in the DOM), "
          f"HTTP {1000 * seconds['http']:.0f} (POST to its SSE event), "
          f"gRPC {1000 * seconds['grpc']:.0f} (call to event)")
    print(f"ratios to gRPC: page {result['ratios']['page']:.3f}, HTTP {result['ratios']['http']:.3f}")
    print(f"steered: {result['steered']!r}\ndefault: {result['default']!r}")


if __name__ == "__main__":
    main()
