"""Interventions as data: each one against an independent computation (edited weights, raw torch hooks,
hand arithmetic), selectors, composition, steps during generate, errors, and both executors."""

from __future__ import annotations

import pytest
import torch
from conftest import hook_counts

import omnilens
from omnilens.errors import HookError
from omnilens.interventions import (AddVector, Apply, MeanAblate, Patch, ProjectOut, ResampleAblate, Scale,
                                    ZeroAblate, apply, to_writes)

TOL = 1e-5
CLEAN = "the cat is happy and the dog is sad"
CORRUPT = "the dog is sad and the cat is happy"


def logits(lens, text, ivs=(), executor=None):
    return lens.run(text, writes=to_writes(ivs), executor=executor).output.logits


def test_zero_ablate_kv_head_equals_zeroed_v_proj_rows(dense_lens):
    model = dense_lens.model
    out = logits(dense_lens, CLEAN, [ZeroAblate("blocks.1.attn.hook_v", kv_head=1)])
    d = model.config.head_dim
    w = model.model.layers[1].self_attn.v_proj.weight
    saved = w.detach().clone()
    with torch.no_grad():
        w[d:2 * d] = 0
        ref = model(**dense_lens.to_inputs(CLEAN)).logits
        w.copy_(saved)
    assert (out - ref).abs().max() < TOL
    assert (out - logits(dense_lens, CLEAN)).abs().max() > 1e-3


def test_scale_head_equals_scaled_o_proj_columns(dense_lens):
    model = dense_lens.model
    out = logits(dense_lens, CLEAN, [Scale("blocks.0.attn.hook_z", 2.5, head=[1, 3])])
    d = model.config.head_dim
    w = model.model.layers[0].self_attn.o_proj.weight
    saved = w.detach().clone()
    with torch.no_grad():
        for h in (1, 3):
            w[:, h * d:(h + 1) * d] *= 2.5
        ref = model(**dense_lens.to_inputs(CLEAN)).logits
        w.copy_(saved)
    assert (out - ref).abs().max() < TOL


