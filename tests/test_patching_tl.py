"""Parity with TransformerLens 3.9's ``transformer_lens.patching`` on the same tiny Qwen3 weights: a
HookedTransformer booted hub-free from a ``save_pretrained`` folder. TransformerLens returns the raw
metric of each patched run (its metric is a scalar: we give it the mean of ours over prompt rows), so
the raw values are compared."""

from __future__ import annotations

import pytest
import torch
import transformer_lens.patching as tlp
from conftest import make_model
from transformer_lens import HookedTransformer, loading

import omnilens
from omnilens.patching import LogitDiff, Sweep, patch_exact

TOL = 1e-5
CLEAN = ["the cat is happy and sad", "a red bird is in the"]
CORRUPT = ["the dog is sad and happy", "a blue fish is in the"]


@pytest.fixture(scope="module")
def models(tokenizer, tmp_path_factory):
    model = make_model("dense")
    folder = tmp_path_factory.mktemp("tiny_qwen3")
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    cfg = loading.get_pretrained_model_config(str(folder), device="cpu")
    state = loading.get_pretrained_state_dict(str(folder), cfg, model)
    tl = HookedTransformer(cfg, tokenizer)
    tl.load_and_process_state_dict(state, fold_ln=False, center_writing_weights=False, center_unembed=False,
                                   fold_value_biases=False)
    return omnilens.load(model.eval(), tokenizer=tokenizer), tl.eval()


@pytest.fixture(scope="module")
def setup(models, tokenizer):
    lens, tl = models
    clean, corrupted = lens.to_tokens(CLEAN), lens.to_tokens(CORRUPT)
    assert clean.shape == corrupted.shape == (2, 6)
    ids = tokenizer.convert_tokens_to_ids
    metric = LogitDiff([ids("happy"), ids("house")], [ids("sad"), ids("tree")])
    with torch.no_grad():
        assert (tl(clean) - lens.run(clean).output.logits).abs().max() < TOL  # same model
        _, tl_cache = tl.run_with_cache(clean)
    return lens, tl, clean, corrupted, metric, tl_cache


CASES = [  # (TransformerLens function, omnilens sweep); axis orders as TransformerLens returns them
    (tlp.get_act_patch_resid_pre, Sweep("hook_resid_pre")),
    (tlp.get_act_patch_resid_mid, Sweep("hook_resid_mid")),
    (tlp.get_act_patch_attn_out, Sweep("hook_attn_out")),
    (tlp.get_act_patch_mlp_out, Sweep("hook_mlp_out")),
    (tlp.get_act_patch_attn_head_out_by_pos, Sweep("hook_z", by=("layer", "pos", "head"))),
    (tlp.get_act_patch_attn_head_out_all_pos, Sweep("hook_z", by=("layer", "head"))),
    (tlp.get_act_patch_attn_head_q_by_pos, Sweep("hook_q", by=("layer", "pos", "head"))),
    (tlp.get_act_patch_attn_head_k_by_pos, Sweep("hook_k", by=("layer", "pos", "head"))),
    (tlp.get_act_patch_attn_head_v_by_pos, Sweep("hook_v", by=("layer", "pos", "head"))),
    (tlp.get_act_patch_attn_head_k_all_pos, Sweep("hook_k", by=("layer", "head"))),
    (tlp.get_act_patch_attn_head_pattern_all_pos, Sweep("hook_pattern", by=("layer", "head"))),
    (tlp.get_act_patch_attn_head_pattern_by_pos, Sweep("hook_pattern", by=("layer", "head", "pos"))),
]


@pytest.mark.parametrize("tl_fn,sweep", CASES, ids=[f"{c[1].site}-{'x'.join(c[1].by)}" for c in CASES])
def test_matches_transformer_lens_patching(setup, tl_fn, sweep):
    lens, tl, clean, corrupted, metric, tl_cache = setup
    with torch.no_grad():
        expected = tl_fn(tl, corrupted, tl_cache, lambda logits: metric(logits).mean())
    got = patch_exact(lens, clean, corrupted, metric, sweep)
    assert got.raw.shape == expected.shape
    assert (got.raw - expected).abs().max() < TOL
    assert expected.std() > 1e-3  # a non-trivial heatmap
    kv = sweep.site in ("hook_k", "hook_v")
    assert ("kv_head" in got.axes) == kv and got.shape[got.axes.index("layer")] == 2
