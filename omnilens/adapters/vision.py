"""The packed vision-tower mapping, shared by the Qwen2-VL and Qwen3-Omni adapters.

Stable API (other adapters build on it; extend, do not change):

``VisionTowerLayout(root, n_layers, d_model, n_heads, ...)``
    Hugging Face module names of one packed ViT tower relative to ``root`` (the tower module, e.g.
    ``"model.visual"`` or ``"thinker.model.visual"``) and its sizes. Defaults match Qwen2-VL
    (``norm1/norm2``, fused ``attn.qkv`` + ``attn.proj``, ``mlp.fc1/fc2``, ``patch_embed``, ``merger``);
    Qwen3-Omni sets ``mlp_gate="linear_fc1", mlp_down="linear_fc2"``.
``vision_specs(layout) -> list[HookSpec]``
    Every site of the tower in forward order: ``{tower}.hook_patch_embed``, the block grammar of
    DESIGN.md for each ``{tower}.blocks.{i}`` and ``{tower}.hook_merger``. Towers with more sites (Omni
    deepstack mergers) insert their own specs into this list.
``FusedQKV(index, n_heads, d_head)``
    View splitting the fused ``qkv`` output ``[patch 3*d_model]`` into per-head q (0), k (1) or
    v (2) ``[patch head d_head]``, and writing one of them back.
``SegmentHeads()``
    View of one image's rotated queries/keys inside attention: ``[1 head n d_head]`` <-> ``[n head d_head]``.
``check_media(inputs, pixel_key=, grid_key=, token_id=, merge_size=, patch_dim=, site=)``
    Validation for ``Adapter.prepare_inputs``: grid present, pixel rows match it, one run of
    placeholder tokens per image of the right length; raises ``HookError`` naming ``site``.
``check_vision_media(inputs, config)``
    ``check_media`` for both images and videos of a config with ``vision_config``,
    ``image_token_id`` and ``video_token_id``, naming ``vision.hook_patch_embed``.
``image_segments(inputs, merge_size)``
    The images' :class:`~omnilens.core.packed.Segments` of a run (``None`` without images), for
    ``Adapter.segments`` / ``Adapter.run_meta``.

Axes: ``patch`` is the packed patch axis (all images concatenated, no batch axis); ``merged`` the
merger's output axis (language-model image tokens). Hugging Face's non-flash vision attention calls
the attention function once per image (``cu_seqlens``), so the attention-internal sites
``attn.hook_rot_q``, ``attn.hook_rot_k`` (``[patch head d_head]``, that image's patches) and
``attn.hook_pattern`` (``[segment head query key]`` with ``segment`` of size 1) are visited once per
image, in image order: ``cache.steps(name)[i]`` is image ``i`` and patches of different images never
meet in one pattern. They use the shared attention points (:mod:`omnilens.core.hookpoints`), which run
Hugging Face's eager attention. :func:`omnilens.core.packed.per_image` splits any vision site per image.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from omnilens.adapters.decoder import ATTENTION_POINTS, DecoderLayout, decoder_specs
from omnilens.core.errors import HookError
from omnilens.core.graph import HookSpec
from omnilens.core.packed import Segments
from omnilens.core.views import View


@dataclass(frozen=True, repr=False)
class FusedQKV(View):
    """``[patch 3*n_heads*d_head]`` (fused qkv output) <-> ``[patch head d_head]`` for q (0), k (1) or v (2)."""

    index: int
    n_heads: int
    d_head: int

    def view(self, raw, ctx=None):
        return raw.view(raw.shape[0], 3, self.n_heads, self.d_head)[:, self.index]

    def unview(self, new, raw, ctx=None):
        out = raw.clone()
        out.view(raw.shape[0], 3, self.n_heads, self.d_head)[:, self.index] = new
        return out

    def __repr__(self) -> str:
        return f"{'qkv'[self.index]} of fused qkv, split into {self.n_heads} heads x {self.d_head}"


@dataclass(frozen=True, repr=False)
class SegmentHeads(View):
    """One image's attention-internal layout ``[1 head n d_head]`` <-> ``[n head d_head]``."""

    def view(self, raw, ctx=None):
        return raw[0].transpose(0, 1)

    def unview(self, new, raw, ctx=None):
        return new.transpose(0, 1).unsqueeze(0)

    def __repr__(self) -> str:
        return "one image: (1 head patch d) -> (patch head d)"


