"""The OpenAI-compatible API (`/openai/v1` on the HTTP port) through the official `openai` package and curl, against
real servers on the tiny model: an in-process one with the smoke stack, and a `serve` process started with
--chat-template and a bearer token. Completions equal the gRPC Generate they become (text, log-probabilities,
features), steering travels in `extra_body`, n and the default branch come back as documented, errors are
OpenAI's JSON with the statuses its SDK maps to exceptions, and a dropped stream frees the engine."""

from __future__ import annotations

import asyncio
import http.client
import json
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import openai
import pytest
from featurewire.v1 import featurewire_pb2 as pb
from google.protobuf import json_format

from core.errors import FailedPrecondition
from service.cli import _server_config, build_parser
from service.http.openai.chat import load_template
from tests.server_process import ServerProcess, launch
from tests.service.conftest import Running, ServerLoop, server_config, slow_generation, start_server

STAGE0, STAGE1 = "blocks.1.hook_resid_post", "blocks.2.hook_mlp_out"
TOKEN = "openai-token"
TEMPLATE = ("{{ bos_token }}{% for m in messages %}{% if m['role'] == 'system' %}"
            "{{ raise_exception('this template has no system role') }}{% endif %}<start_of_turn>"
            "{{ 'model' if m['role'] == 'assistant' else 'user' }}\n{{ m['content'] }}<end_of_turn>\n{% endfor %}"
            "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}")
PIN = {"stage": STAGE0, "feature": 3, "op": "INTERVENTION_OP_SET", "value": 40.0}


def client(port: int, **kwargs: Any) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"http://127.0.0.1:{port}/openai/v1", api_key=kwargs.pop("api_key", "unused"),
                         max_retries=0, timeout=60, **kwargs)


def generate(running: Running, prompt: str, sampling: dict[str, Any], **extra: Any) -> list[dict[str, Any]]:
    """The gRPC Generate stream of the same request, as JSON messages."""
    request = json_format.ParseDict({"prompt": {"text": prompt}, "sampling": sampling, **extra}, pb.GenerateRequest())
    return [json_format.MessageToDict(m) for m in running.stub.Generate(request, timeout=60)]


def tokens(messages: list[dict[str, Any]], branch: str = "BRANCH_STEERED") -> list[dict[str, Any]]:
    return [m["token"] for m in messages if "token" in m and m["token"].get("branch") == branch]


# -- fixtures ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def served(server_loop: ServerLoop, tiny_stack: Path) -> Iterator[Running]:
    running = start_server(server_loop, server_config(tiny_stack, http_port=0, queue_size=8, max_batch_size=4))
    yield running
    running.stop()


@pytest.fixture(scope="module")
def api(served: Running) -> openai.OpenAI:
    assert served.server.http_port
    return client(served.server.http_port)


@pytest.fixture(scope="module")
def stack_model(served: Running) -> str:
    return f"tiny-random:{served.stub.ListStacks(pb.ListStacksRequest(), timeout=10).stacks[0].name}"


@pytest.fixture(scope="module")
def chat_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    """`serve --chat-template FILE` with a bearer token, as a process (the flag's whole path)."""
    folder = tmp_path_factory.mktemp("chat")
    (folder / "template.jinja").write_text(TEMPLATE)
    (folder / "token").write_text(TOKEN)
    server = launch(["--model", "tiny-random", "--device", "cpu", "--host", "127.0.0.1", "--port", "0",
                     "--http-port", "0", "--metrics-port", "0", "--chat-template", str(folder / "template.jinja"),
                     "--auth-token-file", str(folder / "token"), "--drain-grace", "10"])
    yield server
    server.stop()


