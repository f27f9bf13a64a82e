"""The nnsight executor against the local executor: same caches, same patched logits, bit for bit.

Real tiny Qwen3 / Qwen3-MoE models, real nnsight traces (in-process and through nnsight's
remote-simulation round trip, which serialises the trace as a remote request and deserialises it
with non-installed modules hidden).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import omnilens
from omnilens import HookError, Read, Write
from omnilens.executors.nnsight import NNsightExecutor
from omnilens.testing import (tiny_omni_thinker, tiny_omni_tokenizer, tiny_qwen2_vl, tiny_qwen3, tiny_qwen3_moe,
                              tiny_tokenizer)

TEXT = ["the cat is happy today", "a dog"]  # padded batch: right padding + attention mask


@pytest.fixture(scope="module", params=["qwen3", "qwen3_moe"])
def lens(request):
    model = tiny_qwen3() if request.param == "qwen3" else tiny_qwen3_moe()
    return omnilens.load(model, tokenizer=tiny_tokenizer())


@pytest.fixture(scope="module")
def qwen3_lens():
    return omnilens.load(tiny_qwen3(seed=1), tokenizer=tiny_tokenizer())


def _run(lens, executor, reads=(), writes=(), **kwargs):
    with torch.no_grad():
        return executor.run(lens.to_inputs(TEXT), list(reads), list(writes), **kwargs)


def _patches(lens):
    """Writes through views: one head of hook_z, a vector into the in-place resid_mid, one kv head of hook_v,
    the pattern of block 1 and the per-head result of block 0."""
    vec = torch.randn(lens.config.hidden_size, generator=torch.Generator().manual_seed(0))

    def zero_head_2(z, spec):
        z = z.clone()
        z[:, :, 2] = 0
        return z

    def scale_kv_head_1(v, spec):
        v = v.clone()
        v[:, :, 1] *= 3
        return v

    return [
        Write("blocks.0.attn.hook_z", zero_head_2),
        Write("blocks.1.hook_resid_mid", lambda x, spec: x + vec),
        Write("blocks.1.attn.hook_v", scale_kv_head_1),
        Write("blocks.1.attn.hook_pattern", lambda p, spec: p * 0.5),
        Write("blocks.0.attn.hook_result", lambda r, spec: r * 2),
    ]


def _assert_clean(model):
    """No torch hooks and no hook points left anywhere on the model."""
    for name, module in model.named_modules():
        assert not module._forward_hooks and not module._forward_pre_hooks, name
        assert getattr(module, "hook_pattern", None) is None, name


def test_cache_of_every_site_equals_local(lens):
    names = lens.graph.names(include_opt_in=True)  # every site, hook_result included
    ref_logits, ref = lens.run_with_cache(TEXT, names=names)
    logits, cache = lens.run_with_cache(TEXT, names=names, executor="nnsight")
    assert list(cache) == list(ref) == names
    for name in names:
        assert torch.equal(cache[name], ref[name]), name
    assert torch.equal(logits, ref_logits)
    _assert_clean(lens.model)


def test_attention_points_fire_on_every_run(qwen3_lens):
    """Hook points are new modules each run; the envoy tree must follow them, not the previous run's."""
    names = qwen3_lens.graph.names("blocks.*.attn.hook_pattern")
    for text in (TEXT, ["one two three four five six"]):
        _, ref = qwen3_lens.run_with_cache(text, names=names)
        _, cache = qwen3_lens.run_with_cache(text, names=names, executor="nnsight")
        for name in names:
            assert torch.equal(cache[name], ref[name]), name


def test_patched_logits_equal_local(lens):
    writes = _patches(lens)
    plain = _run(lens, lens.executor("local")).output.logits
    ref = _run(lens, lens.executor("local"), writes=writes).output.logits
    got = _run(lens, lens.executor("nnsight"), writes=writes).output.logits
    assert not torch.allclose(ref, plain, atol=1e-3)  # the patches bite
    assert torch.equal(got, ref)
    _assert_clean(lens.model)


def test_zeroing_a_head_of_z_edits_only_that_slice_of_o_proj_input(qwen3_lens):
    d_head = qwen3_lens.config.head_dim

    def zero_head_2(z, spec):
        z = z.clone()
        z[:, :, 2] = 0
        return z

    res = _run(qwen3_lens, qwen3_lens.executor("nnsight"), [Read("blocks.0.attn.hook_z")],
               [Write("blocks.0.attn.hook_z", zero_head_2)])
    (z,) = res.values["blocks.0.attn.hook_z"]
    plain = _run(qwen3_lens, qwen3_lens.executor("local"), [Read("blocks.0.attn.hook_z")])
    (z0,) = plain.values["blocks.0.attn.hook_z"]
    assert torch.equal(z[:, :, 2], torch.zeros_like(z[:, :, 2]))
    keep = [h for h in range(qwen3_lens.config.num_attention_heads) if h != 2]
    assert torch.equal(z[:, :, keep], z0[:, :, keep])
    assert z.shape[-1] == d_head


