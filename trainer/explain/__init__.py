"""LLM explanations of a stack's features through any OpenAI-compatible endpoint, scored by detection and fuzzing
on held-out examples (`featurewire-train explain`)."""
