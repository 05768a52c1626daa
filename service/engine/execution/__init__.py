"""Execution: the one worker thread that owns the model, its bounded queue, and continuous batching of the
forward passes of many requests."""
