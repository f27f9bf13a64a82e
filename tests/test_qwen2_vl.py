"""Qwen2-VL adapter: every vision site against a hand-written packed vision forward, language sites against
Hugging Face hidden states, per-image segments, identity writes, nnsight parity and input validation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import assert_same_values, hook_counts, picture, rotate_half

from omnilens import HookError
from omnilens.executors.base import Read, Write
from omnilens.inputs import vision_inputs
from omnilens.packed import Segments, pad_segments, per_image, to_grid

ATOL = 1e-5
PROMPT = "<image> and <image> what colour is the cat ?"


@pytest.fixture(scope="module")
def vi(vl_lens, tokenizer):
    """Two images of different sizes: 16x12 px (8x6 patches, 12 tokens) and 8x8 px (4x4 patches, 4 tokens)."""
    return vision_inputs(tokenizer, [picture(16, 12, 0), picture(8, 8, 1)], PROMPT, config=vl_lens.config)


# ---------------------------------------------------------------------------------------------
# an independent packed vision forward, from the weights
# ---------------------------------------------------------------------------------------------
def vision_rope(grid: torch.Tensor, merge: int, d_head: int, theta: float = 10000.0):
    """cos/sin ``[patch d_head]``: 2-D rotary angles of each patch in block-major order."""
    inv = 1.0 / theta ** (torch.arange(0, d_head // 2, 2, dtype=torch.float) / (d_head // 2))
    pos = []
    for t, h, w in grid.tolist():
        hh = torch.arange(h)[:, None].expand(h, w).reshape(h // merge, merge, w // merge, merge).permute(0, 2, 1, 3)
        ww = torch.arange(w)[None, :].expand(h, w).reshape(h // merge, merge, w // merge, merge).permute(0, 2, 1, 3)
        pos.append(torch.stack([hh.flatten(), ww.flatten()], -1).repeat(t, 1))
    pos = torch.cat(pos).float()
    freqs = torch.cat([pos[:, :1] * inv, pos[:, 1:] * inv], -1)
    emb = torch.cat([freqs, freqs], -1)
    return emb.cos(), emb.sin()


def reference_vision(model, pixel_values, grid) -> dict[str, object]:
    """Every vision site computed by hand: per-image attention from ``cu_seqlens``, the vision rotary embedding."""
    vis = model.model.visual
    cfg = model.config.vision_config
    m, n_heads = cfg.spatial_merge_size, cfg.num_heads
    d_head = cfg.embed_dim // n_heads
    out: dict[str, object] = {}
    x = pixel_values.reshape(pixel_values.shape[0], -1) @ vis.patch_embed.proj.weight.reshape(cfg.embed_dim, -1).T
    out["vision.hook_patch_embed"] = x
    cos, sin = vision_rope(grid, m, d_head)
    cos, sin = cos[:, None, :], sin[:, None, :]
    lengths = grid.prod(-1).tolist()
    for i, blk in enumerate(vis.blocks):
        p = f"vision.blocks.{i}."
        out[p + "hook_resid_pre"] = x
        ln1 = F.layer_norm(x, (cfg.embed_dim,), blk.norm1.weight, blk.norm1.bias, 1e-6)
        qkv = (ln1 @ blk.attn.qkv.weight.T + blk.attn.qkv.bias).view(-1, 3, n_heads, d_head)
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        rq, rk = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        zs, pats, rqs, rks = [], [], [], []
        for qi, ki, vi_ in zip(rq.split(lengths), rk.split(lengths), v.split(lengths)):
            pat = torch.softmax(torch.einsum("qhd,khd->hqk", qi, ki) * d_head**-0.5, dim=-1)
            pats.append(pat[None])
            rqs.append(qi)
            rks.append(ki)
            zs.append(torch.einsum("hqk,khd->qhd", pat, vi_))
        z = torch.cat(zs)
        attn_out = z.reshape(z.shape[0], -1) @ blk.attn.proj.weight.T + blk.attn.proj.bias
        mid = x + attn_out
        ln2 = F.layer_norm(mid, (cfg.embed_dim,), blk.norm2.weight, blk.norm2.bias, 1e-6)
        pre = ln2 @ blk.mlp.fc1.weight.T + blk.mlp.fc1.bias
        post = pre * torch.sigmoid(1.702 * pre)  # quick_gelu
        mlp_out = post @ blk.mlp.fc2.weight.T + blk.mlp.fc2.bias
        x = mid + mlp_out
        out.update({
            p + "ln1.hook_normalized": ln1, p + "attn.hook_q": q, p + "attn.hook_k": k, p + "attn.hook_v": v,
            p + "attn.hook_rot_q": rqs, p + "attn.hook_rot_k": rks, p + "attn.hook_pattern": pats,
            p + "attn.hook_z": z, p + "hook_attn_out": attn_out, p + "hook_resid_mid": mid,
            p + "ln2.hook_normalized": ln2, p + "mlp.hook_pre": pre, p + "mlp.hook_post": post,
            p + "hook_mlp_out": mlp_out, p + "hook_resid_post": x,
        })
    mg = vis.merger
    h = F.layer_norm(x, (cfg.embed_dim,), mg.ln_q.weight, mg.ln_q.bias, 1e-6).reshape(-1, cfg.embed_dim * m * m)
    h = F.gelu(h @ mg.mlp[0].weight.T + mg.mlp[0].bias)
    out["vision.hook_merger"] = h @ mg.mlp[2].weight.T + mg.mlp[2].bias
    return out


def test_graph_towers_and_forward_order(vl_lens):
    g = vl_lens.graph
    assert g.towers == ["", "vision"] and g.n_layers("vision") == 2 and g.n_layers() == 2
    names = g.names()
    assert names.index("hook_embed") < names.index("vision.hook_patch_embed") < names.index("vision.hook_merger")
    assert names.index("vision.hook_merger") < names.index("blocks.0.hook_resid_pre")
    assert "blocks.0.attn.hook_q_normed" not in g  # Qwen2 attention: no q/k norm
    assert g["vision.blocks.1.attn.hook_pattern"].axes == "segment head query key"
    assert g["blocks.0.attn.hook_k"].axes == "batch pos kv_head d_head"


def test_every_vision_site_matches_hand_written_forward(vl_lens, vi):
    _, cache = vl_lens.run_with_cache(vi, "vision.*")
    with torch.no_grad():
        ref = reference_vision(vl_lens.model, vi["pixel_values"], vi["image_grid_thw"])
    vision_sites = vl_lens.graph.names("vision.*")
    assert set(ref) == set(vision_sites)
    for name in vision_sites:
        got = cache.steps(name) if isinstance(ref[name], list) else [cache[name]]
        want = ref[name] if isinstance(ref[name], list) else [ref[name]]
        assert len(got) == len(want), name
        for g, w in zip(got, want):
            assert g.shape == w.shape, (name, g.shape, w.shape)
            torch.testing.assert_close(g, w, atol=ATOL, rtol=0, msg=name)
    # opt-in per-head result: z_h @ W_h^T, summing (plus the bias) to the attention output
    _, res = vl_lens.run_with_cache(vi, "vision.blocks.1.attn.hook_result")
    result = res["vision.blocks.1.attn.hook_result"]
    proj = vl_lens.model.model.visual.blocks[1].attn.proj
    w = proj.weight.view(32, 4, 8)
    want = torch.einsum("phd,mhd->phm", ref["vision.blocks.1.attn.hook_z"], w)
    torch.testing.assert_close(result, want, atol=ATOL, rtol=0)
    torch.testing.assert_close(result.sum(1) + proj.bias, ref["vision.blocks.1.hook_attn_out"], atol=ATOL, rtol=0)


def test_language_sites_match_hf_hidden_states(vl_lens, vi):
    logits, cache = vl_lens.run_with_cache(vi, ["blocks.*.hook_resid_*", "ln_final.hook_normalized", "hook_logits"])
    with torch.no_grad():
        vl_lens.model.set_attn_implementation("eager")
        try:
            hf = vl_lens.model(**vi.inputs, output_hidden_states=True)
        finally:
            vl_lens.model.set_attn_implementation("sdpa")
    hs = hf.hidden_states
    torch.testing.assert_close(cache["blocks.0.hook_resid_pre"], hs[0], atol=ATOL, rtol=0)
    torch.testing.assert_close(cache["blocks.0.hook_resid_post"], hs[1], atol=ATOL, rtol=0)
    torch.testing.assert_close(cache["blocks.1.hook_resid_pre"], hs[1], atol=ATOL, rtol=0)
    torch.testing.assert_close(cache["ln_final.hook_normalized"], hs[2], atol=ATOL, rtol=0)
    torch.testing.assert_close(logits, hf.logits, atol=ATOL, rtol=0)
    # the merged tokens are exactly what enters the residual stream at each image's token span
    _, vcache = vl_lens.run_with_cache(vi, ["vision.hook_merger", "blocks.0.hook_resid_pre"])
    merged = per_image(vcache, "vision.hook_merger")
    for i, span in enumerate(vi.image_spans):
        assert torch.equal(vcache["blocks.0.hook_resid_pre"][0, span], merged[i])


def mrope_positions(vi, merge: int) -> torch.Tensor:
    """``[3 pos]`` (t, h, w) positions by hand: text counts on; an image's tokens sit on its merged grid."""
    n = vi["input_ids"].shape[1]
    pos = torch.zeros(3, n, dtype=torch.long)
    cur, i = 0, 0
    spans = {s.start: (k, s) for k, s in enumerate(vi.image_spans)}
    while i < n:
        if i in spans:
            k, span = spans[i]
            t, h, w = vi.segments.grid_thw[k]
            hh, ww = h // merge, w // merge
            idx = torch.arange(span.stop - span.start)
            pos[0, span] = cur + idx // (hh * ww)
            pos[1, span] = cur + (idx // ww) % hh
            pos[2, span] = cur + idx % ww
            cur += max(hh, ww)
            i = span.stop
        else:
            pos[:, i] = cur
            cur += 1
            i += 1
    return pos


def test_language_rotated_queries_are_mrope_and_pattern_causal(vl_lens, vi):
    names = [f"blocks.0.attn.{h}" for h in ("hook_q", "hook_rot_q", "hook_k", "hook_rot_k", "hook_pattern")]
    _, cache = vl_lens.run_with_cache(vi, names)
    q, rq, k, rk, pat = (cache[n] for n in names)
    tc = vl_lens.config.text_config
    d_head = tc.hidden_size // tc.num_attention_heads
    pos = mrope_positions(vi, vl_lens.config.vision_config.spatial_merge_size).float()
    inv = 1.0 / tc.rope_parameters["rope_theta"] ** (torch.arange(0, d_head, 2, dtype=torch.float) / d_head)
    freqs = pos[:, :, None] * inv  # [3 pos d_head/2]
    bounds = np.cumsum([0] + list(tc.rope_parameters["mrope_section"]))
    half = torch.cat([freqs[a % 3, :, bounds[a]:bounds[a + 1]] for a in range(3)], -1)
    cos, sin = torch.cat([half, half], -1).cos()[None, :, None], torch.cat([half, half], -1).sin()[None, :, None]
    torch.testing.assert_close(rq, q * cos + rotate_half(q) * sin, atol=ATOL, rtol=0)
    torch.testing.assert_close(rk, k * cos + rotate_half(k) * sin, atol=ATOL, rtol=0)
    # an image token's pattern row, recomputed from the rotated q/k (GQA: 2 query heads per kv head)
    kk = rk.repeat_interleave(2, dim=2)
    scores = torch.einsum("bqhd,bkhd->bhqk", rq, kk) * d_head**-0.5
    scores = scores.masked_fill(torch.ones_like(scores, dtype=torch.bool).triu(1), float("-inf"))
    torch.testing.assert_close(pat, scores.softmax(-1), atol=ATOL, rtol=0)


# ---------------------------------------------------------------------------------------------
# packed segments
# ---------------------------------------------------------------------------------------------
def test_cache_meta_carries_segments_and_split_is_per_image(vl_lens, vi):
    _, cache = vl_lens.run_with_cache(vi, ["vision.hook_patch_embed", "vision.blocks.1.hook_resid_post",
                                        "vision.hook_merger", "vision.blocks.0.attn.hook_pattern"])
    assert cache.meta["segments"] == {"patch": [(0, 48), (48, 64)], "merged": [(0, 12), (12, 16)]}
    assert cache.meta["vision"]["grid_thw"] == [[1, 8, 6], [1, 4, 4]]
    assert Segments.from_meta(cache.meta["vision"]) == vi.segments
    parts = per_image(cache, "vision.blocks.1.hook_resid_post")
    assert [p.shape[0] for p in parts] == [48, 16]
    assert [p.shape[0] for p in per_image(cache, "vision.hook_merger")] == [12, 4]
    pats = per_image(cache, "vision.blocks.0.attn.hook_pattern")
    assert [tuple(p.shape) for p in pats] == [(1, 4, 48, 48), (1, 4, 16, 16)]
    padded = pad_segments(pats)
    assert padded.shape == (2, 4, 48, 48) and torch.all(padded[1, :, 16:] == 0) and torch.all(padded[1, :, :, 16:] == 0)
    # each image's tower run alone gives the same activations as its segment of the packed run
    for i, img in enumerate([picture(16, 12, 0), picture(8, 8, 1)]):
        alone = vision_inputs(vl_lens.tokenizer, [img], "", config=vl_lens.config)
        _, c1 = vl_lens.run_with_cache(alone, ["vision.blocks.1.hook_resid_post", "vision.hook_merger"])
        torch.testing.assert_close(c1["vision.blocks.1.hook_resid_post"], parts[i], atol=ATOL, rtol=0)
        torch.testing.assert_close(c1["vision.hook_merger"], per_image(cache, "vision.hook_merger")[i], atol=ATOL, rtol=0)


def test_to_grid_restores_raster_patch_order(vl_lens, tokenizer):
    """Pixels coded by their patch's raster index come back in raster order after ``to_grid``."""
    h, w, p = 8, 6, vl_lens.config.vision_config.patch_size
    img = np.zeros((h * p, w * p, 3), dtype=np.uint8)
    for y in range(h * p):
        for x in range(w * p):
            img[y, x] = (y // p) * w + x // p
    vi1 = vision_inputs(tokenizer, [img], "", config=vl_lens.config)
    seg = vi1.segments
    assert seg.grid_thw == ((1, h, w),)
    grid = to_grid(vi1["pixel_values"], seg.grid_thw[0], seg.merge_size)
    codes = grid[0, :, :, 0].flatten()
    assert torch.all(codes[1:] > codes[:-1])  # strictly increasing in raster order
    merged = to_grid(torch.arange(12), (1, h, w), 2, merged=True)
    assert merged.shape == (1, 4, 3) and merged[0, 1, 2] == 5


def test_patching_image_a_leaves_image_b_unchanged(vl_lens, vi):
    seg = vi.segments
    a, b = seg.span(0, "patch"), seg.span(1, "patch")
    names = ["vision.blocks.1.hook_resid_post", "vision.blocks.1.attn.hook_pattern", "vision.blocks.1.attn.hook_rot_q"]
    _, clean = vl_lens.run_with_cache(vi, names)

    def perturb_a(act, spec):
        out = act.clone()
        out[a] += torch.randn_like(out[a], generator=torch.Generator().manual_seed(0))
        return out

    _, patched = vl_lens.run_with_cache(vi, names, hooks=[("vision.blocks.0.hook_resid_post", perturb_a)])
    r0, r1 = clean[names[0]], patched[names[0]]
    assert torch.equal(r0[b], r1[b])
    assert (r0[a] - r1[a]).abs().max() > 1e-2
    for n in names[1:]:
        assert torch.equal(clean.steps(n)[1], patched.steps(n)[1])
        assert not torch.equal(clean.steps(n)[0], patched.steps(n)[0])


# ---------------------------------------------------------------------------------------------
# writes, executors
# ---------------------------------------------------------------------------------------------
def test_identity_writes_leave_logits_bit_identical(vl_lens, vi):
    names = vl_lens.graph.names()
    before = hook_counts(vl_lens.model)
    base = vl_lens.run_with_hooks(vi, [(n, lambda a, s: None) for n in names])
    same = vl_lens.run_with_hooks(vi, [(n, lambda a, s: a.clone()) for n in names])
    assert torch.equal(base, same)
    assert hook_counts(vl_lens.model) == before


def test_rot_q_write_reaches_only_that_image(vl_lens, vi):
    """A write to one image's rotated queries changes that image's attention output only."""
    site = "vision.blocks.0.attn.hook_rot_q"
    _, clean = vl_lens.run_with_cache(vi, ["vision.blocks.0.attn.hook_z", site])  # eager attention, as the writes
    _, patched = vl_lens.run_with_cache(vi, "vision.blocks.0.attn.hook_z",
                                     hooks=[(site, lambda a, s: a * 2.0)])
    seg = vi.segments
    z0, z1 = clean["vision.blocks.0.attn.hook_z"], patched["vision.blocks.0.attn.hook_z"]
    assert not torch.equal(z0[seg.span(0)], z1[seg.span(0)]) and not torch.equal(z0[seg.span(1)], z1[seg.span(1)])
    only_first = [Write(site, lambda a, s: a * 2.0, steps=[0])]
    res = vl_lens.run(vi, [Read("vision.blocks.0.attn.hook_z")], only_first)
    z2 = res.values["vision.blocks.0.attn.hook_z"][0]
    assert torch.equal(z2[seg.span(1)], z0[seg.span(1)]) and torch.equal(z2[seg.span(0)], z1[seg.span(0)])


def test_fused_qkv_write_edits_one_head_of_v(vl_lens, vi):
    _, clean = vl_lens.run_with_cache(vi, ["vision.blocks.0.attn.hook_q", "vision.blocks.0.attn.hook_v",
                                        "vision.blocks.0.attn.hook_z"])

    def zero_head(act, spec):
        out = act.clone()
        out[:, 2] = 0
        return out

    _, p = vl_lens.run_with_cache(vi, ["vision.blocks.0.attn.hook_q", "vision.blocks.0.attn.hook_v",
                                    "vision.blocks.0.attn.hook_z"], hooks=[("vision.blocks.0.attn.hook_v", zero_head)])
    assert torch.equal(p["vision.blocks.0.attn.hook_q"], clean["vision.blocks.0.attn.hook_q"])
    assert torch.all(p["vision.blocks.0.attn.hook_v"][:, 2] == 0)
    z = p["vision.blocks.0.attn.hook_z"]
    assert torch.all(z[:, 2] == 0) and torch.equal(z[:, :2], clean["vision.blocks.0.attn.hook_z"][:, :2])


def test_nnsight_executor_matches_local(vl_lens, vi):
    names = [n for n in vl_lens.graph.names() if "attention_points" not in vl_lens.graph[n].requires]
    l0, c0 = vl_lens.run_with_cache(vi, names)
    l1, c1 = vl_lens.run_with_cache(vi, names, executor="nnsight")
    assert torch.equal(l0, l1)
    for n in names:
        assert torch.equal(c0[n], c1[n]), n


def test_nnsight_remote_simulation_matches_local_with_writes(vl_lens, vi):
    seg = vi.segments
    other = torch.randn(seg.n_merged[1], vl_lens.config.text_config.hidden_size,
                        generator=torch.Generator().manual_seed(3))

    def swap_b(act, spec):
        out = act.clone()
        out[seg.span(1, "merged")] = other
        return out

    reads = [Read(n) for n in ["vision.blocks.1.hook_resid_post", "vision.hook_merger", "blocks.1.hook_resid_post"]]
    writes = [Write("vision.hook_merger", swap_b)]
    local = vl_lens.run(vi, reads, writes)
    ex = vl_lens.executor("nnsight", remote="local")
    with torch.no_grad():
        remote = ex.run(vl_lens.to_inputs(vi), reads, writes)
    assert torch.equal(local.output.logits, remote.output.logits)
    for r in reads:
        assert torch.equal(local.values[r.name][0], remote.values[r.name][0]), r.name


def test_nnsight_attention_points_match_local_on_one_image(vl_lens, tokenizer):
    one = vision_inputs(tokenizer, [picture(8, 8, 1)], "what colour ?", config=vl_lens.config)
    names = vl_lens.graph.names(["vision.blocks.*.attn.hook_pattern", "vision.blocks.*.attn.hook_rot_k",
                              "blocks.*.attn.hook_pattern"])
    _, c0 = vl_lens.run_with_cache(one, names)
    _, c1 = vl_lens.run_with_cache(one, names, executor="nnsight")
    for n in names:
        assert torch.equal(c0[n], c1[n]), n


# ---------------------------------------------------------------------------------------------
# behaviour through the merger
# ---------------------------------------------------------------------------------------------
def test_merger_write_from_other_image_equals_running_on_it(vl_lens, tokenizer):
    a = vision_inputs(tokenizer, [picture(16, 12, 5)], "what colour is the cat ?", config=vl_lens.config)
    b = vision_inputs(tokenizer, [picture(16, 12, 6)], "what colour is the cat ?", config=vl_lens.config)
    _, cb = vl_lens.run_with_cache(b, "vision.hook_merger")
    before = hook_counts(vl_lens.model)
    logits_b = vl_lens.run_with_hooks(b, [])
    logits_a = vl_lens.run_with_hooks(a, [])
    patched = vl_lens.run_with_hooks(a, [("vision.hook_merger", lambda act, s: cb["vision.hook_merger"])])
    assert not torch.allclose(logits_a, logits_b, atol=1e-3)
    torch.testing.assert_close(patched, logits_b, atol=ATOL, rtol=0)
    small = vision_inputs(tokenizer, [picture(8, 8, 7)], "what colour is the cat ?", config=vl_lens.config)
    _, cs = vl_lens.run_with_cache(small, "vision.hook_merger")
    with pytest.raises(HookError, match=r"vision\.hook_merger.*\(12, 64\).*\(4, 64\)"):
        vl_lens.run_with_hooks(a, [("vision.hook_merger", lambda act, s: cs["vision.hook_merger"])])
    assert hook_counts(vl_lens.model) == before


# ---------------------------------------------------------------------------------------------
# inputs
# ---------------------------------------------------------------------------------------------
def test_vision_inputs_spans_and_token_types(vl_lens, vi):
    ids = vi["input_ids"][0]
    cfg = vl_lens.config
    assert [s.stop - s.start for s in vi.image_spans] == [12, 4]
    for s in vi.image_spans:
        assert torch.all(ids[s] == cfg.image_token_id)
        assert ids[s.start - 1] == cfg.vision_start_token_id and ids[s.stop] == cfg.vision_end_token_id
    assert torch.equal(vi["mm_token_type_ids"][0].bool(), ids == cfg.image_token_id)
    assert isinstance(vi.segments, Segments) and vi.segments.n_merged == [12, 4]
    _, full = vl_lens.run_with_cache(vi, "blocks.1.hook_resid_post")
    _, img_b = vl_lens.run_with_cache(vi, "blocks.1.hook_resid_post", pos=vi.image_spans[1])
    assert torch.equal(img_b["blocks.1.hook_resid_post"], full["blocks.1.hook_resid_post"][:, 16:20])
    pil = pytest.importorskip("PIL.Image")
    vp = vision_inputs(vl_lens.tokenizer, [pil.fromarray(picture(16, 12, 0)), picture(8, 8, 1)], PROMPT, config=cfg)
    assert torch.equal(vp["pixel_values"], vi["pixel_values"]) and torch.equal(vp["input_ids"], vi["input_ids"])
    with pytest.raises(ValueError, match="2 .*markers for 1 images"):
        vision_inputs(vl_lens.tokenizer, [picture(8, 8, 1)], PROMPT, config=cfg)


def _forward_count(vl_lens):
    calls = []
    h = vl_lens.model.model.visual.patch_embed.register_forward_hook(lambda *a: calls.append(1))
    return calls, h


def test_bad_inputs_raise_before_the_model_runs(vl_lens, vi):
    calls, handle = _forward_count(vl_lens)
    try:
        missing_grid = {k: v for k, v in vi.items() if k != "image_grid_thw"}
        with pytest.raises(HookError, match=r"vision\.hook_patch_embed.*image_grid_thw"):
            vl_lens.run_with_cache(missing_grid, "vision.hook_merger")
        ids = vi["input_ids"].clone()
        drop = vi.image_spans[0].start
        short = {**vi.inputs, "input_ids": torch.cat([ids[:, :drop], ids[:, drop + 1:]], 1),
                 "attention_mask": vi["attention_mask"][:, 1:], "mm_token_type_ids": vi["mm_token_type_ids"][:, 1:]}
        with pytest.raises(HookError, match=r"lengths \[12, 4\].*lengths \[11, 4\]"):
            vl_lens.run_with_hooks(short, [])
        with pytest.raises(HookError, match="pixel_values of shape"):
            vl_lens.run_with_hooks({**vi.inputs, "pixel_values": vi["pixel_values"][:-4]}, [])
        text_only = {k: v for k, v in vi.items() if k not in ("pixel_values", "image_grid_thw")}
        with pytest.raises(HookError, match="pixel_values for the 16 placeholder tokens"):
            vl_lens.run_with_hooks(text_only, [])
        assert calls == []
    finally:
        handle.remove()
    # mm_token_type_ids is filled in when absent
    no_types = {k: v for k, v in vi.items() if k != "mm_token_type_ids"}
    torch.testing.assert_close(vl_lens.run_with_hooks(no_types, []), vl_lens.run_with_hooks(vi, []), atol=0, rtol=0)


def test_nnsight_serves_every_per_image_visit_like_local(vl_lens, vi):
    """Attention points are visited once per image: the nnsight executor serves every visit, and a write with
    ``steps=[1]`` reaches image 1 only; every vision site and the logits equal the local executor's."""
    reads = [Read(n) for n in vl_lens.graph.names("vision.*", include_opt_in=True)]
    site = "vision.blocks.0.attn.hook_pattern"
    writes = [Write(site, lambda p, s: p * 0.5, steps=[1])]
    plain = vl_lens.run(vi, reads)
    local = vl_lens.run(vi, reads, writes)
    nn = vl_lens.run(vi, reads, writes, executor="nnsight")
    assert_same_values(nn, local, reads)
    assert len(nn.values[site]) == 2
    assert torch.equal(nn.values[site][0], plain.values[site][0])  # image 0 untouched
    assert torch.equal(nn.values[site][1], plain.values[site][1] * 0.5)  # image 1 written
    z0, z = plain.values["vision.blocks.0.attn.hook_z"][0], nn.values["vision.blocks.0.attn.hook_z"][0]
    first = vi.segments.span(0, "patch")
    assert torch.equal(z[first], z0[first]) and not torch.equal(z, z0)
