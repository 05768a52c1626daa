"""Interoperability: importing SAELens / sparsify SAEs and exporting stages to ONNX."""
