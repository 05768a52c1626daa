"""Operations: what each request computes on the worker thread (decompose, generate, score, search, feature
pages, encode), on the host model and the stack runtime."""
