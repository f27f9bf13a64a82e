"""Patching across towers: language-model blocks x token spans (image tokens, audio tokens, text) and
vision / audio encoder blocks x packed patch / frame spans, on tiny Qwen2-VL and Qwen3-Omni Thinker
models. Batched (or, for packed towers, per-cell) sweeps equal a one-forward-per-cell loop written here,
and the nnsight executor gives the same heatmap."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import picture

from omnilens.inputs.omni import omni_inputs
from omnilens.inputs.vision import vision_inputs
from omnilens.interventions import Patch
from omnilens.patching import KLToClean, LogitDiff, Sweep, patch_attribution, patch_exact
from omnilens.testing import tiny_omni_feature_extractor

TOL = 1e-5


def naive(lens, clean, corrupted, metric, sites: list[str], spans: dict[str, list[int]]) -> torch.Tensor:
    """One forward per (layer, span) with a :class:`Patch` from the clean cache."""
    clean_logits, cache = lens.run_with_cache(clean, sites)
    metric = metric.bind(clean_logits, None) if hasattr(metric, "bind") else metric
    out = torch.empty(len(sites), len(spans))
    for i, site in enumerate(sites):
        for j, pos in enumerate(spans.values()):
            logits = lens.run(corrupted, writes=Patch.from_cache(cache, site, pos=pos).writes()).output.logits
            out[i, j] = metric(logits).mean()
    return out


# --- Qwen2-VL: image tokens ----------------------------------------------------------------------

@pytest.fixture(scope="module")
def vl(vl_lens, tokenizer):
    lens, prompt = vl_lens, "<image> what colour is the cat ?"
    clean = vision_inputs(tokenizer, [picture(8, 8, 0)], prompt, config=lens.config)
    corrupted = vision_inputs(tokenizer, [picture(8, 8, 1)], prompt, config=lens.config)
    span = clean.image_spans[0]
    n = clean["input_ids"].shape[1]
    spans = {"image": list(range(span.start, span.stop)),
             "text": [i for i in range(n) if not span.start <= i < span.stop]}
    return lens, dict(clean.inputs), dict(corrupted.inputs), spans, KLToClean(pos=None)


def test_language_blocks_by_image_and_text_spans(vl):
    lens, clean, corrupted, spans, metric = vl
    res = patch_exact(lens, clean, corrupted, metric, Sweep("hook_resid_pre", spans=spans))
    ref = naive(lens, clean, corrupted, metric, ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"], spans)
    assert res.axes == ("layer", "span") and res.labels["span"] == ("image", "text")
    assert (res.raw - ref).abs().max() < TOL
    # only the image differs: at the first block, patching the image tokens is the clean run, the text a no-op
    assert abs(float(res.values[0, 0]) - 1) < 1e-4 and abs(float(res.values[0, 1])) < 1e-4
    nn = patch_exact(lens, clean, corrupted, metric, Sweep("hook_resid_pre", spans=spans), executor="nnsight")
    assert (nn.raw - res.raw).abs().max() < TOL


def test_vision_blocks_by_patch_spans(vl):
    lens, clean, corrupted, _, metric = vl
    patches = {"rows 0-1": list(range(8)), "rows 2-3": list(range(8, 16))}
    for site in ("hook_resid_post", "hook_mlp_out"):
        res = patch_exact(lens, clean, corrupted, metric, Sweep(site, tower="vision", spans=patches))
        ref = naive(lens, clean, corrupted, metric, [f"vision.blocks.{i}.{site}" for i in range(2)], patches)
        assert res.sites == (f"vision.blocks.0.{site}", f"vision.blocks.1.{site}")
        assert (res.raw - ref).abs().max() < TOL and res.raw.std() > 1e-4
    atp = patch_attribution(lens, clean, corrupted, metric, Sweep("hook_resid_post", tower="vision", spans=patches))
    assert atp.shape == (2, 2) and torch.isfinite(atp.values).all()
    with pytest.raises(IndexError, match="span 'far'"):
        patch_exact(lens, clean, corrupted, metric, Sweep("hook_resid_post", tower="vision", spans={"far": [99]}))


# --- Qwen3-Omni Thinker: audio tokens ------------------------------------------------------------

@pytest.fixture(scope="module")
def omni(thinker_lens, omni_tok):
    lens, tok, fe = thinker_lens, omni_tok, tiny_omni_feature_extractor()
    t = np.arange(16000) / 16000
    loud = (0.5 * np.sin(2 * np.pi * 440 * t)).astype(np.float32)
    quiet = (0.05 * np.random.RandomState(1).randn(16000)).astype(np.float32)
    clean = omni_inputs(tok, lens.config, ["the cat", {"type": "audio", "audio": loud}, "is happy"],
                        feature_extractor=fe)
    corrupted = omni_inputs(tok, lens.config, ["the dog", {"type": "audio", "audio": quiet}, "is happy"],
                            feature_extractor=fe)
    span = clean.spans[0]["audio"][0]
    n = clean["input_ids"].shape[1]
    spans = {"audio": list(range(span.start, span.stop)),
             "text": [i for i in range(n) if not span.start <= i < span.stop]}
    ids = tok.convert_tokens_to_ids
    return lens, dict(clean.inputs), dict(corrupted.inputs), spans, LogitDiff(ids("happy"), ids("sad"))


def test_thinker_blocks_by_audio_and_text_spans(omni):
    lens, clean, corrupted, spans, metric = omni
    res = patch_exact(lens, clean, corrupted, metric, Sweep("hook_resid_pre", spans=spans))
    ref = naive(lens, clean, corrupted, metric, ["blocks.0.hook_resid_pre", "blocks.1.hook_resid_pre"], spans)
    assert (res.raw - ref).abs().max() < TOL and res.raw.std() > 1e-4
    heads = patch_exact(lens, clean, corrupted, metric, Sweep("hook_z", by=("layer", "head", "pos"), spans=spans))
    assert heads.axes == ("layer", "head", "span") and heads.shape[1] == lens.config.text_config.num_attention_heads
    nn = patch_exact(lens, clean, corrupted, metric, Sweep("hook_resid_pre", spans=spans), executor="nnsight")
    assert (nn.raw - res.raw).abs().max() < TOL


def test_audio_blocks_by_frame_spans(omni):
    lens, clean, corrupted, _, metric = omni
    frames = {"first half": list(range(6)), "second half": list(range(6, 13))}
    res = patch_exact(lens, clean, corrupted, metric, Sweep("hook_resid_post", tower="audio", spans=frames))
    ref = naive(lens, clean, corrupted, metric, ["audio.blocks.0.hook_resid_post", "audio.blocks.1.hook_resid_post"],
                frames)
    assert res.axes == ("layer", "span") and (res.raw - ref).abs().max() < TOL
