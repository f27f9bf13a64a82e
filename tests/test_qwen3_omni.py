"""Qwen3-Omni Thinker on the hook graph: text (MoE), audio and vision sites against Hugging Face internals and
hand-written block forwards, deepstack additions, per-clip audio segments, input builders and input errors."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import assert_same_values, close, fused_moe, hook_counts, picture, rms, rotate_half, wave

import omnilens
from omnilens import HookError
from omnilens.inputs.audio import audio_features, clip_tokens
from omnilens.inputs.omni import omni_inputs
from omnilens.packed import per_image
from omnilens.testing import tiny_omni, tiny_omni_feature_extractor, tiny_omni_thinker


@pytest.fixture(scope="module")
def fe():
    return tiny_omni_feature_extractor()


@pytest.fixture(scope="module")
def audio_batch(thinker_lens, omni_tok, fe):
    """Two rows, three clips of 1 s, 1.5 s and 0.5 s (13, 20 and 7 audio tokens), left-padded."""
    return omni_inputs(omni_tok, thinker_lens.config,
                       [["the cat", {"type": "audio", "audio": wave(1.0, 0)}, "is happy"],
                        [{"type": "audio", "audio": wave(1.5, 1)}, "and",
                         {"type": "audio", "audio": wave(0.5, 2)}, "what"]],
                       feature_extractor=fe)


@pytest.fixture(scope="module")
def audio_run(thinker_lens, audio_batch):
    return thinker_lens.run_with_cache(audio_batch, names=["hook_embed", "audio.*", "blocks.*"])


# ---------------------------------------------------------------------------------------------
# independent computations from the weights
# ---------------------------------------------------------------------------------------------
def rope(x, pos, theta):
    """``x`` ``[batch head pos d]`` rotated at positions ``pos`` ``[pos]`` (plain RoPE)."""
    d = x.shape[-1]
    freqs = pos[:, None].float() / theta ** (torch.arange(0, d, 2).float() / d)
    emb = torch.cat((freqs, freqs), -1)
    return x * emb.cos() + rotate_half(x) * emb.sin()


def softmax_attention(q, k, v, scale, causal):
    """``q`` ``[batch head q d]``, ``k``/``v`` ``[batch kv_head k d]`` -> pattern, z ``[batch q head d]``."""
    rep = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1)
    scores = q @ k.transpose(-1, -2) * scale
    if causal:
        n = q.shape[-2]
        scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    pattern = scores.softmax(-1)
    return pattern, (pattern @ v).transpose(1, 2)


def packed_attention(q, k, v, windows, scale):
    """Per-window bidirectional attention over packed ``[n head d]``; patterns per window and ``z``."""
    patterns, zs = [], []
    for a, b in windows:
        p, z = softmax_attention(q[a:b].transpose(0, 1)[None], k[a:b].transpose(0, 1)[None],
                                 v[a:b].transpose(0, 1)[None], scale, causal=False)
        patterns.append(p)
        zs.append(z[0])
    return patterns, torch.cat(zs)


# ---------------------------------------------------------------------------------------------
# Thinker text decoder (root, MoE)
# ---------------------------------------------------------------------------------------------
def test_thinker_text_sites_match_hf_hidden_states(thinker_lens, omni_tok):
    model = thinker_lens.model
    ids = omni_tok(["the cat is happy and the dog is sad"], return_tensors="pt")["input_ids"]
    logits, cache = thinker_lens.run_with_cache(ids)
    hf = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
    close(cache["blocks.0.hook_resid_pre"], hf.hidden_states[0])
    close(cache["hook_embed"], hf.hidden_states[0])  # text only: nothing scattered in
    close(cache["blocks.0.hook_resid_post"], hf.hidden_states[1])
    close(cache["blocks.1.hook_resid_pre"], hf.hidden_states[1])
    close(cache["ln_final.hook_normalized"], hf.hidden_states[2])
    close(logits, hf.logits)
    assert "blocks.0.hook_deepstack" not in cache  # no image: the deepstack point is not installed


def test_thinker_moe_block_by_hand(thinker_lens, omni_tok):
    """Every site of Thinker block 1 recomputed from its input with the weights (MoE, q/k norm, RoPE)."""
    ids = omni_tok(["a red bird and a blue fish"], return_tensors="pt")["input_ids"]
    _, cache = thinker_lens.run_with_cache(ids, names="blocks.1.*")
    layer = thinker_lens.model.model.language_model.layers[1]
    att, cfg = layer.self_attn, thinker_lens.config.text_config
    b, n, h, kv, d = 1, ids.shape[1], cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
    x = cache["blocks.1.hook_resid_pre"]
    ln1 = rms(x, layer.input_layernorm)
    close(cache["blocks.1.ln1.hook_normalized"], ln1)
    q = (ln1 @ att.q_proj.weight.T).view(b, n, h, d)
    k = (ln1 @ att.k_proj.weight.T).view(b, n, kv, d)
    v = (ln1 @ att.v_proj.weight.T).view(b, n, kv, d)
    close(cache["blocks.1.attn.hook_q"], q)
    close(cache["blocks.1.attn.hook_v"], v)
    qn, kn = rms(q, att.q_norm), rms(k, att.k_norm)
    close(cache["blocks.1.attn.hook_q_normed"], qn)
    close(cache["blocks.1.attn.hook_k_normed"], kn)
    pos = torch.arange(n)
    rq, rk = rope(qn.transpose(1, 2), pos, 10000.0), rope(kn.transpose(1, 2), pos, 10000.0)
    close(cache["blocks.1.attn.hook_rot_q"], rq.transpose(1, 2))
    close(cache["blocks.1.attn.hook_rot_k"], rk.transpose(1, 2))
    pattern, z = softmax_attention(rq, rk, v.transpose(1, 2), d**-0.5, causal=True)
    close(cache["blocks.1.attn.hook_pattern"], pattern)
    close(cache["blocks.1.attn.hook_z"], z)
    attn_out = z.reshape(b, n, h * d) @ att.o_proj.weight.T
    close(cache["blocks.1.hook_attn_out"], attn_out)
    mid = x + attn_out
    close(cache["blocks.1.hook_resid_mid"], mid)
    ln2 = rms(mid, layer.post_attention_layernorm)
    close(cache["blocks.1.ln2.hook_normalized"], ln2)
    logits, weights, idx, out = fused_moe(ln2.view(-1, cfg.hidden_size), layer.mlp, cfg.norm_topk_prob)
    close(cache["blocks.1.mlp.hook_router_logits"], logits)
    close(cache["blocks.1.mlp.hook_topk_weights"], weights)
    assert torch.equal(cache["blocks.1.mlp.hook_topk_idx"], idx)
    assert idx.unique().numel() > 1  # routing is not trivial
    close(cache["blocks.1.hook_mlp_out"], out.view(b, n, -1))
    close(cache["blocks.1.hook_resid_post"], mid + out.view(b, n, -1))


def test_hf_recorded_hidden_states_see_writes_on_every_call(omni_tok):
    """Writes run before Hugging Face's output recorders, which it installs lazily on the first call that
    records: the recorded hidden states carry the write on the first call and on later ones."""
    thinker_lens = omnilens.load(tiny_omni_thinker(seed=3), tokenizer=omni_tok)
    ids = omni_tok(["the cat is happy"], return_tensors="pt")["input_ids"]
    vec = torch.ones(thinker_lens.config.text_config.hidden_size)
    for _ in range(2):
        with thinker_lens.hooks([("blocks.0.hook_resid_post", lambda x, s: x + vec)]):
            edited = thinker_lens.model(input_ids=ids, output_hidden_states=True).hidden_states[1]
        plain = thinker_lens.model(input_ids=ids, output_hidden_states=True).hidden_states[1]
        close(edited, plain + vec)


def test_router_sites_equal_gate_outputs(audio_run, thinker_lens):
    """``mlp.hook_router_logits|topk_weights|topk_idx`` are ``mlp.gate``'s three outputs on ``ln2``."""
    _, cache = audio_run
    for i in range(2):
        x = cache[f"blocks.{i}.ln2.hook_normalized"]
        logits, scores, idx = thinker_lens.model.model.language_model.layers[i].mlp.gate(x.reshape(-1, x.shape[-1]))
        close(cache[f"blocks.{i}.mlp.hook_router_logits"], logits)
        close(cache[f"blocks.{i}.mlp.hook_topk_weights"], scores)
        assert torch.equal(cache[f"blocks.{i}.mlp.hook_topk_idx"], idx)


