"""Serving a model over HTTP: the engine (decoding with a shared static KV cache), the scheduler
(continuous batching in one thread), the app (OpenAI-compatible endpoints and the playground)."""
