"""Exporting a stage to SAELens' format: every architecture SAELens has round-trips through our own importer
(codes and reconstructions on raw activations, input_scale folded in), SAELens' equations on the written files
give featurewire's codes, stages SAELens cannot express are refused with the reason, and the CLI runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import Tensor

from core.sae import SAEConfig, build_sae
from core.sae.base import SparseAutoencoder
from core.stack.affine import AffineMap
from core.stack.identity import HostModelIdentity
from core.stack.reader import read_stack
from core.stack.runtime import StackRuntime
from core.stack.writer import StageSpec, write_stack
from trainer.interop.export_saelens import SAELensExportError, export_saelens
from trainer.interop.importers import import_saelens

REPO_ROOT = Path(__file__).resolve().parents[3]
D_IN, D_SAE, K = 16, 48, 6
IDENTITY = HostModelIdentity("test-model", "gemma3_text", 4, D_IN, 100, "f" * 64)
# stage name -> (SAEConfig overrides, input_scale, SAELens architecture, architecture our importer gives back)
PLAIN = {
    "relu": ({"architecture": "relu"}, 0.37, "standard", "relu"),
    "topk": ({"architecture": "topk", "k": K}, 2.5, "topk", "topk"),
    "batchtopk": ({"architecture": "batchtopk", "k": K}, 0.8, "jumprelu", "jumprelu"),
    "jumprelu": ({"architecture": "jumprelu"}, 3.0, "jumprelu", "jumprelu"),
    "gated": ({"architecture": "gated"}, 0.25, "gated", "gated"),
}
TOL = {"rtol": 1e-5, "atol": 1e-5}


def random_sae(overrides: dict, seed: int) -> SparseAutoencoder:
    """Random non-trivial parameters; thresholds in [0.05, 0.55], BatchTopK's calibrated to k."""
    torch.manual_seed(seed)
    sae = build_sae(SAEConfig(d_in=D_IN, d_sae=D_SAE, **overrides))
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if name.startswith("threshold"):
                p.copy_(torch.rand_like(p) * 0.5 + 0.05)
            elif name != "W_dec":
                p.add_(torch.randn_like(p) * 0.1)
        if overrides["architecture"] == "batchtopk":
            sae.calibrate_threshold_(torch.randn(512, D_IN))
    return sae.eval()


def write_test_stack(path: Path) -> Path:
    specs = [StageSpec(random_sae(o, seed=i), f"blocks.{i % 4}.hook_resid_post", input_scale=s, name=name)
             for i, (name, (o, s, _, _)) in enumerate(PLAIN.items())]
    specs.append(StageSpec(random_sae({"architecture": "sa_gsae"}, seed=7), "blocks.2.hook_mlp_out", 1.5,
                           name="sa_gsae"))
    affine = AffineMap(torch.randn(D_IN, D_IN) * 0.3, torch.randn(D_IN), 1.0, 0.5, 2.0)
    specs.append(StageSpec(random_sae({"architecture": "relu"}, seed=8), "blocks.3.hook_resid_post", 2.0,
                           name="residual", residual_of=0, affine=affine))
    return write_stack(path, "export-test", IDENTITY, specs)


@pytest.fixture(scope="module")
def stack_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_test_stack(tmp_path_factory.mktemp("saelens") / "stack")


def featurewire_output(stack_dir: Path, name: str, h: Tensor) -> tuple[Tensor, Tensor, float]:
    """(codes, reconstruction of the raw activations h, input_scale) from the stack runtime."""
    runtime = StackRuntime.from_loaded(read_stack(stack_dir))
    stage = next(s for s in runtime.stages if s.name == name)
    with torch.no_grad():
        result = runtime.run_stage(stage, h)
    return result.codes, result.recon, stage.input_scale


