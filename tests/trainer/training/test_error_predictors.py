"""Error-norm predictors: planted linear relations are recovered, the held-out numbers match a direct
computation, the runtime reports the probe's dot product, and stacks store the probes hashed."""

from __future__ import annotations

import hashlib
import json
import tomllib
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from core.sae import SAEConfig, build_sae
from core.stack.error_predictor import ErrorPredictor, NormProbe
from core.stack.identity import HostModelIdentity
from core.stack.manifest import StackError
from core.stack.reader import read_stack
from core.stack.runtime import RuntimeStage, StackRuntime
from core.stack.writer import StageSpec, write_stack
from trainer.evaluation.error_metrics import error_norm_metrics, format_error_predictors, stored_predictor_table
from trainer.training.affine_fit import MomentAccumulator, fit_affine
from trainer.training.error_predictors import SPLIT_EVERY, ErrorMoments, fit_error_predictors, fit_predictor

D, N = 16, 5000
SMOKE = Path(__file__).resolve().parents[3] / "trainer" / "configs" / "smoke.toml"
IDENTITY = HostModelIdentity("test", "gemma3_text", 2, D, 100, "f" * 64, "w" * 64)


def _unit_rows(n: int, d: int) -> torch.Tensor:
    v = torch.randn(n, d)
    return v / v.norm(dim=-1, keepdim=True)


def _test_rows(n: int) -> torch.Tensor:
    return torch.arange(n) % SPLIT_EVERY == 0


def test_norm_probe_recovers_a_planted_norm_and_finds_no_linear_vector() -> None:
    x = torch.randn(N, D)
    w, b = 0.4 * torch.randn(D), 10.0
    norm = x @ w + b  # (N,) positive: |x·w| stays far below 10
    error = norm[:, None] * _unit_rows(N, D)  # random directions: the vector is not linear in x
    m = ErrorMoments(D)
    m.update(x, error, x)
    p = fit_predictor(m)
    assert p.metrics["norm_r2"] > 0.999
    torch.testing.assert_close(p.norm_weight, w, atol=2e-3, rtol=0)
    assert float(p.norm_bias) == pytest.approx(b, abs=2e-3)
    assert abs(p.metrics["vector_r2"]) < 0.05 and p.metrics["nonlinear_share"] > 0.95
    assert p.prev_weight is None and p.metrics["tokens_test"] == N // SPLIT_EVERY


def test_vector_probe_recovers_a_planted_map_and_the_split_matches_a_direct_computation() -> None:
    x = torch.randn(N, D)
    a, c = torch.randn(D, D) / D**0.5, torch.randn(D)
    noise = 0.5 * torch.randn(N, D)
    error, h = x @ a.T + c + noise, 3.0 * x + 1.0
    m = ErrorMoments(D)
    for rows in (slice(0, 1234), slice(1234, N)):  # streamed in two batches
        m.update(x[rows], error[rows], h[rows])
    p = fit_predictor(m)
    torch.testing.assert_close(p.vector_weight, a, atol=0.06, rtol=0)
    torch.testing.assert_close(p.vector_bias, c, atol=0.06, rtol=0)
    assert p.metrics["vector_r2"] == pytest.approx(1 / 1.25, abs=0.02)  # signal variance 1, noise 0.25
    test = _test_rows(N)
    xt, et, ht = x[test].double(), error[test].double(), h[test].double()
    linear = p.predict_vector(xt)  # (n, d)
    variance = float((ht - ht.mean(0)).pow(2).sum())
    sse, sst = (et - linear).pow(2).sum(0), (et - et.mean(0)).pow(2).sum(0)
    expected = {"fvu_total": float(et.pow(2).sum()) / variance, "fvu_linear": float(linear.pow(2).sum()) / variance,
                "fvu_nonlinear": float(sse.sum()) / variance, "vector_r2": 1 - float(sse.sum() / sst.sum()),
                "vector_r2_per_dim": float((1 - sse / sst).mean())}
    expected["nonlinear_share"] = expected["fvu_nonlinear"] / expected["fvu_total"]
    for key, value in expected.items():
        assert p.metrics[key] == pytest.approx(value, rel=1e-6), key


