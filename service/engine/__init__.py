"""The inference engine: host model loading, hookpoints, hooks (and later stacks and generation).

Modules here import torch and transformers but never grpc: the trainer reuses the host model
runtime (`loading`, `hookpoints`, `hooks`, `host_model`) to collect activations.
"""
