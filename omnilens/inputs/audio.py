"""Audio clips -> Qwen3-Omni audio-encoder inputs (log-mel features and their mask), without the hub.

A clip is a 1-D waveform (numpy array or tensor, at the feature extractor's sampling rate), turned into
log-mel features by the Whisper-style feature extractor the Omni processor uses, or precomputed
features ``[mel frame]``. Clips are padded to the longest along ``frame``; the mask marks real frames.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from jaxtyping import Int


def feat_extract_output_lengths(n_frames: Int[torch.Tensor, "clip"], n_window: int = 50) -> Int[torch.Tensor, "clip"]:
    """Audio tokens per clip for ``n_frames`` mel frames (the Omni audio encoder's length rule)."""
    from transformers.models.qwen3_omni_moe.modeling_qwen3_omni_moe import _get_feat_extract_output_lengths

    return _get_feat_extract_output_lengths(torch.as_tensor(n_frames), n_window)


def audio_features(clips: Sequence[Any], feature_extractor: Any = None) -> dict[str, torch.Tensor]:
    """``input_features [clip mel frame]`` and ``feature_attention_mask [clip frame]`` for ``clips``.

    Each clip is a 1-D waveform (needs ``feature_extractor``, e.g. ``transformers.WhisperFeatureExtractor``)
    or precomputed features ``[mel frame]``; the two kinds may not be mixed.
    """
    if not len(clips):
        raise ValueError("no audio clips given")
    dims = {np.ndim(c) for c in clips}
    if dims == {1}:
        if feature_extractor is None:
            raise ValueError("waveform clips need a feature_extractor (e.g. WhisperFeatureExtractor)")
        waves = [np.asarray(c, dtype=np.float32) for c in clips]
        out = feature_extractor(waves, sampling_rate=feature_extractor.sampling_rate, return_attention_mask=True,
                                padding="longest", truncation=False, return_tensors="pt")
        return {"input_features": out["input_features"], "feature_attention_mask": out["attention_mask"]}
    if dims == {2}:
        feats = [torch.as_tensor(c, dtype=torch.float32) for c in clips]
        mels = {f.shape[0] for f in feats}
        if len(mels) != 1:
            raise ValueError(f"precomputed features must share the mel axis [mel frame]; got mel sizes {sorted(mels)}")
        longest = max(f.shape[1] for f in feats)
        padded = torch.zeros(len(feats), mels.pop(), longest)
        mask = torch.zeros(len(feats), longest, dtype=torch.long)
        for i, f in enumerate(feats):
            padded[i, :, : f.shape[1]] = f
            mask[i, : f.shape[1]] = 1
        return {"input_features": padded, "feature_attention_mask": mask}
    raise ValueError(f"audio clips must all be 1-D waveforms or all 2-D features [mel frame]; got ndims {sorted(dims)}")


def clip_tokens(inputs: dict[str, torch.Tensor], n_window: int = 50) -> list[int]:
    """Thinker tokens per clip (also the clip's frames in the packed ``audio.hook_out``)."""
    return feat_extract_output_lengths(inputs["feature_attention_mask"].sum(-1), n_window).tolist()

