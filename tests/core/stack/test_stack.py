"""The stack directory format: exact round trips, and refusal of anything corrupt, foreign or hostile."""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from core.host.smoke_models import build_smoke_model
from core.sae import SAEConfig, SparseAutoencoder, build_sae
from core.stack import tensors as stack_mod
from core.stack.identity import HostModelIdentity, model_fingerprint, weights_fingerprint
from core.stack.manifest import StackError
from core.stack.reader import read_stack
from core.stack.writer import StageSpec, stack_digest, update_metrics, write_stack

D_IN, D_SAE = 16, 48
VARIANTS = {  # id -> SAEConfig overrides; every architecture, and the SA-GSAE parameter layouts
    "relu": {"architecture": "relu"},
    "topk": {"architecture": "topk"},
    "batchtopk": {"architecture": "batchtopk"},
    "jumprelu": {"architecture": "jumprelu"},
    "gated": {"architecture": "gated"},
    "sa_gsae": {"architecture": "sa_gsae"},
    "sa_gsae-per-side-untied": {"architecture": "sa_gsae", "per_side_thresholds": True, "tied_magnitude": False},
}


def make_sae(architecture: str = "relu", **overrides) -> SparseAutoencoder:
    """An SAE with every float parameter and buffer randomised, so a lost or swapped tensor shows."""
    sae = build_sae(SAEConfig(architecture=architecture, d_in=D_IN, d_sae=D_SAE, k=6, **overrides))
    with torch.no_grad():
        for name, tensor in sae.state_dict().items():
            if tensor.is_floating_point():
                tensor.copy_(torch.randn_like(tensor) * (0.05 if "threshold" in name else 0.3))
                if "threshold" in name:
                    tensor.abs_()
        sae.normalize_decoder_()
    return sae


def identity(name: str = "tiny", d_model: int = D_IN) -> HostModelIdentity:
    return HostModelIdentity(name, "gpt_neox", 4, d_model, 512, "f" * 64, "e" * 64)


def write_one(tmp_path: Path, sae: SparseAutoencoder | None = None, overwrite: bool = False, **spec) -> Path:
    spec.setdefault("hookpoint", "blocks.1.hook_resid_post")
    stages = [StageSpec(sae or make_sae(), **spec)]
    return write_stack(tmp_path / "stack", "test", identity(), stages, overwrite=overwrite)


def manifest(stack_dir: Path) -> dict:
    return json.loads((stack_dir / "stack.json").read_text())


def save_manifest(stack_dir: Path, data: dict) -> None:
    (stack_dir / "stack.json").write_text(json.dumps(data))


def rewrite_tensors(stack_dir: Path, tensors: dict[str, torch.Tensor]) -> str:
    """Replace stage 0's file and fix its hash and size in stack.json, as a forger would."""
    data = manifest(stack_dir)
    file = data["stages"][0]["file"]
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(stack_dir / file))
    record = {"sha256": hashlib.sha256((stack_dir / file).read_bytes()).hexdigest(),
              "bytes": (stack_dir / file).stat().st_size}
    data["files"][file] = record
    data["stages"][0].update(record)
    save_manifest(stack_dir, data)
    return file


def refused(stack_dir: Path, *needles: str, **kwargs) -> str:
    with pytest.raises(StackError) as info:
        read_stack(stack_dir, **kwargs)
    message = str(info.value)
    for needle in needles:
        assert needle in message, message
    return message


# ----------------------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_round_trip_is_exact_for_every_architecture(tmp_path: Path, variant: str) -> None:
    sae = make_sae(**VARIANTS[variant])
    extra = {"A": torch.randn(D_IN, D_IN), "c": torch.randn(D_IN)}
    stack_dir = write_one(tmp_path, sae, input_scale=0.25, training={"steps": 3}, metrics={"fve": 0.5},
                          extras={"note": "x"}, extra_tensors=extra)
    stage = read_stack(stack_dir).stages[0]
    x = torch.randn(64, D_IN)
    assert type(stage.sae) is type(sae) and stage.sae.cfg == sae.cfg
    assert torch.equal(stage.sae.encode(x), sae.encode(x))  # bit for bit
    assert torch.equal(stage.sae.decode(sae.encode(x)), sae.decode(sae.encode(x)))
    for name, tensor in sae.state_dict().items():
        assert torch.equal(stage.sae.state_dict()[name], tensor), name
    assert not stage.sae.training and not any(p.requires_grad for p in stage.sae.parameters())
    assert (stage.input_scale, stage.signed, stage.hookpoint) == (0.25, sae.signed, "blocks.1.hook_resid_post")
    assert (stage.training, stage.metrics, stage.extras) == ({"steps": 3}, {"fve": 0.5}, {"note": "x"})
    assert stage.extra_tensors.keys() == extra.keys()
    assert all(torch.equal(stage.extra_tensors[k], v) for k, v in extra.items())


