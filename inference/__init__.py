"""Inference: a batched generation engine with a static KV cache, speculative decoding,
watermarking and an OpenAI-compatible server (see the modules)."""