def test_add_vector_equals_raw_torch_hook(dense_lens):
    model = dense_lens.model
    vec = torch.randn(model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    out = logits(dense_lens, CLEAN, [AddVector("blocks.0.hook_resid_post", vec, alpha=0.7, pos=[2, 4])])

    def hook(module, args, output):
        output = output.clone()
        output[:, [2, 4]] += 0.7 * vec
        return output

    handle = model.model.layers[0].register_forward_hook(hook)
    try:
        with torch.no_grad():
            ref = model(**dense_lens.to_inputs(CLEAN)).logits
    finally:
        handle.remove()
    assert (out - ref).abs().max() < TOL


def test_patch_from_cache_respects_causality(dense_lens):
    _, cache = dense_lens.run_with_cache(CLEAN, "blocks.1.hook_resid_pre")
    base = logits(dense_lens, CORRUPT)
    out = logits(dense_lens, CORRUPT, [Patch.from_cache(cache, "blocks.1.hook_resid_pre", pos=4)])
    assert (out[:, :4] - base[:, :4]).abs().max() < TOL  # earlier positions cannot see the patch
    assert (out[:, 4:] - base[:, 4:]).abs().max() > 1e-3
    res = dense_lens.run(CORRUPT, [omnilens.Read("blocks.1.hook_resid_pre")],
                   Patch.from_cache(cache, "blocks.1.hook_resid_pre", pos=4).writes())
    got = res.values["blocks.1.hook_resid_pre"][0]
    assert torch.equal(got[:, 4], cache["blocks.1.hook_resid_pre"][:, 4])


def test_project_out_removes_the_direction_only_where_selected(dense_lens):
    site = "blocks.0.hook_resid_mid"
    direction = torch.randn(dense_lens.config.hidden_size, generator=torch.Generator().manual_seed(1))
    _, before = dense_lens.run_with_cache(CLEAN, site)
    res = dense_lens.run(CLEAN, [omnilens.Read(site)], ProjectOut(site, direction, pos=slice(0, 3)).writes())
    after, x = res.values[site][0], before[site]
    unit = direction / direction.norm()
    assert (after[:, :3] @ unit).abs().max() < 1e-5
    expected = x[:, :3] - (x[:, :3] @ unit)[..., None] * unit
    assert (after[:, :3] - expected).abs().max() < TOL
    assert torch.equal(after[:, 3:], x[:, 3:])


def test_mean_and_resample_ablation(dense_lens, batch):
    site = "blocks.1.hook_mlp_out"
    _, cache = dense_lens.run_with_cache(batch, site)
    mean = MeanAblate.from_cache(cache, site)
    assert mean.mean.shape == (1,) + cache[site].shape[1:]
    res = dense_lens.run(batch, [omnilens.Read(site)], mean.writes())
    got = res.values[site][0]
    assert (got - cache[site].mean(0, keepdim=True)).abs().max() < TOL
    resample = ResampleAblate(site, cache[site].flip(0), seed=3, pos=0)
    perm = torch.randperm(2, generator=torch.Generator().manual_seed(3))
    got = dense_lens.run(batch, [omnilens.Read(site)], resample.writes()).values[site][0]
    assert torch.equal(got[:, 0], cache[site].flip(0)[perm][:, 0])
    assert torch.equal(got[:, 1:], cache[site][:, 1:])


def test_apply_user_function_and_composition_order(dense_lens):
    site = "blocks.0.attn.hook_z"
    _, cache = dense_lens.run_with_cache(CLEAN, site)
    ivs = [Scale(site, 3.0, head=2), Apply(site, lambda block, spec: block - 1.0, head=2, pos=[0, 1])]
    got = dense_lens.run(CLEAN, [omnilens.Read(site)], to_writes(ivs)).values[site][0]
    x = cache[site]
    assert (got[:, :2, 2] - (3 * x[:, :2, 2] - 1)).abs().max() < TOL  # scale first, then the user fn
    assert (got[:, 2:, 2] - 3 * x[:, 2:, 2]).abs().max() < TOL
    assert torch.equal(got[:, :, [0, 1, 3]], x[:, :, [0, 1, 3]])


def test_expert_selector_on_router_logits(moe_lens):
    site = "blocks.0.mlp.hook_router_logits"
    _, cache = moe_lens.run_with_cache(CLEAN, site)
    got = moe_lens.run(CLEAN, [omnilens.Read(site)], Scale(site, 0.0, expert=[1, 2]).writes()).values[site][0]
    assert got[:, 1:3].abs().max() == 0
    assert torch.equal(got[:, [0, 3]], cache[site][:, [0, 3]])


def test_errors_name_the_site_and_leave_no_hooks(dense_lens):
    with pytest.raises(HookError, match="blocks.0.attn.hook_z.*head indices"):
        logits(dense_lens, CLEAN, [ZeroAblate("blocks.0.attn.hook_z", head=7)])
    with pytest.raises(HookError, match="kv_head"):
        logits(dense_lens, CLEAN, [ZeroAblate("blocks.0.attn.hook_z", kv_head=0)])  # hook_z has heads, not kv heads
    with pytest.raises(HookError, match="selected block's shape"):
        logits(dense_lens, CLEAN, [Apply("blocks.0.hook_resid_pre", lambda b, s: b[..., :3], pos=1)])
    assert hook_counts(dense_lens.model) == 0
    with pytest.raises(KeyError, match="closest valid names"):
        with apply(dense_lens, [ZeroAblate("blocks.0.hook_resid_prex")]):
            pass
    with pytest.raises(HookError, match="expert"):
        with apply(dense_lens, [Scale("blocks.0.hook_resid_pre", 2.0, expert=1)]):
            pytest.fail("the block must not run")
    assert hook_counts(dense_lens.model) == 0
    with pytest.raises(RuntimeError, match="boom"):
        with apply(dense_lens, [ZeroAblate("blocks.0.hook_resid_pre")]):
            assert hook_counts(dense_lens.model) == 1
            raise RuntimeError("boom")
    assert hook_counts(dense_lens.model) == 0


def test_context_manager_applies_to_generate_steps(dense_lens):
    site = "blocks.0.hook_resid_pre"
    inputs = dense_lens.to_inputs(CLEAN)
    with apply(dense_lens, [ZeroAblate(site, steps=[1])]), dense_lens.hooks(cache=[site]) as cache:
        dense_lens.model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0)
    visits = cache.steps(site)
    assert len(visits) == 3
    assert visits[0].abs().min() > 0 and visits[2].abs().min() > 0
    assert visits[1].abs().max() == 0
    assert hook_counts(dense_lens.model) == 0


def test_context_manager_forward_equals_run(dense_lens):
    ivs = [ZeroAblate("blocks.1.attn.hook_z", head=0), AddVector("blocks.0.hook_resid_post", torch.ones(64), pos=-1)]
    with apply(dense_lens, ivs), torch.no_grad():
        inside = dense_lens.model(**dense_lens.to_inputs(CLEAN)).logits
    assert (inside - logits(dense_lens, CLEAN, ivs)).abs().max() == 0
    assert hook_counts(dense_lens.model) == 0


def test_nnsight_executor_and_remote_simulation_apply_the_same_interventions(dense_lens):
    _, cache = dense_lens.run_with_cache(CLEAN)
    ivs = [Patch.from_cache(cache, "blocks.1.hook_resid_pre", pos=[3, 5]),
           ZeroAblate("blocks.0.attn.hook_v", kv_head=0),
           AddVector("blocks.1.hook_mlp_out", torch.ones(64), alpha=0.1)]
    local = logits(dense_lens, CORRUPT, ivs)
    nn_out = logits(dense_lens, CORRUPT, ivs, executor="nnsight")
    assert (local - nn_out).abs().max() < TOL
    remote = dense_lens.executor("nnsight", remote="local")
    with torch.no_grad():
        sim = remote.run(dense_lens.to_inputs(CORRUPT), [], to_writes(ivs)).output.logits
    assert (local - sim).abs().max() < TOL
    assert (local - logits(dense_lens, CORRUPT)).abs().max() > 1e-3
