"""Parity of an exported stage graph with torch, and the activations it is checked on.

The check runs the graph in ONNX Runtime (CPU) and the same `StageGraph` in torch on identical fp32 inputs,
and compares codes, L0, error norms and predicted error norms element by element: |onnx − torch| must be
at most TOLERANCE · max(1, |torch|) (1e-4; fp32 with different summation orders lands near 1e-6); error
norms and predicted error norms relative to max(1, |torch|, ‖h‖), since they are computed from differences of
activation-sized vectors (the norm probe reads the SAE input, for a residual stage s·(h − A h_prev − c)).

One thing legitimately differs: a pre-activation within rounding of a threshold (JumpReLU, gated, SA-GSAE,
BatchTopK's calibrated threshold) or a tie at TopK's k-th place may fall on either side in the two
runtimes, which switches that code on or off. How often depends on how many pre-activations sit near the
thresholds, so the allowance is measured rather than guessed: the same torch graph is also run in float64,
and the codes whose on/off state differs between torch fp32 and fp64 are what rounding alone does to these
inputs. ONNX Runtime may flip at most FLIP_FACTOR times as many codes, plus one in 1e5 of all codes (at
least one). Rows with a flipped code are left out of the value comparison, every other row must match
within the tolerance. A mistranslated graph fails on almost every row.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import onnxruntime as ort
import torch
from torch import Tensor

from core.stack.runtime import StackRuntime
from trainer.interop.stage_graph import StageGraph

if TYPE_CHECKING:
    from core.stack.reader import LoadedStack

TOLERANCE = 1e-4
FLIP_FACTOR = 4
FLIP_SLACK = 1e-5  # of all codes
SMALL_K = 8


@dataclass(frozen=True)
class ParityReport:
    source: str  # "random" or "real"
    rows: int
    codes: int  # rows · d_sae
    flipped_codes: int  # codes on in one runtime and off in the other
    rounding_flips: int  # the same between torch fp32 and torch fp64: what rounding alone does here
    boundary_rows: int  # rows with a flipped code, left out of the value comparison
    max_code_diff: float  # over the other rows, relative to max(1, |z|)
    max_error_diff: float
    max_predicted_diff: float | None
    top_k_matches: bool  # the K = SMALL_K output ranks the same magnitudes as torch

    @property
    def allowed_flips(self) -> int:
        return FLIP_FACTOR * self.rounding_flips + max(1, math.floor(FLIP_SLACK * self.codes))

    @property
    def passed(self) -> bool:
        diffs = [self.max_code_diff, self.max_error_diff, self.max_predicted_diff or 0.0]
        return all(d <= TOLERANCE for d in diffs) and self.top_k_matches and self.flipped_codes <= self.allowed_flips

    def describe(self) -> str:
        parts = [f"max relative |Δcode| {self.max_code_diff:.2e}", f"|Δerror_norm| {self.max_error_diff:.2e}"]
        if self.max_predicted_diff is not None:
            parts.append(f"|Δpredicted_error_norm| {self.max_predicted_diff:.2e}")
        parts.append(f"{self.flipped_codes} codes switched on/off in {self.boundary_rows} of {self.rows} rows "
                     f"(allowed {self.allowed_flips}; torch fp32 vs fp64: {self.rounding_flips})")
        if not self.top_k_matches:
            parts.append(f"the top-{SMALL_K} output ranks other magnitudes than torch")
        return ", ".join(parts) + f" (tolerance {TOLERANCE:g} · max(1, |torch|))"

    def to_dict(self) -> dict[str, Any]:
        out = {"rows": self.rows, "flipped_codes": self.flipped_codes, "rounding_flips": self.rounding_flips,
               "boundary_rows": self.boundary_rows, "max_code_diff": self.max_code_diff,
               "max_error_diff": self.max_error_diff, "tolerance": TOLERANCE}
        return out | ({"max_predicted_diff": self.max_predicted_diff} if self.max_predicted_diff is not None else {})


def float64_twin(graph: StageGraph) -> StageGraph:
    """The same stage computed in float64 (copies of the SAEs it reads), the reference for rounding flips."""

    runtime = graph.runtime
    needed = set(runtime.dependencies([graph.stage.index]))
    stages = [dataclasses.replace(s, sae=copy.deepcopy(s.sae).double()) if s.index in needed else s
              for s in runtime.stages]
    predictor = copy.deepcopy(graph.predictor).double() if graph.predictor is not None else None
    return StageGraph(StackRuntime(stages), graph.stage.index, predictor).eval()


def _relative(onnx_value: np.ndarray, torch_value: np.ndarray, scale: np.ndarray | None = None) -> np.ndarray:
    """|Δ| / max(1, |torch|[, scale]). Error norms pass scale = ‖h‖: the error h − ĥ is a difference of two
    vectors of that size (for a residual stage ĥ holds A h_prev), so fp32 rounding is relative to ‖h‖, not
    to the (much smaller) error itself."""
    denominator = np.maximum(1.0, np.abs(torch_value))
    if scale is not None:
        denominator = np.maximum(denominator, scale)
    return np.abs(onnx_value - torch_value) / denominator


def _max(values: np.ndarray) -> float:
    return float(values.max()) if values.size else 0.0


def check_parity(data: bytes, graph: StageGraph, h: Tensor, prev: Tensor | None, *, codes: str,
                 source: str) -> ParityReport:
    """Run the serialized graph and `graph` (torch) on h (N, d_in) [and prev (N, d_prev)]; compare."""
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    h = h.detach().to("cpu", torch.float32).contiguous()
    rows = torch.arange(h.shape[0])
    args = [h, *([prev.detach().to("cpu", torch.float32).contiguous()] if prev is not None else []), rows]
    with torch.no_grad():
        reference = [t.numpy() for t in graph(*args)]  # z (N, H), l0 (N,), error (N,)[, predicted (N,)]
        exact = float64_twin(graph)(*(a.double() if a.is_floating_point() else a for a in args))[0].numpy()
    feeds = {name: t.numpy() for name, t in zip(("activations", *(["previous"] if prev is not None else []),
                                                 "error_rows"), args, strict=True)}
    z_ref, d_sae = reference[0], reference[0].shape[1]
    h_norm = np.linalg.norm(h.numpy(), axis=1)  # (N,) the rounding scale of error norms and their predictions
    predicted = ["predicted_error_norm"] if len(reference) > 3 else []
    small = None
    if codes == "top_k":
        values, indices, *rest = session.run(["values", "indices", "l0", "error_norm", *predicted],
                                             feeds | {"top_k": np.array([d_sae], np.int64)})
        z = np.zeros_like(values)
        np.put_along_axis(z, indices, values, axis=1)  # dense (N, d_sae) from the full ranking
        small, _ = session.run(["values", "indices"], feeds | {"top_k": np.array([min(SMALL_K, d_sae)], np.int64)})
    else:
        z, *rest = session.run(["codes", "l0", "error_norm", *predicted], feeds)
    flipped = (z != 0) != (z_ref != 0)  # (N, d_sae)
    same = ~flipped.any(axis=1) & (rest[0] == reference[1])  # (N,) same support and L0
    top_k_matches = True
    if small is not None:  # the K largest magnitudes, in order, as torch ranks them
        expected = -np.sort(-np.abs(z_ref), axis=1)[:, : small.shape[1]]
        top_k_matches = bool((_relative(np.abs(small), expected)[same] <= TOLERANCE).all())
    return ParityReport(
        source=source, rows=int(h.shape[0]), codes=int(z_ref.size), flipped_codes=int(flipped.sum()),
        rounding_flips=int(((exact != 0) != (z_ref != 0)).sum()), boundary_rows=int((~same).sum()),
        max_code_diff=_max(_relative(z, z_ref)[same]),
        max_error_diff=_max(_relative(rest[1], reference[2], scale=h_norm)[same]),
        max_predicted_diff=_max(_relative(rest[2], reference[3], scale=h_norm)[same]) if predicted else None,
        top_k_matches=top_k_matches)


def random_inputs(runtime: StackRuntime, index: int, rows: int, seed: int) -> tuple[Tensor, Tensor | None]:
    """Random activations at the SAE's training scale (E‖s·h‖² = d; for a ReSAE stage h = A h_prev + c + noise
    with unit-RMS scaled noise), plus a zero row and a large row."""
    stage = runtime.stages[index]
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(rows, stage.sae.d_in, generator=g) / stage.input_scale  # (N, d_in)
    noise[0] = 0.0
    noise[-1] *= 30.0
    if not stage.is_residual:
        return noise, None
    assert stage.affine is not None and stage.residual_of is not None
    source = runtime.stages[stage.residual_of]
    prev = torch.randn(rows, source.sae.d_in, generator=g) / source.input_scale  # (N, d_prev)
    return stage.affine.predict(prev) + noise, prev


def real_activations(stack: LoadedStack, *, model: str | None = None, corpus: str | None = None,
                     tokens: int = 512) -> dict[str, Tensor]:
    """hookpoint -> (n, d) fp32 activations of about `tokens` real (non-special) tokens of the held-out split of
    the stack's training corpus (or `corpus`), from the host model it names (or `model`), on CPU."""
    from core.config import ModelConfig
    from core.host.loading import load_host_model
    from core.stack.identity import HostModelIdentity
    from core.stack.manifest import StackError
    from trainer.data.activations import batch_windows, iter_windows, special_token_ids
    from trainer.data.corpus import load_corpus, split_documents
    from trainer.evaluation.held_out import recorded_generated_source

    model_config = ModelConfig.from_env(os.environ, name=model or stack.identity.name, device="cpu", dtype="float32")
    host = load_host_model(model_config)
    if diff := HostModelIdentity.from_model(host.model, host.name).differences(stack.identity):
        raise StackError(f"model {host.name!r} is not the one stack {stack.name!r} was trained on: {', '.join(diff)}")
    config = stack.stages[0].training.get("config", {})
    corpus_cfg, context = config.get("corpus", {}), config.get("activations", {}).get("context_length", 128)
    spec = corpus or corpus_cfg.get("spec", "default")
    documents = load_corpus(spec, text_field=corpus_cfg.get("text_field", "text"),
                            generated=recorded_generated_source(host, corpus_cfg, model_config.cache_dir),
                            mix_seed=corpus_cfg.get("split_seed", 0))
    held_out = split_documents(documents, calibration_fraction=corpus_cfg.get("calibration_fraction", 0.05),
                               eval_fraction=corpus_cfg.get("eval_fraction", 0.05),
                               seed=corpus_cfg.get("split_seed", 0))
    hookpoints = list(dict.fromkeys(s.hookpoint for s in stack.stages))
    special = torch.tensor(special_token_ids(host.tokenizer), dtype=torch.int64)
    pad = host.tokenizer.pad_token_id if host.tokenizer.pad_token_id is not None else 0
    parts: dict[str, list[Tensor]] = {hp: [] for hp in hookpoints}
    seen = 0
    with torch.no_grad():
        for batch in batch_windows(iter_windows(host.tokenizer, held_out.eval or documents, context), 4, pad):
            keep = batch.attention_mask.bool() & ~torch.isin(batch.input_ids, special)  # (B, T)
            captures = host.forward(batch.input_ids, reads=hookpoints, attention_mask=batch.attention_mask).captures
            for hp in hookpoints:
                parts[hp].append(captures[hp][keep].float())  # (n, d)
            seen += int(keep.sum())
            if seen >= tokens:
                break
    if not seen:
        raise StackError("the corpus gave no real tokens to check the graphs on")
    return {hp: torch.cat(p)[:tokens] for hp, p in parts.items()}
