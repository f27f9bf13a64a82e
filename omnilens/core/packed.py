"""Segments of packed encoder activations: split per image, reshape to the patch grid, pool.

Packed vision towers (Qwen2-VL, Qwen3-Omni) have no batch axis: every image's patches are concatenated
into one ``[patch d_model]`` tensor, in the order the image processor emits them, and the merger turns
each block of ``merge_size**2`` consecutive patches into one language-model token (``[merged d_model]``).
A :class:`Segments` records where each image lies in both sequences. ``Lens.run_with_cache`` stores
``Adapter.run_meta(inputs)`` in ``cache.meta``: ``"segments"`` (``[start, end)`` per image along each
packed axis, any adapter) and, for a run with images, ``"vision"`` (:meth:`Segments.to_meta`: grids and
offsets), so a cached run can be split per image (:func:`per_image`) and reshaped (:func:`to_grid`).

Patch order inside one image is *block-major*: ``(t, h/m, w/m, m, m)`` with ``m = merge_size``, so
that each merged token's ``m x m`` patches are consecutive. :func:`to_grid` undoes it.

Poolings for an image-level vector (Qwen2-VL has no CLS token, so "CLS embedding" workflows must pick
one of these): ``"mean"`` (mean over the image's patches, or over its merged tokens for a
``merged`` site), ``"merged_mean"`` (mean over merged tokens: the ``m x m`` patch blocks are averaged
first, which equals ``"mean"`` up to rounding), and ``("patch", (t, h, w))`` (one patch of the grid).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float

from omnilens.core.errors import HookError
from omnilens.core.types import HookFn

Pooling = str | tuple[str, tuple[int, int, int]]


@dataclass(frozen=True)
class Segments:
    """Where each image (or clip) of a packed tower run lies.

    Attributes:
        grid_thw: ``(t, h, w)`` patch grid per image.
        merge_size: spatial merge size ``m`` (``m x m`` patches make one merged token).
    """

    grid_thw: tuple[tuple[int, int, int], ...]
    merge_size: int

    @classmethod
    def from_grid(cls, grid_thw: torch.Tensor | Sequence[Sequence[int]], merge_size: int) -> Segments:
        """Segments from ``image_grid_thw`` ``[image 3]``."""
        rows = grid_thw.tolist() if isinstance(grid_thw, torch.Tensor) else grid_thw
        return cls(tuple((int(t), int(h), int(w)) for t, h, w in rows), int(merge_size))

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> Segments:
        """Inverse of :meth:`to_meta`."""
        return cls.from_grid(meta["grid_thw"], meta["merge_size"])

    def to_meta(self) -> dict[str, Any]:
        """Plain data for ``ActivationCache.meta``: grid, merge size and both offset lists."""
        return {"grid_thw": [list(g) for g in self.grid_thw], "merge_size": self.merge_size,
                "patch_offsets": self.patch_offsets, "merged_offsets": self.merged_offsets}

    def __len__(self) -> int:
        return len(self.grid_thw)

    @property
    def n_patches(self) -> list[int]:
        """Rows per image along the packed ``patch`` axis (``t * h * w``)."""
        return [t * h * w for t, h, w in self.grid_thw]

    @property
    def n_merged(self) -> list[int]:
        """Rows per image along the packed ``merged`` axis (its language-model image tokens)."""
        return [n // self.merge_size**2 for n in self.n_patches]

    @property
    def patch_offsets(self) -> list[int]:
        """``[0, n_0, n_0 + n_1, ...]`` along the packed ``patch`` axis (``cu_seqlens``)."""
        return _cumsum(self.n_patches)

    @property
    def merged_offsets(self) -> list[int]:
        """Offsets along the packed ``merged`` axis (language-model image tokens)."""
        return _cumsum(self.n_merged)

    def spans(self, axis: str = "patch") -> list[tuple[int, int]]:
        """``[start, end)`` per image along a packed ``patch`` or ``merged`` axis (``Adapter.segments``)."""
        return _pairs(self._offsets(axis))

    def span(self, image: int, axis: str = "patch") -> slice:
        """Rows of image ``image`` along a packed ``patch`` or ``merged`` axis."""
        offsets = self._offsets(axis)
        if not -len(self) <= image < len(self):
            raise IndexError(f"image {image} out of range for {len(self)} images")
        image %= len(self)
        return slice(offsets[image], offsets[image + 1])

    def _offsets(self, axis: str) -> list[int]:
        if axis == "patch":
            return self.patch_offsets
        if axis == "merged":
            return self.merged_offsets
        raise ValueError(f"packed axis must be 'patch' or 'merged', got {axis!r}")


def _cumsum(sizes: Sequence[int]) -> list[int]:
    out = [0]
    for n in sizes:
        out.append(out[-1] + int(n))
    return out


def _pairs(offsets: list[int]) -> list[tuple[int, int]]:
    return list(zip(offsets[:-1], offsets[1:]))


def spans_of(sizes: Sequence[int]) -> list[tuple[int, int]]:
    """``[start, end)`` of consecutive runs of ``sizes`` rows along a packed axis (clips, images)."""
    return _pairs(_cumsum(sizes))


def split(x: Float[torch.Tensor, "packed *rest"], spans: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
    """Split a packed tensor along its leading axis into one tensor per ``[start, end)`` span."""
    end = spans[-1][1] if spans else 0
    if x.shape[0] != end:
        raise ValueError(f"packed tensor has {x.shape[0]} rows along its leading axis, but the spans "
                         f"{list(spans)} cover {end}")
    return [x[a:b] for a, b in spans]


def to_grid(
    x: Float[torch.Tensor, "n *rest"], thw: Sequence[int], merge_size: int, *, merged: bool = False,
) -> Float[torch.Tensor, "t h w *rest"]:
    """One image's packed rows ``[n ...]`` as its grid ``[t h w ...]`` (raster order).

    Patch rows (``merged=False``) come block-major ``(t, h/m, w/m, m, m)``; merged rows are already in
    raster order over the ``(t, h/m, w/m)`` grid.
    """
    t, h, w = (int(v) for v in thw)
    m = merge_size
    rest = x.shape[1:]
    if merged:
        if x.shape[0] != t * (h // m) * (w // m):
            raise ValueError(f"expected {t * (h // m) * (w // m)} merged rows for grid {(t, h, w)}, got {x.shape[0]}")
        return x.reshape(t, h // m, w // m, *rest)
    if x.shape[0] != t * h * w:
        raise ValueError(f"expected {t * h * w} patch rows for grid {(t, h, w)}, got {x.shape[0]}")
    blocks = x.reshape(t, h // m, w // m, m, m, *rest)
    return blocks.transpose(2, 3).reshape(t, h, w, *rest)


def pool(
    x: Float[torch.Tensor, "n d"], thw: Sequence[int], merge_size: int, how: Pooling = "mean", *, merged: bool = False,
) -> Float[torch.Tensor, " d"]:
    """An image-level vector from one image's rows ``[n d]`` (see the module docstring for ``how``)."""
    if how == "mean":
        return x.mean(0)
    if how == "merged_mean":
        if merged:
            return x.mean(0)
        return x.reshape(-1, merge_size**2, *x.shape[1:]).mean(1).mean(0)
    if isinstance(how, tuple) and len(how) == 2 and how[0] == "patch":
        ti, hi, wi = how[1]
        grid = to_grid(x, thw, merge_size, merged=merged)
        return grid[ti, hi, wi]
    raise ValueError(f"unknown pooling {how!r}; expected 'mean', 'merged_mean' or ('patch', (t, h, w))")