def test_reads_select_positions_like_local(qwen3_lens):
    names = qwen3_lens.graph.names(["blocks.1.hook_resid_post", "blocks.0.attn.hook_pattern", "blocks.0.attn.hook_k"])
    for pos in (-1, slice(1, 3), [0, 2]):
        _, ref = qwen3_lens.run_with_cache(TEXT, names=names, pos=pos)
        _, got = qwen3_lens.run_with_cache(TEXT, names=names, pos=pos, executor="nnsight")
        for name in names:
            assert torch.equal(got[name], ref[name]), (name, pos)


def test_generate_serves_every_step_and_honours_write_steps(qwen3_lens):
    kw = qwen3_lens.to_inputs(["the cat is"])
    gen = dict(max_new_tokens=3, min_new_tokens=3, do_sample=False)
    reads = [Read("blocks.1.hook_resid_post"), Read("blocks.1.attn.hook_pattern")]
    writes = [Write("blocks.0.hook_resid_post", lambda x, spec: x * 1.5, steps=[1])]
    with torch.no_grad():
        plain = qwen3_lens.executor("local").run(kw, reads, [], method="generate", **gen)
        ref = qwen3_lens.executor("local").run(kw, reads, writes, method="generate", **gen)
        got = qwen3_lens.executor("nnsight").run(kw, reads, writes, method="generate", **gen)
    assert torch.equal(got.output, ref.output)
    for r in reads:
        assert len(got.values[r.name]) == len(ref.values[r.name]) == 3
        assert all(torch.equal(a, b) for a, b in zip(got.values[r.name], ref.values[r.name])), r.name
    post = "blocks.1.hook_resid_post"
    assert torch.equal(got.values[post][0], plain.values[post][0])  # step 0 untouched
    assert not torch.allclose(got.values[post][1], plain.values[post][1])  # step 1 written
    _assert_clean(qwen3_lens.model)


def test_sites_whose_module_does_not_run_yield_nothing():
    """A text-only Qwen2-VL forward never calls the vision tower: no values, no error, as with the local executor."""
    vl = omnilens.load(tiny_qwen2_vl(), tokenizer=tiny_tokenizer())
    reads = [Read("vision.blocks.0.hook_resid_post"), Read("blocks.0.hook_resid_post")]
    ref = _run(vl, vl.executor("local"), reads)
    got = _run(vl, vl.executor("nnsight"), reads)
    assert list(got.values) == list(ref.values) == ["blocks.0.hook_resid_post"]
    assert torch.equal(got.values["blocks.0.hook_resid_post"][0], ref.values["blocks.0.hook_resid_post"][0])


@pytest.mark.parametrize("fault", ["raises", "wrong_shape"])
@pytest.mark.parametrize("site", ["blocks.1.attn.hook_z", "blocks.0.attn.hook_pattern"])
def test_faults_name_the_site_and_leave_the_model_untouched(qwen3_lens, fault, site):
    before = qwen3_lens.run_with_hooks(TEXT, [])
    impl = qwen3_lens.config._attn_implementation

    def bad(x, spec):
        if fault == "raises":
            raise RuntimeError("boom")
        return x[:, :1]

    with pytest.raises(HookError) as err:
        qwen3_lens.run_with_hooks(TEXT, [(site, bad)], executor="nnsight")
    assert err.value.site == site
    shape = tuple(qwen3_lens.run_with_cache(TEXT, names=site)[1][site].shape)
    if fault == "wrong_shape":
        assert str(shape) in err.value.expected
        assert str((shape[0], 1, *shape[2:])) in err.value.actual
    else:
        assert "RuntimeError: boom" in err.value.actual
    _assert_clean(qwen3_lens.model)
    assert qwen3_lens.config._attn_implementation == impl
    assert torch.equal(qwen3_lens.run_with_hooks(TEXT, []), before)
    assert torch.equal(qwen3_lens.run_with_hooks(TEXT, [], executor="nnsight"), before)


