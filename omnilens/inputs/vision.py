"""Images plus text -> Qwen2-VL forward kwargs, with each image's token span in the language-model sequence.

Images (numpy ``[H W C]`` arrays or PIL images) go through ``Qwen2VLImageProcessorPil`` (pillow only; a
full ``Qwen2VLProcessor``'s ``image_processor`` works too where torchvision is installed). The text
marks each image with ``<image>``; each marker becomes ``<|vision_start|>``, one ``<|image_pad|>`` per
merged token (``grid.prod() // merge_size**2``), ``<|vision_end|>``. Without markers the images come
first, in order.

``VisionInputs.image_spans[i]`` is image ``i``'s token positions: pass it as ``pos=`` to
``Lens.run_with_cache`` to read or patch "the image tokens" of a language site.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from omnilens.core.packed import Segments

IMAGE_MARKER = "<image>"


def image_processor_for(config: Any, *, min_pixels: int | None = None, max_pixels: int = 28 * 28 * 1280):
    """A ``Qwen2VLImageProcessorPil`` matching ``config.vision_config`` (patch, temporal patch, merge sizes).

    ``min_pixels`` defaults to one merged token's area, so small images are not upscaled.
    """
    from transformers import Qwen2VLImageProcessorPil

    vc = config.vision_config
    factor = vc.patch_size * vc.spatial_merge_size
    return Qwen2VLImageProcessorPil(
        patch_size=vc.patch_size, temporal_patch_size=vc.temporal_patch_size, merge_size=vc.spatial_merge_size,
        min_pixels=min_pixels if min_pixels is not None else factor * factor, max_pixels=max_pixels,
    )


def pixel_inputs(images: Sequence[Any], image_processor: Any) -> dict[str, torch.Tensor]:
    """``pixel_values [patch C*T*P*P]`` and ``image_grid_thw [image 3]`` for ``images``."""
    if not len(images):
        raise ValueError("no images given")
    out = image_processor(images=list(images), return_tensors="pt")
    return {"pixel_values": out["pixel_values"], "image_grid_thw": out["image_grid_thw"]}


class ForwardKwargs(Mapping[str, torch.Tensor]):
    """A read-only mapping over ``self.inputs`` (the forward kwargs), so a builder's result can be passed
    wherever a dict of kwargs is; subclasses hold ``inputs: dict[str, Tensor]`` plus their own metadata."""

    inputs: dict[str, torch.Tensor]

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.inputs[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self.inputs)

    def __len__(self) -> int:
        return len(self.inputs)


@dataclass
class VisionInputs(ForwardKwargs):
    """Forward kwargs for one sequence with images; usable wherever a dict of kwargs is (``lens.run_with_cache(vi)``).

    Attributes:
        inputs: ``input_ids``, ``attention_mask``, ``mm_token_type_ids`` ``[1 pos]``, ``pixel_values``
            ``[patch C*T*P*P]``, ``image_grid_thw`` ``[image 3]``.
        image_spans: per image, the positions of its image tokens in the sequence (``slice`` along ``pos``).
        segments: per image, its rows along the vision tower's packed ``patch`` / ``merged`` axes.
    """

    inputs: dict[str, torch.Tensor]
    image_spans: list[slice]
    segments: Segments


def vision_inputs(
    tokenizer: Any, images: Sequence[Any], text: str = "", *, config: Any = None, image_processor: Any = None,
) -> VisionInputs:
    """Build Qwen2-VL inputs for ``images`` and ``text`` (one sequence; see the module docstring).

    Args:
        tokenizer: tokenizes the text between images; must know the vision special tokens.
        images: numpy ``[H W C]`` uint8 arrays or PIL images.
        text: the prompt, with one ``<image>`` marker per image (or none: images first).
        config: the model config (``Qwen2VLConfig``): token ids and patch sizes.
        image_processor: defaults to :func:`image_processor_for` ``(config)``.
    """
    if config is None:
        raise ValueError("vision_inputs needs the model config (config=model.config)")
    processor = image_processor if image_processor is not None else image_processor_for(config)
    pix = pixel_inputs(images, processor)
    segments = Segments.from_grid(pix["image_grid_thw"], config.vision_config.spatial_merge_size)
    n_markers = text.count(IMAGE_MARKER)
    if n_markers == 0:
        text = IMAGE_MARKER * len(images) + text
    elif n_markers != len(images):
        raise ValueError(f"text has {n_markers} {IMAGE_MARKER} markers for {len(images)} images")
    chunks = text.split(IMAGE_MARKER)
    ids: list[int] = []
    spans: list[slice] = []
    for i, chunk in enumerate(chunks):
        ids += _encode(tokenizer, chunk)
        if i < len(images):
            ids.append(config.vision_start_token_id)
            start = len(ids)
            ids += [config.image_token_id] * segments.n_merged[i]
            spans.append(slice(start, len(ids)))
            ids.append(config.vision_end_token_id)
    input_ids = torch.tensor([ids], dtype=torch.long)
    types = (input_ids == config.image_token_id).to(torch.int32)
    inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "mm_token_type_ids": types, **pix}
    return VisionInputs(inputs, spans, segments)


def _encode(tokenizer: Any, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]) if text.strip() else []
