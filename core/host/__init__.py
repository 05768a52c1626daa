"""The host model runtime: loading (default, smoke models, HF dirs, GGUF cache), devices, hookpoints, hooks.

Modules here import torch and transformers but never grpc, metrics or servers: the trainer collects
activations through the same `HostModel` the service serves.
"""