def test_previous_stage_probe_recovers_what_the_input_alone_cannot() -> None:
    x, recon = torch.randn(N, D), 30.0 * torch.randn(N, 8)  # the previous stage's reconstruction, another scale
    w, v = 0.3 * torch.randn(D), 0.02 * torch.randn(8)
    norm = x @ w + recon @ v + 10.0
    error = norm[:, None] * _unit_rows(N, D)
    m = ErrorMoments(D, d_prev=8)
    m.update(x, error, x, recon)
    p = fit_predictor(m, from_stage=0)
    assert p.metrics["prev_r2"] > 0.999 and p.metrics["norm_r2"] < 0.7
    assert p.metrics["prev_gain"] == pytest.approx(p.metrics["prev_r2"] - p.metrics["norm_r2"])
    torch.testing.assert_close(p.predict_norm_with_previous(x, recon), norm, atol=0.02, rtol=0)
    assert p.from_stage == 0 and p.prev_weight is not None and p.prev_weight.shape == (D + 8,)


def test_too_few_rows_is_an_error() -> None:
    m = ErrorMoments(D)
    m.update(torch.randn(2, D), torch.randn(2, D), torch.randn(2, D))  # a test and a select row, none to fit
    with pytest.raises(ValueError, match="too few held-out tokens"):
        fit_predictor(m)


# ----------------------------------------------------------------------------------------- runtime


def _predictor(d: int, d_prev: int | None, seed: int) -> ErrorPredictor:
    g = torch.Generator().manual_seed(seed)
    prev = None if d_prev is None else torch.randn(d + d_prev, generator=g)
    return ErrorPredictor(torch.randn(d, generator=g), torch.tensor([0.5]), torch.randn(d, d, generator=g),
                          torch.randn(d, generator=g), prev, None if prev is None else torch.tensor([1.0]),
                          None if prev is None else 0, 2.0, {"norm_r2": 0.9, "vector_r2": 0.5, "prev_r2": None})


def _runtime(with_predictors: bool = True) -> StackRuntime:
    """Stage 0 plain (TopK), stage 1 residual on stage 0 (SA-GSAE), random weights."""
    torch.manual_seed(0)
    sae0 = build_sae(SAEConfig("topk", D, 32, k=4)).eval()
    sae1 = build_sae(SAEConfig("sa_gsae", D, 32)).eval()
    fit, held = MomentAccumulator(D, D), MomentAccumulator(D, D)
    h0 = torch.randn(400, D)
    h1 = h0 @ torch.randn(D, D) * 0.3 + 0.5 * torch.randn(400, D)
    fit.update(h0[::2], h1[::2])
    held.update(h0[1::2], h1[1::2])
    affine = fit_affine(fit, held)
    p0, p1 = (_predictor(D, None, 1), _predictor(D, D, 2)) if with_predictors else (None, None)
    return StackRuntime([RuntimeStage(0, "a", "blocks.0.hook_resid_post", sae0, 1.5, error_predictor=p0),
                         RuntimeStage(1, "b", "blocks.1.hook_resid_post", sae1, affine.residual_scale, 0, affine, p1)])