def test_manifest_lists_every_file_with_its_hash(tmp_path: Path) -> None:
    stages = [StageSpec(make_sae("topk"), "blocks.0.hook_resid_post", 2.0),
              StageSpec(make_sae("sa_gsae"), "blocks.2.hook_mlp_out", extra_tensors={"w": torch.ones(3)})]
    stack_dir = write_stack(tmp_path / "s", "two", identity(), stages)
    data = manifest(stack_dir)
    assert data["format_version"] == 1 and data["name"] == "two" and data["created_by"].startswith("featurewire")
    assert data["host_model"] == identity().__dict__
    assert [s["file"] for s in data["stages"]] == ["stage_00_blocks.0.hook_resid_post.safetensors",
                                                  "stage_01_blocks.2.hook_mlp_out.safetensors"]
    assert data["stages"][1]["signed"] is True and data["stages"][1]["architecture"] == "sa_gsae"
    on_disk = {p.name for p in stack_dir.iterdir()} - {"stack.json"}
    assert set(data["files"]) == on_disk and len(on_disk) == 3
    for file, record in data["files"].items():
        assert record["sha256"] == hashlib.sha256((stack_dir / file).read_bytes()).hexdigest()
        assert record["bytes"] == (stack_dir / file).stat().st_size
    loaded = read_stack(stack_dir)
    assert [s.name for s in loaded.stages] == ["blocks.0.hook_resid_post", "blocks.2.hook_mlp_out"]
    manifest_sha = hashlib.sha256((stack_dir / "stack.json").read_bytes()).hexdigest()
    assert loaded.digest == stack_digest(stack_dir) == manifest_sha
    assert loaded.stage("blocks.2.hook_mlp_out").index == 1


def test_update_metrics_merges_and_keeps_hashes(tmp_path: Path) -> None:
    stack_dir = write_one(tmp_path, metrics={"fve": 0.5, "l0": 6})
    before, digest = manifest(stack_dir), stack_digest(stack_dir)
    update_metrics(stack_dir, 0, {"fve": 0.75, "ce_recovered": 0.9})
    after = manifest(stack_dir)
    assert after["stages"][0]["metrics"] == {"fve": 0.75, "l0": 6, "ce_recovered": 0.9}
    assert after["files"] == before["files"] and stack_digest(stack_dir) != digest
    assert read_stack(stack_dir).stages[0].metrics["fve"] == 0.75
    with pytest.raises(StackError, match="out of range"):
        update_metrics(stack_dir, 1, {})


def test_writing_is_atomic_and_does_not_clobber(tmp_path: Path) -> None:
    stack_dir = write_one(tmp_path)
    with pytest.raises(StackError, match="already exists"):
        write_one(tmp_path)
    sae = make_sae("gated")
    write_one(tmp_path, sae, overwrite=True)
    assert read_stack(stack_dir).stages[0].sae.cfg.architecture == "gated"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["stack"]  # no temporary directories left behind
    with pytest.raises(StackError, match="JSON"):
        write_stack(tmp_path / "bad", "x", identity(), [StageSpec(sae, "blocks.0.hook_resid_post", metrics={"t": {1}})])
    assert not (tmp_path / "bad").exists()


def test_reading_leaves_the_global_rng_alone(tmp_path: Path) -> None:
    stack_dir = write_one(tmp_path)
    state = torch.random.get_rng_state()
    read_stack(stack_dir)
    assert torch.equal(torch.random.get_rng_state(), state)


# ------------------------------------------------------------------------------------------- refusals


def test_flipped_byte_is_refused_naming_the_file(tmp_path: Path) -> None:
    stack_dir = write_one(tmp_path)
    file = manifest(stack_dir)["stages"][0]["file"]
    data = bytearray((stack_dir / file).read_bytes())
    data[-5] ^= 0x01
    (stack_dir / file).write_bytes(bytes(data))
    refused(stack_dir, file, "sha256")


