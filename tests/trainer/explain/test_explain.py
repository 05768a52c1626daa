"""`featurewire-train explain` against a real featurewire server's OpenAI-compatible completions endpoint on the
tiny model (its answers are gibberish, which is the point: prompts are built as documented, answers parsed or
refused clearly, scores computed in [0, 1] with their counts, records written, a second run skips), and the error
paths (unreachable, 401, 429 then success, malformed, empty and non-UTF-8 answers) against a local stub server."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from core.stack.explanations import read_records
from core.stack.reader import read_stack
from core.stack.runtime import StackRuntime
from tests.service.conftest import Running, ServerLoop, server_config, start_server
from tests.service.engine.tiny_stacks import EXPLANATIONS, one_thread, write_dashboard_stack
from trainer.explain.endpoint import Endpoint, EndpointConfig, EndpointError
from trainer.explain.prompts import (
    PROMPT_VERSION,
    RefusedAnswer,
    balanced_accuracy,
    parse_explanation,
    parse_yes_no,
    render,
)
from trainer.explain.run import HELD_OUT, SHOWN, explain_stack, prepare

STAGE = "resid1"


@pytest.fixture(scope="module")
def server_loop() -> Iterator[ServerLoop]:
    loop = ServerLoop()
    yield loop
    loop.close()


@pytest.fixture(scope="module")
def stack(tiny_gemma, tmp_path_factory: pytest.TempPathFactory) -> Path:
    with one_thread():
        return write_dashboard_stack(tiny_gemma, tmp_path_factory.mktemp("explain") / "stack")


@pytest.fixture(scope="module")
def served(server_loop: ServerLoop, stack: Path) -> Iterator[Running]:
    running = start_server(server_loop, server_config(stack, http_port=0, self_check=False))
    yield running
    running.stop()


def endpoint(served: Running, **kwargs) -> Endpoint:
    base = f"http://127.0.0.1:{served.server.http_port}/openai/v1"
    import urllib.request
    with urllib.request.urlopen(f"{base}/models", timeout=30) as response:
        model = json.load(response)["data"][0]["id"]
    return Endpoint(EndpointConfig(base, model, api="completions", max_tokens=12, **kwargs))


def busiest(stack: Path, n: int) -> list[int]:
    """The n features of resid1 that fired most among those firing on at most 4% of tokens (denser ones of the
    random tiny model fire in almost every window, leaving too few non-activating examples)."""
    stage = read_stack(stack).stages[0]
    count = stage.dashboard["count"][0]
    moderate = count.where(count <= 0.04 * stage.dashboard_record["tokens"], 0)
    return moderate.argsort(descending=True)[:n].tolist()


def test_prompts_render_marks_and_parse_answers():
    assert render(["The", " cat", " sat", "\n"], [False, True, True, False]) == "The<< cat sat>>⏎"
    assert render(["a", "b"], [True, False]) == "<<a>>b" and render(["a", "b"], [False, True]) == "a<<b>>"
    assert parse_explanation("\n  Explanation: \"the word cat\"\nmore") == "the word cat"
    for empty in ("", "  \n ", "<<>> ...", "Explanation:"):
        with pytest.raises(RefusedAnswer, match="holds no explanation"):
            parse_explanation(empty)
    assert parse_yes_no(" Yes, it does") is True and parse_yes_no("no.") is False
    assert parse_yes_no("yesterday") is None and parse_yes_no("maybe") is None
    assert balanced_accuracy([True, True, False, False], [True, None, False, True]) == pytest.approx(0.5)
    assert balanced_accuracy([True, False, False], [True, False, False]) == 1.0
    with pytest.raises(ValueError, match="both classes"):
        balanced_accuracy([True], [True])


def test_prepared_examples_split_shown_from_held_out_and_quiet_is_really_zero(stack: Path, tiny_gemma):
    loaded = read_stack(stack)
    runtime = StackRuntime.from_loaded(loaded)
    feature = busiest(stack, 1)[0]
    with one_thread():
        job = prepare(tiny_gemma, loaded, runtime, 0, feature, lambda ids: [tiny_gemma.decode([i],
                                                                                          skip_special_tokens=False)
                                                                           for i in ids])
    assert job is not None and 2 <= len(job.shown) <= SHOWN and 2 <= len(job.held) <= HELD_OUT
    assert all("<<" in x and ">>" in x for x in job.shown)  # every shown example marks its firing token
    assert all(any(a > 0 for a in w.acts) for w in job.held)
    assert len(job.quiet) == len(job.held) and all(not any(w.acts) for w in job.quiet)
    shown = {x.replace("<<", "").replace(">>", "") for x in job.shown}
    held = {"".join(tiny_gemma.decode([i], skip_special_tokens=False) for i in w.ids).replace("\n", "⏎")
            for w in job.held}
    assert len(shown & held) < len(held)  # held-out windows are other windows (a repeated text may recur)


def test_explain_against_our_openai_endpoint_writes_scores_and_resumes(stack: Path, served: Running, tiny_gemma):
    features = busiest(stack, 2)
    api = endpoint(served)
    with one_thread():
        summary = explain_stack(stack, tiny_gemma, api, api, stages=[STAGE], features=features, concurrency=2,
                                progress=False)
    assert summary["explained"] + len(summary["failed"]) + summary["unusable"] == 2 and summary["explained"] >= 1
    assert all("holds no explanation" in why for why in summary["failed"].values())
    assert summary["requests"] > summary["explained"] and summary["prompt_tokens"] > 0
    records = read_records(stack)[STAGE]
    for f in features:
        record = records.get(f)
        if not isinstance(record, dict):
            continue
        assert record["prompt_version"] == PROMPT_VERSION and record["explainer"] == api.config.model
        assert record["source"] == "llm" and record["date"].endswith("Z") and len(record["examples"]) == 64
        assert record["text"] and "\n" not in record["text"]
        for name in ("detection", "fuzzing"):
            score = record["scores"][name]
            assert 0 <= score["balanced_accuracy"] <= 1 and score["examples"] >= 4
            assert 0 <= score["unparsed"] <= score["examples"]
    loaded = read_stack(stack)  # the server's reader: old string entries and new records side by side
    assert loaded.explanations[STAGE][5] == EXPLANATIONS[STAGE][5]
    assert all(loaded.explanations[STAGE][f] == records[f]["text"] for f in features if isinstance(records.get(f),
                                                                                                   dict))
    with one_thread():
        fresh = endpoint(served)  # its own request count
        again = explain_stack(stack, tiny_gemma, fresh, fresh, stages=[STAGE], features=features, progress=False)
    assert again["skipped"] == summary["explained"]  # only the refused ones (if any) are asked again
    assert again["requests"] <= len(summary["failed"]) * (1 + 4 * HELD_OUT)


# ------------------------------------------------------------------------------------- error paths (stub)


class Stub(BaseHTTPRequestHandler):
    """Answers each POST with the next (status, body bytes, headers) of `script`."""

    script: list[tuple[int, bytes, dict[str, str]]] = []
    seen: list[dict] = []

    def do_POST(self):  # noqa: N802 - the http.server API
        self.seen.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
        status, body, headers = self.script.pop(0) if self.script else (500, b"{}", {})
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def stub() -> Iterator[tuple[str, type[Stub]]]:
    handler = type("Handler", (Stub,), {"script": [], "seen": []})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/v1", handler
    server.shutdown()


def completion(text: str) -> bytes:
    return json.dumps({"choices": [{"text": text}], "usage": {"prompt_tokens": 5, "completion_tokens": 1}}).encode()


def test_endpoint_errors_are_clear(stub):
    url, handler = stub
    api = Endpoint(EndpointConfig(url, "m", api="completions", retries=2, backoff=0.01, api_key="k"))
    handler.script += [(429, b"slow down", {"Retry-After": "0"}), (503, b"busy", {}), (200, completion("yes"), {})]
    assert api.complete("p") == "yes" and api.usage.retries == 2 and api.usage.prompt_tokens == 5
    assert handler.seen[-1]["prompt"] == "p" and handler.seen[-1]["temperature"] == 0
    handler.script += [(401, b'{"error": "bad key"}', {})]
    with pytest.raises(EndpointError, match="HTTP 401.*--api-key-env"):
        api.complete("p")
    handler.script += [(429, b"", {"Retry-After": "0"})] * 3
    with pytest.raises(EndpointError, match="HTTP 429 after 3 tries"):
        api.complete("p")
    handler.script += [(200, b"\xff\xfe not utf-8", {})]
    with pytest.raises(EndpointError, match="not UTF-8 JSON"):
        api.complete("p")
    handler.script += [(200, b'{"choices": []}', {})]
    with pytest.raises(EndpointError, match=r"no choices\[0\].text"):
        api.complete("p")
    chat = Endpoint(EndpointConfig(url, "m", api="chat", retries=0))
    handler.script += [(200, json.dumps({"choices": [{"message": {"content": "no"}}]}).encode(), {})]
    assert chat.complete("q") == "no" and handler.seen[-1]["messages"] == [{"role": "user", "content": "q"}]
    with pytest.raises(EndpointError, match="cannot reach"):
        Endpoint(EndpointConfig("http://127.0.0.1:9/v1", "m", retries=0, timeout=5)).complete("p")


def test_a_fatal_error_leaves_the_stack_as_it_was_and_empty_answers_are_refused(stack: Path, stub, tiny_gemma):
    url, handler = stub
    before = (stack / "stack.json").read_bytes()
    api = Endpoint(EndpointConfig(url, "stub-model", api="completions", retries=0))
    handler.script += [(401, b"no", {})] * 4
    with one_thread(), pytest.raises(EndpointError, match="HTTP 401"):
        explain_stack(stack, tiny_gemma, api, api, stages=[STAGE], features=busiest(stack, 1), progress=False)
    assert (stack / "stack.json").read_bytes() == before
    handler.script[:] = [(200, completion("  \n"), {})] * 2
    with one_thread():
        summary = explain_stack(stack, tiny_gemma, api, api, stages=[STAGE], features=busiest(stack, 1)[:1],
                                progress=False)
    assert summary["explained"] == 0 and list(summary["failed"].values())[0].startswith("the explainer's answer holds")
    assert (stack / "stack.json").read_bytes() == before


def test_the_command_line_reports_bad_flags_and_endpoint_errors(stack: Path, capsys, monkeypatch):
    from trainer.cli import main

    base = ["explain", "--stack", str(stack), "--endpoint", "http://127.0.0.1:9/v1", "--model", "m", "--quiet"]
    monkeypatch.delenv("FW_TEST_NO_KEY", raising=False)
    assert main([*base, "--api-key-env", "FW_TEST_NO_KEY"]) == 2
    assert "FW_TEST_NO_KEY: that environment variable is not set" in capsys.readouterr().err
    assert main([*base, "--features", "a,b"]) == 2
    assert "--features must be comma-separated feature ids" in capsys.readouterr().err
    before = (stack / "stack.json").read_bytes()
    with one_thread():
        code = main([*base, "--stage", STAGE, "--features", str(busiest(stack, 1)[0]), "--device", "cpu",
                     "--api", "completions"])
    assert code == 1 and "cannot reach http://127.0.0.1:9/v1/completions" in capsys.readouterr().err
    assert (stack / "stack.json").read_bytes() == before