@dataclass(frozen=True)
class VisionTowerLayout:
    """Module names (relative to ``root``) and sizes of a packed vision tower; see the module docstring."""

    root: str
    n_layers: int
    d_model: int
    n_heads: int
    tower: str = "vision"
    patch_embed: str | None = "patch_embed"
    blocks: str = "blocks"
    merger: str | None = "merger"
    attn: str = "attn"
    qkv: str = "qkv"
    proj: str = "proj"
    ln1: str = "norm1"
    ln2: str = "norm2"
    mlp: str = "mlp"
    mlp_gate: str | None = "fc1"
    mlp_up: str | None = None
    mlp_down: str = "fc2"

    @property
    def d_head(self) -> int:
        """Per-head width ``d_model // n_heads``."""
        return self.d_model // self.n_heads

    def path(self, rel: str) -> str:
        """Dotted module path of ``rel`` (relative to the tower) from the model root."""
        return f"{self.root}.{rel}"


def _site(lay: VisionTowerLayout, layer: int | None, component: str, site: str, axes: str, module: str,
          **kw) -> HookSpec:
    if layer is None:
        name = f"{lay.tower}.{site}"
    else:
        name = f"{lay.tower}.blocks.{layer}.{component}.{site}"
    return HookSpec(name=name, tower=lay.tower, layer=layer, component=component, site=site, axes=axes,
                    module=module, **kw)


def _attn_extra(lay: VisionTowerLayout) -> tuple[HookSpec, ...]:
    """Per-head q/k/v out of the fused qkv, then the per-image rotated q/k (attention points)."""
    out = []
    for i in range(lay.n_layers):
        att = lay.path(f"{lay.blocks}.{i}.{lay.attn}")
        for idx, what in enumerate("qkv"):
            out.append(_site(lay, i, "attn", f"hook_{what}", "patch head d_head", f"{att}.{lay.qkv}",
                             view=FusedQKV(idx, lay.n_heads, lay.d_head),
                             doc=f"{'queries keys values'.split()[idx]} (fused qkv output, split per head)"))
        for what in ("q", "k"):
            out.append(_site(lay, i, "attn", f"hook_rot_{what}", "patch head d_head", f"{att}.hook_rot_{what}",
                             view=SegmentHeads(), requires=ATTENTION_POINTS,
                             doc=f"{'queries' if what == 'q' else 'keys'} after the 2-D vision rotary "
                                 "embedding; one visit per image"))
    return tuple(out)


def vision_specs(lay: VisionTowerLayout) -> list[HookSpec]:
    """Hook specs of a packed vision tower in forward order (see the module docstring)."""
    dec = DecoderLayout(
        tower=lay.tower, layers=lay.path(lay.blocks), n_layers=lay.n_layers, d_model=lay.d_model,
        n_heads=lay.n_heads, n_kv_heads=lay.n_heads, d_head=lay.d_head, mlp_kinds=["dense"] * lay.n_layers,
        seq_axes="patch", attn=lay.attn, q=None, k=None, v=None, o=lay.proj, ln1=lay.ln1, ln2=lay.ln2,
        mlp=lay.mlp, mlp_gate=lay.mlp_gate, mlp_up=lay.mlp_up, mlp_down=lay.mlp_down,
        attn_output_is_tuple=False, rotary=False, extra_attn_sites=_attn_extra(lay),
    )
    specs = [_vision_doc(lay, s) for s in decoder_specs(dec)]
    if lay.patch_embed:
        specs.insert(0, _site(lay, None, "embed", "hook_patch_embed", "patch d_model", lay.path(lay.patch_embed),
                              doc="patch embeddings (packed: all images' patches, block-major order)"))
    if lay.merger:
        specs.append(_site(lay, None, "merger", "hook_merger", "merged d_model", lay.path(lay.merger),
                           doc="merged patch tokens handed to the language model (one per image token)"))
    return specs


