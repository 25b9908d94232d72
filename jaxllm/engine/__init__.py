"""The engine: KV cache, sampling, compiled steps, and the generation loop."""
