"""`featurewire` run in-process (`main(argv)`): every command, its --json output and its exit codes."""

from __future__ import annotations

import json
import socket

import featurewire as fw
import pytest
from featurewire import Intervention, Positions
from featurewire.cli import main, parse_edit, parse_stop_condition

from tests.clients.conftest import STAGES, TOKEN

TEXT = "The cat sat on the mat"


@pytest.fixture
def cli(target, capsys):
    """Run the CLI against the test server; returns (exit code, stdout, stderr)."""

    def run(*argv: str, environ: dict[str, str] | None = None) -> tuple[int, str, str]:
        code = main(["--target", target, *argv], environ=environ or {})
        out, err = capsys.readouterr()
        return code, out, err

    return run


def json_lines(out: str) -> list[dict]:
    return [json.loads(line) for line in out.splitlines() if line.strip()]


def test_info_and_stacks(cli):
    code, out, _ = cli("info")
    assert code == 0 and "model tiny-random" in out and "stack tiny (default)" in out and "resid3" in out
    code, out, _ = cli("info", "--json")
    (info,) = json_lines(out)
    assert code == 0 and info["model"]["name"] == "tiny-random" and info["capabilities"]["mode"] == "FULL"
    code, out, _ = cli("--json", "stacks")  # --json before the command works too
    (stacks,) = json_lines(out)
    assert [s["name"] for s in stacks["stacks"][0]["stages"]] == list(STAGES)
    code, out, _ = cli("stacks")
    assert code == 0 and out.count("blocks.") == 4


def test_decompose_table_and_json_lines(cli):
    code, out, _ = cli("decompose", TEXT, "--top-k", "2", "--stage", "resid1", "--stage", "signed")
    lines = out.splitlines()
    assert code == 0 and lines[0].startswith("stack tiny") and "signed" in lines[1] and "predicted" in lines[2]
    body = lines[3:]
    assert len(body) == 2 * 10 and "'<bos>'" in body[0] and body[0].split()[2] == "resid1"  # 10 tokens x 2 stages
    assert body[1].split()[0] == "signed" and ":-" in body[1]  # signed codes print with their sign
    code, out, _ = cli("decompose", TEXT, "--json", "--top-k", "3", "--feature", "mlp2:7", "--no-error")
    header, *tokens = json_lines(out)
    assert header["type"] == "header" and header["top_k"] == 3 and len(tokens) == header["num_tokens"]
    assert all(t["type"] == "token" and 7 in t["features"][2]["ids"] for t in tokens)
    assert tokens[0]["features"][0]["error_norm"] is None and [t["position"] for t in tokens] == list(range(10))


def test_generate_streams_then_compares_with_the_default(cli):
    code, out, _ = cli("generate", "The cat", "--set", "resid1:3=10@generated", "--with-default",
                       "--max-new-tokens", "6", "--seed", "2", "--ignore-eos")
    assert code == 0 and out.startswith("The cat")
    assert "steered" in out and " | default" in out and "[steered: LENGTH, 6 tokens] [default: LENGTH, 6 tokens]" in out
    code, out, _ = cli("generate", "The cat", "--json", "--max-new-tokens", "3", "--seed", "2", "--ignore-eos",
                       "--ablate", "resid1:140", "--clamp", "mlp2:5=1:", "--positions", "generated")
    events = json_lines(out)
    assert code == 0 and events[0]["type"] == "started" and events[0]["seed"] == 2
    assert [e["type"] for e in events[1:]] == ["token"] * 3 + ["finished"]
    assert events[-1]["text"] == "".join(e["text"] for e in events[1:-1])


def test_generate_stop_when_a_feature_fires(cli, target):
    with fw.Client(target) as client:
        free = client.generate_text("The cat", max_new_tokens=3, seed=0, decompose=["resid1"])
    feature = free.tokens[1].stage("resid1").ids[0]  # active on the second generated token
    code, out, _ = cli("generate", "The cat", "--max-new-tokens", "8", "--stop-when", f"resid1:{feature}>0.01",
                       "--stop-when", "resid1:1<-1000", "--seed", "0")
    assert code == 0 and "STOP]" in out and "[steered: FEATURE_CONDITION" in out