def _vision_doc(lay: VisionTowerLayout, spec: HookSpec) -> HookSpec:
    """Vision-specific docs for sites whose decoder wording does not fit."""
    if spec.site == "hook_pattern":
        return replace(spec, doc="softmax pattern of one image (eager attention); one visit per image")
    if spec.site == "hook_pre" and lay.mlp_up is None:
        return replace(spec, doc=f"MLP pre-activation ({lay.mlp_gate} output)")
    if spec.site == "hook_post":
        return replace(spec, doc=f"MLP hidden activation ({lay.mlp_down} input)")
    return spec


def check_media(
    inputs: dict, *, pixel_key: str, grid_key: str, token_id: int, merge_size: int, patch_dim: int, site: str,
) -> None:
    """Check one medium's packed inputs (``pixel_values`` + ``image_grid_thw``, or the video pair) before a run.

    Raises :class:`~omnilens.core.errors.HookError` naming ``site`` when the grid is missing, the pixel rows
    or patch size disagree with it, or the text's runs of ``token_id`` do not match each image's
    merged-token count. Media without pixels and without placeholder tokens pass.
    """
    pixels, grid, ids = inputs.get(pixel_key), inputs.get(grid_key), inputs.get("input_ids")
    n_tokens = int((ids == token_id).sum()) if ids is not None else None
    if pixels is None:
        if n_tokens:
            raise HookError(site, f"{pixel_key} for the {n_tokens} placeholder tokens (id {token_id}) in input_ids",
                            f"no {pixel_key}")
        return
    if grid is None:
        raise HookError(site, f"{grid_key} [image 3] (t, h, w patch grid per image) alongside {pixel_key}",
                        f"no {grid_key}", "Build inputs with omnilens.inputs.vision_inputs or the processor.")
    grid = torch.as_tensor(grid)
    if grid.dim() != 2 or grid.shape[1] != 3:
        raise HookError(site, f"{grid_key} of shape (n_images, 3)", f"shape {tuple(grid.shape)}")
    n_patches = int(grid.prod(-1).sum())
    if pixels.dim() != 2 or tuple(pixels.shape) != (n_patches, patch_dim):
        raise HookError(site, f"{pixel_key} of shape ({n_patches}, {patch_dim}) for grids {grid.tolist()}",
                        f"shape {tuple(pixels.shape)}")
    per_image = (grid.prod(-1) // merge_size**2).tolist()
    if ids is None:
        return
    runs = _runs(ids == token_id)
    if runs != per_image:
        raise HookError(site, f"{len(per_image)} runs of placeholder tokens (id {token_id}) of lengths {per_image} "
                        f"({sum(per_image)} tokens) in input_ids",
                        f"{len(runs)} runs of lengths {runs} ({n_tokens} tokens)",
                        "Each image needs grid.prod() // merge_size**2 placeholder tokens between its "
                        "vision start/end tokens.")


def check_vision_media(inputs: dict, config) -> None:
    """:func:`check_media` for images (``pixel_values``) and videos (``pixel_values_videos``) of a model
    whose ``config`` has ``vision_config``, ``image_token_id`` and ``video_token_id``."""
    vc = config.vision_config
    patch_dim = vc.in_channels * vc.temporal_patch_size * vc.patch_size**2
    for pixel_key, grid_key, token_id in (("pixel_values", "image_grid_thw", config.image_token_id),
                                          ("pixel_values_videos", "video_grid_thw", config.video_token_id)):
        check_media(inputs, pixel_key=pixel_key, grid_key=grid_key, token_id=token_id,
                    merge_size=vc.spatial_merge_size, patch_dim=patch_dim, site="vision.hook_patch_embed")


def image_segments(inputs: dict, merge_size: int) -> Segments | None:
    """The images' :class:`~omnilens.core.packed.Segments` of a run's inputs (``None`` without ``pixel_values`` and
    ``image_grid_thw`` ``[image 3]``)."""
    grid = inputs.get("image_grid_thw")
    if grid is None or inputs.get("pixel_values") is None:
        return None
    return Segments.from_grid(grid, merge_size)


def _runs(mask: torch.Tensor) -> list[int]:
    """Lengths of the runs of True in each row of ``mask`` ``[batch pos]``, row after row."""
    out = []
    for row in mask.reshape(-1, mask.shape[-1]).tolist():
        n = 0
        for flag in row + [False]:
            if flag:
                n += 1
            elif n:
                out.append(n)
                n = 0
    return out
