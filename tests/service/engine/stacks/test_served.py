"""Loading a stack for serving: identity, hookpoint and width checks, and the self-check on calibration
text that refuses a stack pointed at the wrong hookpoint."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from core.errors import FailedPrecondition, NotFound
from service.engine.stacks.served import (
    CALIBRATION_TOKENS,
    FVE_TOLERANCE,
    ServedStack,
    calibration_windows,
    load_served_stack,
    predicted_error_norm,
)
from tests.service.engine.tiny_stacks import STAGES, one_thread, write_tiny_stack


@pytest.fixture(scope="module", autouse=True)
def _single_thread() -> Iterator[None]:
    with one_thread():
        yield


@pytest.fixture(scope="module")
def stack_dir(tiny_gemma, tmp_path_factory) -> Path:
    return write_tiny_stack(tiny_gemma, tmp_path_factory.mktemp("served") / "stack")


@pytest.fixture(scope="module")
def served(tiny_gemma, stack_dir) -> ServedStack:
    return load_served_stack(stack_dir, tiny_gemma)


def edited_copy(src: Path, dst: Path, stage: int, **changes) -> Path:
    """A copy of the stack with stage fields changed in stack.json (not hashed: it lists the hashes)."""
    shutil.copytree(src, dst)
    manifest = json.loads((dst / "stack.json").read_text())
    for key, value in changes.items():
        target = manifest["stages"][stage]
        *path, last = key.split("__")
        for part in path:
            target = target[part]
        target[last] = value
    (dst / "stack.json").write_text(json.dumps(manifest))
    return dst


def test_a_good_stack_loads_and_passes_its_self_check(served, stack_dir):
    assert served.name == "tiny" and served.path == stack_dir
    assert served.digest == served.loaded.digest and len(served.digest) == 64
    assert served.stage_names == [name for name, *_ in STAGES]
    assert [s.hookpoint for s in served.runtime.stages] == [hp for _, hp, *_ in STAGES]
    assert served.runtime.stages[3].residual_of == 0
    assert set(served.self_check) == set(served.stage_names)
    for name, result in served.self_check.items():
        assert result["passed"], (name, result)
        assert result["tokens"] >= CALIBRATION_TOKENS - 16
        assert result["fve"] >= result["recorded_fve"] - FVE_TOLERANCE
        assert result["l0"] > 0 and result["recorded_l0"] > 0
        assert abs(result["fve"] - result["recorded_fve"]) < 0.1  # honest stages land near their record


def test_stage_lookup_by_name(served):
    assert served.stage_index("mlp2") == 2
    with pytest.raises(NotFound, match="resid1"):
        served.stage_index("nope")


@pytest.mark.parametrize(("stage", "hookpoint"), [(1, "blocks.1.hook_attn_out"), (2, "blocks.1.hook_mlp_out")])
def test_a_stage_pointed_at_another_layer_is_refused(tiny_gemma, stack_dir, tmp_path, stage, hookpoint):
    swapped = edited_copy(stack_dir, tmp_path / "swapped", stage, hookpoint=hookpoint)
    with pytest.raises(FailedPrecondition, match=rf"self-check.*{STAGES[stage][0]}: FVE") as caught:
        load_served_stack(swapped, tiny_gemma)
    assert "hookpoint" in caught.value.message
    # without the self-check the same stack loads: every other check passes
    assert load_served_stack(swapped, tiny_gemma, self_check=False).self_check == {}


def test_an_l0_far_from_the_record_is_refused(tiny_gemma, stack_dir, tmp_path):
    edited = edited_copy(stack_dir, tmp_path / "l0", 0, metrics__l0=100.0)
    with pytest.raises(FailedPrecondition, match="resid1: mean L0 8.00 is outside"):
        load_served_stack(edited, tiny_gemma)


def test_a_stack_without_recorded_metrics_is_measured_and_served(tiny_gemma, tmp_path):
    served = load_served_stack(write_tiny_stack(tiny_gemma, tmp_path / "bare", record_metrics=False), tiny_gemma)
    for result in served.self_check.values():
        assert result["passed"] and result["recorded_fve"] is None and result["recorded_l0"] is None
        assert result["fve"] > 0.3


def test_without_a_record_a_stage_worse_than_the_mean_is_refused(tiny_gemma, tmp_path):
    bare = write_tiny_stack(tiny_gemma, tmp_path / "bare", record_metrics=False)
    scale = json.loads((bare / "stack.json").read_text())["stages"][2]["input_scale"]
    edited = edited_copy(bare, tmp_path / "scaled", 2, input_scale=scale / 10)  # a wrong input scale
    with pytest.raises(FailedPrecondition, match=r"mlp2: FVE -\d.* is below 0.0 \(no recorded FVE"):
        load_served_stack(edited, tiny_gemma)


def test_a_stack_for_another_model_is_refused(stack_dir):
    from core.config import ModelConfig
    from core.host.loading import load_host_model

    neox = load_host_model(ModelConfig(name="tiny-random-neox", device="cpu"))
    with pytest.raises(FailedPrecondition, match="was made for gemma3_text.*this model is gpt_neox"):
        load_served_stack(stack_dir, neox)


def test_an_unknown_hookpoint_is_refused(tiny_gemma, stack_dir, tmp_path):
    edited = edited_copy(stack_dir, tmp_path / "unknown", 2, hookpoint="blocks.9.hook_mlp_out")
    message = r"stage 2 \('mlp2'\) reads a hookpoint .*: unknown hookpoint 'blocks.9.hook_mlp_out'"
    with pytest.raises(FailedPrecondition, match=message):
        load_served_stack(edited, tiny_gemma)


def test_a_width_mismatch_is_refused(tiny_gemma, stack_dir, monkeypatch):
    registry = tiny_gemma.hookpoints
    original = registry.get

    def narrow(name: str):
        point = original(name)
        return dataclasses.replace(point, dim=32) if name == "blocks.2.hook_mlp_out" else point

    monkeypatch.setattr(registry, "get", narrow)
    with pytest.raises(FailedPrecondition, match="'blocks.2.hook_mlp_out', which is 32 wide.*d_in=64"):
        load_served_stack(stack_dir, tiny_gemma, self_check=False)


def test_a_broken_stack_is_a_failed_precondition(tiny_gemma, stack_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(stack_dir, broken)
    weights = next(broken.glob("stage_00_*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(FailedPrecondition, match="corrupt"):
        load_served_stack(broken, tiny_gemma)
    with pytest.raises(FailedPrecondition, match="not a directory"):
        load_served_stack(tmp_path / "missing", tiny_gemma)


def test_calibration_windows_are_deterministic_and_start_with_bos(tiny_gemma):
    windows = calibration_windows(tiny_gemma, window=64)
    again = calibration_windows(tiny_gemma, window=64)
    assert len(windows) >= 3 and all(torch.equal(a, b) for a, b in zip(windows, again, strict=True))
    bos = tiny_gemma.tokenizer.bos_token_id
    assert all(w.shape[0] == 1 and w.shape[1] <= 64 and int(w[0, 0]) == bos for w in windows)
    assert sum(w.shape[1] - 1 for w in windows) == CALIBRATION_TOKENS


def test_no_error_predictor_yet(served):
    h = torch.randn(5, 64)
    assert predicted_error_norm(served, 0, h, None) is None
    assert predicted_error_norm(served, served.runtime.stages[3], h, h) is None
    assert not served.has_error_predictor(0)
