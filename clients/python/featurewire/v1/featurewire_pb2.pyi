from featurewire.v1 import types_pb2 as _types_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class HookpointKind(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    HOOKPOINT_KIND_UNSPECIFIED: _ClassVar[HookpointKind]
    HOOKPOINT_KIND_RESID_PRE: _ClassVar[HookpointKind]
    HOOKPOINT_KIND_ATTN_OUT: _ClassVar[HookpointKind]
    HOOKPOINT_KIND_MLP_OUT: _ClassVar[HookpointKind]
    HOOKPOINT_KIND_RESID_POST: _ClassVar[HookpointKind]

class ServingMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SERVING_MODE_UNSPECIFIED: _ClassVar[ServingMode]
    SERVING_MODE_FULL: _ClassVar[ServingMode]
    SERVING_MODE_ACTIVATION_ONLY: _ClassVar[ServingMode]

class Sign(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    SIGN_UNSPECIFIED: _ClassVar[Sign]
    SIGN_POSITIVE: _ClassVar[Sign]
    SIGN_NEGATIVE: _ClassVar[Sign]

class Reduction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REDUCTION_UNSPECIFIED: _ClassVar[Reduction]
    REDUCTION_MAX: _ClassVar[Reduction]
    REDUCTION_MEAN: _ClassVar[Reduction]

class TokenDirection(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TOKEN_DIRECTION_UNSPECIFIED: _ClassVar[TokenDirection]
    TOKEN_DIRECTION_PROMOTES: _ClassVar[TokenDirection]
    TOKEN_DIRECTION_SUPPRESSES: _ClassVar[TokenDirection]

class FeatureSort(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FEATURE_SORT_UNSPECIFIED: _ClassVar[FeatureSort]
    FEATURE_SORT_DENSITY: _ClassVar[FeatureSort]
    FEATURE_SORT_MAX: _ClassVar[FeatureSort]
    FEATURE_SORT_LABEL_F1: _ClassVar[FeatureSort]
    FEATURE_SORT_STEERING: _ClassVar[FeatureSort]
    FEATURE_SORT_OUTPUT_SCORE: _ClassVar[FeatureSort]
    FEATURE_SORT_EXPLANATION_SCORE: _ClassVar[FeatureSort]

class FinishReason(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    FINISH_REASON_UNSPECIFIED: _ClassVar[FinishReason]
    FINISH_REASON_LENGTH: _ClassVar[FinishReason]
    FINISH_REASON_STOP_STRING: _ClassVar[FinishReason]
    FINISH_REASON_EOS: _ClassVar[FinishReason]
    FINISH_REASON_FEATURE_CONDITION: _ClassVar[FinishReason]
    FINISH_REASON_CANCELLED: _ClassVar[FinishReason]
HOOKPOINT_KIND_UNSPECIFIED: HookpointKind
HOOKPOINT_KIND_RESID_PRE: HookpointKind
HOOKPOINT_KIND_ATTN_OUT: HookpointKind
HOOKPOINT_KIND_MLP_OUT: HookpointKind
HOOKPOINT_KIND_RESID_POST: HookpointKind
SERVING_MODE_UNSPECIFIED: ServingMode
SERVING_MODE_FULL: ServingMode
SERVING_MODE_ACTIVATION_ONLY: ServingMode
SIGN_UNSPECIFIED: Sign
SIGN_POSITIVE: Sign
SIGN_NEGATIVE: Sign
REDUCTION_UNSPECIFIED: Reduction
REDUCTION_MAX: Reduction
REDUCTION_MEAN: Reduction
TOKEN_DIRECTION_UNSPECIFIED: TokenDirection
TOKEN_DIRECTION_PROMOTES: TokenDirection
TOKEN_DIRECTION_SUPPRESSES: TokenDirection
FEATURE_SORT_UNSPECIFIED: FeatureSort
FEATURE_SORT_DENSITY: FeatureSort
FEATURE_SORT_MAX: FeatureSort
FEATURE_SORT_LABEL_F1: FeatureSort
FEATURE_SORT_STEERING: FeatureSort
FEATURE_SORT_OUTPUT_SCORE: FeatureSort
FEATURE_SORT_EXPLANATION_SCORE: FeatureSort
FINISH_REASON_UNSPECIFIED: FinishReason
FINISH_REASON_LENGTH: FinishReason
FINISH_REASON_STOP_STRING: FinishReason
FINISH_REASON_EOS: FinishReason
FINISH_REASON_FEATURE_CONDITION: FinishReason
FINISH_REASON_CANCELLED: FinishReason

class GetServerInfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetServerInfoResponse(_message.Message):
    __slots__ = ("model", "hookpoints", "stacks", "capabilities", "limits", "versions", "instance")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    HOOKPOINTS_FIELD_NUMBER: _ClassVar[int]
    STACKS_FIELD_NUMBER: _ClassVar[int]
    CAPABILITIES_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    VERSIONS_FIELD_NUMBER: _ClassVar[int]
    INSTANCE_FIELD_NUMBER: _ClassVar[int]
    model: ModelInfo
    hookpoints: _containers.RepeatedCompositeFieldContainer[HookpointInfo]
    stacks: _containers.RepeatedCompositeFieldContainer[StackInfo]
    capabilities: Capabilities
    limits: Limits
    versions: Versions
    instance: str
    def __init__(self, model: _Optional[_Union[ModelInfo, _Mapping]] = ..., hookpoints: _Optional[_Iterable[_Union[HookpointInfo, _Mapping]]] = ..., stacks: _Optional[_Iterable[_Union[StackInfo, _Mapping]]] = ..., capabilities: _Optional[_Union[Capabilities, _Mapping]] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., versions: _Optional[_Union[Versions, _Mapping]] = ..., instance: _Optional[str] = ...) -> None: ...

class ModelInfo(_message.Message):
    __slots__ = ("name", "architecture", "num_layers", "d_model", "vocab_size", "dtype", "device", "fingerprint")
    NAME_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    D_MODEL_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    FINGERPRINT_FIELD_NUMBER: _ClassVar[int]
    name: str
    architecture: str
    num_layers: int
    d_model: int
    vocab_size: int
    dtype: str
    device: str
    fingerprint: str
    def __init__(self, name: _Optional[str] = ..., architecture: _Optional[str] = ..., num_layers: _Optional[int] = ..., d_model: _Optional[int] = ..., vocab_size: _Optional[int] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., fingerprint: _Optional[str] = ...) -> None: ...

class HookpointInfo(_message.Message):
    __slots__ = ("name", "layer", "kind", "d")
    NAME_FIELD_NUMBER: _ClassVar[int]
    LAYER_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    D_FIELD_NUMBER: _ClassVar[int]
    name: str
    layer: int
    kind: HookpointKind
    d: int
    def __init__(self, name: _Optional[str] = ..., layer: _Optional[int] = ..., kind: _Optional[_Union[HookpointKind, str]] = ..., d: _Optional[int] = ...) -> None: ...

class StackInfo(_message.Message):
    __slots__ = ("name", "digest", "path", "host_model", "created_by", "stages")
    NAME_FIELD_NUMBER: _ClassVar[int]
    DIGEST_FIELD_NUMBER: _ClassVar[int]
    PATH_FIELD_NUMBER: _ClassVar[int]
    HOST_MODEL_FIELD_NUMBER: _ClassVar[int]
    CREATED_BY_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    name: str
    digest: str
    path: str
    host_model: str
    created_by: str
    stages: _containers.RepeatedCompositeFieldContainer[StageInfo]
    def __init__(self, name: _Optional[str] = ..., digest: _Optional[str] = ..., path: _Optional[str] = ..., host_model: _Optional[str] = ..., created_by: _Optional[str] = ..., stages: _Optional[_Iterable[_Union[StageInfo, _Mapping]]] = ...) -> None: ...

class StageInfo(_message.Message):
    __slots__ = ("index", "name", "hookpoint", "architecture", "d_in", "d_sae", "signed", "residual_of", "has_error_predictor", "metrics", "input_scale", "has_density", "has_top_examples", "has_dashboard", "has_explanations", "has_meta_sae")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    INDEX_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    HOOKPOINT_FIELD_NUMBER: _ClassVar[int]
    ARCHITECTURE_FIELD_NUMBER: _ClassVar[int]
    D_IN_FIELD_NUMBER: _ClassVar[int]
    D_SAE_FIELD_NUMBER: _ClassVar[int]
    SIGNED_FIELD_NUMBER: _ClassVar[int]
    RESIDUAL_OF_FIELD_NUMBER: _ClassVar[int]
    HAS_ERROR_PREDICTOR_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    INPUT_SCALE_FIELD_NUMBER: _ClassVar[int]
    HAS_DENSITY_FIELD_NUMBER: _ClassVar[int]
    HAS_TOP_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    HAS_DASHBOARD_FIELD_NUMBER: _ClassVar[int]
    HAS_EXPLANATIONS_FIELD_NUMBER: _ClassVar[int]
    HAS_META_SAE_FIELD_NUMBER: _ClassVar[int]
    index: int
    name: str
    hookpoint: str
    architecture: str
    d_in: int
    d_sae: int
    signed: bool
    residual_of: int
    has_error_predictor: bool
    metrics: _containers.ScalarMap[str, float]
    input_scale: float
    has_density: bool
    has_top_examples: bool
    has_dashboard: bool
    has_explanations: bool
    has_meta_sae: bool
    def __init__(self, index: _Optional[int] = ..., name: _Optional[str] = ..., hookpoint: _Optional[str] = ..., architecture: _Optional[str] = ..., d_in: _Optional[int] = ..., d_sae: _Optional[int] = ..., signed: _Optional[bool] = ..., residual_of: _Optional[int] = ..., has_error_predictor: _Optional[bool] = ..., metrics: _Optional[_Mapping[str, float]] = ..., input_scale: _Optional[float] = ..., has_density: _Optional[bool] = ..., has_top_examples: _Optional[bool] = ..., has_dashboard: _Optional[bool] = ..., has_explanations: _Optional[bool] = ..., has_meta_sae: _Optional[bool] = ...) -> None: ...

class Capabilities(_message.Message):
    __slots__ = ("mode", "rpcs", "intervention_ops", "condition_actions", "steering_vectors", "encode_backend", "auth_required")
    MODE_FIELD_NUMBER: _ClassVar[int]
    RPCS_FIELD_NUMBER: _ClassVar[int]
    INTERVENTION_OPS_FIELD_NUMBER: _ClassVar[int]
    CONDITION_ACTIONS_FIELD_NUMBER: _ClassVar[int]
    STEERING_VECTORS_FIELD_NUMBER: _ClassVar[int]
    ENCODE_BACKEND_FIELD_NUMBER: _ClassVar[int]
    AUTH_REQUIRED_FIELD_NUMBER: _ClassVar[int]
    mode: ServingMode
    rpcs: _containers.RepeatedScalarFieldContainer[str]
    intervention_ops: _containers.RepeatedScalarFieldContainer[_types_pb2.InterventionOp]
    condition_actions: _containers.RepeatedScalarFieldContainer[_types_pb2.ConditionAction]
    steering_vectors: bool
    encode_backend: str
    auth_required: bool
    def __init__(self, mode: _Optional[_Union[ServingMode, str]] = ..., rpcs: _Optional[_Iterable[str]] = ..., intervention_ops: _Optional[_Iterable[_Union[_types_pb2.InterventionOp, str]]] = ..., condition_actions: _Optional[_Iterable[_Union[_types_pb2.ConditionAction, str]]] = ..., steering_vectors: _Optional[bool] = ..., encode_backend: _Optional[str] = ..., auth_required: _Optional[bool] = ...) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_new_tokens", "default_max_new_tokens", "max_prompt_tokens", "max_top_k", "default_top_k", "max_batch_vectors", "max_message_bytes", "queue_size", "max_interventions", "max_conditions", "max_stop_strings", "max_top_n", "max_page_size", "default_page_size")
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOP_K_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_TOP_K_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_VECTORS_FIELD_NUMBER: _ClassVar[int]
    MAX_MESSAGE_BYTES_FIELD_NUMBER: _ClassVar[int]
    QUEUE_SIZE_FIELD_NUMBER: _ClassVar[int]
    MAX_INTERVENTIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_CONDITIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_STOP_STRINGS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOP_N_FIELD_NUMBER: _ClassVar[int]
    MAX_PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
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
    def __init__(self, max_new_tokens: _Optional[int] = ..., default_max_new_tokens: _Optional[int] = ..., max_prompt_tokens: _Optional[int] = ..., max_top_k: _Optional[int] = ..., default_top_k: _Optional[int] = ..., max_batch_vectors: _Optional[int] = ..., max_message_bytes: _Optional[int] = ..., queue_size: _Optional[int] = ..., max_interventions: _Optional[int] = ..., max_conditions: _Optional[int] = ..., max_stop_strings: _Optional[int] = ..., max_top_n: _Optional[int] = ..., max_page_size: _Optional[int] = ..., default_page_size: _Optional[int] = ...) -> None: ...

class Versions(_message.Message):
    __slots__ = ("server", "api", "torch", "transformers", "onnxruntime", "grpc", "python")
    SERVER_FIELD_NUMBER: _ClassVar[int]
    API_FIELD_NUMBER: _ClassVar[int]
    TORCH_FIELD_NUMBER: _ClassVar[int]
    TRANSFORMERS_FIELD_NUMBER: _ClassVar[int]
    ONNXRUNTIME_FIELD_NUMBER: _ClassVar[int]
    GRPC_FIELD_NUMBER: _ClassVar[int]
    PYTHON_FIELD_NUMBER: _ClassVar[int]
    server: str
    api: str
    torch: str
    transformers: str
    onnxruntime: str
    grpc: str
    python: str
    def __init__(self, server: _Optional[str] = ..., api: _Optional[str] = ..., torch: _Optional[str] = ..., transformers: _Optional[str] = ..., onnxruntime: _Optional[str] = ..., grpc: _Optional[str] = ..., python: _Optional[str] = ...) -> None: ...

class ListStacksRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ListStacksResponse(_message.Message):
    __slots__ = ("stacks",)
    STACKS_FIELD_NUMBER: _ClassVar[int]
    stacks: _containers.RepeatedCompositeFieldContainer[StackInfo]
    def __init__(self, stacks: _Optional[_Iterable[_Union[StackInfo, _Mapping]]] = ...) -> None: ...

class GetFeatureRequest(_message.Message):
    __slots__ = ("stack", "stage", "feature", "top_n")
    STACK_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_N_FIELD_NUMBER: _ClassVar[int]
    stack: str
    stage: str
    feature: int
    top_n: int
    def __init__(self, stack: _Optional[str] = ..., stage: _Optional[str] = ..., feature: _Optional[int] = ..., top_n: _Optional[int] = ...) -> None: ...

class TokenScore(_message.Message):
    __slots__ = ("id", "text", "score")
    ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    id: int
    text: str
    score: float
    def __init__(self, id: _Optional[int] = ..., text: _Optional[str] = ..., score: _Optional[float] = ...) -> None: ...

class FeatureExample(_message.Message):
    __slots__ = ("text", "position", "value")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    text: str
    position: int
    value: float
    def __init__(self, text: _Optional[str] = ..., position: _Optional[int] = ..., value: _Optional[float] = ...) -> None: ...

class GetFeatureResponse(_message.Message):
    __slots__ = ("stack", "stage", "stage_index", "feature", "decoder_norm", "top_tokens", "bottom_tokens", "density", "top_examples", "dashboard", "explanation", "meta_latents", "steerability", "explanation_source")
    STACK_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    STAGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    DECODER_NORM_FIELD_NUMBER: _ClassVar[int]
    TOP_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BOTTOM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DENSITY_FIELD_NUMBER: _ClassVar[int]
    TOP_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    DASHBOARD_FIELD_NUMBER: _ClassVar[int]
    EXPLANATION_FIELD_NUMBER: _ClassVar[int]
    META_LATENTS_FIELD_NUMBER: _ClassVar[int]
    STEERABILITY_FIELD_NUMBER: _ClassVar[int]
    EXPLANATION_SOURCE_FIELD_NUMBER: _ClassVar[int]
    stack: str
    stage: str
    stage_index: int
    feature: int
    decoder_norm: float
    top_tokens: _containers.RepeatedCompositeFieldContainer[TokenScore]
    bottom_tokens: _containers.RepeatedCompositeFieldContainer[TokenScore]
    density: float
    top_examples: _containers.RepeatedCompositeFieldContainer[FeatureExample]
    dashboard: FeatureDashboard
    explanation: str
    meta_latents: MetaLatents
    steerability: Steerability
    explanation_source: ExplanationSource
    def __init__(self, stack: _Optional[str] = ..., stage: _Optional[str] = ..., stage_index: _Optional[int] = ..., feature: _Optional[int] = ..., decoder_norm: _Optional[float] = ..., top_tokens: _Optional[_Iterable[_Union[TokenScore, _Mapping]]] = ..., bottom_tokens: _Optional[_Iterable[_Union[TokenScore, _Mapping]]] = ..., density: _Optional[float] = ..., top_examples: _Optional[_Iterable[_Union[FeatureExample, _Mapping]]] = ..., dashboard: _Optional[_Union[FeatureDashboard, _Mapping]] = ..., explanation: _Optional[str] = ..., meta_latents: _Optional[_Union[MetaLatents, _Mapping]] = ..., steerability: _Optional[_Union[Steerability, _Mapping]] = ..., explanation_source: _Optional[_Union[ExplanationSource, _Mapping]] = ...) -> None: ...

class ExplanationSource(_message.Message):
    __slots__ = ("explainer", "scorer", "prompt_version", "date", "scores")
    EXPLAINER_FIELD_NUMBER: _ClassVar[int]
    SCORER_FIELD_NUMBER: _ClassVar[int]
    PROMPT_VERSION_FIELD_NUMBER: _ClassVar[int]
    DATE_FIELD_NUMBER: _ClassVar[int]
    SCORES_FIELD_NUMBER: _ClassVar[int]
    explainer: str
    scorer: str
    prompt_version: str
    date: str
    scores: _containers.RepeatedCompositeFieldContainer[ExplanationScore]
    def __init__(self, explainer: _Optional[str] = ..., scorer: _Optional[str] = ..., prompt_version: _Optional[str] = ..., date: _Optional[str] = ..., scores: _Optional[_Iterable[_Union[ExplanationScore, _Mapping]]] = ...) -> None: ...

class ExplanationScore(_message.Message):
    __slots__ = ("name", "balanced_accuracy", "examples", "unparsed")
    NAME_FIELD_NUMBER: _ClassVar[int]
    BALANCED_ACCURACY_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    UNPARSED_FIELD_NUMBER: _ClassVar[int]
    name: str
    balanced_accuracy: float
    examples: int
    unparsed: int
    def __init__(self, name: _Optional[str] = ..., balanced_accuracy: _Optional[float] = ..., examples: _Optional[int] = ..., unparsed: _Optional[int] = ...) -> None: ...

class SteeringPoint(_message.Message):
    __slots__ = ("op", "unit", "value", "amount", "expression", "lift", "concept_share", "fluency_cost", "repetition", "examples")
    OP_FIELD_NUMBER: _ClassVar[int]
    UNIT_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    AMOUNT_FIELD_NUMBER: _ClassVar[int]
    EXPRESSION_FIELD_NUMBER: _ClassVar[int]
    LIFT_FIELD_NUMBER: _ClassVar[int]
    CONCEPT_SHARE_FIELD_NUMBER: _ClassVar[int]
    FLUENCY_COST_FIELD_NUMBER: _ClassVar[int]
    REPETITION_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    op: str
    unit: str
    value: float
    amount: float
    expression: float
    lift: float
    concept_share: float
    fluency_cost: float
    repetition: float
    examples: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, op: _Optional[str] = ..., unit: _Optional[str] = ..., value: _Optional[float] = ..., amount: _Optional[float] = ..., expression: _Optional[float] = ..., lift: _Optional[float] = ..., concept_share: _Optional[float] = ..., fluency_cost: _Optional[float] = ..., repetition: _Optional[float] = ..., examples: _Optional[_Iterable[str]] = ...) -> None: ...

class Steerability(_message.Message):
    __slots__ = ("steers", "best", "curve", "output_score", "default_expression", "default_examples", "expression_threshold", "fluency_threshold", "repetition_threshold")
    STEERS_FIELD_NUMBER: _ClassVar[int]
    BEST_FIELD_NUMBER: _ClassVar[int]
    CURVE_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_SCORE_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_EXPRESSION_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    EXPRESSION_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    FLUENCY_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    REPETITION_THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    steers: bool
    best: SteeringPoint
    curve: _containers.RepeatedCompositeFieldContainer[SteeringPoint]
    output_score: float
    default_expression: float
    default_examples: _containers.RepeatedScalarFieldContainer[str]
    expression_threshold: float
    fluency_threshold: float
    repetition_threshold: float
    def __init__(self, steers: _Optional[bool] = ..., best: _Optional[_Union[SteeringPoint, _Mapping]] = ..., curve: _Optional[_Iterable[_Union[SteeringPoint, _Mapping]]] = ..., output_score: _Optional[float] = ..., default_expression: _Optional[float] = ..., default_examples: _Optional[_Iterable[str]] = ..., expression_threshold: _Optional[float] = ..., fluency_threshold: _Optional[float] = ..., repetition_threshold: _Optional[float] = ...) -> None: ...

class FeatureDashboard(_message.Message):
    __slots__ = ("tokens", "documents", "corpus", "context", "sides", "neighbours", "cross_stage_neighbours", "cooccurring")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    CORPUS_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_FIELD_NUMBER: _ClassVar[int]
    SIDES_FIELD_NUMBER: _ClassVar[int]
    NEIGHBOURS_FIELD_NUMBER: _ClassVar[int]
    CROSS_STAGE_NEIGHBOURS_FIELD_NUMBER: _ClassVar[int]
    COOCCURRING_FIELD_NUMBER: _ClassVar[int]
    tokens: int
    documents: int
    corpus: str
    context: int
    sides: _containers.RepeatedCompositeFieldContainer[DashboardSide]
    neighbours: _containers.RepeatedCompositeFieldContainer[FeatureNeighbour]
    cross_stage_neighbours: _containers.RepeatedCompositeFieldContainer[FeatureNeighbour]
    cooccurring: _containers.RepeatedCompositeFieldContainer[CoOccurringFeature]
    def __init__(self, tokens: _Optional[int] = ..., documents: _Optional[int] = ..., corpus: _Optional[str] = ..., context: _Optional[int] = ..., sides: _Optional[_Iterable[_Union[DashboardSide, _Mapping]]] = ..., neighbours: _Optional[_Iterable[_Union[FeatureNeighbour, _Mapping]]] = ..., cross_stage_neighbours: _Optional[_Iterable[_Union[FeatureNeighbour, _Mapping]]] = ..., cooccurring: _Optional[_Iterable[_Union[CoOccurringFeature, _Mapping]]] = ...) -> None: ...

class DashboardSide(_message.Message):
    __slots__ = ("sign", "count", "density", "mean", "max", "histogram", "top_examples", "quantiles", "label")
    SIGN_FIELD_NUMBER: _ClassVar[int]
    COUNT_FIELD_NUMBER: _ClassVar[int]
    DENSITY_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    HISTOGRAM_FIELD_NUMBER: _ClassVar[int]
    TOP_EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    QUANTILES_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    sign: Sign
    count: int
    density: float
    mean: float
    max: float
    histogram: Histogram
    top_examples: _containers.RepeatedCompositeFieldContainer[DashboardExample]
    quantiles: _containers.RepeatedCompositeFieldContainer[QuantileGroup]
    label: TokenLabel
    def __init__(self, sign: _Optional[_Union[Sign, str]] = ..., count: _Optional[int] = ..., density: _Optional[float] = ..., mean: _Optional[float] = ..., max: _Optional[float] = ..., histogram: _Optional[_Union[Histogram, _Mapping]] = ..., top_examples: _Optional[_Iterable[_Union[DashboardExample, _Mapping]]] = ..., quantiles: _Optional[_Iterable[_Union[QuantileGroup, _Mapping]]] = ..., label: _Optional[_Union[TokenLabel, _Mapping]] = ...) -> None: ...

class TokenLabel(_message.Message):
    __slots__ = ("tokens", "rule_size", "precision", "recall", "f1")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    RULE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PRECISION_FIELD_NUMBER: _ClassVar[int]
    RECALL_FIELD_NUMBER: _ClassVar[int]
    F1_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedCompositeFieldContainer[LabelToken]
    rule_size: int
    precision: float
    recall: float
    f1: float
    def __init__(self, tokens: _Optional[_Iterable[_Union[LabelToken, _Mapping]]] = ..., rule_size: _Optional[int] = ..., precision: _Optional[float] = ..., recall: _Optional[float] = ..., f1: _Optional[float] = ...) -> None: ...

class LabelToken(_message.Message):
    __slots__ = ("id", "text", "share", "firings", "occurrences")
    ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    FIRINGS_FIELD_NUMBER: _ClassVar[int]
    OCCURRENCES_FIELD_NUMBER: _ClassVar[int]
    id: int
    text: str
    share: float
    firings: int
    occurrences: int
    def __init__(self, id: _Optional[int] = ..., text: _Optional[str] = ..., share: _Optional[float] = ..., firings: _Optional[int] = ..., occurrences: _Optional[int] = ...) -> None: ...

class Histogram(_message.Message):
    __slots__ = ("edges", "counts")
    EDGES_FIELD_NUMBER: _ClassVar[int]
    COUNTS_FIELD_NUMBER: _ClassVar[int]
    edges: _containers.RepeatedScalarFieldContainer[float]
    counts: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, edges: _Optional[_Iterable[float]] = ..., counts: _Optional[_Iterable[int]] = ...) -> None: ...

class QuantileGroup(_message.Message):
    __slots__ = ("low", "high", "share", "examples")
    LOW_FIELD_NUMBER: _ClassVar[int]
    HIGH_FIELD_NUMBER: _ClassVar[int]
    SHARE_FIELD_NUMBER: _ClassVar[int]
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    low: float
    high: float
    share: float
    examples: _containers.RepeatedCompositeFieldContainer[DashboardExample]
    def __init__(self, low: _Optional[float] = ..., high: _Optional[float] = ..., share: _Optional[float] = ..., examples: _Optional[_Iterable[_Union[DashboardExample, _Mapping]]] = ...) -> None: ...

class DashboardExample(_message.Message):
    __slots__ = ("tokens", "index", "value", "document", "position")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedCompositeFieldContainer[ExampleToken]
    index: int
    value: float
    document: int
    position: int
    def __init__(self, tokens: _Optional[_Iterable[_Union[ExampleToken, _Mapping]]] = ..., index: _Optional[int] = ..., value: _Optional[float] = ..., document: _Optional[int] = ..., position: _Optional[int] = ...) -> None: ...

class ExampleToken(_message.Message):
    __slots__ = ("id", "text", "value")
    ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    id: int
    text: str
    value: float
    def __init__(self, id: _Optional[int] = ..., text: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...

class FeatureNeighbour(_message.Message):
    __slots__ = ("stage", "stage_index", "feature", "cosine")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    STAGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    COSINE_FIELD_NUMBER: _ClassVar[int]
    stage: str
    stage_index: int
    feature: int
    cosine: float
    def __init__(self, stage: _Optional[str] = ..., stage_index: _Optional[int] = ..., feature: _Optional[int] = ..., cosine: _Optional[float] = ...) -> None: ...

class CoOccurringFeature(_message.Message):
    __slots__ = ("feature", "jaccard")
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    JACCARD_FIELD_NUMBER: _ClassVar[int]
    feature: int
    jaccard: float
    def __init__(self, feature: _Optional[int] = ..., jaccard: _Optional[float] = ...) -> None: ...

class MetaLatents(_message.Message):
    __slots__ = ("ids", "values", "width")
    IDS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    width: int
    def __init__(self, ids: _Optional[_Iterable[int]] = ..., values: _Optional[_Iterable[float]] = ..., width: _Optional[int] = ...) -> None: ...

class Span(_message.Message):
    __slots__ = ("start", "end")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    start: int
    end: int
    def __init__(self, start: _Optional[int] = ..., end: _Optional[int] = ...) -> None: ...

class TextQuery(_message.Message):
    __slots__ = ("text", "span", "reduction", "add_special_tokens")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SPAN_FIELD_NUMBER: _ClassVar[int]
    REDUCTION_FIELD_NUMBER: _ClassVar[int]
    ADD_SPECIAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    text: str
    span: Span
    reduction: Reduction
    add_special_tokens: bool
    def __init__(self, text: _Optional[str] = ..., span: _Optional[_Union[Span, _Mapping]] = ..., reduction: _Optional[_Union[Reduction, str]] = ..., add_special_tokens: _Optional[bool] = ...) -> None: ...

class TokenQuery(_message.Message):
    __slots__ = ("text", "id", "direction")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    DIRECTION_FIELD_NUMBER: _ClassVar[int]
    text: str
    id: int
    direction: TokenDirection
    def __init__(self, text: _Optional[str] = ..., id: _Optional[int] = ..., direction: _Optional[_Union[TokenDirection, str]] = ...) -> None: ...

class SearchFeaturesRequest(_message.Message):
    __slots__ = ("stack", "text", "token", "explanation", "stages", "page_size", "page_token")
    STACK_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    EXPLANATION_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    stack: str
    text: TextQuery
    token: TokenQuery
    explanation: str
    stages: _containers.RepeatedScalarFieldContainer[str]
    page_size: int
    page_token: str
    def __init__(self, stack: _Optional[str] = ..., text: _Optional[_Union[TextQuery, _Mapping]] = ..., token: _Optional[_Union[TokenQuery, _Mapping]] = ..., explanation: _Optional[str] = ..., stages: _Optional[_Iterable[str]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class FeatureMatch(_message.Message):
    __slots__ = ("stage", "stage_index", "feature", "score", "sign", "position", "density", "explanation", "label_f1", "label")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    STAGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    SIGN_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    DENSITY_FIELD_NUMBER: _ClassVar[int]
    EXPLANATION_FIELD_NUMBER: _ClassVar[int]
    LABEL_F1_FIELD_NUMBER: _ClassVar[int]
    LABEL_FIELD_NUMBER: _ClassVar[int]
    stage: str
    stage_index: int
    feature: int
    score: float
    sign: Sign
    position: int
    density: float
    explanation: str
    label_f1: float
    label: str
    def __init__(self, stage: _Optional[str] = ..., stage_index: _Optional[int] = ..., feature: _Optional[int] = ..., score: _Optional[float] = ..., sign: _Optional[_Union[Sign, str]] = ..., position: _Optional[int] = ..., density: _Optional[float] = ..., explanation: _Optional[str] = ..., label_f1: _Optional[float] = ..., label: _Optional[str] = ...) -> None: ...

class SearchFeaturesResponse(_message.Message):
    __slots__ = ("stack", "features", "next_page_token", "total", "tokens")
    STACK_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    stack: str
    features: _containers.RepeatedCompositeFieldContainer[FeatureMatch]
    next_page_token: str
    total: int
    tokens: _containers.RepeatedCompositeFieldContainer[_types_pb2.Token]
    def __init__(self, stack: _Optional[str] = ..., features: _Optional[_Iterable[_Union[FeatureMatch, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., total: _Optional[int] = ..., tokens: _Optional[_Iterable[_Union[_types_pb2.Token, _Mapping]]] = ...) -> None: ...

class ListFeaturesRequest(_message.Message):
    __slots__ = ("stack", "stage", "min_density", "max_density", "sort", "descending", "page_size", "page_token", "steerable_only")
    STACK_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    MIN_DENSITY_FIELD_NUMBER: _ClassVar[int]
    MAX_DENSITY_FIELD_NUMBER: _ClassVar[int]
    SORT_FIELD_NUMBER: _ClassVar[int]
    DESCENDING_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    STEERABLE_ONLY_FIELD_NUMBER: _ClassVar[int]
    stack: str
    stage: str
    min_density: float
    max_density: float
    sort: FeatureSort
    descending: bool
    page_size: int
    page_token: str
    steerable_only: bool
    def __init__(self, stack: _Optional[str] = ..., stage: _Optional[str] = ..., min_density: _Optional[float] = ..., max_density: _Optional[float] = ..., sort: _Optional[_Union[FeatureSort, str]] = ..., descending: _Optional[bool] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ..., steerable_only: _Optional[bool] = ...) -> None: ...

class FeatureSummary(_message.Message):
    __slots__ = ("feature", "density", "max", "mean", "explanation", "label_f1", "steers", "output_score", "best_strength")
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    DENSITY_FIELD_NUMBER: _ClassVar[int]
    MAX_FIELD_NUMBER: _ClassVar[int]
    MEAN_FIELD_NUMBER: _ClassVar[int]
    EXPLANATION_FIELD_NUMBER: _ClassVar[int]
    LABEL_F1_FIELD_NUMBER: _ClassVar[int]
    STEERS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_SCORE_FIELD_NUMBER: _ClassVar[int]
    BEST_STRENGTH_FIELD_NUMBER: _ClassVar[int]
    feature: int
    density: float
    max: float
    mean: float
    explanation: str
    label_f1: float
    steers: bool
    output_score: float
    best_strength: str
    def __init__(self, feature: _Optional[int] = ..., density: _Optional[float] = ..., max: _Optional[float] = ..., mean: _Optional[float] = ..., explanation: _Optional[str] = ..., label_f1: _Optional[float] = ..., steers: _Optional[bool] = ..., output_score: _Optional[float] = ..., best_strength: _Optional[str] = ...) -> None: ...

class ListFeaturesResponse(_message.Message):
    __slots__ = ("stack", "stage", "stage_index", "features", "next_page_token", "total", "tokens")
    STACK_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    STAGE_INDEX_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    stack: str
    stage: str
    stage_index: int
    features: _containers.RepeatedCompositeFieldContainer[FeatureSummary]
    next_page_token: str
    total: int
    tokens: int
    def __init__(self, stack: _Optional[str] = ..., stage: _Optional[str] = ..., stage_index: _Optional[int] = ..., features: _Optional[_Iterable[_Union[FeatureSummary, _Mapping]]] = ..., next_page_token: _Optional[str] = ..., total: _Optional[int] = ..., tokens: _Optional[int] = ...) -> None: ...

class TokenizeRequest(_message.Message):
    __slots__ = ("text", "add_special_tokens")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    ADD_SPECIAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    text: str
    add_special_tokens: bool
    def __init__(self, text: _Optional[str] = ..., add_special_tokens: _Optional[bool] = ...) -> None: ...

class TokenizeResponse(_message.Message):
    __slots__ = ("ids", "tokens")
    IDS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    tokens: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, ids: _Optional[_Iterable[int]] = ..., tokens: _Optional[_Iterable[str]] = ...) -> None: ...

class DecomposeRequest(_message.Message):
    __slots__ = ("stack", "input", "options", "chunk_tokens")
    STACK_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    CHUNK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    stack: str
    input: _types_pb2.Input
    options: _types_pb2.DecomposeOptions
    chunk_tokens: int
    def __init__(self, stack: _Optional[str] = ..., input: _Optional[_Union[_types_pb2.Input, _Mapping]] = ..., options: _Optional[_Union[_types_pb2.DecomposeOptions, _Mapping]] = ..., chunk_tokens: _Optional[int] = ...) -> None: ...

class DecomposeResponse(_message.Message):
    __slots__ = ("header", "chunk")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    header: DecomposeHeader
    chunk: DecomposeChunk
    def __init__(self, header: _Optional[_Union[DecomposeHeader, _Mapping]] = ..., chunk: _Optional[_Union[DecomposeChunk, _Mapping]] = ...) -> None: ...

class DecomposeHeader(_message.Message):
    __slots__ = ("stack", "stack_digest", "stages", "num_tokens", "top_k")
    STACK_FIELD_NUMBER: _ClassVar[int]
    STACK_DIGEST_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    stack: str
    stack_digest: str
    stages: _containers.RepeatedCompositeFieldContainer[_types_pb2.StageRef]
    num_tokens: int
    top_k: int
    def __init__(self, stack: _Optional[str] = ..., stack_digest: _Optional[str] = ..., stages: _Optional[_Iterable[_Union[_types_pb2.StageRef, _Mapping]]] = ..., num_tokens: _Optional[int] = ..., top_k: _Optional[int] = ...) -> None: ...

class DecomposeChunk(_message.Message):
    __slots__ = ("tokens",)
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedCompositeFieldContainer[TokenFeatures]
    def __init__(self, tokens: _Optional[_Iterable[_Union[TokenFeatures, _Mapping]]] = ...) -> None: ...

class TokenFeatures(_message.Message):
    __slots__ = ("token", "features")
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    token: _types_pb2.Token
    features: _containers.RepeatedCompositeFieldContainer[_types_pb2.StageCodes]
    def __init__(self, token: _Optional[_Union[_types_pb2.Token, _Mapping]] = ..., features: _Optional[_Iterable[_Union[_types_pb2.StageCodes, _Mapping]]] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop", "ignore_eos")
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    max_new_tokens: int
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    ignore_eos: bool
    def __init__(self, max_new_tokens: _Optional[int] = ..., temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., ignore_eos: _Optional[bool] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("stack", "prompt", "sampling", "interventions", "steering_vectors", "conditions", "decompose", "with_default")
    STACK_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    INTERVENTIONS_FIELD_NUMBER: _ClassVar[int]
    STEERING_VECTORS_FIELD_NUMBER: _ClassVar[int]
    CONDITIONS_FIELD_NUMBER: _ClassVar[int]
    DECOMPOSE_FIELD_NUMBER: _ClassVar[int]
    WITH_DEFAULT_FIELD_NUMBER: _ClassVar[int]
    stack: str
    prompt: _types_pb2.Input
    sampling: SamplingParams
    interventions: _containers.RepeatedCompositeFieldContainer[_types_pb2.Intervention]
    steering_vectors: _containers.RepeatedCompositeFieldContainer[_types_pb2.SteeringVector]
    conditions: _containers.RepeatedCompositeFieldContainer[_types_pb2.Condition]
    decompose: _types_pb2.DecomposeOptions
    with_default: bool
    def __init__(self, stack: _Optional[str] = ..., prompt: _Optional[_Union[_types_pb2.Input, _Mapping]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., interventions: _Optional[_Iterable[_Union[_types_pb2.Intervention, _Mapping]]] = ..., steering_vectors: _Optional[_Iterable[_Union[_types_pb2.SteeringVector, _Mapping]]] = ..., conditions: _Optional[_Iterable[_Union[_types_pb2.Condition, _Mapping]]] = ..., decompose: _Optional[_Union[_types_pb2.DecomposeOptions, _Mapping]] = ..., with_default: _Optional[bool] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("header", "token", "condition", "finish")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    TOKEN_FIELD_NUMBER: _ClassVar[int]
    CONDITION_FIELD_NUMBER: _ClassVar[int]
    FINISH_FIELD_NUMBER: _ClassVar[int]
    header: GenerateHeader
    token: TokenEvent
    condition: ConditionEvent
    finish: FinishEvent
    def __init__(self, header: _Optional[_Union[GenerateHeader, _Mapping]] = ..., token: _Optional[_Union[TokenEvent, _Mapping]] = ..., condition: _Optional[_Union[ConditionEvent, _Mapping]] = ..., finish: _Optional[_Union[FinishEvent, _Mapping]] = ...) -> None: ...

class GenerateHeader(_message.Message):
    __slots__ = ("stack", "stack_digest", "stages", "prompt", "prompt_tokens", "seed", "max_new_tokens", "branches")
    STACK_FIELD_NUMBER: _ClassVar[int]
    STACK_DIGEST_FIELD_NUMBER: _ClassVar[int]
    STAGES_FIELD_NUMBER: _ClassVar[int]
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    MAX_NEW_TOKENS_FIELD_NUMBER: _ClassVar[int]
    BRANCHES_FIELD_NUMBER: _ClassVar[int]
    stack: str
    stack_digest: str
    stages: _containers.RepeatedCompositeFieldContainer[_types_pb2.StageRef]
    prompt: _containers.RepeatedCompositeFieldContainer[_types_pb2.Token]
    prompt_tokens: int
    seed: int
    max_new_tokens: int
    branches: _containers.RepeatedScalarFieldContainer[_types_pb2.Branch]
    def __init__(self, stack: _Optional[str] = ..., stack_digest: _Optional[str] = ..., stages: _Optional[_Iterable[_Union[_types_pb2.StageRef, _Mapping]]] = ..., prompt: _Optional[_Iterable[_Union[_types_pb2.Token, _Mapping]]] = ..., prompt_tokens: _Optional[int] = ..., seed: _Optional[int] = ..., max_new_tokens: _Optional[int] = ..., branches: _Optional[_Iterable[_Union[_types_pb2.Branch, str]]] = ...) -> None: ...

class TokenEvent(_message.Message):
    __slots__ = ("branch", "index", "position", "token_id", "text", "logprob", "features")
    BRANCH_FIELD_NUMBER: _ClassVar[int]
    INDEX_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    branch: _types_pb2.Branch
    index: int
    position: int
    token_id: int
    text: str
    logprob: float
    features: _containers.RepeatedCompositeFieldContainer[_types_pb2.StageCodes]
    def __init__(self, branch: _Optional[_Union[_types_pb2.Branch, str]] = ..., index: _Optional[int] = ..., position: _Optional[int] = ..., token_id: _Optional[int] = ..., text: _Optional[str] = ..., logprob: _Optional[float] = ..., features: _Optional[_Iterable[_Union[_types_pb2.StageCodes, _Mapping]]] = ...) -> None: ...

class ConditionEvent(_message.Message):
    __slots__ = ("branch", "condition_id", "stage", "feature", "position", "value", "action")
    BRANCH_FIELD_NUMBER: _ClassVar[int]
    CONDITION_ID_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    POSITION_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    branch: _types_pb2.Branch
    condition_id: str
    stage: str
    feature: int
    position: int
    value: float
    action: _types_pb2.ConditionAction
    def __init__(self, branch: _Optional[_Union[_types_pb2.Branch, str]] = ..., condition_id: _Optional[str] = ..., stage: _Optional[str] = ..., feature: _Optional[int] = ..., position: _Optional[int] = ..., value: _Optional[float] = ..., action: _Optional[_Union[_types_pb2.ConditionAction, str]] = ...) -> None: ...

class FinishEvent(_message.Message):
    __slots__ = ("branch", "reason", "trigger", "stop_string", "prompt_tokens", "generated_tokens", "text")
    BRANCH_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    TRIGGER_FIELD_NUMBER: _ClassVar[int]
    STOP_STRING_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    branch: _types_pb2.Branch
    reason: FinishReason
    trigger: ConditionEvent
    stop_string: str
    prompt_tokens: int
    generated_tokens: int
    text: str
    def __init__(self, branch: _Optional[_Union[_types_pb2.Branch, str]] = ..., reason: _Optional[_Union[FinishReason, str]] = ..., trigger: _Optional[_Union[ConditionEvent, _Mapping]] = ..., stop_string: _Optional[str] = ..., prompt_tokens: _Optional[int] = ..., generated_tokens: _Optional[int] = ..., text: _Optional[str] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("stack", "input", "interventions", "steering_vectors", "splice_stages")
    STACK_FIELD_NUMBER: _ClassVar[int]
    INPUT_FIELD_NUMBER: _ClassVar[int]
    INTERVENTIONS_FIELD_NUMBER: _ClassVar[int]
    STEERING_VECTORS_FIELD_NUMBER: _ClassVar[int]
    SPLICE_STAGES_FIELD_NUMBER: _ClassVar[int]
    stack: str
    input: _types_pb2.Input
    interventions: _containers.RepeatedCompositeFieldContainer[_types_pb2.Intervention]
    steering_vectors: _containers.RepeatedCompositeFieldContainer[_types_pb2.SteeringVector]
    splice_stages: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, stack: _Optional[str] = ..., input: _Optional[_Union[_types_pb2.Input, _Mapping]] = ..., interventions: _Optional[_Iterable[_Union[_types_pb2.Intervention, _Mapping]]] = ..., steering_vectors: _Optional[_Iterable[_Union[_types_pb2.SteeringVector, _Mapping]]] = ..., splice_stages: _Optional[_Iterable[str]] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("num_tokens", "scored_tokens", "token_ids", "clean_ce", "edited_ce", "kl", "edited", "clean_ce_per_token", "edited_ce_per_token", "kl_per_token")
    NUM_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SCORED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    CLEAN_CE_FIELD_NUMBER: _ClassVar[int]
    EDITED_CE_FIELD_NUMBER: _ClassVar[int]
    KL_FIELD_NUMBER: _ClassVar[int]
    EDITED_FIELD_NUMBER: _ClassVar[int]
    CLEAN_CE_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    EDITED_CE_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    KL_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    num_tokens: int
    scored_tokens: int
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    clean_ce: float
    edited_ce: float
    kl: float
    edited: bool
    clean_ce_per_token: _containers.RepeatedScalarFieldContainer[float]
    edited_ce_per_token: _containers.RepeatedScalarFieldContainer[float]
    kl_per_token: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, num_tokens: _Optional[int] = ..., scored_tokens: _Optional[int] = ..., token_ids: _Optional[_Iterable[int]] = ..., clean_ce: _Optional[float] = ..., edited_ce: _Optional[float] = ..., kl: _Optional[float] = ..., edited: _Optional[bool] = ..., clean_ce_per_token: _Optional[_Iterable[float]] = ..., edited_ce_per_token: _Optional[_Iterable[float]] = ..., kl_per_token: _Optional[_Iterable[float]] = ...) -> None: ...

class EncodeActivationsRequest(_message.Message):
    __slots__ = ("sequence", "stack", "stage", "activations", "previous", "top_k", "include_error")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    STACK_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    ACTIVATIONS_FIELD_NUMBER: _ClassVar[int]
    PREVIOUS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_ERROR_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    stack: str
    stage: str
    activations: _types_pb2.Matrix
    previous: _types_pb2.Matrix
    top_k: int
    include_error: bool
    def __init__(self, sequence: _Optional[int] = ..., stack: _Optional[str] = ..., stage: _Optional[str] = ..., activations: _Optional[_Union[_types_pb2.Matrix, _Mapping]] = ..., previous: _Optional[_Union[_types_pb2.Matrix, _Mapping]] = ..., top_k: _Optional[int] = ..., include_error: _Optional[bool] = ...) -> None: ...

class EncodeActivationsResponse(_message.Message):
    __slots__ = ("sequence", "rows")
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    sequence: int
    rows: _containers.RepeatedCompositeFieldContainer[_types_pb2.StageCodes]
    def __init__(self, sequence: _Optional[int] = ..., rows: _Optional[_Iterable[_Union[_types_pb2.StageCodes, _Mapping]]] = ...) -> None: ...