def _batches(n: int, rows: int = 500) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    out = []
    for _ in range(n // rows):
        h0 = torch.randn(rows, D, generator=g)
        out.append({"blocks.0.hook_resid_post": h0,
                    "blocks.1.hook_resid_post": h0.roll(1, dims=1) + 0.3 * torch.randn(rows, D, generator=g)})
    return out


def test_the_runtime_reports_the_probe_as_one_dot_product() -> None:
    runtime = _runtime()
    (batch,) = _batches(500, 500)
    results = runtime.decompose(batch)
    for i, result in results.items():
        stage = runtime.stages[i]
        p = stage.error_predictor
        assert p is not None and result.predicted_error_norm is not None
        manual = torch.relu(result.sae_input @ p.norm_weight + p.norm_bias)  # (N,)
        torch.testing.assert_close(result.predicted_error_norm, manual)
        prev = batch["blocks.0.hook_resid_post"] if stage.is_residual else None
        h = batch[stage.hookpoint]
        torch.testing.assert_close(runtime.predict_error_norm(stage, h, prev), manual)
        torch.testing.assert_close(NormProbe(p, stage.input_scale, stage.affine)(h, prev), manual)
    plain = _runtime(with_predictors=False)
    assert plain.run_stage(plain.stages[0], batch["blocks.0.hook_resid_post"]).predicted_error_norm is None
    assert plain.predict_error_norm(plain.stages[0], batch["blocks.0.hook_resid_post"]) is None


def test_fitted_predictors_and_all_metrics_on_a_runtime() -> None:
    runtime = _runtime(with_predictors=False)
    predictors = fit_error_predictors(runtime, _batches(2000))
    assert predictors[0].prev_weight is None and predictors[1].from_stage == 0
    assert all(p.metrics["tokens_test"] == 400 for p in predictors)
    stages = [RuntimeStage(s.index, s.name, s.hookpoint, s.sae, s.input_scale, s.residual_of, s.affine, p)
              for s, p in zip(runtime.stages, predictors, strict=True)]
    metrics = error_norm_metrics(StackRuntime(stages), _batches(1000), max_tokens=1000)
    assert metrics["tokens"] == 1000
    first, second = metrics["stages"]
    assert first["prev_r2"] is None and first["prev_gain"] is None
    assert second["prev_gain"] == pytest.approx(second["prev_r2"] - second["norm_r2"])
    for stage in metrics["stages"]:
        assert -1.0 < stage["stored_norm_r2"] <= 1.0 and 0.0 <= stage["nonlinear_share"] <= 1.0
        assert stage["fvu_nonlinear"] <= stage["fvu_total"] * 1.05
        assert stage["ito_total_error_reduction"] >= 0.0  # ITO keeps the encoder's codes where it does worse
        assert stage["ito_l0"] <= stage["ito_encoder_l0"]
    table = format_error_predictors(["a", "b"], [p.metadata() for p in predictors])
    assert table.splitlines()[0].startswith("error predictor") and len(table.splitlines()) == 3


# ------------------------------------------------------------------------------------------ storage


def _write(tmp_path: Path) -> Path:
    runtime = _runtime()
    specs = [StageSpec(s.sae, s.hookpoint, s.input_scale, name=s.name, residual_of=s.residual_of, affine=s.affine,
                       error_predictor=s.error_predictor) for s in runtime.stages]
    return write_stack(tmp_path / "stack", "t", IDENTITY, specs)


def test_predictors_round_trip_through_a_stack(tmp_path: Path) -> None:
    stack_dir = _write(tmp_path)
    manifest = json.loads((stack_dir / "stack.json").read_text())
    record = manifest["stages"][1]["error_predictor"]
    assert record["file"] in manifest["files"] and record["from_stage"] == 0 and record["prev_r2"] is None
    assert record["target"] == "activation_error_norm" and record["input"] == "sae_input"
    loaded = read_stack(stack_dir)
    written = _runtime()
    for stage, original in zip(loaded.stages, written.stages, strict=True):
        got, want = stage.error_predictor, original.error_predictor
        assert got is not None and want is not None
        for key, tensor in want.tensors().items():
            assert torch.equal(got.tensors()[key], tensor), key
        assert got.metrics == {"norm_r2": 0.9, "vector_r2": 0.5, "prev_r2": None}
        assert got.from_stage == want.from_stage and got.prev_input_scale == want.prev_input_scale
    runtime = StackRuntime.from_loaded(loaded)
    assert runtime.stages[1].error_predictor is not None


def test_a_tampered_predictor_file_or_record_is_refused(tmp_path: Path) -> None:
    stack_dir = _write(tmp_path)
    manifest = json.loads((stack_dir / "stack.json").read_text())
    file = manifest["stages"][0]["error_predictor"]["file"]
    data = bytearray((stack_dir / file).read_bytes())
    data[-1] ^= 1
    (stack_dir / file).write_bytes(bytes(data))
    with pytest.raises(StackError, match="sha256"):
        read_stack(stack_dir)
    # A consistent hash but the wrong shapes: refused before loading.
    save_file({"norm_weight": torch.zeros(D + 1), "norm_bias": torch.zeros(1), "vector_weight": torch.zeros(D, D),
               "vector_bias": torch.zeros(D)}, str(stack_dir / file))
    manifest["files"][file] = {"sha256": hashlib.sha256((stack_dir / file).read_bytes()).hexdigest(),
                               "bytes": (stack_dir / file).stat().st_size}
    (stack_dir / "stack.json").write_text(json.dumps(manifest))
    with pytest.raises(StackError, match="norm_weight is F32"):
        read_stack(stack_dir)
    manifest["stages"][1]["error_predictor"]["from_stage"] = 1
    (stack_dir / "stack.json").write_text(json.dumps(manifest))
    with pytest.raises(StackError, match="from_stage"):
        read_stack(stack_dir)


# ---------------------------------------------------------------------------------------- end to end


def test_training_with_error_predictors_serves_predicted_norms(tmp_path: Path, tiny_gemma) -> None:
    from service.engine.stacks.served import load_served_stack, predicted_error_norm
    from trainer.interop.onnx_export import export_stack
    from trainer.training.config import config_from_dict
    from trainer.training.loop import run_training

    data = {k: dict(v) for k, v in tomllib.loads(SMOKE.read_text()).items()}
    data["stack"].update(error_predictors=True, calibration_tokens=2048)
    data["training"].update(token_budget=2048, checkpoint_every=8)
    data["activations"]["max_tokens"] = 2048
    data["eval"] = {"max_tokens": 128, "ce_windows": 4}
    result = run_training(config_from_dict(data), tmp_path, progress=False)
    assert (tmp_path / "calibration").is_dir()  # the held-out calibration split, never training tokens
    report = result.report["error_predictors"]
    assert report[0]["prev_r2"] is None and report[1]["from_stage"] == 0 and report[1]["prev_r2"] is not None
    assert all(r["tokens_test"] > 300 and r["norm_r2"] > 0.0 for r in report)

    served = load_served_stack(result.stack_dir, tiny_gemma, self_check=False)
    ids = tiny_gemma.tokenizer("The quick brown fox jumps over the lazy dog", return_tensors="pt")["input_ids"]
    captures = tiny_gemma.forward(ids, reads=served.runtime.hookpoints).captures
    for stage in served.runtime.stages:
        h = captures[stage.hookpoint][0]  # (T, d)
        predicted = predicted_error_norm(served, stage.index, h)
        assert served.has_error_predictor(stage.index) and predicted is not None
        assert predicted.shape == (ids.shape[1],) and bool((predicted >= 0).all())
        torch.testing.assert_close(predicted, served.runtime.run_stage(stage, h).predicted_error_norm)

    exports = export_stack(result.stack_dir, random_rows=64)
    assert all(e.record["outputs"][-1] == "predicted_error_norm" for e in exports)
    assert all(r.passed and r.max_predicted_diff is not None for e in exports for r in e.parity)
    table = stored_predictor_table(result.stack_dir).splitlines()  # what `featurewire-train eval` prints
    assert table[0].startswith("error predictor") and table[1].startswith("blocks.1.hook_resid_post")
