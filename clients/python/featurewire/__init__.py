"""Python client for the featurewire service: live SAE feature decomposition and steering over gRPC.

The client depends only on grpcio and protobuf (numpy is used when present), so applications can call
the service without pulling torch or the host model's stack into their environment.

    from featurewire import Client, Intervention, Condition

    with Client("localhost:50051") as fw:
        stage = fw.info().stack().stages[0].name
        result = fw.generate_text("My favourite food is", with_default=True, max_new_tokens=20,
                                  interventions=[Intervention.set(stage, 123, 8.0, positions="generated")])
        print(result.text, "|", result.default_text)
"""

from featurewire._transport import RetryPolicy
from featurewire._version import __version__
from featurewire.aio import AsyncClient, AsyncDecomposeStream, AsyncGenerateStream
from featurewire.arrays import feature_matrix, to_numpy
from featurewire.builders import Condition, DecomposeOptions, Intervention, Positions, Vector
from featurewire.client import Client, DecomposeStream, GenerateStream
from featurewire.errors import (
    Cancelled,
    DeadlineExceeded,
    FailedPrecondition,
    FeaturewireError,
    Internal,
    InvalidArgument,
    NotFound,
    PermissionDenied,
    ResourceExhausted,
    Unauthenticated,
    Unavailable,
    Unimplemented,
)
from featurewire.events import (
    ConditionFired,
    DecomposeHeader,
    Decomposition,
    EncodedBatch,
    Finished,
    Generation,
    StageCodes,
    StageRef,
    Started,
    TextToken,
    Token,
    TokenFeatures,
)
from featurewire.feature_results import (
    DashboardExample,
    FeatureDashboard,
    FeatureList,
    FeatureMatch,
    FeatureSummary,
    SearchResult,
)
from featurewire.results import (
    Feature,
    ScoreResult,
    ServerInfo,
    StackInfo,
    StageInfo,
    Tokens,
)

__all__ = [
    "AsyncClient", "AsyncDecomposeStream", "AsyncGenerateStream", "Cancelled", "Client", "Condition",
    "ConditionFired", "DashboardExample", "DeadlineExceeded", "DecomposeHeader", "DecomposeOptions", "DecomposeStream",
    "Decomposition", "EncodedBatch", "FailedPrecondition", "Feature", "FeatureDashboard", "FeatureList",
    "FeatureMatch", "FeatureSummary", "FeaturewireError", "Finished", "GenerateStream", "Generation",
    "Internal", "Intervention", "InvalidArgument", "NotFound", "PermissionDenied", "Positions", "ResourceExhausted",
    "RetryPolicy", "ScoreResult", "SearchResult", "ServerInfo", "StackInfo", "StageCodes", "StageInfo", "StageRef",
    "Started", "TextToken", "Token", "TokenFeatures", "Tokens", "Unauthenticated", "Unavailable", "Unimplemented",
    "Vector", "__version__", "feature_matrix", "to_numpy",
]
