"""Measured steerability: steer features from neutral openings, re-read what came out, store a verdict per feature."""
