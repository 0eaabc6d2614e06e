"""coordexp_jax: CoordExp (coordinate tokens, expectation decoding, set matching) for Qwen3-VL in JAX."""
__version__ = "0.1.0"