def test_remote_simulation_round_trip(lens):
    """``remote="local"``: the trace is serialised like a remote request, deserialised with omnilens hidden
    (it travels by value) and run; module-boundary sites and a patched forward equal the local executor.
    Attention-point sites run too, because the simulation executes against the local instrumented model."""
    sim = lens.executor("nnsight", remote="local")
    names = lens.graph.names(include_opt_in=True)
    ref = _run(lens, lens.executor("local"), [Read(n) for n in names])
    got = _run(lens, sim, [Read(n) for n in names])
    assert torch.equal(got.output.logits, ref.output.logits)
    for name in names:
        assert torch.equal(got.values[name][0], ref.values[name][0]), name
    writes = _patches(lens)
    ref = _run(lens, lens.executor("local"), writes=writes)
    got = _run(lens, sim, writes=writes)
    assert torch.equal(got.output.logits, ref.output.logits)
    with pytest.raises(HookError, match="blocks.1.attn.hook_z"):
        _run(lens, sim, writes=[Write("blocks.1.attn.hook_z", lambda z, spec: z[..., :1])])
    _assert_clean(lens.model)


def test_remote_rejects_attention_point_sites_before_sending(qwen3_lens):
    ex = qwen3_lens.executor("nnsight", remote=True)
    with pytest.raises(ValueError) as err:
        _run(qwen3_lens, ex, [Read("blocks.0.hook_resid_post"), Read("blocks.0.attn.hook_pattern"),
                              Read("blocks.1.attn.hook_rot_k")])
    assert "blocks.0.attn.hook_pattern" in str(err.value) and "blocks.1.attn.hook_rot_k" in str(err.value)
    assert "blocks.0.hook_resid_post" not in str(err.value)
    assert "blocks.0.attn.hook_pattern (requires attention_points)" in str(err.value)
    _assert_clean(qwen3_lens.model)


def test_remote_rejects_every_site_that_requires_instrumentation():
    """Not only attention points: Omni's ``hook_deepstack`` needs a temporary hook point too; the error names
    each site with what it requires, before anything is sent."""
    omni = omnilens.load(tiny_omni_thinker(), tokenizer=tiny_omni_tokenizer())
    ex = omni.executor("nnsight", remote=True)
    required = {n: omni.graph[n].requires for n in ("blocks.0.hook_deepstack", "vision.blocks.0.attn.hook_pattern")}
    assert required["blocks.0.hook_deepstack"] and "attention_points" not in required["blocks.0.hook_deepstack"]
    with pytest.raises(ValueError) as err:
        ex.run({"input_ids": torch.tensor([[1, 2, 3]])}, [Read("blocks.0.hook_resid_post"), *map(Read, required)], [])
    for name, req in required.items():
        assert f"{name} (requires {', '.join(sorted(req))})" in str(err.value)
    assert "blocks.0.hook_resid_post" not in str(err.value)
    assert ex._envoy is None  # refused before the model was even wrapped
    _assert_clean(omni.model)


def test_bad_options_are_refused(qwen3_lens):
    with pytest.raises(ValueError, match="remote"):
        NNsightExecutor(qwen3_lens.adapter, remote="ndif")
    with pytest.raises(ValueError, match="tokenizer"):
        NNsightExecutor(qwen3_lens.adapter, remote="local")
    with pytest.raises(KeyError, match="hook_resid_pots"):
        _run(qwen3_lens, qwen3_lens.executor("nnsight"), [Read("blocks.0.hook_resid_pots")])


@settings(max_examples=6, deadline=None)
@given(n_layers=st.integers(1, 3), n_kv=st.sampled_from([1, 2]), group=st.sampled_from([1, 2, 3]),
       d_head=st.sampled_from([8, 16]), seed=st.integers(0, 1000))
def test_parity_over_random_configs(n_layers, n_kv, group, d_head, seed):
    n_heads = n_kv * group
    model = tiny_qwen3(seed=seed, num_hidden_layers=n_layers, num_attention_heads=n_heads, num_key_value_heads=n_kv,
                       head_dim=d_head, hidden_size=32)
    lens = omnilens.load(model, tokenizer=tiny_tokenizer())
    names = lens.graph.names(include_opt_in=True)
    head = n_heads - 1

    def zero_last_head(z, spec):
        z = z.clone()
        z[:, :, head] = 0
        return z

    hooks = [(f"blocks.{n_layers - 1}.attn.hook_z", zero_last_head)]
    ref_logits, ref = lens.run_with_cache(TEXT, names=names, hooks=hooks)
    logits, cache = lens.run_with_cache(TEXT, names=names, hooks=hooks, executor="nnsight")
    assert torch.equal(logits, ref_logits)
    for name in names:
        assert torch.equal(cache[name], ref[name]), name
