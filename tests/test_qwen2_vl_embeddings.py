"""Packed poolings, the layer-wise vision-embedding extractor and generation with replaced image tokens (Qwen2-VL)."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import hook_counts, picture

import omnilens
from omnilens import HookError
from omnilens.inputs import vision_inputs
from omnilens.packed import Segments, pool, replace_segment, split, to_grid
from omnilens.testing import tiny_qwen2_vl
from omnilens.vision_embeddings import (
    config_hash, extract_vision_embeddings, generate_with_image_embeddings, load_vision_embeddings,
)

SIZES = [(16, 12), (8, 8), (8, 16), (12, 12), (8, 8)]


@pytest.fixture(scope="module")
def lens(tokenizer):
    return omnilens.load(tiny_qwen2_vl(seed=2), tokenizer=tokenizer)


def test_poolings_on_a_grid():
    seg = Segments.from_grid(torch.tensor([[1, 4, 4], [1, 2, 4]]), 2)
    assert seg.spans("patch") == [(0, 16), (16, 24)] and seg.spans("merged") == [(0, 4), (4, 6)]
    x = torch.arange(24, dtype=torch.float)[:, None].repeat(1, 3)
    parts = split(x, seg.spans("patch"))
    grid = to_grid(parts[0], (1, 4, 4), 2)
    # block-major rows 0..3 are the top-left 2x2 block: (0,0) (0,1) (1,0) (1,1)
    assert grid[0, 0, 1, 0] == 1 and grid[0, 1, 0, 0] == 2 and grid[0, 0, 2, 0] == 4
    assert torch.equal(pool(parts[0], (1, 4, 4), 2, "mean"), parts[0].mean(0))
    torch.testing.assert_close(pool(parts[0], (1, 4, 4), 2, "merged_mean"), parts[0].mean(0))
    assert torch.equal(pool(parts[0], (1, 4, 4), 2, ("patch", (0, 2, 1))), grid[0, 2, 1])
    with pytest.raises(ValueError, match="unknown pooling"):
        pool(parts[0], (1, 4, 4), 2, "cls")
    with pytest.raises(ValueError, match="cover 24"):
        split(x[:20], seg.spans("patch"))


def test_extractor_streams_every_layer_per_image(lens, tmp_path):
    images = [picture(h, w, i) for i, (h, w) in enumerate(SIZES)]
    labels = ["red", "blue", "red", "green", "blue"]
    manifest_path = extract_vision_embeddings(lens, images, labels, tmp_path, batch_size=2, progress=False)
    got, manifest = load_vision_embeddings(tmp_path)
    sites = ["vision.blocks.0.hook_resid_post", "vision.blocks.1.hook_resid_post", "vision.hook_merger"]
    assert manifest_path == tmp_path / "manifest.json"
    assert manifest["sites"] == sites and manifest["layers"] == [0, 1, None] and manifest["labels"] == labels
    assert manifest["pooling"] == "mean" and manifest["n_images"] == 5
    assert manifest["config_hash"] == config_hash(lens.config) and manifest["model"] == "Qwen2VLForConditionalGeneration"
    assert [(s["start"], s["stop"]) for s in manifest["shards"]] == [(0, 2), (2, 4), (4, 5)]
    assert not list(tmp_path.glob("*.tmp")) and not list(tmp_path.glob(".*"))
    # each image run alone through the whole model, pooled by hand
    for i, img in enumerate(images):
        vi = vision_inputs(lens.tokenizer, [img], "", config=lens.config)
        _, cache = lens.run_with_cache(vi, sites)
        for n in sites:
            assert got[n].shape == (5, cache[n].shape[-1])
            torch.testing.assert_close(got[n][i], cache[n].mean(0), atol=1e-5, rtol=0, msg=n)


def test_extractor_patch_pooling_and_bad_labels(lens, tmp_path):
    images = [picture(8, 8, 10), picture(16, 12, 11)]
    extract_vision_embeddings(lens, images, [0, 1], tmp_path, pooling=("patch", (0, 3, 2)), progress=False)
    got, manifest = load_vision_embeddings(tmp_path)
    assert manifest["pooling"] == ["patch", [0, 3, 2]]
    vi = vision_inputs(lens.tokenizer, [images[1]], "", config=lens.config)
    _, cache = lens.run_with_cache(vi, ["vision.blocks.1.hook_resid_post", "vision.hook_merger"])
    grid = to_grid(cache["vision.blocks.1.hook_resid_post"], (1, 8, 6), 2)
    torch.testing.assert_close(got["vision.blocks.1.hook_resid_post"][1], grid[0, 3, 2], atol=1e-5, rtol=0)
    merged = to_grid(cache["vision.hook_merger"], (1, 8, 6), 2, merged=True)
    torch.testing.assert_close(got["vision.hook_merger"][1], merged[0, 1, 1], atol=1e-5, rtol=0)
    calls = []
    handle = lens.model.model.visual.register_forward_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ValueError, match="2 images, 1 labels"):
            extract_vision_embeddings(lens, images, ["x"], tmp_path / "bad", progress=False)
        with pytest.raises(TypeError):
            extract_vision_embeddings(lens, images, [object(), 1], tmp_path / "bad", progress=False)
    finally:
        handle.remove()
    assert calls == []


def test_generate_with_other_images_tokens_generates_its_answer(lens, tokenizer):
    a = vision_inputs(tokenizer, [picture(16, 12, 5)], "what colour is the cat ?", config=lens.config)
    b = vision_inputs(tokenizer, [picture(16, 12, 6)], "what colour is the cat ?", config=lens.config)
    _, cb = lens.run_with_cache(b, "vision.hook_merger")
    before = hook_counts(lens.model)
    with torch.no_grad():
        gen_a = lens.model.generate(**a.inputs, max_new_tokens=6, do_sample=False)
        gen_b = lens.model.generate(**b.inputs, max_new_tokens=6, do_sample=False)
    swapped = generate_with_image_embeddings(lens, a, 0, cb["vision.hook_merger"], max_new_tokens=6)
    assert not torch.equal(gen_a, gen_b)
    assert torch.equal(swapped, gen_b)
    assert hook_counts(lens.model) == before


def test_generate_with_wrong_shape_raises_before_running(lens, tokenizer):
    two = vision_inputs(tokenizer, [picture(8, 8, 1), picture(16, 12, 2)], "<image> or <image> ?", config=lens.config)
    calls = []
    handle = lens.model.model.visual.register_forward_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(HookError, match=r"vision\.hook_merger.*\(12, 64\).*image 1.*\(4, 64\)"):
            generate_with_image_embeddings(lens, two, 1, torch.zeros(4, 64), max_new_tokens=2)
        with pytest.raises(HookError, match=r"vision\.hook_merger.*pixel_values and image_grid_thw.*input_ids"):
            generate_with_image_embeddings(lens, "what colour is the cat ?", 0, torch.zeros(4, 64))
    finally:
        handle.remove()
    assert calls == []
    # replacing image 1 only: image 0's merged tokens still reach the residual stream unchanged
    seg = two.segments
    vec = torch.randn(12, 64, generator=torch.Generator().manual_seed(0))
    _, clean = lens.run_with_cache(two, ["blocks.0.hook_resid_pre"])
    _, cache = lens.run_with_cache(two, ["blocks.0.hook_resid_pre"],
                                   hooks=[("vision.hook_merger", replace_segment(seg, 1, vec))])
    r0, r1 = clean["blocks.0.hook_resid_pre"][0], cache["blocks.0.hook_resid_pre"][0]
    assert torch.equal(r1[two.image_spans[1]], vec)
    assert torch.equal(r1[two.image_spans[0]], r0[two.image_spans[0]])
    json.dumps(cache.meta)  # run metadata is plain data
