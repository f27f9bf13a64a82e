"""Layer-wise vision embeddings on disk, and generation with an image's vision tokens replaced.

The first and the last step of a latent-steering study on a vision-language model (e.g. Stroop-style
colour/word conflicts): :func:`extract_vision_embeddings` runs the packed vision tower over labelled
images in batches and streams one pooled vector per image and layer to safetensors shards with a JSON
manifest; :func:`generate_with_image_embeddings` swaps one image's ``vision.hook_merger`` tokens for
given vectors and generates the answer through the hook graph.

Files (written atomically: temporary file, then rename):

- ``shard-{k:05d}.safetensors``: one ``[n_images_in_shard d]`` tensor per site name;
- ``manifest.json``: ``labels``, ``sites``, ``layers`` (block index per site, ``null`` for the
  merger), ``pooling``, ``shards`` (file and image range), ``model``, ``config_hash`` (sha256 of the
  model config JSON) and ``n_images``; rewritten after every shard, so it always describes the shards on disk.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from safetensors.torch import load_file
from tqdm.auto import tqdm

from omnilens.core.errors import HookError
from omnilens.inputs.vision import image_processor_for, pixel_inputs
from omnilens.core.io import atomic_save_safetensors, atomic_write_json
from omnilens.core.packed import Pooling, Segments, pool, replace_segment, split

MANIFEST = "manifest.json"
MERGER = "vision.hook_merger"


def config_hash(config: Any) -> str:
    """sha256 of the model config's JSON (identifies the model an embedding file came from)."""
    return hashlib.sha256(config.to_json_string(use_diff=False).encode()).hexdigest()


def extract_vision_embeddings(
    lens: Any, images: Sequence[Any], labels: Sequence[Any], out_dir: str | os.PathLike, *,
    sites: str | Sequence[str] = "vision.blocks.*.hook_resid_post", pooling: Pooling = "mean",
    include_merger: bool = True, batch_size: int = 8, image_processor: Any = None, progress: bool = True,
) -> Path:
    """Pool every selected vision site per image and stream the vectors to ``out_dir``; returns the manifest path.

    Args:
        lens: a Lens over a vision-language model whose adapter has ``encode_images`` (Qwen2-VL).
        images: numpy ``[H W C]`` arrays or PIL images (sizes may differ).
        labels: one JSON-serialisable label per image.
        sites: vision sites with a leading ``patch`` axis (glob or names).
        pooling: ``"mean"``, ``"merged_mean"`` or ``("patch", (t, h, w))`` (see :mod:`omnilens.core.packed`);
            the merger (``[merged d_model]``) is pooled over its merged tokens (a patch picks the merged
            token that holds it).
        include_merger: also store ``vision.hook_merger`` (the tokens the language model sees).
        batch_size: images per packed tower forward (one shard each).
    """
    if len(labels) != len(images):
        raise ValueError(f"expected one label per image: {len(images)} images, {len(labels)} labels")
    names = [n for n in lens.graph.names(sites) if lens.graph[n].axis_names[0] == "patch"]
    if not names:
        raise KeyError(f"{sites!r} selects no vision site with a leading 'patch' axis")
    if include_merger:
        names.append(MERGER)
    labels = list(labels)
    json.dumps(labels)  # fail before any forward when labels cannot be stored
    processor = image_processor if image_processor is not None else image_processor_for(lens.config)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = {
        "model": type(lens.model).__name__, "config_hash": config_hash(lens.config), "n_images": len(images),
        "labels": labels, "sites": names, "layers": [lens.graph[n].layer for n in names],
        "pooling": list(pooling) if isinstance(pooling, tuple) else pooling, "shards": [],
    }
    bar = tqdm(total=len(images), desc="vision embeddings", unit="image", disable=not progress)
    for k, start in enumerate(range(0, len(images), batch_size)):
        batch = images[start:start + batch_size]
        pix = pixel_inputs(batch, processor)
        segments = lens.adapter.image_segments(pix)
        with lens.hooks(cache=names) as cache, torch.no_grad():
            lens.adapter.encode_images(pix["pixel_values"], pix["image_grid_thw"])
        tensors = {n: _pool_site(cache[n], segments, pooling, merged=n == MERGER) for n in names}
        shard = f"shard-{k:05d}.safetensors"
        atomic_save_safetensors(out / shard, tensors)
        manifest["shards"].append({"file": shard, "start": start, "stop": start + len(batch)})
        atomic_write_json(out / MANIFEST, manifest)
        bar.update(len(batch))
    bar.close()
    return out / MANIFEST


def _pool_site(x: torch.Tensor, segments: Segments, pooling: Pooling, *, merged: bool) -> torch.Tensor:
    """``[image d]``: one pooled vector per image of a packed ``[patch d]`` or ``[merged d]`` tensor."""
    how = pooling
    if merged and isinstance(pooling, tuple):
        t, h, w = pooling[1]
        how = ("patch", (t, h // segments.merge_size, w // segments.merge_size))
    parts = split(x, segments.spans("merged" if merged else "patch"))
    return torch.stack([pool(p, thw, segments.merge_size, how, merged=merged).float().contiguous()
                        for p, thw in zip(parts, segments.grid_thw)])


def load_vision_embeddings(out_dir: str | os.PathLike) -> tuple[dict[str, Float[torch.Tensor, "image d"]], dict]:
    """Read what :func:`extract_vision_embeddings` wrote: ``({site: [image d]}, manifest)``."""
    out = Path(out_dir)
    manifest = json.loads((out / MANIFEST).read_text())
    shards = [load_file(str(out / s["file"])) for s in manifest["shards"]]
    return {n: torch.cat([s[n] for s in shards]) for n in manifest["sites"]}, manifest


def generate_with_image_embeddings(
    lens: Any, inputs: Any, image: int, vectors: Float[torch.Tensor, "merged d_model"], **generate_kwargs: Any,
) -> torch.Tensor:
    """Generate with image ``image``'s ``vision.hook_merger`` tokens replaced by ``vectors``.

    ``inputs`` are image+text forward kwargs (e.g. :func:`omnilens.inputs.vision_inputs`); ``vectors``
    must have one row per image token of that image. Greedy unless ``do_sample`` is given. Returns
    the generated ids ``[batch pos]``. A shape mismatch raises :class:`~omnilens.core.errors.HookError`
    before the model runs; the hook is removed on exit.
    """
    kw = lens.to_inputs(inputs)
    segments = lens.adapter.image_segments(kw)
    if segments is None:
        raise HookError(MERGER, "image inputs (pixel_values and image_grid_thw [image 3])",
                        f"inputs with keys {sorted(kw)}", "Build them with omnilens.inputs.vision_inputs.")
    rows = segments.span(image, "merged")
    expected = (rows.stop - rows.start, lens.config.text_config.hidden_size)
    if tuple(vectors.shape) != expected:
        raise HookError(MERGER, f"vectors of shape {expected} [merged d_model] for image {image}",
                        f"shape {tuple(vectors.shape)}", "An image's token count is grid.prod() // merge_size**2.")
    generate_kwargs.setdefault("do_sample", False)
    with lens.hooks([(MERGER, replace_segment(segments, image, vectors))]), torch.no_grad():
        return lens.model.generate(**kw, **generate_kwargs)
