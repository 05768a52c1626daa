"""A small ReSAE stack for the tiny host with its ONNX graphs, and activations to encode, shared by the
EncodeActivations tests of both serving modes.

Two stages with random weights (EncodeActivations does not care whether codes mean anything):
    0 signed  blocks.1.hook_resid_post  SA-GSAE (signed codes, thresholds in [0.05, 0.55])
    1 resid   blocks.2.hook_resid_post  TopK (k 8) on the residual of stage 0 (ReSAE: A h1 + c)
Servers load it with the self-check off (random SAEs reconstruct nothing).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from featurewire.v1 import featurewire_pb2 as pb
from featurewire.v1 import types_pb2 as t

from core.host.host_model import HostModel
from core.sae import SAEConfig, build_sae
from core.stack.affine import AffineMap
from core.stack.identity import HostModelIdentity
from core.stack.writer import StageSpec, write_stack
from trainer.interop.onnx_export import export_stack

SIGNED, RESID = "signed", "resid"
HOOKPOINTS = ("blocks.1.hook_resid_post", "blocks.2.hook_resid_post")
D_SAE = (96, 128)
TEXT = "Captured activations from a model that runs elsewhere, encoded into features."


def write_resae_stack(path: Path, host: HostModel, *, onnx: bool = True) -> Path:
    d = host.hookpoints.d_model
    torch.manual_seed(3)
    signed = build_sae(SAEConfig("sa_gsae", d, D_SAE[0]))
    with torch.no_grad():
        signed.threshold.copy_(torch.rand(D_SAE[0]) * 0.5 + 0.05)
        signed.b_enc.add_(torch.randn(D_SAE[0]) * 0.1)
    resid = build_sae(SAEConfig("topk", d, D_SAE[1], k=8))
    affine = AffineMap(torch.eye(d) * 0.9 + torch.randn(d, d) * 0.02, torch.randn(d) * 0.1, 1.0, 0.5, 0.7)
    specs = [StageSpec(signed.eval(), HOOKPOINTS[0], input_scale=0.4, name=SIGNED),
             StageSpec(resid.eval(), HOOKPOINTS[1], input_scale=0.7, name=RESID, residual_of=0, affine=affine)]
    stack_dir = write_stack(path, "resae", HostModelIdentity.from_model(host.model, host.name), specs)
    if onnx:
        export_stack(stack_dir, random_rows=64)
    return stack_dir


def captured(host: HostModel, text: str = TEXT) -> dict[str, np.ndarray]:
    """hookpoint -> (T, d) float32 activations of `text` (BOS included), as another runtime would capture them."""
    with torch.no_grad():
        captures = host.forward(host.encode(text), reads=list(HOOKPOINTS)).captures
    return {hp: captures[hp][0].float().numpy() for hp in HOOKPOINTS}


def matrix(x: np.ndarray, dtype: str = "values") -> t.Matrix:
    """A Matrix of x (N, d): packed floats, or raw little-endian bytes of FLOAT32, FLOAT16 or BFLOAT16."""
    rows, cols = x.shape
    if dtype == "values":
        return t.Matrix(rows=rows, cols=cols, values=x.ravel().tolist())
    if dtype == "FLOAT32":
        raw = x.astype("<f4").tobytes()
    elif dtype == "FLOAT16":
        raw = x.astype("<f2").tobytes()
    else:  # BFLOAT16: the upper half of each float32 (round toward zero)
        raw = (x.astype("<f4").view("<u4") >> 16).astype("<u2").tobytes()
    return t.Matrix(rows=rows, cols=cols, raw=raw, dtype=t.DType.Value(f"DTYPE_{dtype}"))


def encode_requests(acts: dict[str, np.ndarray], *, top_k: int = 8, include_error: bool = True,
                    dtype: str = "values") -> list[pb.EncodeActivationsRequest]:
    """Two batches per stage (rows split in halves), sequences 0..3; the residual stage gets `previous`."""
    h1, h2 = acts[HOOKPOINTS[0]], acts[HOOKPOINTS[1]]
    half = h1.shape[0] // 2
    out = []
    for part in (slice(0, half), slice(half, None)):
        out.append(pb.EncodeActivationsRequest(stage=SIGNED, activations=matrix(h1[part], dtype), top_k=top_k,
                                               include_error=include_error))
        out.append(pb.EncodeActivationsRequest(stage=RESID, activations=matrix(h2[part], dtype),
                                               previous=matrix(h1[part], dtype), top_k=top_k,
                                               include_error=include_error))
    for i, request in enumerate(out):
        request.sequence = 100 + i
    return out