def pad_segments(parts: Sequence[torch.Tensor], value: float = 0.0) -> Float[torch.Tensor, "segment head query key"]:
    """Stack per-image patterns ``[1 head q_i k_i]`` into ``[segment head query key]``, padded with ``value``."""
    q = max(p.shape[-2] for p in parts)
    k = max(p.shape[-1] for p in parts)
    out = parts[0].new_full((len(parts), parts[0].shape[1], q, k), value)
    for i, p in enumerate(parts):
        out[i, :, : p.shape[-2], : p.shape[-1]] = p[0]
    return out


def per_image(cache: Any, name: str) -> list[torch.Tensor]:
    """Activations of packed site ``name`` from ``cache``, one tensor per image.

    Sites computed inside the per-image attention call (``attn.hook_rot_q|hook_rot_k|hook_pattern``,
    ``requires`` attention points) are visited once per image: their visits are returned as they are.
    Other sites are split along their leading packed axis (``patch``, ``merged``, ``frame``) with the
    spans the run stored in ``cache.meta["segments"]`` (``Adapter.segments``).
    """
    spec = cache.spec(name)
    if "attention_points" in spec.requires:
        return cache.steps(name)
    axis = spec.axis_names[0]
    spans = cache.meta.get("segments", {}).get(axis)
    if spans is None:
        raise KeyError(f"{name}: cache.meta['segments'] has no {axis!r} spans; cache a run with packed "
                       "inputs through Lens.run_with_cache so the adapter records them")
    return split(cache[name], spans)


def replace_segment(
    segments: Segments, image: int, vectors: Float[torch.Tensor, "n d"], axis: str = "merged",
) -> HookFn:
    """A hook fn writing ``vectors`` over image ``image``'s rows of a packed site (e.g. ``vision.hook_merger``).

    Raises :class:`~omnilens.core.errors.HookError` naming the site when the rows do not match.
    """
    rows = segments.span(image, axis)

    def fn(act: torch.Tensor, spec) -> torch.Tensor:
        expected = (rows.stop - rows.start, *act.shape[1:])
        if tuple(vectors.shape) != expected:
            raise HookError(spec.name, f"vectors of shape {expected} [{spec.axes}] for image {image}",
                            f"shape {tuple(vectors.shape)}")
        out = act.clone()
        out[rows] = vectors.to(device=act.device, dtype=act.dtype)
        return out

    return fn