# ---------------------------------------------------------------------------------------------
# audio tower
# ---------------------------------------------------------------------------------------------
def test_audio_out_matches_hf_and_is_scattered_at_the_spans(audio_run, audio_batch, thinker_lens):
    _, cache = audio_run
    inp = audio_batch.inputs
    hf = thinker_lens.model.model.get_audio_features(inp["input_features"],
                                                     inp["feature_attention_mask"]).last_hidden_state
    close(cache["audio.hook_out"], hf)
    assert cache.meta["segments"]["frame"] == [(s.start, s.stop) for s in audio_batch.audio_segments]
    resid = cache["blocks.0.hook_resid_pre"]
    clips = iter(audio_batch.audio_segments)
    for row, spans in enumerate(audio_batch.spans):
        for span in spans["audio"]:
            assert (inp["input_ids"][row, span] == thinker_lens.config.audio_token_id).all()
            close(resid[row, span], cache["audio.hook_out"][next(clips)])
    text = inp["input_ids"] != thinker_lens.config.audio_token_id
    close(resid[text], cache["hook_embed"][text])


def test_audio_front_end_by_hand(audio_run, audio_batch, thinker_lens):
    """``audio.hook_conv`` from the conv stack on 100-frame chunks; ``audio.blocks.0.hook_resid_pre`` is the
    valid frames plus positions, packed."""
    _, cache = audio_run
    tower = thinker_lens.model.model.audio_tower
    feats, mask = audio_batch["input_features"], audio_batch["feature_attention_mask"]
    chunks = []
    for f, n in zip(feats, mask.sum(-1).tolist()):
        chunks += [f[:, a:min(a + 100, n)] for a in range(0, n, 100)]
    longest = max(c.shape[1] for c in chunks)
    x = torch.stack([F.pad(c, (0, longest - c.shape[1])) for c in chunks])[:, None]
    for conv in (tower.conv2d1, tower.conv2d2, tower.conv2d3):
        x = F.gelu(conv(x))
    c, f, t = x.shape[1:]
    conv_out = x.permute(0, 3, 1, 2).reshape(len(chunks), t, c * f) @ tower.conv_out.weight.T
    close(cache["audio.hook_conv"], conv_out)
    valid = []
    for c in chunks:
        n = c.shape[1]
        for _ in range(3):  # three stride-2, padding-1 convolutions
            n = (n - 1) // 2 + 1
        valid.append(n)
    pos = tower.positional_embedding.positional_embedding
    packed = torch.cat([conv_out[i, :n] + pos[:n] for i, n in enumerate(valid)])
    close(cache["audio.blocks.0.hook_resid_pre"], packed)


