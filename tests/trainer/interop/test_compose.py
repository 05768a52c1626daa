"""Importing SAEs by release from a Hugging Face cache layout built here, composing several into one stack, and
making it explorer-ready; all offline, on the tiny Gemma host (d_model 64)."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor

from core.config import ModelConfig
from core.stack.reader import read_stack
from trainer.cli import main
from trainer.interop.compose import SAESource, compose_stack, load_source, parse_sae_spec
from trainer.interop.hub_cache import HubFilesMissing, hub_cache_dir, resolve_files
from trainer.interop.importers import SAEImportError, import_saelens
from trainer.interop.saelens_releases import resolve_release

D_MODEL, D_SAE = 64, 96
REPO = "tiny-org/tiny-random-saes"


def saelens_files(folder: Path, layer: int, *, d_in: int = D_MODEL, model: str = "tiny-random") -> dict[str, Tensor]:
    """An SAE in SAELens 6's own format (cfg.json + sae_weights.safetensors): a ReLU SAE at resid_post of `layer`."""
    folder.mkdir(parents=True, exist_ok=True)
    params = {"W_enc": torch.randn(d_in, D_SAE) * 0.2, "b_enc": torch.randn(D_SAE) * 0.1,
              "W_dec": torch.randn(D_SAE, d_in) * 0.2, "b_dec": torch.randn(d_in) * 0.1}
    cfg = {"architecture": "standard", "d_in": d_in, "d_sae": D_SAE, "dtype": "float32", "device": "cpu",
           "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
           "metadata": {"hook_name": f"blocks.{layer}.hook_resid_post", "model_name": model,
                        "sae_lens_version": "6.5.0"}}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file(params, str(folder / "sae_weights.safetensors"))
    return params


