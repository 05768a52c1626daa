"""What is known about one feature: its decoder direction in activation units, the logit lens through
the host model's unembedding, and what the stack records: the dashboard (service/engine/operations/dashboard.py), the
explanation and the meta-latents, or the older density and top examples.

The dashboard, when the stage has one, also fills the old `density` and `top_examples` fields, so clients that
predate it keep working. Otherwise, optional records a stack may carry per stage (the trainer or an importer
writes them; GetFeature and StageInfo report them when present):
- density: `extra_tensors["density"]` (d_sae,) or `extras["density"]` (a list of d_sae numbers), the
  fraction of evaluated tokens on which each feature was non-zero;
- top examples: `extras["top_examples"]`, a mapping from the feature id (as a string) to a list of
  [text, position, value] triples, strongest first (a list indexed by feature id is accepted too).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from core.errors import NotFound
from core.host.host_model import HostModel
from core.stack.reader import LoadedStage
from service.engine.contract.specs import FeatureInfo, TokenScore
from service.engine.operations.dashboard import (
    explanation,
    explanation_source,
    feature_dashboard,
    feature_meta_latents,
    summary_examples,
)
from service.engine.operations.decompose import token_texts
from service.engine.stacks.served import ServedStack

DENSITY = "density"
TOP_EXAMPLES = "top_examples"


def decoder_direction(stack: ServedStack, stage: int, feature: int) -> Tensor:
    """The activation change per unit of the feature, W_dec[feature] / s: (d,). The same for residual
    stages, whose reconstruction A h_prev + c + r̂ / s moves by W_dec[f] / s per unit of z_f."""
    runtime_stage = stack.runtime.stages[stage]
    return runtime_stage.sae.W_dec[feature] / runtime_stage.input_scale


def logit_lens(host: HostModel, direction: Tensor, top_n: int) -> tuple[tuple[TokenScore, ...], tuple[TokenScore, ...]]:
    """(tokens the direction raises most, best first; tokens it lowers most, most negative first).

    Scores are W_U @ direction, W_U the output embedding (V, d), computed in its dtype (no fp32 copy of
    a 262k-row unembedding); rows past the tokenizer's vocabulary (padding) are left out.
    """
    weight = host.model.get_output_embeddings().weight  # (V, d)
    scores = (weight @ direction.to(weight.device, weight.dtype)).float()  # (V,)
    scores = scores[: min(scores.shape[0], len(host.tokenizer))]
    n = min(max(top_n, 0), scores.shape[0])
    if n == 0:
        return (), ()
    top, bottom = torch.topk(scores, n), torch.topk(-scores, n)
    return _token_scores(host, top.indices, top.values), _token_scores(host, bottom.indices, -bottom.values)


def _token_scores(host: HostModel, ids: Tensor, values: Tensor) -> tuple[TokenScore, ...]:
    id_list, value_list = ids.tolist(), values.tolist()
    texts = token_texts(host.tokenizer, id_list)
    return tuple(TokenScore(i, t, v) for i, t, v in zip(id_list, texts, value_list, strict=True))


def feature_density(stage: LoadedStage, feature: int) -> float | None:
    """The recorded firing density of one feature, or None when the stack has none for it."""
    tensor = stage.extra_tensors.get(DENSITY)
    if isinstance(tensor, Tensor) and tensor.dim() == 1 and 0 <= feature < tensor.shape[0]:
        value = float(tensor[feature])
        return value if math.isfinite(value) else None
    values = stage.extras.get(DENSITY)
    if isinstance(values, list) and 0 <= feature < len(values):
        value = values[feature]
        if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    return None


def feature_examples(stage: LoadedStage, feature: int) -> tuple[tuple[str, int, float], ...]:
    """The recorded top examples of one feature as (text, position, value); malformed entries are skipped."""
    records: Any = stage.extras.get(TOP_EXAMPLES)
    if isinstance(records, dict):
        entries = records.get(str(feature))
    elif isinstance(records, list) and 0 <= feature < len(records):
        entries = records[feature]
    else:
        entries = None
    out = []
    for entry in entries if isinstance(entries, list) else ():
        if (isinstance(entry, list | tuple) and len(entry) == 3 and isinstance(entry[0], str)
                and type(entry[1]) is int and entry[1] >= 0 and isinstance(entry[2], int | float)
                and not isinstance(entry[2], bool) and math.isfinite(entry[2])):
            out.append((entry[0], entry[1], float(entry[2])))
    return tuple(out)


@torch.inference_mode()
def feature_info(host: HostModel, stack: ServedStack, stage: int, feature: int, top_n: int) -> FeatureInfo:
    """Decoder norm, logit-lens top and bottom tokens, dashboard, explanation, meta-latents, density and top
    examples of one feature."""
    if not 0 <= stage < len(stack.runtime.stages):
        raise NotFound(f"stack {stack.name!r} has no stage {stage}; it has {len(stack.runtime.stages)}")
    d_sae = stack.runtime.stages[stage].sae.d_sae
    if not 0 <= feature < d_sae:
        raise NotFound(f"feature {feature} is out of range: stage {stage} has features 0..{d_sae - 1}")
    direction = decoder_direction(stack, stage, feature)  # (d,)
    top, bottom = logit_lens(host, direction, top_n)
    loaded = stack.loaded.stages[stage]
    dashboard = feature_dashboard(host, loaded, feature)
    if dashboard is None:
        density, examples = feature_density(loaded, feature), feature_examples(loaded, feature)
    else:
        fired = sum(side.count for side in dashboard.sides)
        density = fired / dashboard.tokens if dashboard.tokens else 0.0
        examples = summary_examples(host, dashboard)
    return FeatureInfo(stack=stack.name, stage=stage, feature=feature, decoder_norm=float(direction.norm()),
                       top_tokens=top, bottom_tokens=bottom, density=density, top_examples=examples,
                       dashboard=dashboard, explanation=explanation(stack.loaded, loaded, feature),
                       meta_latents=feature_meta_latents(loaded, feature), steerability=steerability(loaded, feature),
                       explanation_source=explanation_source(stack.path, stack.digest, stack.loaded, loaded, feature))


def steerability(stage: LoadedStage, feature: int) -> dict | None:
    """The feature's stored steerability record with the verdict's thresholds, or None when it was not measured."""
    record = (stage.steerability or {}).get("features", {}).get(feature)
    if record is None:
        return None
    settings = stage.steerability.get("settings", {})  # type: ignore[union-attr]
    return {**record, "expression_threshold": settings.get("expression_threshold", 0.0),
            "fluency_threshold": settings.get("fluency_threshold", 0.0),
            "repetition_threshold": settings.get("repetition_threshold", 0.0)}