def saelens_forward(cfg: dict, p: dict[str, Tensor], h: Tensor) -> tuple[Tensor, Tensor]:
    """SAELens 6 inference encode/decode (sae_lens/saes/{standard,topk,jumprelu,gated}_sae.py), written out."""
    assert cfg["apply_b_dec_to_input"] and cfg["normalize_activations"] == "none"
    sae_in = h - p["b_dec"]
    if cfg["architecture"] == "gated":
        active = (sae_in @ p["W_enc"] + p["b_gate"] > 0).float()
        z = active * torch.relu(sae_in @ (p["W_enc"] * p["r_mag"].exp()) + p["b_mag"])
    else:
        pre = sae_in @ p["W_enc"] + p["b_enc"]
        if cfg["architecture"] == "jumprelu":
            z = torch.relu(pre) * (pre > p["threshold"].relu()).float()
        elif cfg["architecture"] == "topk":
            top = pre.topk(cfg["k"], dim=-1)
            z = torch.zeros_like(pre).scatter(-1, top.indices, top.values.relu())
        else:
            z = torch.relu(pre)
    return z, z @ p["W_dec"] + p["b_dec"]


def raw_activations(scale: float, rows: int = 64) -> Tensor:
    """Raw activations h whose SAE input s·h is unit scale."""
    return torch.randn(rows, D_IN, generator=torch.Generator().manual_seed(1234)) / scale


@pytest.mark.parametrize("name", list(PLAIN))
def test_export_then_import_reproduces_the_stage(stack_dir: Path, tmp_path: Path, name: str) -> None:
    _, scale, saelens_arch, reimported_arch = PLAIN[name]
    result = export_saelens(stack_dir, name, tmp_path / "sae")
    assert (result.architecture, result.input_scale) == (saelens_arch, scale)
    h = raw_activations(scale)
    codes, recon, _ = featurewire_output(stack_dir, name, h)
    assert (codes != 0).float().mean() > 0.05  # the fixture really exercises active latents

    imported = import_saelens(tmp_path / "sae")  # our own importer, no input_scale: it is in the weights
    assert imported.sae.cfg.architecture == reimported_arch and imported.input_scale == 1.0
    assert imported.hookpoint == read_stack(stack_dir).stage(name).hookpoint
    if reimported_arch == "topk":
        assert imported.sae.cfg.k == K
    # Exported decoder rows have norm 1/s; the importer normalises them, so its codes are ours times 1/s.
    torch.testing.assert_close(imported.code_scale, torch.full((D_SAE,), 1 / scale), rtol=1e-5, atol=0)
    z = imported.sae.encode(h)
    torch.testing.assert_close(z, codes * imported.code_scale, **TOL)
    assert torch.equal(z != 0, codes != 0)
    torch.testing.assert_close(imported.sae.decode(z), recon, **TOL)


@pytest.mark.parametrize("name", list(PLAIN))
def test_saelens_equations_on_the_files_give_featurewire_codes(stack_dir: Path, tmp_path: Path, name: str) -> None:
    """Folding keeps the pre-activations: SAELens' codes are featurewire's, unscaled, on raw activations."""
    export_saelens(stack_dir, name, tmp_path / "sae")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    weights = load_file(str(tmp_path / "sae" / "sae_weights.safetensors"))
    assert all(t.dtype == torch.float32 for t in weights.values())
    h = raw_activations(PLAIN[name][1])
    codes, recon, _ = featurewire_output(stack_dir, name, h)
    z, h_hat = saelens_forward(cfg, weights, h)
    torch.testing.assert_close(z, codes, **TOL)
    torch.testing.assert_close(h_hat, recon, **TOL)


def test_cfg_json_has_the_fields_saelens_reads(stack_dir: Path, tmp_path: Path) -> None:
    export_saelens(stack_dir, "topk", tmp_path / "sae", model_name="gemma-3-270m")
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert cfg | {"metadata": None} == cfg | {
        "architecture": "topk", "d_in": D_IN, "d_sae": D_SAE, "k": K, "rescale_acts_by_decoder_norm": False,
        "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": True, "normalize_activations": "none",
        "reshape_activations": "none", "hook_name": "blocks.1.hook_resid_post", "hook_layer": 1,
        "hook_head_index": None, "model_name": "gemma-3-270m", "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": K}, "prepend_bos": True, "metadata": None}
    meta = cfg["metadata"]
    assert meta["sae_lens_version"].startswith("6.") and meta["hook_name"] == "blocks.1.hook_resid_post"
    assert meta["model_name"] == "gemma-3-270m" and meta["hook_head_index"] is None
    assert meta["featurewire"]["input_scale"] == 2.5 and meta["featurewire"]["input_scale_folded"]
    assert meta["featurewire"]["host_model"]["name"] == "test-model"
    export_saelens(stack_dir, "jumprelu", tmp_path / "j")
    assert json.loads((tmp_path / "j" / "cfg.json").read_text())["model_name"] == "test-model"  # from the stack


