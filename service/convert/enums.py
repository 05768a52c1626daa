"""The proto enum <-> spec enum tables, shared by the request and response sides and the server info.

Members are matched by name when the module is imported, so a member renamed on one side fails at
import rather than mid-request. Torch-free: the host model's hookpoint kinds are tabled where a host
model is described (service/convert/info.py), with `table` from here.
"""

from __future__ import annotations

from enum import Enum
from typing import Any, TypeVar

from featurewire.v1 import featurewire_pb2 as pb
from featurewire.v1 import types_pb2 as t

from service.engine.contract.encode_spec import RAW_DTYPES
from service.engine.contract.feature_specs import FeatureSort, Reduction, Sign, TokenDirection
from service.engine.contract.specs import Action, Branch, Comparison, FinishReason, Op, Scope

E = TypeVar("E", bound=Enum)


def table(wrapper: Any, prefix: str, enum: type[E]) -> dict[int, E]:
    """proto number -> spec member, matched by name (a renamed member fails at import, not mid-request)."""
    return {wrapper.Value(f"{prefix}{member.name}"): member for member in enum}


# proto number -> spec member (requests; OPS and ACTIONS also list the capabilities in GetServerInfo)
OPS = table(t.InterventionOp, "INTERVENTION_OP_", Op)
SCOPES = table(t.PositionScope, "POSITION_SCOPE_", Scope)
COMPARISONS = table(t.Comparison, "COMPARISON_", Comparison)
ACTIONS = table(t.ConditionAction, "CONDITION_ACTION_", Action)
DTYPES = {t.DType.Value(f"DTYPE_{name}"): name for name in RAW_DTYPES}
REDUCTIONS = table(pb.Reduction, "REDUCTION_", Reduction)
TOKEN_DIRECTIONS = table(pb.TokenDirection, "TOKEN_DIRECTION_", TokenDirection)
FEATURE_SORTS = table(pb.FeatureSort, "FEATURE_SORT_", FeatureSort)

# spec member -> proto number (responses)
BRANCHES = {m: n for n, m in table(t.Branch, "BRANCH_", Branch).items()}
FINISH_REASONS = {m: n for n, m in table(pb.FinishReason, "FINISH_REASON_", FinishReason).items()}
ACTION_NUMBERS = {m: n for n, m in ACTIONS.items()}
SIGNS = {m: n for n, m in table(pb.Sign, "SIGN_", Sign).items()}
