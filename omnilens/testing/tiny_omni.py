"""Tiny random Qwen3-Omni models (Thinker + Talker + code predictor + code2wav, or the Thinker alone).

Built from the transformers config classes with the config keys the Omni code reads but the config
classes do not declare (``talker_config.spatial_merge_size``,
``talker_config.text_config.shared_expert_intermediate_size``, ``thinker_config.vision_start_token_id``),
a speaker table, and a Talker vocabulary that exceeds the codebook by 1024 (``generate`` suppresses the
top 1024 codec ids except the codec end-of-speech id). Everything is seeded; nothing touches a hub.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import (
    PreTrainedTokenizerFast,
    Qwen3OmniMoeConfig,
    Qwen3OmniMoeForConditionalGeneration,
    Qwen3OmniMoeThinkerConfig,
    Qwen3OmniMoeThinkerForConditionalGeneration,
    WhisperFeatureExtractor,
)

from omnilens.testing.tiny import tiny_tokenizer

OMNI_WORDS = ["system", "user", "assistant", "<tts_pad>", "<tts_bos>", "<tts_eos>"]
CODEBOOK = 32
N_MELS = 16
SPEAKERS = {"ethan": CODEBOOK + 10, "chelsie": CODEBOOK + 11}


def tiny_omni_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny word-level tokenizer plus the chat roles and the TTS marker tokens the Omni config names."""
    return tiny_tokenizer(extra_words=OMNI_WORDS)


def tiny_omni_feature_extractor() -> WhisperFeatureExtractor:
    """The Whisper-style log-mel feature extractor the Omni processor uses, with ``N_MELS`` mel bins."""
    return WhisperFeatureExtractor(feature_size=N_MELS, sampling_rate=16000, hop_length=160, n_fft=400)


def _token_ids(tok: PreTrainedTokenizerFast) -> dict[str, int]:
    v = tok.get_vocab()
    return dict(
        audio_token_id=v["<|audio_pad|>"], image_token_id=v["<|image_pad|>"], video_token_id=v["<|video_pad|>"],
        audio_start_token_id=v["<|audio_start|>"], vision_start_token_id=v["<|vision_start|>"],
        user_token_id=v["user"],
    )


def _thinker_config(tok: PreTrainedTokenizerFast, **overrides: Any) -> dict[str, Any]:
    ids = _token_ids(tok)
    vocab = len(tok.get_vocab())
    text = dict(
        vocab_size=vocab, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_experts=4, num_experts_per_tok=2,
        decoder_sparse_step=1, norm_topk_prob=True, max_position_embeddings=512, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                         "interleaved": True},
        pad_token_id=0, eos_token_id=tok.convert_tokens_to_ids("<|im_end|>"),
    )
    audio = dict(
        num_mel_bins=N_MELS, encoder_layers=2, encoder_attention_heads=4, encoder_ffn_dim=64, d_model=32,
        output_dim=64, n_window=50, n_window_infer=100, downsample_hidden_size=8, max_source_positions=256,
    )
    vision = dict(
        depth=2, hidden_size=32, intermediate_size=64, num_heads=2, in_channels=3, patch_size=4,
        spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=64, num_position_embeddings=16,
        deepstack_visual_indexes=[0, 1], rope_parameters={"rope_type": "axial", "rope_theta": 10000.0},
    )
    cfg = dict(text_config=text, audio_config=audio, vision_config=vision, **ids)
    cfg.update(overrides)
    return cfg


