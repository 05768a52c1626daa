"""Importing SAELens and sparsify SAEs: hand-built fixtures in each library's own file layout, checked
against the libraries' encode/decode equations written out here from their definitions."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import Tensor

from core.stack.identity import HostModelIdentity
from core.stack.reader import read_stack
from core.stack.writer import write_stack
from trainer.interop.compose import import_into_stack
from trainer.interop.importers import ImportedSAE, SAEImportError, import_saelens, import_sparsify

D_IN, D_SAE, K = 12, 40, 5


# ------------------------------------------------------------------- the libraries' equations (reference)


def saelens_encode(cfg: dict, p: dict[str, Tensor], x: Tensor) -> Tensor:
    """SAELens `encode` per architecture (sae_lens/saes/{standard,gated,jumprelu,topk}_sae.py)."""
    sae_in = x - p["b_dec"] * cfg.get("apply_b_dec_to_input", True)
    if cfg["architecture"] == "gated":
        active = (sae_in @ p["W_enc"] + p["b_gate"] > 0).float()
        return active * torch.relu(sae_in @ (p["W_enc"] * p["r_mag"].exp()) + p["b_mag"])
    hidden_pre = sae_in @ p["W_enc"] + p["b_enc"]
    if cfg["architecture"] == "jumprelu":
        return torch.relu(hidden_pre) * (hidden_pre > p["threshold"]).float()
    k = cfg.get("k") or cfg.get("activation_fn_kwargs", {}).get("k")
    if k is None:
        return torch.relu(hidden_pre)
    if cfg.get("rescale_acts_by_decoder_norm"):
        hidden_pre = hidden_pre * p["W_dec"].norm(dim=-1)
    top = hidden_pre.topk(k, dim=-1)
    return torch.zeros_like(hidden_pre).scatter(-1, top.indices, top.values.relu())


def saelens_decode(cfg: dict, p: dict[str, Tensor], z: Tensor) -> Tensor:
    if cfg.get("rescale_acts_by_decoder_norm"):
        z = z / p["W_dec"].norm(dim=-1)
    return z @ p["W_dec"] + p["b_dec"]


def sparsify_forward(cfg: dict, p: dict[str, Tensor], x: Tensor) -> tuple[Tensor, Tensor]:
    """sparsify SparseCoder: pre = ReLU(encoder(x − b_dec)); top-k; decode = Σ acts·W_dec[idx] + b_dec."""
    pre = torch.relu((x - p["b_dec"]) @ p["encoder.weight"].T + p["encoder.bias"])
    top = pre.topk(cfg["k"], dim=-1, sorted=False)
    dense = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
    return dense, dense @ p["W_dec"] + p["b_dec"]


# ------------------------------------------------------------------------------------------- fixtures


def random_params(architecture: str, *, norms: Tensor | None) -> dict[str, Tensor]:
    """SAELens-named parameters; decoder rows get the given norms (non-unit on purpose)."""
    W_dec = torch.randn(D_SAE, D_IN)
    W_dec = W_dec / W_dec.norm(dim=1, keepdim=True) * (norms if norms is not None else torch.ones(D_SAE))[:, None]
    p = {"W_enc": torch.randn(D_IN, D_SAE) * 0.4, "W_dec": W_dec, "b_dec": torch.randn(D_IN) * 0.2}
    if architecture == "gated":
        p |= {"b_gate": torch.randn(D_SAE) * 0.3, "r_mag": torch.randn(D_SAE) * 0.2, "b_mag": torch.randn(D_SAE) * 0.3}
    else:
        p["b_enc"] = torch.randn(D_SAE) * 0.3
    if architecture == "jumprelu":
        p["threshold"] = torch.rand(D_SAE) * 0.8
        p["threshold"][:3] = torch.tensor([-0.2, 0.0, -1.0])  # θ ≤ 0: SAELens's ReLU still zeroes π ≤ 0
    return p


def write_saelens(path: Path, cfg: dict, params: dict[str, Tensor]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in params.items()}, str(path / "sae_weights.safetensors"))
    return path


def saelens_cfg(architecture: str, **fields) -> dict:
    """A SAELens 6.x cfg.json (`metadata` holds the hook); pass version="3.0.0" style fields for older ones."""
    return {"architecture": architecture, "d_in": D_IN, "d_sae": D_SAE, "dtype": "float32", "device": "cpu",
            "apply_b_dec_to_input": True, "normalize_activations": "none", "reshape_activations": "none",
            "metadata": {"hook_name": "blocks.3.hook_resid_post", "model_name": "tiny", "sae_lens_version": "6.5.0"},
            **fields}


def uneven_norms() -> Tensor:
    return torch.rand(D_SAE) * 2.7 + 0.3  # in [0.3, 3.0]


def assert_parity(imported: ImportedSAE, codes_lib: Tensor, recon_lib: Tensor, x: Tensor, code_scale: Tensor) -> None:
    """The contract: decode(encode(x)) equals the library's reconstruction; codes equal up to code_scale."""
    z = imported.sae.encode(x)
    torch.testing.assert_close(imported.code_scale, code_scale, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(z, codes_lib * code_scale, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(imported.sae.decode(z), recon_lib, rtol=0, atol=1e-5)
    torch.testing.assert_close(imported.sae.W_dec.norm(dim=1), torch.ones(D_SAE), rtol=0, atol=1e-6)
    assert (codes_lib != 0).float().mean() > 0.05  # the fixture really exercises active latents
    assert (z != 0).sum() == (codes_lib != 0).sum()


# ---------------------------------------------------------------------------------------------- SAELens


CASES = {  # id -> (cfg fields, architecture of the parameters, decoder norms, expected featurewire architecture)
    "standard-no-b_dec-in-input": (dict(apply_b_dec_to_input=False), "standard", "uneven", "relu"),
    "standard": ({}, "standard", "uneven", "relu"),
    "gated-pre-6-layout": (dict(metadata=None, hook_name="blocks.3.hook_resid_post", activation_fn_str="relu",
                                sae_lens_version="3.12.0"), "gated", "uneven", "gated"),
    "gated-no-b_dec-in-input": (dict(apply_b_dec_to_input=False), "gated", "uneven", "gated"),
    "jumprelu": (dict(apply_b_dec_to_input=False), "jumprelu", "uneven", "jumprelu"),
    "topk-rescaled-by-decoder-norm": (dict(k=K, rescale_acts_by_decoder_norm=True), "topk", "uneven", "topk"),
    "topk-legacy-activation-fn": (dict(activation_fn_str="topk", activation_fn_kwargs={"k": K}), "standard",
                                  "uniform", "topk"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_saelens_import_matches_the_library(tmp_path: Path, case: str) -> None:
    fields, architecture, norm_kind, expected = CASES[case]
    norms = uneven_norms() if norm_kind == "uneven" else torch.full((D_SAE,), 2.0)
    params = random_params(architecture, norms=norms)
    cfg = saelens_cfg(architecture, **fields)
    imported = import_saelens(write_saelens(tmp_path / "sae", cfg, params))
    x = torch.randn(64, D_IN) * 1.5
    codes = saelens_encode(cfg, params, x)
    recon = saelens_decode(cfg, params, codes)
    code_scale = torch.ones(D_SAE) if cfg.get("rescale_acts_by_decoder_norm") else norms
    assert imported.sae.cfg.architecture == expected and imported.hookpoint == "blocks.3.hook_resid_post"
    assert_parity(imported, codes, recon, x, code_scale)
    if expected == "topk":
        assert imported.sae.cfg.k == K
    if not cfg["apply_b_dec_to_input"]:
        assert any("b_dec folded" in note for note in imported.notes)


def test_saelens_finetuning_scaling_factor_is_folded_into_the_decoder(tmp_path: Path) -> None:
    params = random_params("standard", norms=uneven_norms())
    scale = torch.rand(D_SAE) + 0.5
    cfg = saelens_cfg("standard", finetuning_scaling_factor=True)
    imported = import_saelens(write_saelens(tmp_path / "sae", cfg, params | {"finetuning_scaling_factor": scale}))
    x = torch.randn(32, D_IN)
    codes = saelens_encode(cfg, params, x)
    recon = (codes * scale) @ params["W_dec"] + params["b_dec"]  # SAELens applies s before W_dec
    assert_parity(imported, codes, recon, x, params["W_dec"].norm(dim=1) * scale)


@pytest.mark.parametrize(
    "fields, params_arch, needle",
    [
        (dict(activation_fn_str="topk", activation_fn_kwargs={"k": K}), "standard", "decoder norms differ"),
        (dict(normalize_activations="layer_norm"), "standard", "normalises each token"),
        (dict(normalize_activations="expected_average_only_in"), "standard", "pass that factor as input_scale"),
        (dict(reshape_activations="hook_z"), "standard", "hook_z"),
        (dict(architecture="transcoder"), "standard", "no featurewire equivalent"),
        (dict(activation_fn="tanh-relu"), "standard", "no featurewire equivalent"),
        (dict(architecture="topk"), "topk", "valid k"),
        (dict(rescale_acts_by_decoder_norm=True), "standard", "only understood for SAELens TopK"),
        (dict(d_sae=D_SAE + 1), "standard", re.escape("W_enc is (12, 40), expected (12, 41)")),
    ],
)
def test_saelens_imports_that_cannot_be_exact_are_refused(tmp_path: Path, fields, params_arch, needle) -> None:
    cfg = saelens_cfg(params_arch) | fields
    with pytest.raises(SAEImportError, match=needle):
        import_saelens(write_saelens(tmp_path / "sae", cfg, random_params(params_arch, norms=uneven_norms())))


def test_saelens_unknown_tensors_are_refused(tmp_path: Path) -> None:
    params = random_params("standard", norms=None) | {"W_skip": torch.zeros(D_IN, D_IN)}
    with pytest.raises(SAEImportError, match="unexpected W_skip"):
        import_saelens(write_saelens(tmp_path / "sae", saelens_cfg("standard"), params))


def test_expected_average_only_in_takes_the_scale_from_the_caller(tmp_path: Path) -> None:
    cfg = saelens_cfg("standard", normalize_activations="expected_average_only_in")
    imported = import_saelens(write_saelens(tmp_path / "sae", cfg, random_params("standard", norms=None)),
                              input_scale=0.125)
    assert imported.input_scale == 0.125


def test_hookpoints_default_from_canonical_hook_names_only(tmp_path: Path) -> None:
    params = random_params("standard", norms=None)
    odd = saelens_cfg("standard", metadata={"hook_name": "blocks.3.ln2.hook_normalized"})
    imported = import_saelens(write_saelens(tmp_path / "a", odd, params))
    assert imported.hookpoint is None
    with pytest.raises(SAEImportError, match="no hookpoint known"):
        imported.stage_spec()
    assert imported.stage_spec("blocks.3.hook_mlp_out").hookpoint == "blocks.3.hook_mlp_out"
    with pytest.raises(SAEImportError, match="not canonical"):
        import_saelens(tmp_path / "a", hookpoint="layer3")
    assert import_saelens(tmp_path / "a", hookpoint="blocks.2.hook_resid_pre").hookpoint == "blocks.2.hook_resid_pre"


def test_missing_files_are_reported(tmp_path: Path) -> None:
    with pytest.raises(SAEImportError, match="must hold cfg.json and sae_weights.safetensors"):
        import_saelens(tmp_path)


# --------------------------------------------------------------------------------------------- sparsify


def write_sparsify(path: Path, cfg: dict, params: dict[str, Tensor]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "cfg.json").write_text(json.dumps(cfg))
    save_file({k: v.contiguous() for k, v in params.items()}, str(path / "sae.safetensors"))
    return path


def sparsify_fixture(**cfg_fields) -> tuple[dict, dict[str, Tensor]]:
    """Parameters as sparsify saves them; its decoder rows are divided by (norm + eps)."""
    cfg = {"activation": "topk", "expansion_factor": D_SAE // 4, "normalize_decoder": True, "num_latents": D_SAE,
           "k": K, "multi_topk": False, "skip_connection": False, "transcode": False, "d_in": D_IN, **cfg_fields}
    W_dec = torch.randn(D_SAE, D_IN)
    W_dec /= W_dec.norm(dim=1, keepdim=True) + torch.finfo(torch.float32).eps
    return cfg, {"encoder.weight": torch.randn(D_SAE, D_IN) * 0.4, "encoder.bias": torch.randn(D_SAE) * 0.2,
                 "W_dec": W_dec, "b_dec": torch.randn(D_IN) * 0.2}


def test_sparsify_import_matches_the_library(tmp_path: Path) -> None:
    cfg, params = sparsify_fixture()
    imported = import_sparsify(write_sparsify(tmp_path / "layers.4", cfg, params))
    x = torch.randn(64, D_IN) * 1.5
    codes, recon = sparsify_forward(cfg, params, x)
    assert imported.sae.cfg.architecture == "topk" and imported.sae.cfg.k == K
    assert imported.hookpoint == "blocks.4.hook_resid_post"  # the output of decoder layer 4
    assert_parity(imported, codes, recon, x, params["W_dec"].norm(dim=1))
    assert (imported.sae.encode(x) != 0).sum(dim=-1).eq(K).all()


@pytest.mark.parametrize(
    "fields, needle",
    [
        (dict(activation="groupmax"), "only topk"),
        (dict(skip_connection=True), "skip_connection"),
        (dict(transcode=True), "transcode"),
        (dict(num_latents=D_SAE * 2), "implies another number"),
        (dict(normalize_decoder=False), "decoder norms differ"),
    ],
)
def test_sparsify_imports_that_cannot_be_exact_are_refused(tmp_path: Path, fields: dict, needle: str) -> None:
    cfg, params = sparsify_fixture(**fields)
    if not cfg["normalize_decoder"]:
        params["W_dec"] = params["W_dec"] * uneven_norms()[:, None]
    with pytest.raises(SAEImportError, match=needle):
        import_sparsify(write_sparsify(tmp_path / "sae", cfg, params))


# ------------------------------------------------------------------------------------------- into a stack


def test_imported_saes_travel_through_a_stack_unchanged(tmp_path: Path) -> None:
    norms = uneven_norms()
    params = random_params("jumprelu", norms=norms)
    cfg = saelens_cfg("jumprelu")
    from_saelens = import_saelens(write_saelens(tmp_path / "a", cfg, params))
    s_cfg, s_params = sparsify_fixture()
    from_sparsify = import_sparsify(write_sparsify(tmp_path / "layers.5", s_cfg, s_params))
    host = HostModelIdentity("tiny", "gpt_neox", 8, D_IN, 512, "a" * 64)
    stack_dir = write_stack(tmp_path / "stack", "imported", host,
                            [from_saelens.stage_spec(), from_sparsify.stage_spec(name="sparsify")])
    loaded = read_stack(stack_dir, expect_model=host)
    x = torch.randn(16, D_IN)
    for imported, stage in zip([from_saelens, from_sparsify], loaded.stages, strict=True):
        assert torch.equal(stage.sae.encode(x), imported.sae.encode(x))
        assert torch.equal(stage.extra_tensors["source_code_scale"], imported.code_scale)
        assert stage.training["imported"]["source"] == imported.source
    assert [s.hookpoint for s in loaded.stages] == ["blocks.3.hook_resid_post", "blocks.5.hook_resid_post"]
    torch.testing.assert_close(loaded.stages[0].extra_tensors["source_code_scale"], norms)


def test_import_into_stack_checks_the_host_model(tmp_path: Path) -> None:
    """The CLI path: a sparsify SAE for the tiny Gemma (d_model 64) becomes a stack for that model."""
    cfg, params = sparsify_fixture()
    cfg |= {"d_in": 64, "num_latents": 128}
    params = {"encoder.weight": torch.randn(128, 64), "encoder.bias": torch.zeros(128),
              "W_dec": torch.nn.functional.normalize(torch.randn(128, 64), dim=1), "b_dec": torch.zeros(64)}
    src = write_sparsify(tmp_path / "layers.2", cfg, params)
    stack_dir = import_into_stack("sparsify", src, model="tiny-random", out_dir=tmp_path / "stack")
    loaded = read_stack(stack_dir)
    assert loaded.identity.model_type == "gemma3_text" and loaded.identity.d_model == 64
    assert loaded.stages[0].hookpoint == "blocks.2.hook_resid_post"
    with pytest.raises(SAEImportError, match="layer 9 > 3"):
        import_into_stack("sparsify", src, model="tiny-random", hookpoint="blocks.9.hook_resid_post",
                          out_dir=tmp_path / "other")
    with pytest.raises(SAEImportError, match="64-dim vectors but blocks.2.hook_resid_post of tiny-random-neox is 32"):
        import_into_stack("sparsify", src, model="tiny-random-neox", out_dir=tmp_path / "other")