def sparsify_files(folder: Path, *, d_in: int = D_MODEL, model: str | None = "tiny-random") -> None:
    """A sparsify TopK SAE (cfg.json + sae.safetensors) with the run's config.json beside its layer folder."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"activation": "topk", "expansion_factor": 2, "normalize_decoder": True, "num_latents": 2 * d_in, "k": 8,
           "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": d_in}
    (folder / "cfg.json").write_text(json.dumps(cfg))
    save_file({"encoder.weight": torch.randn(2 * d_in, d_in) * 0.2, "encoder.bias": torch.zeros(2 * d_in),
               "W_dec": torch.nn.functional.normalize(torch.randn(2 * d_in, d_in), dim=1),
               "b_dec": torch.zeros(d_in)}, str(folder / "sae.safetensors"))
    if model is not None:
        (folder.parent / "config.json").write_text(json.dumps({"model": model}))


def hub_cache(cache: Path, repo_id: str, files: dict[str, Path], revision: str = "main") -> Path:
    """The layout huggingface_hub writes: blobs by hash, snapshots/COMMIT/PATH symlinks to them, refs/REVISION."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    commit = hashlib.sha1(repo_id.encode()).hexdigest()
    for name, source in files.items():
        data = source.read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = repo / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return repo / "snapshots" / commit


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A hub cache holding two SAELens SAEs of REPO (layers 1 and 3); HF_HUB_CACHE points at it, offline."""
    made = tmp_path / "made"
    for layer in (1, 3):
        saelens_files(made / f"blocks.{layer}.hook_resid_post", layer)
    files = {f"blocks.{layer}.hook_resid_post/{name}": made / f"blocks.{layer}.hook_resid_post" / name
             for layer in (1, 3) for name in ("cfg.json", "sae_weights.safetensors")}
    root = tmp_path / "hf-cache"
    hub_cache(root, REPO, files)
    monkeypatch.setenv("HF_HUB_CACHE", str(root))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return root


def test_cache_location_follows_the_environment(tmp_path: Path) -> None:
    assert hub_cache_dir({"HF_HUB_CACHE": "/a/hub", "HF_HOME": "/b"}) == Path("/a/hub")
    assert hub_cache_dir({"HF_HOME": "/b"}) == Path("/b/hub")
    assert hub_cache_dir({"XDG_CACHE_HOME": "/c"}) == Path("/c/huggingface/hub")
    assert hub_cache_dir({}) == Path.home() / ".cache" / "huggingface" / "hub"
    made = tmp_path / "made"
    saelens_files(made, 2)
    hub_cache(tmp_path / "home" / "hub", REPO, {"x/cfg.json": made / "cfg.json"})
    found = resolve_files(REPO, ["x/cfg.json"], environ={"HF_HOME": str(tmp_path / "home")})
    assert json.loads(found["x/cfg.json"].read_text())["d_sae"] == D_SAE


def test_release_table_and_repository_ids() -> None:
    canonical = resolve_release("gemma-scope-2b-pt-res-canonical", "layer_20/width_16k/canonical")
    assert (canonical.repo_id, canonical.folder, canonical.files) == (
        "google/gemma-scope-2b-pt-res", "layer_20/width_16k/average_l0_71", "gemma_scope")
    assert resolve_release("gemma-2b-res-jb", "blocks.12.hook_resid_post").input_scale == pytest.approx(0.2138193839)
    plain = resolve_release(REPO, "blocks.1.hook_resid_post")
    assert plain.filenames() == [f"blocks.1.hook_resid_post/{name}" for name in ("cfg.json", "sae_weights.safetensors")]
    sparsify = resolve_release("EleutherAI/sae-x", "layers.3", source="sparsify")
    assert sparsify.filenames() == ["layers.3/cfg.json", "layers.3/sae.safetensors"]
    with pytest.raises(SAEImportError, match="has no SAE 'layer_99/width_16k/canonical'; it has ids such as layer_0/"):
        resolve_release("gemma-scope-2b-pt-res-canonical", "layer_99/width_16k/canonical")
    with pytest.raises(SAEImportError, match="unknown release 'gemma-scope-typo'.*gemma-scope-2b-pt-res-canonical"):
        resolve_release("gemma-scope-typo", "layer_0")


def test_import_by_release_offline_matches_the_directory_import(cache: Path, tmp_path: Path) -> None:
    code = main(["import", "--from", "saelens", "--release", REPO, "--sae-id", "blocks.3.hook_resid_post",
                 "--model", "tiny-random", "--device", "cpu", "--out", str(tmp_path / "stack")])
    assert code == 0
    stack = read_stack(tmp_path / "stack")
    assert [s.hookpoint for s in stack.stages] == ["blocks.3.hook_resid_post"]
    assert stack.identity.d_model == D_MODEL
    assert stack.stages[0].training["imported"]["source_config"]["repo_id"] == REPO
    direct = import_saelens(tmp_path / "made" / "blocks.3.hook_resid_post")
    x = torch.randn(8, D_MODEL)
    assert torch.equal(stack.stages[0].sae.encode(x), direct.sae.encode(x))


def test_gemma_scope_params_npz_from_the_cache(tmp_path: Path) -> None:
    """Gemma Scope's own format (params.npz), converted as SAELens does: JumpReLU on x·W_enc + b_enc."""
    g = torch.Generator().manual_seed(1)
    p = {"W_enc": torch.randn(D_MODEL, D_SAE, generator=g) * 0.3, "W_dec": torch.randn(D_SAE, D_MODEL, generator=g),
         "b_enc": torch.randn(D_SAE, generator=g) * 0.1, "b_dec": torch.randn(D_MODEL, generator=g) * 0.1,
         "threshold": torch.rand(D_SAE, generator=g) * 0.3}
    np.savez(tmp_path / "params.npz", **{k: v.numpy() for k, v in p.items()})
    folder = "layer_2/width_16k/average_l0_71"
    hub_cache(tmp_path / "hub", "google/gemma-scope-2b-pt-res", {f"{folder}/params.npz": tmp_path / "params.npz"})
    imported = load_source(SAESource("saelens", release="gemma-scope-2b-pt-res", sae_id=folder),
                           environ={"HF_HUB_CACHE": str(tmp_path / "hub")})
    assert imported.hookpoint == "blocks.2.hook_resid_post" and imported.sae.cfg.architecture == "jumprelu"
    assert imported.model_name == "gemma-2-2b"
    x = torch.randn(32, D_MODEL, generator=g) * 2
    pre = x @ p["W_enc"] + p["b_enc"]
    codes = torch.relu(pre) * (pre > p["threshold"])
    z = imported.sae.encode(x)
    assert (codes != 0).float().mean() > 0.05
    torch.testing.assert_close(z, codes * imported.code_scale, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(imported.sae.decode(z), codes @ p["W_dec"] + p["b_dec"], rtol=0, atol=1e-4)


def test_two_saes_compose_into_one_stack_in_hookpoint_order(cache: Path, tmp_path: Path) -> None:
    sparsify_files(tmp_path / "run" / "layers.1")
    code = main(["import", "--from", "saelens", "--release", REPO, "--sae-id", "blocks.3.hook_resid_post",
                 "--sae", f"from=sparsify,dir={tmp_path / 'run' / 'layers.1'}", "--model", "tiny-random",
                 "--device", "cpu", "--out", str(tmp_path / "stack")])
    assert code == 0
    stack = read_stack(tmp_path / "stack")
    assert [s.hookpoint for s in stack.stages] == ["blocks.1.hook_resid_post", "blocks.3.hook_resid_post"]
    assert [s.training["imported"]["source"] for s in stack.stages] == ["sparsify", "saelens"]
    assert stack.name == "imported-2-saes" and stack.identity.model_type == "gemma3_text"


@pytest.mark.parametrize("case, needle", [
    ("width", "different widths .* reads 32; sparsify .* reads 64"),
    ("model", "different host models: .*: gpt2; sparsify .*: tiny-random"),
    ("hookpoint", "two SAEs hook blocks.1.hook_resid_post"),
])
def test_saes_that_do_not_belong_together_are_refused(tmp_path: Path, case: str, needle: str) -> None:
    saelens_files(tmp_path / "a", 1, d_in=32 if case == "width" else D_MODEL, model="gpt2" if case == "model" else
                  "google/tiny-random")
    sparsify_files(tmp_path / "run" / ("layers.1" if case == "hookpoint" else "layers.2"))
    layer = "layers.1" if case == "hookpoint" else "layers.2"
    specs = [f"dir={tmp_path / 'a'}", f"from=sparsify,dir={tmp_path / 'run' / layer}"]
    with pytest.raises(SAEImportError, match=needle):
        compose_stack([parse_sae_spec(s) for s in specs], model=ModelConfig(name="tiny-random", device="cpu"),
                      out_dir=tmp_path / "stack")
    assert not (tmp_path / "stack").exists()


def test_missing_cache_files_name_the_files_and_the_download_option(cache: Path, tmp_path: Path,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["import", "--from", "saelens", "--release", REPO, "--sae-id", "blocks.2.hook_resid_post",
                 "--model", "tiny-random", "--device", "cpu", "--out", str(tmp_path / "stack")])
    err = capsys.readouterr().err
    assert code == 2 and f"{REPO}/blocks.2.hook_resid_post/cfg.json" in err
    assert f"{REPO}/blocks.2.hook_resid_post/sae_weights.safetensors" in err and "--download" in err
    with pytest.raises(HubFilesMissing, match="HF_HUB_OFFLINE is set"):
        resolve_files(REPO, ["blocks.2.hook_resid_post/cfg.json"], download=True)


def test_sae_specs_are_checked(tmp_path: Path) -> None:
    spec = parse_sae_spec("from=sparsify,release=org/x,id=layers.2,hookpoint=blocks.2.hook_mlp_out,input_scale=0.5")
    assert (spec.source, spec.release, spec.sae_id, spec.hookpoint, spec.input_scale) == (
        "sparsify", "org/x", "layers.2", "blocks.2.hook_mlp_out", 0.5)
    for bad, needle in [("dir=a,colour=red", "KEY=VALUE"), ("from=x,dir=a", "unknown source 'x'"),
                        ("dir=a,release=r,id=i", "not both"), ("release=r", "needs an sae id"),
                        ("dir=a,input_scale=big", "must be a number")]:
        with pytest.raises(SAEImportError, match=needle):
            parse_sae_spec(bad)
    assert main(["import", "--out", str(tmp_path / "s")]) == 2
    assert main(["import", str(tmp_path), "--out", str(tmp_path / "s")]) == 2  # SRC without --from


def test_explorer_ready_records_metrics_and_dashboards(cache: Path, tmp_path: Path) -> None:
    code = main(["import", "--from", "saelens", "--release", REPO, "--sae-id", "blocks.1.hook_resid_post",
                 "--model", "tiny-random", "--device", "cpu", "--out", str(tmp_path / "stack"), "--explorer-ready",
                 "--eval-tokens", "256", "--ce-windows", "4", "--dashboard-tokens", "256", "--quiet"])
    assert code == 0
    stage = read_stack(tmp_path / "stack").stages[0]
    assert {"fve", "l0", "delta_ce"} <= set(stage.metrics) and np.isfinite(stage.metrics["fve"])
    assert stage.dashboard is not None and int(stage.dashboard_record["tokens"]) >= 256
    assert int(stage.dashboard["count"].sum()) > 0 and "label_f1" in stage.dashboard
