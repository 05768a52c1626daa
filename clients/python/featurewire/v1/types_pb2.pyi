from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class PositionScope(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    POSITION_SCOPE_UNSPECIFIED: _ClassVar[PositionScope]
    POSITION_SCOPE_PROMPT: _ClassVar[PositionScope]
    POSITION_SCOPE_GENERATED: _ClassVar[PositionScope]
    POSITION_SCOPE_ALL: _ClassVar[PositionScope]
    POSITION_SCOPE_RANGE: _ClassVar[PositionScope]

class InterventionOp(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    INTERVENTION_OP_UNSPECIFIED: _ClassVar[InterventionOp]
    INTERVENTION_OP_ADD: _ClassVar[InterventionOp]
    INTERVENTION_OP_SET: _ClassVar[InterventionOp]
    INTERVENTION_OP_SCALE: _ClassVar[InterventionOp]
    INTERVENTION_OP_CLAMP: _ClassVar[InterventionOp]
    INTERVENTION_OP_ABLATE: _ClassVar[InterventionOp]

class Comparison(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    COMPARISON_UNSPECIFIED: _ClassVar[Comparison]
    COMPARISON_ABOVE: _ClassVar[Comparison]
    COMPARISON_BELOW: _ClassVar[Comparison]

class ConditionAction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CONDITION_ACTION_UNSPECIFIED: _ClassVar[ConditionAction]
    CONDITION_ACTION_ENABLE_INTERVENTIONS: _ClassVar[ConditionAction]
    CONDITION_ACTION_STOP: _ClassVar[ConditionAction]

class Branch(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BRANCH_UNSPECIFIED: _ClassVar[Branch]
    BRANCH_STEERED: _ClassVar[Branch]
    BRANCH_DEFAULT: _ClassVar[Branch]

class DType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    DTYPE_UNSPECIFIED: _ClassVar[DType]
    DTYPE_FLOAT32: _ClassVar[DType]
    DTYPE_FLOAT16: _ClassVar[DType]
    DTYPE_BFLOAT16: _ClassVar[DType]
POSITION_SCOPE_UNSPECIFIED: PositionScope
POSITION_SCOPE_PROMPT: PositionScope
POSITION_SCOPE_GENERATED: PositionScope
POSITION_SCOPE_ALL: PositionScope
POSITION_SCOPE_RANGE: PositionScope
INTERVENTION_OP_UNSPECIFIED: InterventionOp
INTERVENTION_OP_ADD: InterventionOp
INTERVENTION_OP_SET: InterventionOp
INTERVENTION_OP_SCALE: InterventionOp
INTERVENTION_OP_CLAMP: InterventionOp
INTERVENTION_OP_ABLATE: InterventionOp
COMPARISON_UNSPECIFIED: Comparison
COMPARISON_ABOVE: Comparison
COMPARISON_BELOW: Comparison
CONDITION_ACTION_UNSPECIFIED: ConditionAction
CONDITION_ACTION_ENABLE_INTERVENTIONS: ConditionAction
CONDITION_ACTION_STOP: ConditionAction
BRANCH_UNSPECIFIED: Branch
BRANCH_STEERED: Branch
BRANCH_DEFAULT: Branch
DTYPE_UNSPECIFIED: DType
DTYPE_FLOAT32: DType
DTYPE_FLOAT16: DType
DTYPE_BFLOAT16: DType

class TokenIds(_message.Message):
    __slots__ = ("ids",)
    IDS_FIELD_NUMBER: _ClassVar[int]
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, ids: _Optional[_Iterable[int]] = ...) -> None: ...

class Input(_message.Message):
    __slots__ = ("text", "token_ids", "add_special_tokens")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    ADD_SPECIAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: TokenIds
    add_special_tokens: bool
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Union[TokenIds, _Mapping]] = ..., add_special_tokens: _Optional[bool] = ...) -> None: ...

class Token(_message.Message):
    __slots__ = ("position", "id", "text", "special")
    POSITION_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    SPECIAL_FIELD_NUMBER: _ClassVar[int]
    position: int
    id: int
    text: str
    special: bool
    def __init__(self, position: _Optional[int] = ..., id: _Optional[int] = ..., text: _Optional[str] = ..., special: _Optional[bool] = ...) -> None: ...

class StageCodes(_message.Message):
    __slots__ = ("stage", "ids", "values", "l0", "error_norm", "predicted_error_norm")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    L0_FIELD_NUMBER: _ClassVar[int]
    ERROR_NORM_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_ERROR_NORM_FIELD_NUMBER: _ClassVar[int]
    stage: int
    ids: _containers.RepeatedScalarFieldContainer[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    l0: int
    error_norm: float
    predicted_error_norm: float
    def __init__(self, stage: _Optional[int] = ..., ids: _Optional[_Iterable[int]] = ..., values: _Optional[_Iterable[float]] = ..., l0: _Optional[int] = ..., error_norm: _Optional[float] = ..., predicted_error_norm: _Optional[float] = ...) -> None: ...

class FeatureFilter(_message.Message):
    __slots__ = ("stage", "ids")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    IDS_FIELD_NUMBER: _ClassVar[int]
    stage: str
    ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, stage: _Optional[str] = ..., ids: _Optional[_Iterable[int]] = ...) -> None: ...

class DecomposeOptions(_message.Message):
    __slots__ = ("stages", "top_k", "include_error", "feature_filter")
    STAGES_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_ERROR_FIELD_NUMBER: _ClassVar[int]
    FEATURE_FILTER_FIELD_NUMBER: _ClassVar[int]
    stages: _containers.RepeatedScalarFieldContainer[str]
    top_k: int
    include_error: bool
    feature_filter: _containers.RepeatedCompositeFieldContainer[FeatureFilter]
    def __init__(self, stages: _Optional[_Iterable[str]] = ..., top_k: _Optional[int] = ..., include_error: _Optional[bool] = ..., feature_filter: _Optional[_Iterable[_Union[FeatureFilter, _Mapping]]] = ...) -> None: ...

class Positions(_message.Message):
    __slots__ = ("scope", "start", "end")
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    scope: PositionScope
    start: int
    end: int
    def __init__(self, scope: _Optional[_Union[PositionScope, str]] = ..., start: _Optional[int] = ..., end: _Optional[int] = ...) -> None: ...

class Intervention(_message.Message):
    __slots__ = ("stage", "feature", "op", "value", "lo", "hi", "positions", "condition_id")
    STAGE_FIELD_NUMBER: _ClassVar[int]
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    OP_FIELD_NUMBER: _ClassVar[int]
    VALUE_FIELD_NUMBER: _ClassVar[int]
    LO_FIELD_NUMBER: _ClassVar[int]
    HI_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    CONDITION_ID_FIELD_NUMBER: _ClassVar[int]
    stage: str
    feature: int
    op: InterventionOp
    value: float
    lo: float
    hi: float
    positions: Positions
    condition_id: str
    def __init__(self, stage: _Optional[str] = ..., feature: _Optional[int] = ..., op: _Optional[_Union[InterventionOp, str]] = ..., value: _Optional[float] = ..., lo: _Optional[float] = ..., hi: _Optional[float] = ..., positions: _Optional[_Union[Positions, _Mapping]] = ..., condition_id: _Optional[str] = ...) -> None: ...

class SteeringVector(_message.Message):
    __slots__ = ("hookpoint", "values", "scale", "positions", "condition_id")
    HOOKPOINT_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    SCALE_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    CONDITION_ID_FIELD_NUMBER: _ClassVar[int]
    hookpoint: str
    values: _containers.RepeatedScalarFieldContainer[float]
    scale: float
    positions: Positions
    condition_id: str
    def __init__(self, hookpoint: _Optional[str] = ..., values: _Optional[_Iterable[float]] = ..., scale: _Optional[float] = ..., positions: _Optional[_Union[Positions, _Mapping]] = ..., condition_id: _Optional[str] = ...) -> None: ...

class Condition(_message.Message):
    __slots__ = ("id", "stage", "feature", "comparison", "threshold", "action", "positions")
    ID_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    COMPARISON_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    POSITIONS_FIELD_NUMBER: _ClassVar[int]
    id: str
    stage: str
    feature: int
    comparison: Comparison
    threshold: float
    action: ConditionAction
    positions: Positions
    def __init__(self, id: _Optional[str] = ..., stage: _Optional[str] = ..., feature: _Optional[int] = ..., comparison: _Optional[_Union[Comparison, str]] = ..., threshold: _Optional[float] = ..., action: _Optional[_Union[ConditionAction, str]] = ..., positions: _Optional[_Union[Positions, _Mapping]] = ...) -> None: ...

class Matrix(_message.Message):
    __slots__ = ("rows", "cols", "values", "raw", "dtype")
    ROWS_FIELD_NUMBER: _ClassVar[int]
    COLS_FIELD_NUMBER: _ClassVar[int]
    VALUES_FIELD_NUMBER: _ClassVar[int]
    RAW_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    rows: int
    cols: int
    values: _containers.RepeatedScalarFieldContainer[float]
    raw: bytes
    dtype: DType
    def __init__(self, rows: _Optional[int] = ..., cols: _Optional[int] = ..., values: _Optional[_Iterable[float]] = ..., raw: _Optional[bytes] = ..., dtype: _Optional[_Union[DType, str]] = ...) -> None: ...

class StageRef(_message.Message):
    __slots__ = ("index", "name", "hookpoint", "d_sae", "signed")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    NAME_FIELD_NUMBER: _ClassVar[int]
    HOOKPOINT_FIELD_NUMBER: _ClassVar[int]
    D_SAE_FIELD_NUMBER: _ClassVar[int]
    SIGNED_FIELD_NUMBER: _ClassVar[int]
    index: int
    name: str
    hookpoint: str
    d_sae: int
    signed: bool
    def __init__(self, index: _Optional[int] = ..., name: _Optional[str] = ..., hookpoint: _Optional[str] = ..., d_sae: _Optional[int] = ..., signed: _Optional[bool] = ...) -> None: ...
