"""Activation collection: the corpus and its splits, the sharded activation store."""