# -- completions -------------------------------------------------------------------------------------------
def test_models_list_the_bare_model_and_each_stack(api: openai.OpenAI, stack_model: str) -> None:
    ids = [m.id for m in api.models.list().data]
    assert ids == ["tiny-random", stack_model]
    model = api.models.retrieve(stack_model)
    assert model.owned_by == "featurewire" and model.model_extra["featurewire"]["stages"] == [STAGE0, STAGE1]
    with pytest.raises(openai.NotFoundError) as caught:
        api.completions.create(model="gpt-4o", prompt="x", max_tokens=1)
    assert caught.value.code == "model_not_found" and "tiny-random" in caught.value.message


def test_a_completion_is_the_grpc_generate_it_becomes(served: Running, api: openai.OpenAI) -> None:
    answer = api.completions.create(model="tiny-random", prompt="The cat sat on", max_tokens=8, temperature=0.8,
                                    top_p=0.9, seed=11, logprobs=0)
    messages = generate(served, "The cat sat on", {"maxNewTokens": 8, "temperature": 0.8, "topP": 0.9, "seed": "11"})
    grpc_tokens = tokens(messages)
    choice = answer.choices[0]
    assert choice.text == "".join(t.get("text", "") for t in grpc_tokens)
    assert choice.logprobs.token_logprobs == pytest.approx([t["logprob"] for t in grpc_tokens], abs=1e-5)
    assert len(choice.logprobs.tokens) == 8 and choice.logprobs.top_logprobs is None
    assert choice.finish_reason == "length" and answer.usage.completion_tokens == 8
    assert answer.usage.prompt_tokens == messages[0]["header"]["promptTokens"] and answer.id.startswith("cmpl-")
    assert answer._request_id and answer.id == "cmpl-" + answer._request_id  # x-request-id, as the SDK reads it


