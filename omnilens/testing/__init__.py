"""Tiny, seeded, hub-free models and tokenizers for tests, tutorials and benchmarks."""

from omnilens.testing.tiny import tiny_qwen3, tiny_qwen3_moe, tiny_tokenizer
from omnilens.testing.tiny_vl import tiny_qwen2_vl
from omnilens.testing.tiny_omni import tiny_omni, tiny_omni_feature_extractor, tiny_omni_thinker, tiny_omni_tokenizer

__all__ = ["tiny_omni", "tiny_omni_feature_extractor", "tiny_omni_thinker", "tiny_omni_tokenizer",
           "tiny_qwen2_vl", "tiny_qwen3", "tiny_qwen3_moe", "tiny_tokenizer"]
