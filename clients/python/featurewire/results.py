"""Results of the unary RPCs as frozen dataclasses, so callers never handle protobuf messages.

Enums arrive as short upper-case names ("FULL", "RESID_POST") rather than proto numbers, optional
proto fields as None when unset, repeated fields as tuples. `from_proto` functions are the only place
that reads the generated messages; `dataclasses.asdict` gives the JSON the CLI prints.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from featurewire import feature_results as fr
from featurewire._base import enum_name
from featurewire.feature_results import FeatureDashboard, MetaLatents
from featurewire.v1 import featurewire_pb2 as pb
from featurewire.v1 import types_pb2 as t


@dataclass(frozen=True)
class ModelInfo:
    name: str
    architecture: str
    num_layers: int
    d_model: int
    vocab_size: int
    dtype: str
    device: str
    fingerprint: str


@dataclass(frozen=True)
class HookpointInfo:
    name: str
    layer: int
    kind: str  # RESID_PRE, ATTN_OUT, MLP_OUT, RESID_POST
    d: int  # the length of a Vector's values at this hookpoint


@dataclass(frozen=True)
class StageInfo:
    index: int
    name: str
    hookpoint: str
    architecture: str
    d_in: int
    d_sae: int
    signed: bool
    residual_of: int | None  # the earlier stage a residualized (ReSAE) stage predicts from
    has_error_predictor: bool
    metrics: dict[str, float] = field(hash=False)
    input_scale: float
    has_density: bool
    has_top_examples: bool
    has_dashboard: bool = False  # GetFeature returns a dashboard; ListFeatures works
    has_explanations: bool = False
    has_meta_sae: bool = False


@dataclass(frozen=True)
class StackInfo:
    name: str
    digest: str
    path: str
    host_model: str
    created_by: str
    stages: tuple[StageInfo, ...]

    def stage(self, name: str) -> StageInfo:
        """The stage with this name (KeyError listing the names otherwise)."""
        for s in self.stages:
            if s.name == name:
                return s
        raise KeyError(f"stack {self.name!r} has no stage {name!r}; stages: {[s.name for s in self.stages]}")


@dataclass(frozen=True)
class Capabilities:
    mode: str  # FULL or ACTIVATION_ONLY
    rpcs: tuple[str, ...]
    intervention_ops: tuple[str, ...]
    condition_actions: tuple[str, ...]
    steering_vectors: bool
    encode_backend: str
    auth_required: bool


@dataclass(frozen=True)
class Limits:
    max_new_tokens: int
    default_max_new_tokens: int
    max_prompt_tokens: int
    max_top_k: int
    default_top_k: int
    max_batch_vectors: int
    max_message_bytes: int
    queue_size: int
    max_interventions: int
    max_conditions: int
    max_stop_strings: int
    max_top_n: int
    max_page_size: int
    default_page_size: int


@dataclass(frozen=True)
class Versions:
    server: str
    api: str
    torch: str
    transformers: str
    onnxruntime: str
    grpc: str
    python: str


@dataclass(frozen=True)
class ServerInfo:
    model: ModelInfo | None  # None on an activation-only server
    hookpoints: tuple[HookpointInfo, ...]
    stacks: tuple[StackInfo, ...]
    capabilities: Capabilities
    limits: Limits
    versions: Versions
    instance: str

    def stack(self, name: str = "") -> StackInfo:
        """The named stack, or the default one (the first) for ""."""
        if not name and self.stacks:
            return self.stacks[0]
        for s in self.stacks:
            if s.name == name:
                return s
        raise KeyError(f"no stack {name!r}; loaded: {[s.name for s in self.stacks]}")


@dataclass(frozen=True)
class TokenScore:
    id: int
    text: str
    score: float


@dataclass(frozen=True)
class FeatureExample:
    text: str
    position: int
    value: float


@dataclass(frozen=True)
class Feature:
    """GetFeature: a feature's decoder norm, logit-lens tokens and, when the stack records them, density and
    examples, its dashboard, explanation and meta-latents."""

    stack: str
    stage: str
    stage_index: int
    feature: int
    decoder_norm: float
    top_tokens: tuple[TokenScore, ...]
    bottom_tokens: tuple[TokenScore, ...]
    density: float | None
    top_examples: tuple[FeatureExample, ...]
    dashboard: FeatureDashboard | None = None
    explanation: str = ""
    meta_latents: MetaLatents | None = None
    steerability: fr.Steerability | None = None  # None when the feature was not measured
    explanation_source: fr.ExplanationSource | None = None  # None for an imported explanation or none


@dataclass(frozen=True)
class Tokens:
    """Tokenize: ids and each token decoded on its own."""

    ids: tuple[int, ...]
    tokens: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.ids)


@dataclass(frozen=True)
class ScoreResult:
    """Score: teacher-forced CE (nats per token) clean and edited, and their KL; per-token entry i predicts i+1."""

    num_tokens: int
    scored_tokens: int
    token_ids: tuple[int, ...]
    clean_ce: float
    edited_ce: float
    kl: float
    edited: bool
    clean_ce_per_token: tuple[float, ...]
    edited_ce_per_token: tuple[float, ...]
    kl_per_token: tuple[float, ...]

    @property
    def delta_ce(self) -> float:
        """How much the edits raised the loss (nats per token)."""
        return self.edited_ce - self.clean_ce


# ------------------------------------------------------------------------------------------ from_proto


def stage_info(m: pb.StageInfo) -> StageInfo:
    return StageInfo(index=m.index, name=m.name, hookpoint=m.hookpoint, architecture=m.architecture, d_in=m.d_in,
                     d_sae=m.d_sae, signed=m.signed, residual_of=m.residual_of if m.HasField("residual_of") else None,
                     has_error_predictor=m.has_error_predictor, metrics=dict(m.metrics), input_scale=m.input_scale,
                     has_density=m.has_density, has_top_examples=m.has_top_examples, has_dashboard=m.has_dashboard,
                     has_explanations=m.has_explanations, has_meta_sae=m.has_meta_sae)


def stack_info(m: pb.StackInfo) -> StackInfo:
    return StackInfo(name=m.name, digest=m.digest, path=m.path, host_model=m.host_model, created_by=m.created_by,
                     stages=tuple(stage_info(s) for s in m.stages))


def _plain(message: Any, cls: type) -> Any:
    """A dataclass whose fields are scalar fields of the message with the same names."""
    return cls(**{name: getattr(message, name) for name in cls.__dataclass_fields__})


def server_info(m: pb.GetServerInfoResponse) -> ServerInfo:
    c = m.capabilities
    capabilities = Capabilities(
        mode=enum_name(pb.ServingMode, c.mode, "SERVING_MODE_"), rpcs=tuple(c.rpcs),
        intervention_ops=tuple(enum_name(t.InterventionOp, op, "INTERVENTION_OP_") for op in c.intervention_ops),
        condition_actions=tuple(enum_name(t.ConditionAction, a, "CONDITION_ACTION_") for a in c.condition_actions),
        steering_vectors=c.steering_vectors, encode_backend=c.encode_backend, auth_required=c.auth_required)
    hookpoints = tuple(HookpointInfo(h.name, h.layer, enum_name(pb.HookpointKind, h.kind, "HOOKPOINT_KIND_"), h.d)
                       for h in m.hookpoints)
    return ServerInfo(model=_plain(m.model, ModelInfo) if m.HasField("model") else None, hookpoints=hookpoints,
                      stacks=tuple(stack_info(s) for s in m.stacks), capabilities=capabilities,
                      limits=_plain(m.limits, Limits), versions=_plain(m.versions, Versions), instance=m.instance)


def feature(m: pb.GetFeatureResponse) -> Feature:
    def scores(items: Any) -> tuple[TokenScore, ...]:
        return tuple(TokenScore(s.id, s.text, s.score) for s in items)

    return Feature(stack=m.stack, stage=m.stage, stage_index=m.stage_index, feature=m.feature,
                   decoder_norm=m.decoder_norm, top_tokens=scores(m.top_tokens), bottom_tokens=scores(m.bottom_tokens),
                   density=m.density if m.HasField("density") else None,
                   top_examples=tuple(FeatureExample(x.text, x.position, x.value) for x in m.top_examples),
                   dashboard=fr.dashboard(m.dashboard) if m.HasField("dashboard") else None,
                   explanation=m.explanation,
                   meta_latents=fr.meta_latents(m.meta_latents) if m.HasField("meta_latents") else None,
                   steerability=fr.steerability(m.steerability) if m.HasField("steerability") else None,
                   explanation_source=(fr.explanation_source(m.explanation_source)
                                       if m.HasField("explanation_source") else None))


def tokens(m: pb.TokenizeResponse) -> Tokens:
    return Tokens(tuple(m.ids), tuple(m.tokens))


def score(m: pb.ScoreResponse) -> ScoreResult:
    return ScoreResult(num_tokens=m.num_tokens, scored_tokens=m.scored_tokens, token_ids=tuple(m.token_ids),
                       clean_ce=m.clean_ce, edited_ce=m.edited_ce, kl=m.kl, edited=m.edited,
                       clean_ce_per_token=tuple(m.clean_ce_per_token),
                       edited_ce_per_token=tuple(m.edited_ce_per_token), kl_per_token=tuple(m.kl_per_token))