def test_audio_block_by_hand(audio_run, thinker_lens):
    """Audio block 0 recomputed: LayerNorms, per-window bidirectional attention (13-frame windows), GELU MLP."""
    _, cache = audio_run
    layer, cfg = thinker_lens.model.model.audio_tower.layers[0], thinker_lens.config.audio_config
    h, d = cfg.encoder_attention_heads, cfg.d_model // cfg.encoder_attention_heads
    x = cache["audio.blocks.0.hook_resid_pre"]
    ln1 = F.layer_norm(x, (cfg.d_model,), layer.self_attn_layer_norm.weight, layer.self_attn_layer_norm.bias)
    close(cache["audio.blocks.0.ln1.hook_normalized"], ln1)
    att = layer.self_attn
    q, k, v = (lin(ln1).view(-1, h, d) for lin in (att.q_proj, att.k_proj, att.v_proj))
    close(cache["audio.blocks.0.attn.hook_q"], q)
    close(cache["audio.blocks.0.attn.hook_k"], k)
    windows = [(0, 13), (13, 26), (26, 33), (33, 40)]  # clips of 13, 20, 7 frames in windows of 13
    patterns, z = packed_attention(q, k, v, windows, d**-0.5)
    got = cache.steps("audio.blocks.0.attn.hook_pattern")  # one visit per attention window
    assert [tuple(p.shape) for p in got] == [tuple(p.shape) for p in patterns]
    for a, b in zip(got, patterns):
        close(a, b)
    close(cache["audio.blocks.0.attn.hook_z"], z)
    attn_out = layer.self_attn.out_proj(z.reshape(-1, cfg.d_model))
    close(cache["audio.blocks.0.hook_attn_out"], attn_out)
    mid = x + attn_out
    close(cache["audio.blocks.0.hook_resid_mid"], mid)
    ln2 = F.layer_norm(mid, (cfg.d_model,), layer.final_layer_norm.weight, layer.final_layer_norm.bias)
    close(cache["audio.blocks.0.ln2.hook_normalized"], ln2)
    pre = layer.fc1(ln2)
    close(cache["audio.blocks.0.mlp.hook_pre"], pre)
    close(cache["audio.blocks.0.mlp.hook_post"], F.gelu(pre))
    out = layer.fc2(F.gelu(pre))
    close(cache["audio.blocks.0.hook_mlp_out"], out)
    close(cache["audio.blocks.0.hook_resid_post"], mid + out)


