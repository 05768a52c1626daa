"""ONNX export: every architecture and a residual stage match torch in ONNX Runtime, the graphs are listed
and hashed in the manifest, a graph that disagrees with torch fails the export, and the CLI runs."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import Tensor, nn

from core.sae import SAEConfig, build_sae, top_k_by_magnitude
from core.sae.base import SparseAutoencoder
from core.stack.affine import AffineMap
from core.stack.identity import HostModelIdentity
from core.stack.manifest import StackError, read_summary
from core.stack.reader import read_stack
from core.stack.runtime import StackRuntime
from core.stack.writer import StageSpec, write_stack
from trainer.cli import main
from trainer.interop import onnx_export
from trainer.interop.onnx_export import IR_VERSION, OPSET, StageGraph, build_graph, export_stack
from trainer.interop.onnx_parity import TOLERANCE, check_parity, random_inputs

D_IN, D_SAE = 16, 48
IDENTITY = HostModelIdentity("test-model", "gemma3_text", 4, D_IN, 100, "f" * 64)
VARIANTS = {  # stage name -> SAEConfig overrides; every architecture and the SA-GSAE parameter layouts
    "relu": {"architecture": "relu"},
    "topk": {"architecture": "topk", "k": 6},
    "batchtopk": {"architecture": "batchtopk", "k": 6},
    "jumprelu": {"architecture": "jumprelu"},
    "gated": {"architecture": "gated"},
    "sa_gsae": {"architecture": "sa_gsae"},
    "sa_gsae-split": {"architecture": "sa_gsae", "per_side_thresholds": True, "tied_magnitude": False},
}
RESIDUAL = "residual"  # an SA-GSAE stage on the residual of stage "relu" (ReSAE)


def random_sae(overrides: dict, d_in: int = D_IN, d_sae: int = D_SAE, seed: int = 0) -> SparseAutoencoder:
    """An SAE whose every parameter is non-trivial: random biases and scales, thresholds in [0.05, 0.55],
    BatchTopK's threshold calibrated to k on random activations."""
    torch.manual_seed(seed)
    sae = build_sae(SAEConfig(d_in=d_in, d_sae=d_sae, **overrides))
    with torch.no_grad():
        for name, p in sae.named_parameters():
            if name.startswith("threshold"):
                p.copy_(torch.rand_like(p) * 0.5 + 0.05)
            elif name != "W_dec":
                p.add_(torch.randn_like(p) * 0.1)
        if overrides["architecture"] == "batchtopk":
            sae.calibrate_threshold_(torch.randn(512, d_in))
    return sae.eval()


