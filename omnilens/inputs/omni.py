"""Text + audio + images -> Qwen3-Omni Thinker inputs in the chat layout, with each clip's and image's token span.

One conversation per batch row; its user turn is a list of parts in Hugging Face chat-content form:
a string (text), ``{"type": "text", "text": ...}``, ``{"type": "audio", "audio": clip}`` (1-D waveform or
precomputed ``[mel frame]`` features, see :mod:`omnilens.inputs.audio`) or ``{"type": "image", "image": img}``
(PIL image or ``[H W C]`` uint8 array, see :mod:`omnilens.inputs.vision`). The layout is::

    [<|im_start|> system\\n {system} <|im_end|> \\n]
    <|im_start|> user\\n {parts} <|im_end|> \\n <|im_start|> assistant\\n

with each clip as ``<|audio_start|> <|audio_pad|>*n <|audio_end|>`` and each image as
``<|vision_start|> <|image_pad|>*n <|vision_end|>``. Token ids come from the config where it names them
(``audio_token_id``, ``image_token_id``, ``audio_start_token_id``, ``vision_start_token_id``,
``im_start_token_id``...) and from the tokenizer otherwise. Rows are left-padded (as the Omni processor does).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from omnilens.inputs.audio import audio_features, clip_tokens
from omnilens.inputs.vision import ForwardKwargs, image_processor_for, pixel_inputs
from omnilens.core.packed import Segments, spans_of

Part = str | Mapping[str, Any]


@dataclass
class OmniInputs(ForwardKwargs):
    """Forward kwargs for a batch of Omni conversations; usable wherever a dict of kwargs is.

    Attributes:
        inputs: ``input_ids``, ``attention_mask`` ``[batch pos]``; with audio ``input_features``
            ``[clip mel frame]`` and ``feature_attention_mask`` ``[clip frame]``; with images
            ``pixel_values`` ``[patch C*T*P*P]`` and ``image_grid_thw`` ``[image 3]``.
        spans: per batch row, ``{"audio": [slice, ...], "image": [slice, ...]}``: the positions of each
            clip's / image's placeholder tokens along ``pos`` (padding included).
        audio_segments: per clip (in packing order), its rows along ``audio.*``'s packed ``frame`` axis.
        vision: per image, its rows along the vision tower's ``patch`` / ``merged`` axes (``None`` without images).
    """

    inputs: dict[str, torch.Tensor]
    spans: list[dict[str, list[slice]]]
    audio_segments: list[slice] = field(default_factory=list)
    vision: Segments | None = None


def omni_inputs(
    tokenizer: Any, config: Any, conversations: Sequence[Part] | Sequence[Sequence[Part]], *,
    system: str | None = None, feature_extractor: Any = None, image_processor: Any = None,
) -> OmniInputs:
    """Build Thinker inputs for one conversation (a list of parts) or a batch (a list of such lists).

    Args:
        tokenizer: tokenizes text; must know the Qwen special tokens.
        config: ``Qwen3OmniMoeConfig`` or ``Qwen3OmniMoeThinkerConfig``.
        conversations: the user turn's parts (see the module docstring), or one list per batch row.
        system: optional system prompt.
        feature_extractor: turns waveforms into log-mel features (not needed for precomputed features).
        image_processor: defaults to :func:`omnilens.inputs.vision.image_processor_for` ``(thinker config)``.
    """
    thinker = getattr(config, "thinker_config", config)
    batch = [conversations] if _is_part_list(conversations) else list(conversations)
    tok = _SpecialTokens(tokenizer, config, thinker)
    clips = [p["audio"] for conv in batch for p in _parts(conv) if p["type"] == "audio"]
    images = [p["image"] for conv in batch for p in _parts(conv) if p["type"] == "image"]
    extra: dict[str, torch.Tensor] = {}
    n_audio: list[int] = []
    if clips:
        extra.update(audio_features(clips, feature_extractor))
        n_audio = clip_tokens(extra, thinker.audio_config.n_window)
    vision = None
    if images:
        processor = image_processor if image_processor is not None else image_processor_for(thinker)
        extra.update(pixel_inputs(images, processor))
        vision = Segments.from_grid(extra["image_grid_thw"], thinker.vision_config.spatial_merge_size)
    rows, spans = [], []
    audio_iter, image_iter = iter(n_audio), iter(vision.n_merged if vision else [])
    for conv in batch:
        ids = tok.turn("system", system) if system is not None else []
        ids += [tok.im_start, *_encode(tokenizer, "user\n")]
        row_spans: dict[str, list[slice]] = {"audio": [], "image": []}
        for part in _parts(conv):
            if part["type"] == "text":
                ids += _encode(tokenizer, part["text"])
                continue
            kind = part["type"]
            start_id, pad_id, end_id, n = (
                (tok.audio_start, thinker.audio_token_id, tok.audio_end, next(audio_iter)) if kind == "audio" else
                (tok.vision_start, thinker.image_token_id, tok.vision_end, next(image_iter)))
            ids.append(start_id)
            row_spans[kind].append(slice(len(ids), len(ids) + n))
            ids += [pad_id] * n + [end_id]
        ids += [tok.im_end, *_encode(tokenizer, "\n"), tok.im_start, *_encode(tokenizer, "assistant\n")]
        rows.append(ids)
        spans.append(row_spans)
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        shift = width - len(r)
        input_ids[i, shift:] = torch.tensor(r)
        attention_mask[i, shift:] = 1
        spans[i] = {k: [slice(s.start + shift, s.stop + shift) for s in v] for k, v in spans[i].items()}
    audio_segments = [slice(a, b) for a, b in spans_of(n_audio)]
    inputs = {"input_ids": input_ids, "attention_mask": attention_mask, **extra}
    return OmniInputs(inputs, spans, audio_segments, vision)


class _SpecialTokens:
    """Special token ids: from the config where it names them, else from the tokenizer."""

    def __init__(self, tokenizer: Any, config: Any, thinker: Any):
        def pick(attr: str, token: str) -> int:
            for cfg in (thinker, config):
                value = getattr(cfg, attr, None)
                if value is not None:
                    return int(value)
            tid = tokenizer.convert_tokens_to_ids(token)
            if tid is None or tid == tokenizer.unk_token_id:
                raise ValueError(f"the tokenizer has no {token!r} and the config no {attr}")
            return int(tid)

        self.tokenizer = tokenizer
        self.im_start = pick("im_start_token_id", "<|im_start|>")
        self.im_end = pick("im_end_token_id", "<|im_end|>")
        self.audio_start = pick("audio_start_token_id", "<|audio_start|>")
        self.audio_end = pick("audio_end_token_id", "<|audio_end|>")
        self.vision_start = pick("vision_start_token_id", "<|vision_start|>")
        self.vision_end = pick("vision_end_token_id", "<|vision_end|>")

    def turn(self, role: str, text: str) -> list[int]:
        return [self.im_start, *_encode(self.tokenizer, f"{role}\n{text}"), self.im_end,
                *_encode(self.tokenizer, "\n")]


def _is_part_list(conversations: Sequence[Any]) -> bool:
    return not conversations or isinstance(conversations[0], str | Mapping)


def _parts(conv: Sequence[Part]) -> list[dict[str, Any]]:
    out = []
    for p in conv:
        part = {"type": "text", "text": p} if isinstance(p, str) else dict(p)
        if part.get("type") not in ("text", "audio", "image"):
            raise ValueError(f"unknown content part {p!r}: expected a string or a dict with type text/audio/image")
        out.append(part)
    return out


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text else []