def test_batched_audio_per_clip_segments(audio_run, audio_batch, thinker_lens, omni_tok, fe):
    """Each clip's segment of the packed audio sites equals that clip run alone."""
    _, cache = audio_run
    clips = [wave(1.0, 0), wave(1.5, 1), wave(0.5, 2)]
    lengths = [s.stop - s.start for s in audio_batch.audio_segments]
    assert lengths == [13, 20, 7]
    for clip, seg in zip(clips, audio_batch.audio_segments):
        alone = omni_inputs(omni_tok, thinker_lens.config, [{"type": "audio", "audio": clip}], feature_extractor=fe)
        _, single = thinker_lens.run_with_cache(alone, names=["audio.hook_out", "audio.blocks.1.hook_resid_post"])
        close(cache["audio.hook_out"][seg], single["audio.hook_out"])
        close(cache["audio.blocks.1.hook_resid_post"][seg], single["audio.blocks.1.hook_resid_post"])


# ---------------------------------------------------------------------------------------------
# vision tower and deepstack
# ---------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def image_run(thinker_lens, omni_tok):
    oi = omni_inputs(omni_tok, thinker_lens.config, ["look at", {"type": "image", "image": picture(16, 8, 0)}, "and",
                                        {"type": "image", "image": picture(8, 8, 1)}, "what colour"])
    names = ["hook_embed", "vision.*", "blocks.*.hook_resid_*", "blocks.*.hook_deepstack",
             "vision.blocks.0.attn.hook_rot_q", "vision.blocks.0.attn.hook_rot_k", "vision.blocks.0.attn.hook_pattern"]
    return oi, *thinker_lens.run_with_cache(oi, names=names)


def test_vision_sites_match_hf(image_run, thinker_lens):
    oi, logits, cache = image_run
    hf = thinker_lens.model.model.get_image_features(oi["pixel_values"], oi["image_grid_thw"])
    close(cache["vision.hook_merger"], torch.cat(hf.pooler_output))
    for k, feats in enumerate(hf.deepstack_features):
        close(cache[f"vision.deepstack.{k}.hook_out"], torch.cat(feats))
    out = thinker_lens.model(**oi.inputs, output_hidden_states=True)
    close(logits, out.logits)
    close(cache["blocks.0.hook_resid_post"], out.hidden_states[1])  # HF records the block output, before deepstack
    resid = cache["blocks.0.hook_resid_pre"]
    for row_spans in oi.spans:
        for span, merged in zip(row_spans["image"], per_image(cache, "vision.hook_merger")):
            close(resid[0, span], merged)


def test_vision_block_by_hand(image_run, thinker_lens):
    """Vision block 0 from its input: LayerNorm, fused qkv, rotation-preserving rot_q/k, per-image attention, MLP."""
    oi, _, cache = image_run
    blk, cfg = thinker_lens.model.model.visual.blocks[0], thinker_lens.config.vision_config
    h, d = cfg.num_heads, cfg.hidden_size // cfg.num_heads
    x = cache["vision.blocks.0.hook_resid_pre"]
    ln1 = F.layer_norm(x, (cfg.hidden_size,), blk.norm1.weight, blk.norm1.bias, 1e-6)
    close(cache["vision.blocks.0.ln1.hook_normalized"], ln1)
    q, k, v = blk.attn.qkv(ln1).view(-1, 3, h, d).unbind(1)
    close(cache["vision.blocks.0.attn.hook_q"], q)
    close(cache["vision.blocks.0.attn.hook_v"], v)
    rq = torch.cat(cache.steps("vision.blocks.0.attn.hook_rot_q"))  # one visit per image
    rk = torch.cat(cache.steps("vision.blocks.0.attn.hook_rot_k"))
    close(rq.norm(dim=-1), q.norm(dim=-1))  # a rotation: per-head norms kept
    assert not torch.allclose(rq, q, atol=1e-3)
    segs = [(a, b) for a, b in zip(oi.vision.patch_offsets, oi.vision.patch_offsets[1:])]
    patterns, z = packed_attention(rq, rk, v, segs, d**-0.5)
    for got, want in zip(cache.steps("vision.blocks.0.attn.hook_pattern"), patterns):
        close(got, want)
    close(cache["vision.blocks.0.attn.hook_z"], z)
    mid = x + blk.attn.proj(z.reshape(-1, cfg.hidden_size))
    close(cache["vision.blocks.0.hook_resid_mid"], mid)
    ln2 = F.layer_norm(mid, (cfg.hidden_size,), blk.norm2.weight, blk.norm2.bias, 1e-6)
    pre = blk.mlp.linear_fc1(ln2)
    close(cache["vision.blocks.0.mlp.hook_pre"], pre)
    out = blk.mlp.linear_fc2(F.gelu(pre, approximate="tanh"))
    close(cache["vision.blocks.0.hook_mlp_out"], out)
    close(cache["vision.blocks.0.hook_resid_post"], mid + out)


