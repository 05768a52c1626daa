from __future__ import annotations

import json

from service.cli import main


def test_hookpoints_json(capsys):
    assert main(["hookpoints", "--model", "tiny-random-neox", "--device", "cpu", "--json"]) == 0
    listing = json.loads(capsys.readouterr().out)
    assert listing["model"]["model_type"] == "gpt_neox"
    assert [p["name"] for p in listing["hookpoints"]][:2] == ["blocks.0.hook_resid_pre", "blocks.0.hook_attn_out"]
    assert listing["hookpoints"][1]["module"] == "gpt_neox.layers.0.attention.dense"


def test_hookpoints_table(capsys):
    assert main(["hookpoints", "--model", "tiny-random", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "hookpoints  16" in out and "blocks.3.hook_resid_post" in out


def test_generate_json(capsys):
    assert main(["generate", "--model", "tiny-random", "hello world", "--max-new-tokens", "4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["prompt"] == "hello world" and result["completion"]


def test_errors_are_one_line_with_exit_code_2(capsys):
    assert main(["hookpoints", "--model", "/no/such/dir"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: unknown model '/no/such/dir'") and "tiny-random" in err
    assert main(["generate", "--model", "tiny-random", "x", "--max-new-tokens", "0"]) == 2