def write_test_stack(path: Path) -> Path:
    specs = [StageSpec(random_sae(o, seed=i), f"blocks.{i % 4}.hook_resid_post", input_scale=0.5 + i / 4, name=name)
             for i, (name, o) in enumerate(VARIANTS.items())]
    torch.manual_seed(9)
    affine = AffineMap(torch.randn(D_IN, D_IN) * 0.3, torch.randn(D_IN), 1.0, 0.5, 2.0)
    specs.append(StageSpec(random_sae({"architecture": "sa_gsae"}, seed=9), "blocks.3.hook_mlp_out", input_scale=2.0,
                           name=RESIDUAL, residual_of=0, affine=affine))
    return write_stack(path, "onnx-test", IDENTITY, specs)


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The test stack with every stage exported (top-k codes), once per module."""
    stack_dir = write_test_stack(tmp_path_factory.mktemp("onnx") / "stack")
    export_stack(stack_dir, random_rows=256)
    return stack_dir


def session_of(stack_dir: Path, index: int) -> tuple[ort.InferenceSession, dict]:
    record = json.loads((stack_dir / "stack.json").read_text())["stages"][index]["onnx"]
    return ort.InferenceSession(str(stack_dir / record["file"]), providers=["CPUExecutionProvider"]), record


def fresh_inputs(runtime: StackRuntime, index: int, rows: int = 64) -> tuple[Tensor, Tensor | None]:
    return random_inputs(runtime, index, rows, seed=1234)  # not the seed the export checked with


@pytest.mark.parametrize("name", [*VARIANTS, RESIDUAL])
def test_onnx_runtime_matches_the_torch_runtime(exported: Path, name: str) -> None:
    runtime = StackRuntime.from_loaded(read_stack(exported))
    index = next(s.index for s in runtime.stages if s.name == name)
    h, prev = fresh_inputs(runtime, index)
    session, record = session_of(exported, index)
    assert record["inputs"] == ["activations", *(["previous"] if prev is not None else []), "error_rows", "top_k"]
    feeds = {"activations": h.numpy(), "error_rows": np.arange(len(h)), "top_k": np.array([5])}
    if prev is not None:
        feeds["previous"] = prev.numpy()
    values, indices, l0, error = session.run(["values", "indices", "l0", "error_norm"], feeds)
    with torch.no_grad():
        result = runtime.run_stage(runtime.stages[index], h, prev)
    ref_values, _ = top_k_by_magnitude(result.codes, 5)
    np.testing.assert_allclose(np.abs(values), ref_values.abs().numpy(), rtol=TOLERANCE, atol=TOLERANCE)
    np.testing.assert_allclose(values, np.take_along_axis(result.codes.numpy(), indices, axis=1), atol=TOLERANCE)
    np.testing.assert_array_equal(l0, (result.codes != 0).sum(-1).numpy())
    np.testing.assert_allclose(error, result.error_norm().numpy(), rtol=TOLERANCE, atol=TOLERANCE)
    if name.startswith("sa_gsae"):
        assert (values < 0).any(), "signed stages report negative codes, ranked by |z|"


def test_manifest_lists_and_hashes_every_graph(exported: Path) -> None:
    manifest = json.loads((exported / "stack.json").read_text())
    for stage in manifest["stages"]:
        record = stage["onnx"]
        assert record["file"].endswith(".onnx") and manifest["files"][record["file"]]["sha256"] == record["sha256"]
        assert (record["codes"], record["opset"], record["ir_version"]) == ("top_k", OPSET, IR_VERSION)
        assert record["outputs"] == ["values", "indices", "l0", "error_norm"]
        parity = record["parity"]["random"]
        assert parity["rows"] == 256 and parity["flipped_codes"] <= 1 and parity["max_code_diff"] <= 1e-4
        assert record["source"][stage["file"]] == stage["sha256"]
        model = onnx.load(str(exported / record["file"]))
        assert model.ir_version == IR_VERSION and model.opset_import[0].version == OPSET
        assert {p.key: p.value for p in model.metadata_props}["featurewire.stage"] == stage["name"]
    assert len(read_stack(exported).stages) == len(VARIANTS) + 1  # read_stack verifies the graphs' hashes
    assert read_summary(exported).stages[-1].onnx["inputs"][1] == "previous"


def test_error_rows_select_which_error_norms_are_computed(exported: Path) -> None:
    session, _ = session_of(exported, 0)
    h = np.random.default_rng(0).standard_normal((5, D_IN)).astype(np.float32)
    feeds = {"activations": h, "top_k": np.array([3])}
    _, _, all_errors = session.run(["values", "l0", "error_norm"], feeds | {"error_rows": np.arange(5)})
    values, l0, one = session.run(["values", "l0", "error_norm"], feeds | {"error_rows": np.array([0])})
    picked = session.run(["error_norm"], feeds | {"error_rows": np.array([4, 1])})[0]
    assert values.shape == (5, 3) and l0.shape == (5,) and one.shape == (1,)
    np.testing.assert_allclose(picked, all_errors[[4, 1]], rtol=1e-6)


def test_full_codes_export_and_re_export_replace_the_old_files(exported: Path, tmp_path: Path) -> None:
    stack_dir = shutil.copytree(exported, tmp_path / "copy")
    old = {p.name for p in stack_dir.glob("*.onnx")}
    export_stack(stack_dir, codes="full", stages=["gated", RESIDUAL], random_rows=64)
    manifest = json.loads((stack_dir / "stack.json").read_text())
    by_name = {s["name"]: s["onnx"] for s in manifest["stages"]}
    assert by_name["gated"]["codes"] == by_name[RESIDUAL]["codes"] == "full" and by_name["relu"]["codes"] == "top_k"
    assert by_name["gated"]["outputs"] == ["codes", "l0", "error_norm"] and "top_k" not in by_name["gated"]["inputs"]
    now = {p.name for p in stack_dir.glob("*.onnx")}
    assert len(now) == len(old) and len(now - old) == 2 and now == {r["file"] for r in by_name.values()}
    assert {f for f in manifest["files"] if f.endswith(".onnx")} == now
    read_stack(stack_dir)


def test_a_graph_that_disagrees_with_torch_fails_the_export_and_writes_nothing(exported: Path, tmp_path: Path,
                                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    stack_dir = write_test_stack(tmp_path / "stack")
    before = (stack_dir / "stack.json").read_bytes()
    real_build = onnx_export.build_graph

    def wrong(runtime: StackRuntime, index: int, **kwargs) -> bytes:
        stage = runtime.stages[index]
        with torch.no_grad():
            stage.sae.b_enc.add_(0.5)  # the graph bakes in other weights than torch then runs
        try:
            return real_build(runtime, index, **kwargs)
        finally:
            with torch.no_grad():
                stage.sae.b_enc.sub_(0.5)

    monkeypatch.setattr(onnx_export, "build_graph", wrong)
    with pytest.raises(StackError, match="ONNX Runtime disagrees with torch on random activations"):
        export_stack(stack_dir, random_rows=64)
    assert (stack_dir / "stack.json").read_bytes() == before and not list(stack_dir.glob("*.onnx"))


def test_parity_allows_rounding_flips_only(exported: Path) -> None:
    runtime = StackRuntime.from_loaded(read_stack(exported))
    data = build_graph(runtime, 3)  # jumprelu
    graph = StageGraph(runtime, 3).eval()
    h, _ = random_inputs(runtime, 3, 256, seed=5)
    report = check_parity(data, graph, h, None, codes="top_k", source="random")
    assert report.passed and report.codes == 256 * D_SAE and report.allowed_flips >= 1
    with torch.no_grad():  # move one latent's threshold: the graph now switches it on where torch does not
        runtime.stages[3].sae.threshold[0] += 1.0
    report = check_parity(data, graph, h, None, codes="top_k", source="random")
    assert not report.passed and report.flipped_codes > report.allowed_flips and report.boundary_rows > 0
    assert "codes switched on/off" in report.describe()
    with torch.no_grad():
        runtime.stages[3].sae.threshold[0] -= 1.0


class LinearErrorPredictor(nn.Module):
    """A stand-in for the error-predictor issue's probes: |w·h + b|."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.linear = nn.Linear(d, 1)

    def forward(self, h: Tensor, prev: Tensor | None) -> Tensor:
        return self.linear(h).squeeze(-1).abs()