def test_streaming_chunks_add_up_to_the_whole_answer(api: openai.OpenAI) -> None:
    whole = api.completions.create(model="tiny-random", prompt="Once upon", max_tokens=10, temperature=0)
    stream = api.completions.create(model="tiny-random", prompt="Once upon", max_tokens=10, temperature=0,
                                    stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10


def test_the_async_client_shares_the_engine(api: openai.OpenAI, served: Running) -> None:
    async def run() -> list[str]:
        async with openai.AsyncOpenAI(base_url=str(api.base_url), api_key="unused", max_retries=0) as aclient:
            async def streamed(prompt: str) -> str:
                stream = await aclient.completions.create(model="tiny-random", prompt=prompt, max_tokens=6,
                                                          temperature=0, stream=True)
                return "".join([c.choices[0].text async for c in stream if c.choices])

            plain = aclient.completions.create(model="tiny-random", prompt="one", max_tokens=6, temperature=0)
            results = await asyncio.gather(plain, streamed("two"), streamed("three"))
            return [results[0].choices[0].text, *results[1:]]

    texts = asyncio.run(run())
    for prompt, text in zip(("one", "two", "three"), texts, strict=True):
        assert text == api.completions.create(model="tiny-random", prompt=prompt, max_tokens=6,
                                              temperature=0).choices[0].text


def test_extra_body_steering_equals_grpc_and_the_default_branch_is_unsteered(
        served: Running, api: openai.OpenAI, stack_model: str) -> None:
    answer = api.completions.create(model=stack_model, prompt="I like", max_tokens=8, temperature=0,
                                    extra_body={"featurewire": {"interventions": [PIN], "default_branch": True}})
    steered, default = answer.choices
    grpc_messages = generate(served, "I like", {"maxNewTokens": 8}, interventions=[PIN], withDefault=True)
    assert steered.text == "".join(t.get("text", "") for t in tokens(grpc_messages))
    assert default.text == "".join(t.get("text", "") for t in tokens(grpc_messages, "BRANCH_DEFAULT"))
    plain = api.completions.create(model="tiny-random", prompt="I like", max_tokens=8, temperature=0)
    assert default.text == plain.choices[0].text != steered.text
    assert (steered.index, default.index) == (0, 1)
    assert steered.model_extra["featurewire"]["branch"] == "BRANCH_STEERED"
    assert {"branch": "BRANCH_DEFAULT", "pairedWith": 0}.items() <= default.model_extra["featurewire"].items()
    assert answer.usage.completion_tokens == 16  # both branches' tokens


def test_n_samples_and_their_default_branches(api: openai.OpenAI, stack_model: str) -> None:
    answer = api.completions.create(model=stack_model, prompt=["a", "b"], n=2, max_tokens=4, temperature=1.0,
                                    seed=3, extra_body={"featurewire": {"interventions": [PIN],
                                                                        "defaultBranch": True}})
    choices = answer.choices
    assert [c.index for c in choices] == list(range(8))
    assert [c.model_extra["featurewire"]["branch"] for c in choices] == ["BRANCH_STEERED"] * 4 + ["BRANCH_DEFAULT"] * 4
    assert [c.model_extra["featurewire"]["seed"] for c in choices[:4]] == ["3", "4", "3", "4"]
    assert [c.model_extra["featurewire"]["pairedWith"] for c in choices] == [4, 5, 6, 7, 0, 1, 2, 3]
    alone = api.completions.create(model="tiny-random", prompt="b", max_tokens=4, temperature=1.0, seed=4)
    assert choices[7].text == alone.choices[0].text  # prompt "b", sample 1 (seed 4), unsteered


def test_monitoring_streams_each_tokens_features_and_condition_events(served: Running, api: openai.OpenAI,
                                                                      stack_model: str) -> None:
    monitor = {"decompose": {"stages": [STAGE1], "topK": 4}}
    stream = api.completions.create(model=stack_model, prompt="Dogs run", max_tokens=5, temperature=0, stream=True,
                                    extra_body={"featurewire": monitor})
    streamed = [c.choices[0].model_extra["featurewire"] for c in stream if c.choices]
    features = [f["features"] for f in streamed if "features" in f]
    grpc_tokens = tokens(generate(served, "Dogs run", {"maxNewTokens": 5}, decompose=monitor["decompose"]))
    assert len(features) == 5 and [f[0]["stageName"] for f in features] == [STAGE1] * 5
    assert [f[0]["ids"] for f in features] == [t["features"][0]["ids"] for t in grpc_tokens]
    assert streamed[-1]["finish"]["reason"] == "FINISH_REASON_LENGTH"

    stop = {"id": "anything", "stage": STAGE0, "feature": 0, "comparison": "COMPARISON_BELOW", "threshold": 1e9,
            "action": "CONDITION_ACTION_STOP"}
    whole = api.completions.create(model=stack_model, prompt="Dogs run", max_tokens=5, temperature=0,
                                   extra_body={"featurewire": {"conditions": [stop], **monitor}})
    featurewire = whole.choices[0].model_extra["featurewire"]
    assert whole.choices[0].finish_reason == "stop"
    assert featurewire["finish"]["reason"] == "FINISH_REASON_FEATURE_CONDITION"
    assert featurewire["conditions"][0]["conditionId"] == "anything"
    assert len(featurewire["tokens"]) == whole.usage.completion_tokens == 1


# -- errors ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("kwargs", "param", "words"), [
    ({"extra_body": {"temprature": 1}}, "temprature", "unrecognized request argument"),
    ({"frequency_penalty": 0.5}, "frequency_penalty", "not supported"),
    ({"n": 50}, "n", "at most 4 choices"),
    ({"max_tokens": 10_000}, "max_tokens", "1..400"),
    ({"logprobs": 2}, "logprobs", "only 0 is supported"),
    ({"temperature": -1}, "temperature", "out of range"),
    ({"extra_body": {"featurewire": {"interventions": [{**PIN, "stage": "nope"}]}}}, "featurewire", "nope"),
    ({"extra_body": {"featurewire": {"sampling": {}}}}, "featurewire", "use temperature"),
])
def test_bad_requests_are_400_naming_the_field(api: openai.OpenAI, kwargs: dict[str, Any], param: str,
                                               words: str) -> None:
    expected = openai.NotFoundError if param == "featurewire" and "nope" in words else openai.BadRequestError
    with pytest.raises(expected) as caught:
        api.completions.create(model="tiny-random", prompt="x", **{"max_tokens": 2, **kwargs})
    assert caught.value.param == param and words in caught.value.message
    assert set(caught.value.body) == {"message", "type", "param", "code"}


