"""`StageGraph`: one stage's encode/decode as a torch module, written with the stack runtime's own functions.

The ONNX exporter traces it and the parity check runs it (in float32 and as a float64 twin), so it lives
apart from both.
"""

from __future__ import annotations

from torch import Tensor, nn

from core.sae.base import l0
from core.stack.error_predictor import NormProbe
from core.stack.reader import LoadedStage
from core.stack.runtime import StackRuntime

ErrorPredictor = nn.Module
"""forward(h (M, d_in), previous (M, d_prev) or None) -> predicted ‖h − ĥ‖ (M,); traced into the graph."""


def error_predictor(stage: LoadedStage) -> ErrorPredictor | None:
    """The stage's stored norm probe as a traceable module (core/stack/error_predictor.py: relu(x·w + b) on the
    stage's SAE input), or None when the stage has none; the graph then has a `predicted_error_norm` output.
    The one place the exporter asks for it, like `service.engine.stacks.served.predicted_error_norm` on the torch path.
    """
    if stage.error_predictor is None:
        return None
    return NormProbe(stage.error_predictor, stage.input_scale, stage.affine).to(stage.sae.W_dec.device)


class StageGraph(nn.Module):
    """What one stage's graph computes, written with the stack runtime's functions (traced, never scripted)."""

    def __init__(self, runtime: StackRuntime, index: int, predictor: ErrorPredictor | None = None) -> None:
        super().__init__()
        self.runtime = runtime
        self.stage = runtime.stages[index]
        self.sae = self.stage.sae  # registered, so .eval() and the parameters follow the module
        self.predictor = predictor

    def forward(self, activations: Tensor, *rest: Tensor) -> tuple[Tensor, ...]:
        """(activations, [previous,] error_rows) -> (codes (N, d_sae), l0 (N,), error_norm (M,)[, predicted (M,)])."""
        previous, error_rows = (rest[0], rest[1]) if self.stage.is_residual else (None, rest[0])
        z = self.runtime.encode(self.stage, activations, previous)  # (N, d_sae)
        h = activations.index_select(0, error_rows)  # (M, d_in)
        prev = previous.index_select(0, error_rows) if previous is not None else None
        recon = self.runtime.to_activation(self.stage, self.sae.decode(z.index_select(0, error_rows)), prev)
        outputs = (z, l0(z), (h - recon).norm(dim=-1))
        if self.predictor is not None:
            outputs += (self.predictor(h, prev),)
        return outputs


def input_names(graph: StageGraph) -> list[str]:
    return ["activations", *(["previous"] if graph.stage.is_residual else []), "error_rows"]