def _fill_weights(model: torch.nn.Module, seed: int) -> None:
    """Router weights init to zero: give them spread so routing is non-trivial. Hugging Face leaves the
    Talker's fused expert weights uninitialised (``torch.empty``): fill every fused expert tensor."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                param.copy_(0.5 * torch.randn(param.shape, generator=gen))
            elif name.endswith(("experts.gate_up_proj", "experts.down_proj")):
                param.copy_(0.02 * torch.randn(param.shape, generator=gen))


def tiny_omni_thinker(seed: int = 0, **overrides: Any) -> Qwen3OmniMoeThinkerForConditionalGeneration:
    """A random ``Qwen3OmniMoeThinkerForConditionalGeneration`` (audio, vision and 2-layer MoE text), eval mode."""
    tok = tiny_omni_tokenizer()
    cfg = Qwen3OmniMoeThinkerConfig(**_thinker_config(tok, **overrides))
    torch.manual_seed(seed)
    model = Qwen3OmniMoeThinkerForConditionalGeneration(cfg).eval()
    _fill_weights(model, seed)
    return model


def tiny_omni(seed: int = 0, **overrides: Any) -> Qwen3OmniMoeForConditionalGeneration:
    """A random ``Qwen3OmniMoeForConditionalGeneration``: Thinker, Talker (2 MoE layers with shared expert,
    4 code groups, codebook 32), code predictor (2 layers) and code2wav; eval mode, about 1 M parameters.

    Speakers: ``"ethan"`` and ``"chelsie"``. ``overrides`` update the top-level config dict.
    """
    tok = tiny_omni_tokenizer()
    v = tok.get_vocab()
    ids = _token_ids(tok)
    groups = 4
    talker_text = dict(
        vocab_size=CODEBOOK + 1024, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
        shared_expert_intermediate_size=32, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
        head_dim=16, num_experts=4, num_experts_per_tok=2, decoder_sparse_step=1, max_position_embeddings=1024,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                         "interleaved": True},
    )
    code_predictor = dict(
        vocab_size=CODEBOOK, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, head_dim=16, num_code_groups=groups, max_position_embeddings=64,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    talker = dict(
        text_config=talker_text, code_predictor_config=code_predictor, num_code_groups=groups,
        thinker_hidden_size=64, accept_hidden_layer=1, codec_eos_token_id=CODEBOOK + 1, codec_pad_id=CODEBOOK + 2,
        codec_bos_id=CODEBOOK + 3, codec_nothink_id=CODEBOOK + 4, codec_think_bos_id=CODEBOOK + 5,
        codec_think_eos_id=CODEBOOK + 6, speaker_id=dict(SPEAKERS), spatial_merge_size=2,
        audio_token_id=ids["audio_token_id"], image_token_id=ids["image_token_id"],
        video_token_id=ids["video_token_id"], vision_start_token_id=ids["vision_start_token_id"],
        audio_start_token_id=ids["audio_start_token_id"],
    )
    code2wav = dict(
        codebook_size=CODEBOOK, hidden_size=32, num_attention_heads=2, num_key_value_heads=2, intermediate_size=64,
        num_hidden_layers=1, num_quantizers=groups, upsample_rates=[2, 2], upsampling_ratios=[2], decoder_dim=32,
        sliding_window=8, max_position_embeddings=256,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )
    cfg = dict(
        thinker_config=_thinker_config(tok), talker_config=talker, code2wav_config=code2wav,
        enable_audio_output=True, im_start_token_id=v["<|im_start|>"], im_end_token_id=v["<|im_end|>"],
        tts_pad_token_id=v["<tts_pad>"], tts_bos_token_id=v["<tts_bos>"], tts_eos_token_id=v["<tts_eos>"],
        system_token_id=v["system"], user_token_id=v["user"], assistant_token_id=v["assistant"],
    )
    cfg.update(overrides)
    config = Qwen3OmniMoeConfig(**cfg)
    # keys the Omni code reads that the config classes do not declare
    config.thinker_config.vision_start_token_id = ids["vision_start_token_id"]
    config.talker_config.spatial_merge_size = 2
    config.talker_config.text_config.shared_expert_intermediate_size = 32
    torch.manual_seed(seed)
    model = Qwen3OmniMoeForConditionalGeneration(config).eval()
    _fill_weights(model, seed)
    return model
