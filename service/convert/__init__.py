"""Protobuf <-> engine translation, the servicers' only one, a module per direction.

`requests` turns request messages into validated specs, `responses` turns engine events and results into
response messages, `info` describes the server and its stacks (GetServerInfo, ListStacks), and `enums`
holds the proto <-> spec enum tables they share. Import the module you need; nothing is re-exported here.

Torch-free at import, every module: the activation-only server uses them without torch or transformers.
"""
