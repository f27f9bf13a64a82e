"""A tiny random ``Qwen2VLForConditionalGeneration`` and its image processor, hub-free and seeded.

The special-token ids match :func:`omnilens.testing.tiny.tiny_tokenizer` (``<|vision_start|>`` 3,
``<|vision_end|>`` 4, ``<|image_pad|>`` 5, ``<|video_pad|>`` 6), so the two work together.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

from omnilens.testing.tiny import SPECIAL_TOKENS, _vocab_size


def tiny_qwen2_vl(
    seed: int = 0, *, vision: dict[str, Any] | None = None, **text_overrides: Any,
) -> Qwen2VLForConditionalGeneration:
    """A random Qwen2-VL in eval mode.

    Language model: 2 layers, d_model 64, 4 heads (d_head 16), 2 kv heads, mRoPE sections (2, 3, 3).
    Vision tower: 2 blocks, embed 32, 4 heads, patch 2, temporal patch 2, merge 2 (so an image of
    ``H x W`` pixels gives ``(H/2)(W/2)`` patches and a quarter as many language-model tokens).
    ``vision`` overrides vision-config fields, other keywords text-config fields.
    """
    text = dict(
        vocab_size=_vocab_size(), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3]),
        pad_token_id=0, eos_token_id=2, bos_token_id=None,
    )
    text.update(text_overrides)
    vis = dict(depth=2, embed_dim=32, hidden_size=text["hidden_size"], num_heads=4, mlp_ratio=2, patch_size=2,
               spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    vis.update(vision or {})
    ids = {tok: i for i, tok in enumerate(SPECIAL_TOKENS)}
    cfg = Qwen2VLConfig(
        text_config=text, vision_config=vis, image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"], vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"], tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    return Qwen2VLForConditionalGeneration(cfg).eval()
