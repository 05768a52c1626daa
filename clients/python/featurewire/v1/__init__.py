"""Generated code of the featurewire API v1 (protos/featurewire/v1). Do not edit: run `make protos`.

- `types_pb2`: value types shared by several RPCs (Input, StageCodes, Intervention, Condition, ...)
- `featurewire_pb2`: the request/response messages of each RPC
- `featurewire_pb2_grpc`: `FeaturewireStub` (client) and `FeaturewireServicer` (server)
"""
