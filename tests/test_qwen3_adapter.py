"""Every Qwen3 / Qwen3-MoE site against an independent computation, identity writes, and writes
through views (hook_z heads, hook_v kv heads, hook_resid_mid)."""

from __future__ import annotations

import math

import pytest
import torch
from conftest import MODEL_KINDS, assert_clean, hook_counts, make_model
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import omnilens

TOL = 1e-5


# --- an independent Qwen3 forward, written from the architecture, on the model's weights ---------

def rms(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def linear(x: torch.Tensor, module: torch.nn.Linear) -> torch.Tensor:
    return x @ module.weight.T if module.bias is None else x @ module.weight.T + module.bias


def rope(x: torch.Tensor, theta: float) -> torch.Tensor:
    """Rotate ``x`` ``[batch pos head d_head]`` at positions 0..pos-1 (half-split RoPE)."""
    d = x.shape[-1]
    freqs = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    ang = torch.arange(x.shape[1], dtype=torch.float64)[:, None] * freqs[None]  # [pos d/2]
    cos, sin = ang.cos().float()[None, :, None], ang.sin().float()[None, :, None]
    x1, x2 = x[..., : d // 2], x[..., d // 2:]
    return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)


def reference(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Every site of the Qwen3 grammar, computed by hand from ``model``'s parameters."""
    cfg = model.config
    nh, nkv, dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    eps, theta = cfg.rms_norm_eps, cfg.rope_parameters["rope_theta"]
    b, p = input_ids.shape
    keep = torch.ones(b, p, dtype=torch.bool) if attention_mask is None else attention_mask.bool()
    allowed = torch.tril(torch.ones(p, p, dtype=torch.bool))[None] & keep[:, None, :]  # [batch query key]
    out: dict[str, torch.Tensor] = {}
    h = model.model.embed_tokens.weight[input_ids]
    out["hook_embed"] = h
    for i, layer in enumerate(model.model.layers):
        at, pre = layer.self_attn, f"blocks.{i}."
        out[pre + "hook_resid_pre"] = h
        x = rms(h, layer.input_layernorm.weight, eps)
        out[pre + "ln1.hook_normalized"] = x
        q = linear(x, at.q_proj).view(b, p, nh, dh)
        k = linear(x, at.k_proj).view(b, p, nkv, dh)
        v = linear(x, at.v_proj).view(b, p, nkv, dh)
        qn, kn = rms(q, at.q_norm.weight, eps), rms(k, at.k_norm.weight, eps)
        rq, rk = rope(qn, theta), rope(kn, theta)
        group = torch.arange(nh) // (nh // nkv)  # kv head serving each query head
        scores = torch.einsum("bqhd,bkhd->bhqk", rq, rk[:, :, group]) / math.sqrt(dh)
        scores = scores.masked_fill(~allowed[:, None], float("-inf"))
        pattern = scores.softmax(-1)
        z = torch.einsum("bhqk,bkhd->bqhd", pattern, v[:, :, group])
        w_o = at.o_proj.weight.view(cfg.hidden_size, nh, dh)
        result = torch.einsum("bqhd,mhd->bqhm", z, w_o)  # per-head contribution, bias excluded
        attn_out = result.sum(-2) if at.o_proj.bias is None else result.sum(-2) + at.o_proj.bias
        out.update({pre + "attn.hook_q": q, pre + "attn.hook_k": k, pre + "attn.hook_v": v,
                    pre + "attn.hook_q_normed": qn, pre + "attn.hook_k_normed": kn,
                    pre + "attn.hook_rot_q": rq, pre + "attn.hook_rot_k": rk, pre + "attn.hook_pattern": pattern,
                    pre + "attn.hook_z": z, pre + "attn.hook_result": result, pre + "hook_attn_out": attn_out})
        h = h + attn_out
        out[pre + "hook_resid_mid"] = h
        x = rms(h, layer.post_attention_layernorm.weight, eps)
        out[pre + "ln2.hook_normalized"] = x
        if hasattr(layer.mlp, "gate_proj"):
            g, u = x @ layer.mlp.gate_proj.weight.T, x @ layer.mlp.up_proj.weight.T
            post = torch.nn.functional.silu(g) * u
            mlp_out = post @ layer.mlp.down_proj.weight.T
            out.update({pre + "mlp.hook_pre": g, pre + "mlp.hook_pre_linear": u, pre + "mlp.hook_post": post})
        else:
            mlp_out, routing = moe_reference(layer.mlp, x, cfg)
            out.update({pre + f"mlp.hook_{k}": v for k, v in routing.items()})
        out[pre + "hook_mlp_out"] = mlp_out
        h = h + mlp_out
        out[pre + "hook_resid_post"] = h
    x = rms(h, model.model.norm.weight, eps)
    out["ln_final.hook_normalized"] = x
    out["hook_logits"] = x @ model.lm_head.weight.T
    return out


def moe_reference(mlp, x: torch.Tensor, cfg) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Sparse MoE block by hand: softmax router, top-k (renormalised), gated experts from the fused weights."""
    flat = x.reshape(-1, x.shape[-1])
    logits = flat @ mlp.gate.weight.T
    weights, idx = logits.softmax(-1).topk(cfg.num_experts_per_tok, dim=-1)
    if cfg.norm_topk_prob:
        weights = weights / weights.sum(-1, keepdim=True)
    out = torch.zeros_like(flat)
    inter = cfg.moe_intermediate_size
    for t in range(flat.shape[0]):
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            gu = mlp.experts.gate_up_proj[e] @ flat[t]
            hidden = torch.nn.functional.silu(gu[:inter]) * gu[inter:]
            out[t] += weights[t, j] * (mlp.experts.down_proj[e] @ hidden)
    return out.view_as(x), {"router_logits": logits, "topk_weights": weights, "topk_idx": idx}


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.double() - b.double()).abs().max().item()


def assert_sites_match(lens: omnilens.Lens, batch: dict, tol: float = TOL) -> None:
    """Every site (opt-in included) equals the hand computation; integer sites exactly."""
    names = lens.graph.names(include_opt_in=True)
    _, cache = lens.run_with_cache(batch, names=names)
    with torch.no_grad():
        ref = reference(lens.model, batch["input_ids"], batch.get("attention_mask"))
    assert set(cache) == set(ref) == set(names)
    for name in names:
        assert cache[name].shape == ref[name].shape, name
        if cache[name].dtype == torch.long:
            assert torch.equal(cache[name], ref[name]), name
        else:
            assert max_diff(cache[name], ref[name]) <= tol, (name, max_diff(cache[name], ref[name]))


# --- site values --------------------------------------------------------------------------------

@pytest.mark.parametrize("padded", [False, True], ids=["unpadded", "padded"])
def test_every_site_matches_hand_forward(lens, batch, padded):
    inputs = batch if padded else {"input_ids": batch["input_ids"][:1]}
    assert_sites_match(lens, inputs)


def test_resid_sites_match_hf_hidden_states(lens, batch):
    n = lens.model.config.num_hidden_layers
    _, cache = lens.run_with_cache(batch, names=["hook_embed", "blocks.*.hook_resid_*", "ln_final.hook_normalized",
                                                 "hook_logits"])
    with torch.no_grad():
        hf = lens.model(**batch, output_hidden_states=True)
    hs = hf.hidden_states
    assert len(hs) == n + 1
    assert max_diff(cache["hook_embed"], hs[0]) == 0
    for i in range(n):
        assert max_diff(cache[f"blocks.{i}.hook_resid_pre"], hs[i]) == 0
    for i in range(n - 1):
        assert max_diff(cache[f"blocks.{i}.hook_resid_post"], hs[i + 1]) == 0
    assert max_diff(cache["ln_final.hook_normalized"], hs[n]) == 0  # HF's last entry is after the final norm
    assert max_diff(cache[f"blocks.{n - 1}.hook_resid_post"], hs[n]) > 1e-3  # ...not the last block's output
    assert torch.equal(cache["hook_logits"], hf.logits)


def test_moe_router_sites_match_gate_module(batch):
    lens = omnilens.load(make_model("moe"))
    names = lens.graph.names("blocks.*.mlp.hook_*")
    assert names and all(lens.graph[n].component == "mlp" for n in names)
    _, cache = lens.run_with_cache(batch, names=["blocks.*.ln2.hook_normalized", *names])
    for i, layer in enumerate(lens.model.model.layers):
        x = cache[f"blocks.{i}.ln2.hook_normalized"]
        with torch.no_grad():
            logits, weights, idx = layer.mlp.gate(x.reshape(-1, x.shape[-1]))
        assert torch.equal(cache[f"blocks.{i}.mlp.hook_router_logits"], logits)
        assert torch.equal(cache[f"blocks.{i}.mlp.hook_topk_weights"], weights)
        assert torch.equal(cache[f"blocks.{i}.mlp.hook_topk_idx"], idx)
        assert len(set(idx.flatten().tolist())) > 1  # routing is not degenerate


def test_moe_graph_has_router_sites_not_dense_mlp_sites():
    graph = omnilens.load(make_model("moe")).graph
    assert "blocks.0.mlp.hook_router_logits" in graph and "blocks.0.mlp.hook_pre" not in graph
    assert graph["blocks.0.mlp.hook_topk_idx"].axes == "token k"
    assert graph["blocks.0.mlp.hook_router_logits"].axes == "token expert"
    dense = omnilens.load(make_model("dense")).graph
    assert "blocks.0.mlp.hook_pre" in dense and "blocks.0.mlp.hook_router_logits" not in dense


# --- identity writes ----------------------------------------------------------------------------

@pytest.mark.parametrize("clone", [False, True], ids=["same", "clone"])
def test_identity_write_on_every_site_is_bit_identical(lens, batch, clone):
    fn = (lambda x, site: x.clone()) if clone else (lambda x, site: x)
    names = lens.graph.names(include_opt_in=True)
    assert any(lens.graph[n].opt_in for n in names)
    points = [n for n in names if lens.graph[n].requires]
    plain = [n for n in names if not lens.graph[n].requires]
    with torch.no_grad():
        sdpa = lens.model(**batch).logits
        lens.model.set_attn_implementation("eager")
        eager = lens.model(**batch).logits
        lens.model.set_attn_implementation("sdpa")
    # sites at module boundaries leave the attention implementation alone
    assert torch.equal(lens.run_with_hooks(batch, hooks=[(n, fn) for n in plain]), sdpa)
    # attention points run HF's eager attention operations exactly
    assert torch.equal(lens.run_with_hooks(batch, hooks=[(n, fn) for n in names]), eager)
    for name in names:  # one site at a time, so that no error can cancel another
        expected = eager if name in points else sdpa
        assert torch.equal(lens.run_with_hooks(batch, hooks=[(name, fn)]), expected), name
    assert hook_counts(lens.model) == 0


# --- writes through views -----------------------------------------------------------------------

def test_zeroing_a_head_of_hook_z_equals_zeroing_the_o_proj_input_slice(lens, batch):
    d_head, head, layer = lens.config.head_dim, 2, 1

    def zero_head(z, site):
        z = z.clone()
        z[:, :, head] = 0
        return z

    def zero_head_inplace(z, site):
        z[:, :, head] = 0
        return z

    o_proj = lens.model.model.layers[layer].self_attn.o_proj

    def by_hand(module, args):
        x = args[0].clone()
        x[..., head * d_head:(head + 1) * d_head] = 0
        return (x,)

    handle = o_proj.register_forward_pre_hook(by_hand)
    try:
        with torch.no_grad():
            expected = lens.model(**batch).logits
    finally:
        handle.remove()
    ours = lens.run_with_hooks(batch, hooks=[(f"blocks.{layer}.attn.hook_z", zero_head)])
    assert torch.equal(ours, expected)
    assert torch.equal(lens.run_with_hooks(batch, hooks=[(f"blocks.{layer}.attn.hook_z", zero_head_inplace)]),
                       expected)
    assert not torch.equal(ours, lens.run_with_hooks(batch, hooks=[]))


def test_editing_one_kv_head_of_hook_v_changes_exactly_that_slice(lens, batch):
    d_head, kv_head = lens.config.head_dim, 1
    v_proj = lens.model.model.layers[0].self_attn.v_proj
    seen = []

    def shift(v, site):
        assert site.axes == "batch pos kv_head d_head" and v.shape[2] == lens.config.num_key_value_heads
        v = v.clone()
        v[:, :, kv_head] += 1.0
        return v

    plain = []
    h = v_proj.register_forward_hook(lambda m, a, o: plain.append(o.clone()))
    with torch.no_grad():
        base = lens.model(**batch).logits
    h.remove()
    with lens.hooks(hooks=[("blocks.0.attn.hook_v", shift)]):
        h = v_proj.register_forward_hook(lambda m, a, o: seen.append(o.clone()))  # runs after ours
        with torch.no_grad():
            patched = lens.model(**batch).logits
        h.remove()
    expected = plain[0].clone()
    expected[..., kv_head * d_head:(kv_head + 1) * d_head] += 1.0  # exactly this slice of v_proj's output
    assert torch.equal(seen[0], expected)
    assert max_diff(patched, base) > 1e-4
    assert hook_counts(lens.model) == 0


def test_write_to_resid_mid_changes_the_residual_downstream(lens, batch):
    delta = torch.randn(lens.config.hidden_size, generator=torch.Generator().manual_seed(3))
    layer = lens.model.model.layers[0]
    _, before = lens.run_with_cache(batch, names="blocks.0.hook_resid_mid")
    logits, cache = lens.run_with_cache(
        batch, names=["blocks.0.hook_resid_mid", "blocks.0.hook_resid_post", "blocks.1.hook_resid_pre"],
        hooks=[("blocks.0.hook_resid_mid", lambda x, site: x + delta)],
    )
    new_mid = before["blocks.0.hook_resid_mid"] + delta
    assert max_diff(cache["blocks.0.hook_resid_mid"], new_mid) == 0
    with torch.no_grad():
        expected_post = new_mid + layer.mlp(layer.post_attention_layernorm(new_mid))
    # the written residual flows into both the MLP and the skip connection
    assert max_diff(cache["blocks.0.hook_resid_post"], expected_post) <= TOL
    assert torch.equal(cache["blocks.1.hook_resid_pre"], cache["blocks.0.hook_resid_post"])
    assert max_diff(logits, lens.run_with_hooks(batch, hooks=[])) > 1e-4


@pytest.mark.parametrize("bias", [False, True], ids=["no-bias", "o_proj-bias"])
def test_head_result_sums_to_attn_out_and_writes_through(batch, bias):
    lens = omnilens.load(make_model("dense", attention_bias=bias))
    o_bias = lens.model.model.layers[0].self_attn.o_proj.bias
    zero_head = 1

    def drop(result, site):
        result[:, :, zero_head] = 0  # in place, returning the same tensor
        return result

    _, cache = lens.run_with_cache(batch, names=["blocks.0.attn.hook_result", "blocks.0.hook_attn_out"])
    heads_sum = cache["blocks.0.attn.hook_result"].sum(-2)
    assert max_diff(heads_sum + (o_bias if bias else 0), cache["blocks.0.hook_attn_out"]) <= TOL
    _, patched = lens.run_with_cache(batch, names="blocks.0.hook_attn_out", hooks=[("blocks.0.attn.hook_result", drop)])
    expected = cache["blocks.0.hook_attn_out"] - cache["blocks.0.attn.hook_result"][:, :, zero_head]
    assert max_diff(patched["blocks.0.hook_attn_out"], expected) <= TOL


# --- the attention implementation is switched only for the run ----------------------------------

def test_attention_points_are_removed_and_sdpa_restored(lens, batch):
    assert lens.model.config._attn_implementation == "sdpa"
    _, cache = lens.run_with_cache(batch, names="blocks.*.attn.hook_pattern")
    assert cache["blocks.0.attn.hook_pattern"].shape[1] == lens.config.num_attention_heads
    assert all(layer.self_attn.config._attn_implementation == "sdpa" for layer in lens.model.model.layers)
    assert_clean(lens.model)


# --- property test over random tiny configs ------------------------------------------------------

@st.composite
def qwen3_configs(draw):
    n_kv = draw(st.sampled_from([1, 2]))
    n_heads = n_kv * draw(st.sampled_from([1, 2, 3]))
    n_layers = draw(st.integers(1, 3))
    return dict(num_attention_heads=n_heads, num_key_value_heads=n_kv,
                head_dim=draw(st.sampled_from([4, 8, 12])), num_hidden_layers=n_layers,
                hidden_size=draw(st.sampled_from([16, 24])), intermediate_size=32,
                seed=draw(st.integers(0, 1000)), attention_bias=draw(st.booleans()),
                mlp_only_layers=draw(st.lists(st.integers(0, n_layers - 1), max_size=1)))  # MoE: dense layers


@settings(max_examples=16, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(cfg=qwen3_configs(), kind=st.sampled_from(MODEL_KINDS))
def test_parity_and_identity_over_random_configs(cfg, kind, batch):
    extra = dict(moe_intermediate_size=16) if kind == "moe" else {}
    model = make_model(kind, **cfg, **extra)
    lens = omnilens.load(model)
    graph = lens.graph
    assert graph["blocks.0.attn.hook_z"].axes == "batch pos head d_head"
    assert graph.n_layers() == cfg["num_hidden_layers"]
    for i, layer in enumerate(model.model.layers):  # mixed dense / MoE layers map to their own sites
        assert (f"blocks.{i}.mlp.hook_pre" in graph) == hasattr(layer.mlp, "gate_proj")
        assert (f"blocks.{i}.mlp.hook_router_logits" in graph) == hasattr(layer.mlp, "experts")
    assert_sites_match(lens, batch)
    with torch.no_grad():
        lens.model.set_attn_implementation("eager")
        eager = lens.model(**batch).logits
        lens.model.set_attn_implementation("sdpa")
    hooks = [(n, lambda x, site: x.clone()) for n in graph.names(include_opt_in=True)]
    assert torch.equal(lens.run_with_hooks(batch, hooks=hooks), eager)


def test_write_to_resid_mid_under_autograd_matches_hand_version(batch):
    """The in-place residual write keeps backward working, also for writes whose graph saves their input."""
    lens = omnilens.load(make_model("dense"))
    model, layer = lens.model, lens.model.model.layers[0]
    params = [layer.self_attn.q_proj.weight, layer.mlp.up_proj.weight, model.lm_head.weight]

    def unit(x: torch.Tensor) -> torch.Tensor:
        return x / x.norm(dim=-1, keepdim=True)  # norm() saves x for backward

    logits = lens.run_with_hooks(batch, hooks=[("blocks.0.hook_resid_mid", lambda x, site: unit(x))], grad=True)
    ours = torch.autograd.grad(logits.sum(), params)
    # by hand: attn_out' = unit(resid_pre + attn_out) - resid_pre, so that resid_mid' = unit(resid_mid)
    seen = {}
    hooks = [layer.register_forward_pre_hook(lambda m, args: seen.update(resid=args[0])),
             layer.self_attn.register_forward_hook(lambda m, a, out: (unit(seen["resid"] + out[0]) - seen["resid"],
                                                                       *out[1:]))]
    try:
        expected = model(**batch).logits
    finally:
        for h in hooks:
            h.remove()
    assert max_diff(logits, expected) <= TOL
    for got, want in zip(ours, torch.autograd.grad(expected.sum(), params), strict=True):
        assert max_diff(got, want) <= TOL * max(1.0, want.abs().max().item())


def test_moe_routing_writes(batch):
    """topk_idx / topk_weights writes re-route tokens; router_logits writes change nothing (documented)."""
    lens = omnilens.load(make_model("moe"))
    mlp, k = lens.model.model.layers[0].mlp, lens.config.num_experts_per_tok
    base, cache = lens.run_with_cache(batch, names=["blocks.0.ln2.hook_normalized", "blocks.0.hook_mlp_out"])
    noise = lens.run_with_hooks(batch, hooks=[("blocks.0.mlp.hook_router_logits", lambda x, site: torch.randn_like(x))])
    assert torch.equal(noise, base)

    def to_experts_2_and_3(idx, site):
        return torch.tensor([2, 3][:k]).expand_as(idx).clone()

    def equal_weights(w, site):
        return torch.full_like(w, 1.0 / k)

    _, routed = lens.run_with_cache(batch, names="blocks.0.hook_mlp_out",
                                    hooks=[("blocks.0.mlp.hook_topk_idx", to_experts_2_and_3),
                                           ("blocks.0.mlp.hook_topk_weights", equal_weights)])
    x = cache["blocks.0.ln2.hook_normalized"]
    inter = lens.config.moe_intermediate_size
    expected = torch.zeros_like(x)
    with torch.no_grad():
        for e in [2, 3][:k]:
            gu = x @ mlp.experts.gate_up_proj[e].T
            expected += (torch.nn.functional.silu(gu[..., :inter]) * gu[..., inter:]) @ mlp.experts.down_proj[e].T / k
    assert max_diff(routed["blocks.0.hook_mlp_out"], expected) <= TOL
    assert max_diff(routed["blocks.0.hook_mlp_out"], cache["blocks.0.hook_mlp_out"]) > 1e-3


def test_several_writes_on_one_site_compose_in_order(lens, batch):
    site = "blocks.1.hook_attn_out"
    composed = lens.run_with_hooks(batch, hooks=[(site, lambda x, s: x + 1), (site, lambda x, s: x * 2)])
    single = lens.run_with_hooks(batch, hooks=[(site, lambda x, s: (x + 1) * 2)])
    assert torch.equal(composed, single)


def test_hook_result_reads_and_later_writes_see_earlier_writes(batch):
    lens = omnilens.load(make_model("dense", attention_bias=True))
    site = "blocks.0.attn.hook_result"

    def drop(r, s):
        r[:, :, 1] = 0
        return r

    _, cache = lens.run_with_cache(batch, names=site, hooks=[(site, drop)])
    assert torch.equal(cache[site][:, :, 1], torch.zeros_like(cache[site][:, :, 1]))
    composed = lens.run_with_hooks(batch, hooks=[(site, lambda r, s: r * 2), (site, lambda r, s: r + 1)])
    assert max_diff(composed, lens.run_with_hooks(batch, hooks=[(site, lambda r, s: r * 2 + 1)])) <= TOL
    # a later write that restores the unwritten values gives the unwritten output back, bit for bit
    _, clean = lens.run_with_cache(batch, names=site)
    restored = lens.run_with_hooks(batch, hooks=[(site, drop), (site, lambda r, s: clean[site].clone())])
    assert torch.equal(restored, lens.run_with_hooks(batch, hooks=[]))
