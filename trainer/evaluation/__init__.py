"""Evaluation: reconstruction and splice metrics, redundancy, probing, co-occurrence, ITO, stack comparison."""