def test_an_error_predictor_becomes_an_output(tmp_path: Path) -> None:
    stack_dir = write_test_stack(tmp_path / "stack")
    predictor = LinearErrorPredictor(D_IN)
    (export,) = export_stack(stack_dir, stages=["topk"], predictors={1: predictor}, random_rows=64)
    assert export.record["outputs"][-1] == "predicted_error_norm" and "max_predicted_diff" in export.record["parity"][
        "random"]
    session, _ = session_of(stack_dir, 1)
    h = torch.randn(4, D_IN)
    (got,) = session.run(["predicted_error_norm"], {"activations": h.numpy(), "error_rows": np.arange(4),
                                                    "top_k": np.array([2])})
    np.testing.assert_allclose(got, predictor(h, None).detach().numpy(), rtol=1e-5)


def test_tampered_or_stale_graphs_are_refused(exported: Path, tmp_path: Path) -> None:
    stack_dir = shutil.copytree(exported, tmp_path / "copy")
    manifest = json.loads((stack_dir / "stack.json").read_text())
    graph = stack_dir / manifest["stages"][0]["onnx"]["file"]
    data = bytearray(graph.read_bytes())
    data[-1] ^= 1
    graph.write_bytes(bytes(data))
    with pytest.raises(StackError, match="corrupt"):
        read_stack(stack_dir)
    manifest["stages"][1]["onnx"]["source"] = {"other.safetensors": "0" * 64}
    (stack_dir / "stack.json").write_text(json.dumps(manifest))
    with pytest.raises(StackError, match="exported from other weights"):
        read_summary(stack_dir)


def test_cli_exports_with_real_activations_of_the_host_model(tmp_path: Path, tiny_gemma,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    identity = HostModelIdentity.from_model(tiny_gemma.model, tiny_gemma.name)
    d = tiny_gemma.hookpoints.d_model
    specs = [StageSpec(random_sae({"architecture": "sa_gsae"}, d_in=d, d_sae=96), "blocks.1.hook_resid_post", 0.3)]
    stack_dir = write_stack(tmp_path / "stack", "cli", identity, specs)
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("Sparse autoencoders split activations into features. " * 40)
    code = main(["export-onnx", "--stack", str(stack_dir), "--corpus", str(corpus), "--random-rows", "64",
                 "--real-tokens", "96"])
    out = capsys.readouterr().out
    assert code == 0 and "random: max relative" in out and "real: max relative" in out
    parity = read_summary(stack_dir).stages[0].onnx["parity"]
    assert parity["real"]["rows"] == 96 and parity["real"]["max_error_diff"] <= 1e-4
    assert main(["export-onnx", "--stack", str(stack_dir), "--stage", "nope", "--no-real"]) == 2
    assert "no stage named 'nope'" in capsys.readouterr().err