def test_neutral_values_of_unimplemented_fields_are_accepted(api: openai.OpenAI) -> None:
    answer = api.completions.create(model="tiny-random", prompt="x", max_tokens=2, frequency_penalty=0,
                                    presence_penalty=0, logit_bias={}, user="someone", best_of=1)
    assert answer.choices[0].finish_reason in ("length", "stop")


def test_a_chat_request_to_a_base_model_without_a_template_is_a_clear_400(api: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        api.chat.completions.create(model="tiny-random", messages=[{"role": "user", "content": "hi"}])
    assert "--chat-template FILE" in caught.value.message and caught.value.param == "messages"


def test_a_deadline_mid_stream_raises_in_the_sdk(api: openai.OpenAI, monkeypatch: pytest.MonkeyPatch) -> None:
    slow_generation(monkeypatch, 0.1)
    stream = api.completions.create(model="tiny-random", prompt="slow", max_tokens=200, stream=True,
                                    extra_query={"timeout": "1"}, extra_body={"featurewire": {"ignore_eos": True}})
    with pytest.raises(openai.APIError) as caught:
        list(stream)
    assert "deadline" in str(caught.value).lower() or "DEADLINE" in str(caught.value.body)


def test_a_dropped_stream_cancels_its_generations(served: Running, monkeypatch: pytest.MonkeyPatch) -> None:
    record = slow_generation(monkeypatch, 0.05)
    body = json.dumps({"model": "tiny-random", "prompt": "never read", "max_tokens": 300, "stream": True,
                       "featurewire": {"ignore_eos": True}})
    sock = socket.create_connection(("127.0.0.1", served.server.http_port), timeout=30)
    sock.sendall(f"POST /openai/v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                 f"content-length: {len(body)}\r\n\r\n{body}".encode())
    received = b""
    while b"data: " not in received:
        chunk = sock.recv(65536)
        assert chunk, "the connection closed before the first chunk"
        received += chunk
    sock.close()
    assert record["closed"].wait(10), "the generation kept running after the client went away"
    deadline = time.monotonic() + 10
    while served.server.engine.busy or served.server.engine.queue_depth:
        assert time.monotonic() < deadline, "the engine stayed busy"
        time.sleep(0.01)


def test_calls_count_under_transport_openai(served: Running, api: openai.OpenAI) -> None:
    api.completions.create(model="tiny-random", prompt="count me", max_tokens=1)
    value = served.server.metrics.registry.get_sample_value(
        "featurewire_rpcs_total", {"method": "Generate", "code": "OK", "transport": "openai"})
    assert value and value >= 1


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_curl_streams_and_gets_openai_errors(served: Running) -> None:
    base = f"http://127.0.0.1:{served.server.http_port}/openai/v1"
    body = {"model": "tiny-random", "prompt": "curl", "max_tokens": 3, "stream": True}
    out = subprocess.run(["curl", "-sN", f"{base}/completions", "-H", "content-type: application/json",
                          "-d", json.dumps(body)], capture_output=True, text=True, timeout=60, check=True).stdout
    events = [line.removeprefix("data: ") for line in out.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and all(json.loads(e)["object"] == "text_completion" for e in events[:-1])
    out = subprocess.run(["curl", "-s", "-w", "\n%{http_code}", f"{base}/completions", "-d", "{not json"],
                         capture_output=True, text=True, timeout=60, check=True).stdout
    error, status = out.rsplit("\n", 1)
    assert status == "400" and json.loads(error)["error"]["type"] == "invalid_request_error"


# -- chat, auth and drain on a `serve` process -------------------------------------------------------------
def test_chat_uses_the_template_from_the_command_line(chat_server: ServerProcess) -> None:
    port = chat_server.http_port
    assert port
    api = client(port, api_key=TOKEN)
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"},
                {"role": "user", "content": [{"type": "text", "text": "Bye"}]}]
    answer = api.chat.completions.create(model="tiny-random", messages=messages, max_completion_tokens=6,
                                         temperature=0, logprobs=True)
    rendered = ("<bos><start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\nHello<end_of_turn>\n"
                "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n")
    with grpc.insecure_channel(f"127.0.0.1:{chat_server.port}") as channel:
        request = pb.GenerateRequest(sampling=pb.SamplingParams(max_new_tokens=6))
        request.prompt.text, request.prompt.add_special_tokens = rendered, False
        stream = channel.unary_stream("/featurewire.v1.Featurewire/Generate",
                                      request_serializer=pb.GenerateRequest.SerializeToString,
                                      response_deserializer=pb.GenerateResponse.FromString)
        expected = [m.token for m in stream(request, metadata=(("authorization", f"Bearer {TOKEN}"),), timeout=60)
                    if m.HasField("token")]
    assert answer.choices[0].message.content == "".join(t.text for t in expected)
    assert [lp.logprob for lp in answer.choices[0].logprobs.content] == pytest.approx([t.logprob for t in expected],
                                                                                      abs=1e-5)
    chunks = list(api.chat.completions.create(model="tiny-random", messages=messages, max_tokens=6, temperature=0,
                                              stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == answer.choices[0].message.content
    with pytest.raises(openai.BadRequestError, match="no system role"):
        api.chat.completions.create(model="tiny-random", messages=[{"role": "system", "content": "x"}])
    with pytest.raises(openai.AuthenticationError):
        client(port, api_key="wrong").completions.create(model="tiny-random", prompt="x", max_tokens=1)
    with pytest.raises(openai.AuthenticationError):
        client(port, api_key="wrong").models.list()


def test_sigterm_lets_an_open_stream_finish(chat_server: ServerProcess) -> None:
    assert chat_server.http_port
    api = client(chat_server.http_port, api_key=TOKEN)
    stream = api.completions.create(model="tiny-random", prompt="drain", max_tokens=60, temperature=0, stream=True,
                                    extra_body={"featurewire": {"ignore_eos": True}})
    first = next(iter(stream))
    chat_server.process.send_signal(signal.SIGTERM)
    rest = list(stream)
    assert first.choices and rest[-1].choices[0].finish_reason == "length"
    assert chat_server.process.wait(60) == 0


def test_the_chat_template_flag_and_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = build_parser().parse_args(["serve", "--chat-template", str(tmp_path / "t.jinja")])
    assert _server_config(args).chat_template == tmp_path / "t.jinja"
    monkeypatch.setenv("FEATUREWIRE_CHAT_TEMPLATE", str(tmp_path / "env.jinja"))
    assert _server_config(build_parser().parse_args(["serve"])).chat_template == tmp_path / "env.jinja"


def test_a_chat_template_that_cannot_be_read_or_compiled_stops_startup(tmp_path: Path) -> None:
    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for m in messages %}")
    for path, words in ((tmp_path / "missing.jinja", "cannot read"), (broken, "not valid Jinja")):
        with pytest.raises(FailedPrecondition, match=words):
            load_template(path)
    assert load_template(None) is None


def test_a_body_over_the_limit_is_413_in_openai_shape(served: Running) -> None:
    limit = 4 * served.server.config.max_message_bytes
    connection = http.client.HTTPConnection("127.0.0.1", served.server.http_port, timeout=30)
    try:
        connection.request("POST", "/openai/v1/completions", body=b"{}",
                           headers={"content-type": "application/json", "content-length": str(limit + 1)})
        response = connection.getresponse()
        status, body = response.status, json.loads(response.read())
    finally:
        connection.close()
    assert status == 413 and body["error"]["type"] == "invalid_request_error" and str(limit) in body["error"]["message"]