def test_deepstack_site_completes_the_residual(image_run, thinker_lens):
    """``resid_post[i] + deepstack[i] == resid_pre[i+1]``; the addition is the deepstack merger output at the
    image tokens and zero elsewhere."""
    oi, _, cache = image_run
    ds = cache["blocks.0.hook_deepstack"]
    assert torch.equal(cache["blocks.0.hook_resid_post"] + ds, cache["blocks.1.hook_resid_pre"])
    images = oi["input_ids"] == thinker_lens.config.image_token_id
    assert torch.equal(ds[~images], torch.zeros_like(ds[~images]))
    close(ds[images], cache["vision.deepstack.0.hook_out"])
    assert cache["blocks.1.hook_deepstack"].abs().sum() > 0


def test_nnsight_executor_serves_deepstack_and_vision(image_run, thinker_lens):
    """The deepstack point and the vision sites read and write the same through nnsight as through local hooks."""
    oi = image_run[0]
    names = ["blocks.0.hook_deepstack", "vision.deepstack.0.hook_out", "blocks.1.hook_resid_pre", "hook_logits"]
    hooks = [("blocks.0.hook_deepstack", lambda x, s: 2 * x)]
    local = thinker_lens.run_with_cache(oi, names=names, hooks=hooks)[1]
    nn = thinker_lens.run_with_cache(oi, names=names, hooks=hooks, executor="nnsight")[1]
    for n in names:
        assert torch.equal(nn[n], local[n]), n
    plain = image_run[2]
    close(local["blocks.1.hook_resid_pre"] - plain["blocks.1.hook_resid_pre"], plain["blocks.0.hook_deepstack"])


def test_deepstack_write_changes_what_follows(image_run, thinker_lens):
    oi = image_run[0]
    logits = thinker_lens.model(**oi.inputs).logits  # the image run used eager attention (attention points): rerun
    zero = thinker_lens.run_with_hooks(oi, [("blocks.0.hook_deepstack", lambda x, s: torch.zeros_like(x))])
    same = thinker_lens.run_with_hooks(oi, [("blocks.0.hook_deepstack", lambda x, s: x.clone())])
    assert torch.equal(same, logits)
    assert not torch.allclose(zero, logits, atol=1e-4)
    assert not hasattr(thinker_lens.model.model.language_model, "deepstack_points")  # removed after the run


# ---------------------------------------------------------------------------------------------
# graph, inputs, errors
# ---------------------------------------------------------------------------------------------
def test_graph_towers_and_describe(thinker_lens, omni_tok):
    assert thinker_lens.graph.towers == ["", "audio", "vision"]
    full = omnilens.load(tiny_omni(), tokenizer=omni_tok)
    assert full.graph.towers == ["", "audio", "vision", "talker", "talker.code_predictor", "code2wav"]
    text = full.graph.describe()
    for needle in ("audio_token_id", "hidden_states[1]", "talker.hook_hidden_proj", "blocks.{i}.hook_deepstack",
                   "talker.blocks.{i}.mlp.shared_expert.hook_out", "runs 3 steps", "sites per tower"):
        assert needle in text
    counts = {t: sum(s.tower == t for s in full.graph) for t in full.graph.towers}
    assert f"talker.code_predictor {counts['talker.code_predictor']}" in text
    assert full.graph["blocks.0.hook_resid_post"].module == "thinker.model.language_model.layers.0"
    assert thinker_lens.graph["blocks.0.hook_resid_post"].module == "model.language_model.layers.0"
    assert not any(s.tower.startswith("talker") for s in thinker_lens.graph)


