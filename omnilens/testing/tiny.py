"""Tiny random Qwen-family models built from config classes, and a local word-level tokenizer.

Everything is seeded and built in well under a second; nothing touches a hub.
"""

from __future__ import annotations

from typing import Any

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
    "<|video_pad|>", "<|audio_start|>", "<|audio_end|>", "<|audio_pad|>",
]
WORDS = (
    "the a an and or but of to in on at with for from by is was are were be been it he she they we you i "
    "my your his her their our this that these those there here what who when where why how not no yes "
    "cat dog bird fish tree house car road city river sea sky sun moon star rain snow wind fire water "
    "red green blue yellow black white orange purple pink brown grey colour word "
    "happy sad angry calm afraid surprised joyful gloomy cheerful tearful glad upset "
    "good bad big small old new hot cold fast slow bright dark loud quiet "
    "run walk see look say tell go come make take give think know feel want like love hate "
    "day night morning evening today tomorrow yesterday time year week home school work friend "
    "one two three four five six seven eight nine ten . , ! ? : ' answer question image audio text"
).split()


def tiny_tokenizer(extra_words: list[str] | None = None) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over a small English vocabulary plus Qwen special tokens.

    Ids: special tokens first (``<|endoftext|>`` = 0, also the pad token), then words, then ``[UNK]``.
    """
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + WORDS + list(extra_words or []))}
    vocab["[UNK]"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, unk_token="[UNK]", pad_token="<|endoftext|>", eos_token="<|im_end|>",
        bos_token=None, additional_special_tokens=SPECIAL_TOKENS[1:],
    )
    fast.padding_side = "right"
    return fast


def _vocab_size() -> int:
    return len(SPECIAL_TOKENS) + len(WORDS) + 1


def tiny_qwen3(seed: int = 0, **overrides: Any) -> Qwen3ForCausalLM:
    """A random ``Qwen3ForCausalLM`` (2 layers, d_model 64, 4 heads, 2 kv heads, head_dim 16), eval mode."""
    cfg = dict(
        vocab_size=_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=256,
        rms_norm_eps=1e-6, tie_word_embeddings=False, pad_token_id=0, eos_token_id=2, bos_token_id=None,
    )
    cfg.update(overrides)
    torch.manual_seed(seed)
    return Qwen3ForCausalLM(Qwen3Config(**cfg)).eval()


def tiny_qwen3_moe(seed: int = 0, **overrides: Any) -> Qwen3MoeForCausalLM:
    """A random ``Qwen3MoeForCausalLM`` (2 layers, 4 experts, top-2, d_model 64), eval mode."""
    cfg = dict(
        vocab_size=_vocab_size(), hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4,
        num_experts_per_tok=2, decoder_sparse_step=1, max_position_embeddings=256, norm_topk_prob=True,
        tie_word_embeddings=False, pad_token_id=0, eos_token_id=2, bos_token_id=None,
    )
    cfg.update(overrides)
    torch.manual_seed(seed)
    model = Qwen3MoeForCausalLM(Qwen3MoeConfig(**cfg)).eval()
    with torch.no_grad():  # router weights init to zero; give them spread so routing is non-trivial
        for layer in model.model.layers:
            gate = getattr(layer.mlp, "gate", None)
            if gate is not None:
                gate.weight.normal_(0, 0.5)
    return model