def test_feature_score_tokenize(cli):
    code, out, _ = cli("feature", "-", "resid1", "3", "--top-n", "3")
    assert code == 0 and out.startswith("feature 3 of stage resid1") and "promotes:" in out
    code, out, _ = cli("feature", "tiny", "resid1", "3", "--json")
    (feature,) = json_lines(out)
    assert feature["stack"] == "tiny" and len(feature["top_tokens"]) == 10
    code, out, _ = cli("score", TEXT, "--splice", "resid1")
    assert code == 0 and "clean CE" in out and "edited CE" in out and "KL" in out
    code, out, _ = cli("score", TEXT, "--json", "--scale", "resid1:140=0@all")
    (score,) = json_lines(out)
    assert score["edited"] and len(score["kl_per_token"]) == score["scored_tokens"] == 9
    code, out, _ = cli("tokenize", "hello")
    assert code == 0 and out.splitlines()[0].split() == ["0", "2", "'<bos>'"]
    code, out, _ = cli("tokenize", "hello", "--no-special", "--json")
    (tokens,) = json_lines(out)
    assert "<bos>" not in tokens["tokens"] and len(tokens["ids"]) == len(tokens["tokens"])


def test_exit_codes(cli, capsys):
    code, out, err = cli("feature", "nope", "resid1", "3")
    assert code == 1 and out == "" and err.startswith("featurewire: NOT_FOUND: stack 'nope'")
    code, _, err = cli("decompose", "x", "--top-k", "100000")
    assert code == 1 and "INVALID_ARGUMENT" in err and "top_k" in err
    for argv in (["generate", "x", "--set", "resid1:3"], ["generate", "x", "--clamp", "resid1:3=1"], ["bogus"],
                 ["feature", "tiny", "resid1"], ["generate", "x", "--stop-when", "resid1:3=1"]):
        code, _, err = cli(*argv)
        assert code == 2 and "usage:" in err, argv
    assert main(["--help"]) == 0 and "generate" in capsys.readouterr().out
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    assert main(["info", "--timeout", "0.5"], environ={"FEATUREWIRE_TARGET": f"127.0.0.1:{port}"}) == 1
    assert "UNAVAILABLE" in capsys.readouterr().err


def test_target_and_token_from_the_environment(auth_server, capsys):
    environ = {"FEATUREWIRE_TARGET": auth_server.target}
    assert main(["tokenize", "hi"], environ=environ) == 1 and "UNAUTHENTICATED" in capsys.readouterr().err
    assert main(["tokenize", "hi"], environ={**environ, "FEATUREWIRE_TOKEN": TOKEN}) == 0
    assert main(["tokenize", "hi", "--token", TOKEN], environ=environ) == 0
    assert "'<bos>'" in capsys.readouterr().out


def test_edit_specs():
    assert parse_edit("set", "blocks.6.hook_resid_post:12=-1.5") == Intervention.set("blocks.6.hook_resid_post", 12,
                                                                                       -1.5)
    assert parse_edit("add", "a:1=2@3:9") == Intervention.add("a", 1, 2.0, positions=Positions.range(3, 9))
    assert parse_edit("clamp", "a:1=:0.5", Positions.prompt()) == Intervention.clamp("a", 1, hi=0.5,
                                                                                     positions="prompt")
    assert parse_edit("ablate", "a:7@generated").positions == Positions.generated()
    assert parse_stop_condition("a:3<-2").comparison == "BELOW" and parse_stop_condition("a:3>2").action == "STOP"
    for op, spec in (("set", "a=1"), ("set", "a:x=1"), ("scale", "a:1=big"), ("ablate", "a:1@soon")):
        with pytest.raises(ValueError):
            parse_edit(op, spec)
