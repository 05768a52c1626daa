"""The SAE stack: its on-disk format (manifest, identity, read/write/verify, affine maps, error
predictors, meta-SAE record) and the runtime that encodes, edits and decodes through it.

Kept torch-free at the package level: `core.stack.manifest` is imported by the activation-only server,
which runs without torch.
"""
