"""The benchmark scripts keep running (tiny sizes, JSON output parsed; no timing is asserted)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests import browser
from tests.service.engine.tiny_stacks import write_dashboard_stack

BENCH = Path(__file__).resolve().parents[2] / "bench"


def _run(script: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, str(BENCH / script), *args, "--json"], capture_output=True, text=True,
                         check=True, timeout=300)
    return json.loads(out.stdout)


def test_hook_overhead_reports_every_ratio():
    result = _run("hook_overhead.py", "--model", "tiny-random", "--tokens", "16", "--repeats", "1")
    assert result["machine"]["model"] == "tiny-random"
    assert set(result["median_seconds"]) == {"hf_body", "hf_logits", "read_all", "early_stop", "write_logits"}
    assert all(c["ratio"] > 0 for c in result["comparisons"])


def test_train_throughput_covers_every_architecture():
    result = _run("train_throughput.py", "--d-in", "16", "--width", "32", "--batch", "32", "--steps", "1",
                  "--repeats", "1")
    dense, counted, needed = (result[key] for key in ("dense_flops_per_ndh", "counted_flops_per_ndh", "flops_per_ndh"))
    assert set(counted) == set(dense) == set(needed)
    # torch counts the dense matmuls (plus matrix-vector products: 2·N·H = 2/d·NdH, here 1/8 at most)
    assert all(abs(counted[arch] - dense[arch]) <= 2 / 16 for arch in dense), counted
    assert needed["topk"] == needed["batchtopk"] == 2 + 2 * 4 * result["k"] / 32  # plus 4 sparse k-products
    assert all(needed[arch] == dense[arch] for arch in ("relu", "jumprelu", "gated", "sa_gsae"))
    assert result["machine"]["cpu_count"] >= 1


def test_serve_overhead_reports_the_ratios_and_the_thread_scaling():
    result = _run("serve_overhead.py", "--model", "tiny-random", "--stack", "random", "--tokens", "16",
                  "--new-tokens", "4", "--repeats", "1", "--warmup", "0", "--threads", "2")
    assert result["machine"]["engine_threads"] == 2
    assert {"decompose", "hf_body", "steered_generate", "hf_generate", "grpc_decompose", "direct_decompose",
            "steered_generate_1_thread", "hf_generate_1_thread"} == set(result["median_seconds"])
    assert len(result["comparisons"]) == 6 and result["comparisons"][-1]["target"] == 0.9
    assert all(c["ratio"] > 0 for c in result["comparisons"])
    assert result["comparisons"][0]["flop_floor"] > 1


def test_onnx_encode_reports_kernels_memory_and_grpc():
    result = _run("onnx_encode.py", "--stack", "random", "--model", "tiny-random", "--rows", "16", "--batches", "2",
                  "--repeats", "1", "--threads", "1")
    assert [s["architecture"] for s in result["stages"]] == ["sa_gsae", "sa_gsae"] and result["stages"][1]["residual"]
    assert set(result["servers"]) == {"activation_only", "full"}
    assert all(s["rss_mib"] > 0 and s["grpc_vectors_per_s"] > 0 for s in result["servers"].values())
    assert len(result["comparisons"]) == 4 and all(c["ratio"] > 0 for c in result["comparisons"])


def test_dashboards_reports_the_ratio_and_memory(tmp_path):
    smoke = BENCH.parent / "trainer" / "configs" / "smoke.toml"
    subprocess.run([sys.executable, "-m", "trainer", "train", "--config", str(smoke), "--out", str(tmp_path / "run"),
                    "--quiet"], check=True, capture_output=True, timeout=300)
    stack = tmp_path / "run" / "stack"
    result = _run("dashboards.py", "--stack", str(stack), "--tokens", "200", "--repeats", "1", "--warmup", "0")
    assert result["ratio"] > 0 and result["tokens"] > 0
    assert [m["state_mib"] for m in result["memory"]][0] == result["memory"][1]["state_mib"]
    assert result["label_file_mib"] > 0  # the token labels' firings, 12 bytes each, on disk during the pass


def test_http_gateway_reports_the_ratio():
    result = _run("http_gateway.py", "--tokens", "16", "--repeats", "1", "--warmup", "0")
    assert set(result["median_seconds"]) == {"grpc", "http", "json_encode"}
    assert result["messages"] >= 2 and result["json_bytes"] > result["protobuf_bytes"] > 0
    assert len(result["comparisons"]) == 2 and all(c["ratio"] > 0 for c in result["comparisons"])


def test_openai_face_reports_first_token_and_decode_ratios():
    result = _run("openai_face.py", "--prompt-tokens", "8", "--new-tokens", "4", "--repeats", "1", "--warmup", "0")
    assert set(result["medians"]) == {"grpc", "grpc_aio", "openai", "openai_sdk"}
    assert all(m["ttft_s"] > 0 and m["decode_tokens_per_s"] > 0 for m in result["medians"].values())
    assert len(result["comparisons"]) == 12 and all(c["ratio"] > 0 for c in result["comparisons"])


@pytest.mark.skipif(browser.missing() is not None, reason=browser.missing() or "")
def test_explorer_measures_the_first_steered_token_in_a_browser(tmp_path, tiny_gemma):
    stack = write_dashboard_stack(tiny_gemma, tmp_path / "stack", tokens=500)
    result = _run("explorer.py", "--model", "tiny-random", "--stack", str(stack), "--repeats", "1",
                  "--screenshots", str(tmp_path / "img"))
    assert set(result["median_seconds"]) == {"page", "http", "grpc"}
    assert all(value > 0 for value in result["median_seconds"].values())
    assert result["steered"] != result["default"]
    shots = sorted(p.name for p in (tmp_path / "img").iterdir())
    assert shots == ["explorer-decompose.png", "explorer-feature.png", "explorer-steer.png"]
    assert all((tmp_path / "img" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for name in shots)
