"""Tiny, seeded, hub-free models and tokenizers for tests, tutorials and benchmarks."""

from omnilens.testing.tiny import tiny_qwen3, tiny_qwen3_moe, tiny_tokenizer

__all__ = ["tiny_qwen3", "tiny_qwen3_moe", "tiny_tokenizer"]
