"""Stacks as served: read, checked against the host model and self-checked (torch), or ONNX graphs run by ONNX
Runtime for the activation-only server."""