def test_builder_layout_and_precomputed_features(thinker_lens, omni_tok, fe):
    clip = wave(1.0, 3)
    from_wave = omni_inputs(omni_tok, thinker_lens.config, ["hello", {"type": "audio", "audio": clip}],
                            feature_extractor=fe, system="you are a cat")
    feats = audio_features([clip], fe)["input_features"][0]
    from_feats = omni_inputs(omni_tok, thinker_lens.config, ["hello", {"type": "audio", "audio": feats.numpy()}],
                             system="you are a cat")
    assert torch.equal(from_wave["input_ids"], from_feats["input_ids"])
    torch.testing.assert_close(from_wave["input_features"], from_feats["input_features"])
    v = omni_tok.get_vocab()
    ids = from_wave["input_ids"][0].tolist()
    span = from_wave.spans[0]["audio"][0]
    assert ids[span.start - 1] == v["<|audio_start|>"] and ids[span.stop] == v["<|audio_end|>"]
    assert [span.stop - span.start] == clip_tokens(from_wave.inputs) == [13]
    assert ids[:2] == [v["<|im_start|>"], v["system"]] and ids[-2:] == [v["<|im_start|>"], v["assistant"]]
    assert ids.count(v["user"]) == 1


def test_bad_audio_inputs_raise_before_running(thinker_lens, audio_batch):
    before = hook_counts(thinker_lens.model)
    calls = []
    handle = thinker_lens.model.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        bad = dict(audio_batch.inputs)
        bad["feature_attention_mask"] = bad["feature_attention_mask"][:, :-5]
        with pytest.raises(HookError, match=r"'audio.hook_conv': expected feature_attention_mask of shape \(3, 150\)"):
            thinker_lens.run_with_cache(bad, names="audio.hook_out")
        short = dict(audio_batch.inputs)
        short["feature_attention_mask"] = short["feature_attention_mask"].clone()
        short["feature_attention_mask"][0, 60:] = 0  # 60 frames -> 8 tokens, the text has 13
        with pytest.raises(HookError, match="expected 35 audio tokens .* got 40"):
            thinker_lens.run_with_cache(short, names="audio.hook_out")
        no_feats = {k: v for k, v in audio_batch.inputs.items() if not k.startswith(("input_f", "feature"))}
        with pytest.raises(HookError, match="got no input_features"):
            thinker_lens.run_with_cache(no_feats, names="audio.hook_out")
        mel = dict(audio_batch.inputs)
        mel["input_features"] = mel["input_features"][:, :8]
        with pytest.raises(HookError, match=r"num_mel_bins=16\), got shape \(3, 8, 150\)"):
            thinker_lens.run_with_cache(mel)
    finally:
        handle.remove()
    assert calls == []
    assert hook_counts(thinker_lens.model) == before


def test_bad_image_inputs_raise(image_run, thinker_lens):
    oi, _, _ = image_run
    bad = dict(oi.inputs)
    bad["image_grid_thw"] = bad["image_grid_thw"].flip(0)
    with pytest.raises(HookError, match="vision.hook_patch_embed"):
        thinker_lens.run_with_cache(bad, names="vision.hook_merger")


def test_nnsight_serves_every_audio_window_like_local(thinker_lens, audio_batch):
    """Audio attention points are visited once per window (4 here): the nnsight executor serves each, a write
    with ``steps=[2]`` reaches window 2 only, and every audio site equals the local executor's."""
    from omnilens.executors.base import Read, Write

    reads = [Read(n) for n in thinker_lens.graph.names("audio.*", include_opt_in=True)]
    site = "audio.blocks.0.attn.hook_pattern"
    writes = [Write(site, lambda p, s: p.flip(-1), steps=[2])]
    plain = thinker_lens.run(audio_batch, [Read(site)])
    local = thinker_lens.run(audio_batch, reads, writes)
    nn = thinker_lens.run(audio_batch, reads, writes, executor="nnsight")
    assert_same_values(nn, local, reads)
    got, ref = nn.values[site], plain.values[site]
    assert len(got) == 4
    assert all(torch.equal(got[i], ref[i]) for i in (0, 1, 3))
    assert torch.equal(got[2], ref[2].flip(-1)) and not torch.equal(got[2], ref[2])