@pytest.mark.parametrize(("name", "needle"), [
    ("sa_gsae", "SA-GSAE: its codes are signed"),
    ("residual", "residual \\(ReSAE\\) stage.*SAELens SAEs read one hook's activation"),
    ("nope", "has no stage 'nope'; stages: relu, topk, batchtopk, jumprelu, gated, sa_gsae, residual"),
    (None, "name a stage with --stage; stages: relu"),
])
def test_stages_saelens_cannot_express_are_refused(stack_dir: Path, tmp_path: Path, name: str | None,
                                                   needle: str) -> None:
    with pytest.raises(SAELensExportError, match=needle):
        export_saelens(stack_dir, name, tmp_path / "sae")
    assert not (tmp_path / "sae").exists()


def test_existing_export_is_kept_without_overwrite(stack_dir: Path, tmp_path: Path) -> None:
    export_saelens(stack_dir, "relu", tmp_path / "sae")
    with pytest.raises(SAELensExportError, match="already holds cfg.json, sae_weights.safetensors"):
        export_saelens(stack_dir, "gated", tmp_path / "sae")
    assert json.loads((tmp_path / "sae" / "cfg.json").read_text())["architecture"] == "standard"
    export_saelens(stack_dir, "gated", tmp_path / "sae", overwrite=True)
    assert json.loads((tmp_path / "sae" / "cfg.json").read_text())["architecture"] == "gated"
    assert sorted(p.name for p in (tmp_path / "sae").iterdir()) == ["cfg.json", "sae_weights.safetensors"]


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "trainer", *args], cwd=REPO_ROOT, capture_output=True, text=True,
                          timeout=300, check=False)


def test_cli_exports_a_stage_that_reimports_to_the_same_reconstruction(tmp_path: Path) -> None:
    torch.manual_seed(3)
    stack = write_stack(tmp_path / "stack", "cli", IDENTITY, [
        StageSpec(random_sae({"architecture": "jumprelu"}, seed=3), "blocks.2.hook_resid_post", 0.5, name="jr"),
        StageSpec(random_sae({"architecture": "sa_gsae"}, seed=4), "blocks.3.hook_resid_post", 1.0, name="signed")])
    result = _cli("export", "--to", "saelens", "--stack", str(stack), "--stage", "jr", "--out", str(tmp_path / "sae"))
    assert result.returncode == 0, result.stderr
    assert "jumprelu" in result.stdout and str(tmp_path / "sae") in result.stdout
    assert sorted(p.name for p in (tmp_path / "sae").iterdir()) == ["cfg.json", "sae_weights.safetensors"]
    cfg = json.loads((tmp_path / "sae" / "cfg.json").read_text())
    assert (cfg["architecture"], cfg["d_in"], cfg["d_sae"]) == ("jumprelu", D_IN, D_SAE)
    assert (cfg["hook_name"], cfg["model_name"], cfg["normalize_activations"]) == (
        "blocks.2.hook_resid_post", "test-model", "none")

    imported = import_saelens(tmp_path / "sae")  # and through a stack, as `import --from saelens` would
    again = write_stack(tmp_path / "again", "again", IDENTITY, [imported.stage_spec(name="jr")])
    h = raw_activations(0.5)
    _, recon, _ = featurewire_output(stack, "jr", h)
    _, recon_again, scale_again = featurewire_output(again, "jr", h)
    assert scale_again == 1.0
    torch.testing.assert_close(recon_again, recon, **TOL)

    refused = _cli("export", "--to", "saelens", "--stack", str(stack), "--stage", "signed", "--out",
                   str(tmp_path / "no"))
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.startswith("featurewire-train: error: ") and "SA-GSAE" in refused.stderr
    assert refused.stderr.count("\n") == 1 and not (tmp_path / "no").exists()