def test_wrong_shape_is_refused_before_loading(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    stack_dir = write_one(tmp_path)
    state = {k: v.clone() for k, v in make_sae().state_dict().items()}
    state["W_enc"] = torch.zeros(D_IN, D_SAE + 1)
    file = rewrite_tensors(stack_dir, state)
    monkeypatch.setattr(stack_mod, "load_safetensors_bytes", lambda data: pytest.fail("tensors were loaded"))
    refused(stack_dir, file, "W_enc is F32 (16, 49), expected F32 (16, 48)")


def test_wrong_dtype_and_missing_or_unexpected_tensors_are_refused(tmp_path: Path) -> None:
    stack_dir = write_one(tmp_path)
    state = {k: v.to(torch.float16) if k == "b_dec" else v for k, v in make_sae().state_dict().items()}
    rewrite_tensors(stack_dir, state)
    refused(stack_dir, "b_dec is F16 (16,), expected F32 (16,)")
    del state["W_dec"]
    state["b_dec"], state["bonus"] = torch.zeros(D_IN), torch.zeros(2)
    rewrite_tensors(stack_dir, state)
    refused(stack_dir, "missing W_dec", "unexpected bonus")


def test_hostile_declared_shapes_fail_without_allocating(tmp_path: Path) -> None:
    stack_dir = write_one(tmp_path)
    data = manifest(stack_dir)
    huge = 2**31 - 1  # the largest d_sae a manifest may declare (MAX_DIMENSION); a real build needs ~256 GiB
    data["stages"][0]["d_sae"] = data["stages"][0]["sae_config"]["d_sae"] = huge
    save_manifest(stack_dir, data)
    start = time.perf_counter()
    refused(stack_dir, f"expected F32 (16, {huge})")
    # A forged header that agrees with the huge config but carries no data: still refused, nothing allocated.
    file = data["stages"][0]["file"]
    header = {k: {"dtype": "F32", "shape": [D_IN, huge] if k == "W_enc" else list(v.shape),
                  "data_offsets": [0, 4]} for k, v in make_sae().state_dict().items()}
    header["W_dec"]["shape"], header["b_enc"]["shape"] = [huge, D_IN], [huge]
    blob = json.dumps(header).encode()
    (stack_dir / file).write_bytes(len(blob).to_bytes(8, "little") + blob + b"\0" * 4)
    digest = hashlib.sha256((stack_dir / file).read_bytes()).hexdigest()
    size = (stack_dir / file).stat().st_size
    data["files"][file] = {"sha256": digest, "bytes": size}
    save_manifest(stack_dir, data)
    refused(stack_dir, file)
    assert time.perf_counter() - start < 5


def test_missing_file_is_refused(tmp_path: Path) -> None:
    stack_dir = write_one(tmp_path)
    file = manifest(stack_dir)["stages"][0]["file"]
    (stack_dir / file).unlink()
    refused(stack_dir, file, "missing")
    (stack_dir / "stack.json").unlink()
    refused(stack_dir, "stack.json")


@pytest.mark.parametrize("name", ["../x.safetensors", "sub/x.safetensors", "/etc/passwd.json", "..", ".hidden.json"])
def test_paths_outside_the_directory_are_refused(tmp_path: Path, name: str) -> None:
    stack_dir = write_one(tmp_path)
    (tmp_path / "x.safetensors").write_bytes((stack_dir / manifest(stack_dir)["stages"][0]["file"]).read_bytes())
    data = manifest(stack_dir)
    old = data["stages"][0]["file"]
    data["files"][name] = data["files"].pop(old)
    data["stages"][0]["file"] = name
    save_manifest(stack_dir, data)
    refused(stack_dir, "plain file names")


def test_symlink_pointing_out_is_refused(tmp_path: Path) -> None:
    stack_dir = write_one(tmp_path)
    file = manifest(stack_dir)["stages"][0]["file"]
    outside = tmp_path / "outside.safetensors"
    (stack_dir / file).rename(outside)
    (stack_dir / file).symlink_to(outside)  # same bytes, same hash: only the location is wrong
    refused(stack_dir, file, "symlink")


@pytest.mark.parametrize("name", ["weights.pt", "model.bin", "state.pkl", "notes.txt"])
def test_pickles_and_other_kinds_of_file_are_refused(tmp_path: Path, name: str) -> None:
    stack_dir = write_one(tmp_path)
    (stack_dir / name).write_bytes(b"\x80\x04K\x01.")  # a pickle of the int 1
    data = manifest(stack_dir)
    data["files"][name] = {"sha256": hashlib.sha256(b"\x80\x04K\x01.").hexdigest(), "bytes": 5}
    save_manifest(stack_dir, data)
    refused(stack_dir, name, "pickle" if name != "notes.txt" else "only safetensors and JSON")


@pytest.mark.parametrize("version", [2, 0, "1", True, None])
def test_unsupported_format_version_is_refused(tmp_path: Path, version: object) -> None:
    stack_dir = write_one(tmp_path)
    data = manifest(stack_dir)
    data["format_version"] = version
    save_manifest(stack_dir, data)
    refused(stack_dir, "format_version", "not supported")


@pytest.mark.parametrize(
    "mutate, needle",
    [
        (lambda d: d["stages"][0].update(architecture="lstm"), "unknown architecture"),
        (lambda d: d["stages"][0]["sae_config"].update(k=10_000), "invalid sae_config"),
        (lambda d: d["stages"][0].update(d_in=17), "disagrees"),
        (lambda d: d["stages"][0].update(input_scale=float("nan")), "input_scale"),
        (lambda d: d["stages"][0].pop("hookpoint"), "hookpoint"),
        (lambda d: d.update(stages=[]), "non-empty"),
        (lambda d: d["host_model"].pop("fingerprint"), "host_model"),
        (lambda d: d["files"].clear(), "not listed"),
    ],
)
def test_malformed_manifests_are_refused(tmp_path: Path, mutate, needle: str) -> None:
    stack_dir = write_one(tmp_path)
    data = manifest(stack_dir)
    mutate(data)
    save_manifest(stack_dir, data)
    refused(stack_dir, needle)


def test_invalid_json_is_refused(tmp_path: Path) -> None:
    stack_dir = write_one(tmp_path)
    (stack_dir / "stack.json").write_text("{not json")
    refused(stack_dir, "not valid JSON")


# ------------------------------------------------------------------------------------- host model identity


@pytest.fixture(scope="module")
def tiny_models():
    return {name: build_smoke_model(name)[0] for name in ("tiny-random", "tiny-random-neox")}


def test_a_stack_for_another_model_is_refused_saying_what_differs(tmp_path: Path, tiny_models) -> None:
    gemma = HostModelIdentity.from_model(tiny_models["tiny-random"], "tiny-random")
    neox = HostModelIdentity.from_model(tiny_models["tiny-random-neox"], "tiny-random-neox")
    sae = make_sae()
    stack_dir = write_stack(tmp_path / "s", "g", gemma, [StageSpec(sae, "blocks.1.hook_resid_post")])
    assert read_stack(stack_dir, expect_model=gemma).identity == gemma
    message = refused(stack_dir, "was made for gemma3_text d_model=64", "this model is gpt_neox d_model=32",
                      expect_model=neox)
    assert "model_type, d_model, fingerprint, weights_fingerprint differ" in message
    assert gemma.fingerprint[:12] in message and neox.fingerprint[:12] in message
    # Same architecture and name, different weights (a fine-tune): only the weights fingerprint tells.
    tuned = HostModelIdentity.from_model(tiny_models["tiny-random"], "tiny-random")
    tuned = HostModelIdentity(**{**tuned.__dict__, "weights_fingerprint": "0" * 64})
    refused(stack_dir, "weights_fingerprint differ", expect_model=tuned)
    unknown_weights = HostModelIdentity(**{**gemma.__dict__, "weights_fingerprint": None, "name": "other"})
    assert read_stack(stack_dir, expect_model=unknown_weights).name == "g"


def test_fingerprints_ignore_dtype_and_names_but_not_architecture_or_weights(tiny_models) -> None:
    model = tiny_models["tiny-random"]
    base, weights = model_fingerprint(model), weights_fingerprint(model)
    assert len(base) == 64 and weights is not None
    half = build_smoke_model("tiny-random")[0].to(torch.bfloat16)
    half.config._name_or_path = "/somewhere/else"
    assert (model_fingerprint(half), weights_fingerprint(half)) == (base, weights)
    assert model_fingerprint(tiny_models["tiny-random-neox"]) != base
    changed = build_smoke_model("tiny-random")[0]
    changed.config.rms_norm_eps = 1e-5
    assert model_fingerprint(changed) != base
    with torch.no_grad():
        changed.get_input_embeddings().weight[3, 0] += 1.0
    assert weights_fingerprint(changed) != weights
