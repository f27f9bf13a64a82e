"""Qwen2-VL (``Qwen2VLForConditionalGeneration``): the language model as the root, the vision tower as ``vision.*``.

Forward order: ``hook_embed`` (token embeddings, before image features are scattered in), the packed
vision tower (``vision.hook_patch_embed``, ``vision.blocks.{i}.*``, ``vision.hook_merger``), then the
language blocks. Image features enter the residual stream at ``blocks.0.hook_resid_pre``. The language
model is Qwen2 attention (q/k/v biases, no q/k norm, GQA) with mRoPE: ``attn.hook_rot_q|hook_rot_k``
are taken after mRoPE.
"""

from __future__ import annotations

from typing import Any

import torch

from omnilens.adapters.base import Adapter
from omnilens.adapters.decoder import DecoderLayout, decoder_specs
from omnilens.adapters.vision import VisionTowerLayout, check_vision_media, image_segments, vision_specs
from omnilens.core.graph import HookGraph
from omnilens.core.packed import Segments

NOTES = (
    "vision.* is packed: [patch d_model] over all images (no batch axis); cache.meta['segments'] holds each "
    "image's span along 'patch' and 'merged', cache.meta['vision'] the grids; omnilens.core.packed.per_image splits "
    "a cached site per image and omnilens.core.packed.to_grid reshapes one image to its (t, h, w) patch grid.",
    "vision.blocks.{i}.attn.hook_rot_q|hook_rot_k|hook_pattern are visited once per image (HF eager vision "
    "attention runs each image separately); Write.steps picks images. The nnsight executor serves one visit "
    "per site in a forward, so read them per image with the local executor when several images are packed.",
    "hook_embed is the token embedding before image features are inserted; blocks.0.hook_resid_pre has them.",
    "Qwen2-VL has no CLS token: pool image vectors with omnilens.core.packed.pool ('mean', 'merged_mean', a patch).",
)


def qwen2_vl_text_layout(config) -> DecoderLayout:
    """The root decoder: ``model.language_model`` (Qwen2 attention with biases, mRoPE) and ``lm_head``."""
    tc = config.text_config
    n = tc.num_hidden_layers
    return DecoderLayout(
        tower="", layers="model.language_model.layers", n_layers=n, d_model=tc.hidden_size,
        n_heads=tc.num_attention_heads, n_kv_heads=tc.num_key_value_heads,
        d_head=tc.hidden_size // tc.num_attention_heads, mlp_kinds=["dense"] * n,
        embed="model.language_model.embed_tokens", final_norm="model.language_model.norm", unembed="lm_head",
    )


def qwen2_vl_vision_layout(config) -> VisionTowerLayout:
    """The packed vision tower at ``model.visual``."""
    vc = config.vision_config
    return VisionTowerLayout(root="model.visual", n_layers=vc.depth, d_model=vc.embed_dim, n_heads=vc.num_heads)


class Qwen2VLAdapter(Adapter):
    """``Qwen2VLForConditionalGeneration``: root language decoder ``blocks.*`` plus packed ``vision.*``."""

    architectures = ("Qwen2VLForConditionalGeneration",)

    def build_graph(self) -> HookGraph:
        cfg = self.model.config
        text = decoder_specs(qwen2_vl_text_layout(cfg))
        embed = [s for s in text if s.component == "embed"]
        rest = [s for s in text if s.component != "embed"]
        specs = embed + vision_specs(qwen2_vl_vision_layout(cfg)) + rest
        return HookGraph(specs, model_name=type(self.model).__name__, notes=NOTES)

    @property
    def merge_size(self) -> int:
        """Spatial merge size ``m`` of the vision tower (``m x m`` patches make one language-model token)."""
        return self.model.config.vision_config.spatial_merge_size

    def prepare_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Check images/videos against their grids and placeholder tokens; fill ``mm_token_type_ids``.

        Raises :class:`~omnilens.core.errors.HookError` (naming ``vision.hook_patch_embed``) before any
        forward when ``image_grid_thw`` is missing or the image-token count does not match.
        """
        cfg = self.model.config
        check_vision_media(inputs, cfg)
        ids = inputs.get("input_ids")
        has_media = inputs.get("pixel_values") is not None or inputs.get("pixel_values_videos") is not None
        if ids is not None and has_media and inputs.get("mm_token_type_ids") is None:
            types = torch.zeros_like(ids, dtype=torch.int32)
            types[ids == cfg.image_token_id] = 1
            types[ids == cfg.video_token_id] = 2
            inputs = {**inputs, "mm_token_type_ids": types}
        return inputs

    def image_segments(self, inputs: dict[str, Any]) -> Segments | None:
        """The images' :class:`~omnilens.core.packed.Segments` of a run (``None`` without images)."""
        return image_segments(inputs, self.merge_size)

    def encode_images(self, pixel_values: torch.Tensor, image_grid_thw: torch.Tensor) -> torch.Tensor:
        """Run only the vision tower; returns the merged tokens ``[merged d_model]`` (all images packed)."""
        self.prepare_inputs({"pixel_values": pixel_values, "image_grid_thw": image_grid_thw})
        visual = self.module("model.visual")
        out = visual(pixel_values.type(visual.dtype), grid_thw=image_grid_thw)
        return out.pooler_output
