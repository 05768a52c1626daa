"""The request contract: plain values, limits and settings, specs and events, and the validators. Torch-free,
so the activation-only server and every face (gRPC, JSON, OpenAI-compatible) can use it without the model."""
