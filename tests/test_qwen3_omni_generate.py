"""Qwen3-Omni generation through omnilens: Talker and code-predictor sites against hand-written computations,
the Thinker -> Talker bridge, identity and steering writes during ``generate``, step selection, the
Talker / code-predictor nesting metadata, nnsight parity and the remote-simulation round trip, bad options."""

from __future__ import annotations

from contextlib import contextmanager

import pytest
import torch
import torch.nn.functional as F
from conftest import close, fused_moe, rms, wave

import omnilens
from omnilens import Read, Write
from omnilens.inputs.omni import omni_inputs
from omnilens.testing import tiny_omni_feature_extractor, tiny_omni_thinker

GEN = dict(max_new_tokens=3, talker_max_new_tokens=4, speaker="ethan", return_audio=True)


@pytest.fixture(scope="module")
def prompt(omni_lens, omni_tok):
    return omni_inputs(omni_tok, omni_lens.config, ["the cat", {"type": "audio", "audio": wave(1.0, 0)}, "is happy"],
                       feature_extractor=tiny_omni_feature_extractor())


def hf_generate(model, oi, omni_tok):
    """Hugging Face's own ``generate`` with the options ``GEN`` maps to."""
    return model.generate(**oi.inputs, speaker="ethan", return_audio=True, thinker_max_new_tokens=3,
                          thinker_eos_token_id=omni_tok.convert_tokens_to_ids("<|im_end|>"), thinker_do_sample=False,
                          talker_max_new_tokens=4, talker_do_sample=False)


@pytest.fixture(scope="module")
def baseline(omni_lens, prompt, omni_tok):
    return hf_generate(omni_lens.model, prompt, omni_tok)


@pytest.fixture(scope="module")
def run(omni_lens, prompt):
    """One generate reading the bridge, Talker block 0, code-predictor block 0 and every logits site."""
    names = ["blocks.*.hook_resid_post", "audio.hook_out", "talker.hook_*", "talker.blocks.0.*",
             "talker.ln_final.hook_normalized", "talker.code_predictor.blocks.0.*",
             "talker.code_predictor.ln_final.hook_normalized", "talker.code_predictor.hook_logits.*",
             "code2wav.blocks.0.*", "code2wav.ln_final.*", "code2wav.hook_out"]
    return omni_lens.generate(prompt, reads=names, **GEN)


def attention_by_hand(cache, tower, att, n_heads, d_head, visit=0):
    """From a block's cached q/k (normed), rotated q/k and v at ``visit`` (causal prefill, batch 1):
    check the rotation keeps per-head norms, then pattern, z and the attention output."""
    step = lambda name: cache.steps(f"{tower}.blocks.0.{name}")[visit]  # noqa: E731
    x = step("ln1.hook_normalized")
    b, n, _ = x.shape
    q = (x @ att.q_proj.weight.T).view(b, n, n_heads, d_head)
    k = (x @ att.k_proj.weight.T).view(b, n, -1, d_head)
    v = (x @ att.v_proj.weight.T).view(b, n, -1, d_head)
    close(step("attn.hook_q"), q)
    close(step("attn.hook_v"), v)
    close(step("attn.hook_q_normed"), rms(q, att.q_norm))
    close(step("attn.hook_k_normed"), rms(k, att.k_norm))
    rq, rk = step("attn.hook_rot_q"), step("attn.hook_rot_k")
    close(rq.norm(dim=-1), rms(q, att.q_norm).norm(dim=-1))
    close(rk.norm(dim=-1), rms(k, att.k_norm).norm(dim=-1))
    rep = n_heads // rk.shape[2]
    scores = rq.transpose(1, 2) @ rk.repeat_interleave(rep, 2).permute(0, 2, 3, 1) * d_head**-0.5
    scores = scores.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), float("-inf"))
    pattern = scores.softmax(-1)
    close(step("attn.hook_pattern"), pattern)
    z = (pattern @ v.repeat_interleave(rep, 2).transpose(1, 2)).transpose(1, 2)
    close(step("attn.hook_z"), z)
    out = z.reshape(b, n, -1) @ att.o_proj.weight.T
    close(step("hook_attn_out"), out)
    return out


def test_talker_hidden_proj_is_hidden_projection_of_accept_layer(run, omni_lens, prompt):
    """``talker.hook_hidden_proj`` = ``hidden_projection(hidden_states[accept_hidden_layer])`` at the audio tokens;
    the first ``talker.hook_text_proj`` visit = ``text_projection(hidden_states[0])`` at the other tokens."""
    cfg = omni_lens.config
    hf = omni_lens.model.thinker(**prompt.inputs, output_hidden_states=True)
    mm = prompt["input_ids"] == cfg.thinker_config.audio_token_id
    accept = cfg.talker_config.accept_hidden_layer
    want = omni_lens.model.talker.hidden_projection(hf.hidden_states[accept][mm])
    close(run.cache["talker.hook_hidden_proj"], want)
    close(run.cache.steps("blocks.0.hook_resid_post")[0][mm], hf.hidden_states[accept][mm])
    close(run.cache.steps("talker.hook_text_proj")[0], omni_lens.model.talker.text_projection(hf.hidden_states[0][~mm]))


def test_talker_block_by_hand(run, omni_lens):
    """Talker block 0 on the prefill: attention from its cached q/k/v, router, shared expert and fused experts."""
    cache, layer = run.cache, omni_lens.model.talker.model.layers[0]
    tc = omni_lens.config.talker_config.text_config
    x = cache.steps("talker.blocks.0.hook_resid_pre")[0]
    close(cache.steps("talker.blocks.0.ln1.hook_normalized")[0], rms(x, layer.input_layernorm))
    attn_out = attention_by_hand(cache, "talker", layer.self_attn, tc.num_attention_heads, tc.head_dim)
    mid = x + attn_out
    close(cache.steps("talker.blocks.0.hook_resid_mid")[0], mid)
    h = rms(mid, layer.post_attention_layernorm).view(-1, tc.hidden_size)
    mlp = layer.mlp
    assert mlp.gate.top_k == tc.num_experts_per_tok
    logits, weights, idx, experts = fused_moe(h, mlp, norm_topk=False)  # norm_topk_prob is False for the Talker
    close(cache.steps("talker.blocks.0.mlp.hook_router_logits")[0], logits)
    close(cache.steps("talker.blocks.0.mlp.hook_topk_weights")[0], weights)
    assert torch.equal(cache.steps("talker.blocks.0.mlp.hook_topk_idx")[0], idx)
    se = mlp.shared_expert
    shared = (F.silu(h @ se.gate_proj.weight.T) * (h @ se.up_proj.weight.T)) @ se.down_proj.weight.T
    close(cache.steps("talker.blocks.0.mlp.shared_expert.hook_out")[0], shared)
    out = (experts + torch.sigmoid(h @ mlp.shared_expert_gate.weight.T) * shared).view_as(x)
    close(cache.steps("talker.blocks.0.hook_mlp_out")[0], out)
    close(cache.steps("talker.blocks.0.hook_resid_post")[0], mid + out)


def test_code_predictor_block_and_logits_by_hand(run, omni_lens):
    """Code-predictor block 0 (dense) on its first prefill; per-group logits from its final norm; Talker
    logits from the Talker's final norm; code2wav.hook_out is the returned waveform."""
    cache, cp = run.cache, omni_lens.model.talker.code_predictor
    cc = omni_lens.config.talker_config.code_predictor_config
    layer = cp.model.layers[0]
    x = cache.steps("talker.code_predictor.blocks.0.hook_resid_pre")[0]
    mid = x + attention_by_hand(cache, "talker.code_predictor", layer.self_attn, cc.num_attention_heads, cc.head_dim)
    close(cache.steps("talker.code_predictor.blocks.0.hook_resid_mid")[0], mid)
    h = rms(mid, layer.post_attention_layernorm)
    m = layer.mlp
    pre, lin = h @ m.gate_proj.weight.T, h @ m.up_proj.weight.T
    close(cache.steps("talker.code_predictor.blocks.0.mlp.hook_pre")[0], pre)
    close(cache.steps("talker.code_predictor.blocks.0.mlp.hook_post")[0], F.silu(pre) * lin)
    post = mid + (F.silu(pre) * lin) @ m.down_proj.weight.T
    close(cache.steps("talker.code_predictor.blocks.0.hook_resid_post")[0], post)
    groups = omni_lens.config.talker_config.num_code_groups
    finals = cache.steps("talker.code_predictor.ln_final.hook_normalized")
    for g in range(1, groups):
        for frame, logits in enumerate(cache.steps(f"talker.code_predictor.hook_logits.{g}")):
            close(logits, cp.lm_head[g - 1](finals[frame * (groups - 1) + g - 1]))
    for final, logits in zip(cache.steps("talker.ln_final.hook_normalized"), cache.steps("talker.hook_logits")):
        close(logits, omni_lens.model.talker.codec_head(final))
    assert torch.equal(cache["code2wav.hook_out"], run.waveform)


def test_code2wav_block_by_hand(run, omni_lens):
    """code2wav's pre-transformer block 0: layer-scaled residual adds, gated MLP, final norm."""
    cache, layer = run.cache, omni_lens.model.code2wav.pre_transformer.layers[0]
    x = cache["code2wav.blocks.0.hook_resid_pre"]
    close(cache["code2wav.blocks.0.ln1.hook_normalized"], rms(x, layer.input_layernorm))
    mid = x + layer.self_attn_layer_scale.scale * cache["code2wav.blocks.0.hook_attn_out"]
    close(cache["code2wav.blocks.0.hook_resid_mid"], mid)
    h = rms(mid, layer.post_attention_layernorm)
    m = layer.mlp
    out = (F.silu(h @ m.gate_proj.weight.T) * (h @ m.up_proj.weight.T)) @ m.down_proj.weight.T
    close(cache["code2wav.blocks.0.hook_mlp_out"], out)
    post = mid + layer.mlp_layer_scale.scale * out
    close(cache["code2wav.blocks.0.hook_resid_post"], post)
    close(cache["code2wav.ln_final.hook_normalized"], rms(post, omni_lens.model.code2wav.pre_transformer.norm))


def test_generation_meta_and_step_axes(run, omni_lens):
    meta = run.cache.meta["generation"]
    towers = meta["towers"]
    talker_steps, cp_calls = towers["talker"]["calls"], towers["talker.code_predictor"]["calls"]
    groups = omni_lens.config.talker_config.num_code_groups
    assert meta["code_groups"] == groups and meta["code_predictor_steps_per_talker_step"] == groups - 1
    assert cp_calls == (groups - 1) * (talker_steps - 1)  # the last Talker step ends generation
    nest = meta["nesting"]["talker.code_predictor"]
    assert nest["parent"] == "talker"
    assert nest["parent_step"] == [t for t in range(talker_steps - 1) for _ in range(groups - 1)]
    assert nest["inner_step"] == list(range(groups - 1)) * (talker_steps - 1)
    assert len(run.cache.steps("talker.blocks.0.hook_resid_post")) == talker_steps
    assert len(run.cache.steps("talker.code_predictor.blocks.0.hook_resid_post")) == cp_calls
    assert len(run.cache.steps("talker.code_predictor.hook_logits.1")) == talker_steps - 1
    assert len(run.cache.steps("blocks.1.hook_resid_post")) == towers[""]["calls"] == 3
    assert len(run.cache.steps("audio.hook_out")) == 1
    assert [s.shape[1] for s in run.cache.steps("blocks.1.hook_resid_post")] == [run.ids.shape[1] - 3, 1, 1]
    assert run.cache.meta["segments"]["frame"] == [(0, 13)]


def steering_vector(lens) -> torch.Tensor:
    d = lens.config.thinker_config.text_config.hidden_size
    return 5.0 * torch.randn(d, generator=torch.Generator().manual_seed(0))


def identity(x, spec):
    return x.clone()


@contextmanager
def eager(model):
    cfgs = {id(m.config): m.config for m in model.modules() if hasattr(getattr(m, "config", None),
                                                                        "_attn_implementation_internal")}
    saved = {k: c._attn_implementation_internal for k, c in cfgs.items()}
    for c in cfgs.values():
        c._attn_implementation_internal = "eager"
    try:
        yield
    finally:
        for k, c in cfgs.items():
            c._attn_implementation_internal = saved[k]


def test_identity_writes_everywhere_leave_ids_and_waveform(omni_lens, prompt, omni_tok, baseline):
    plain = [n for n in omni_lens.graph.names() if not omni_lens.graph[n].requires]
    out = omni_lens.generate(prompt, writes=[(n, identity) for n in plain], **GEN)
    assert torch.equal(out.ids, baseline[0])
    assert torch.equal(out.waveform, baseline[1])
    every = omni_lens.generate(prompt, writes=[(n, identity) for n in omni_lens.graph.names()], **GEN)
    with eager(omni_lens.model):  # attention points run Hugging Face's eager attention, bit for bit
        eager_ref = hf_generate(omni_lens.model, prompt, omni_tok)
    assert torch.equal(every.ids, eager_ref[0])
    assert torch.equal(every.waveform, eager_ref[1])


def test_thinker_edit_reaches_talker_inputs_and_waveform(omni_lens, prompt, baseline):
    vec = steering_vector(omni_lens)
    reads = ["talker.hook_hidden_proj", "blocks.0.hook_resid_post"]
    base = omni_lens.generate(prompt, reads=reads, **GEN)
    edit = omni_lens.generate(prompt, reads=reads, writes=[("blocks.0.hook_resid_post", lambda x, s: x + vec)], **GEN)
    mm = prompt["input_ids"] == omni_lens.config.thinker_config.audio_token_id
    edited = edit.cache.steps("blocks.0.hook_resid_post")[0]
    close(edited, base.cache.steps("blocks.0.hook_resid_post")[0] + vec)
    close(edit.cache["talker.hook_hidden_proj"], omni_lens.model.talker.hidden_projection(edited[mm]))
    assert not torch.allclose(edit.cache["talker.hook_hidden_proj"], base.cache["talker.hook_hidden_proj"], atol=1e-3)
    assert not torch.equal(edit.waveform, baseline[1])


def test_write_steps_select_visits(omni_lens, prompt):
    vec = torch.ones(omni_lens.config.thinker_config.text_config.hidden_size)
    base = omni_lens.generate(prompt, reads="blocks.1.hook_resid_post", **GEN)
    edit = omni_lens.generate(prompt, reads="blocks.1.hook_resid_post",
                         writes=[Write("blocks.1.hook_resid_post", lambda x, s: x + vec, steps=[1])], **GEN)
    b, e = base.cache.steps("blocks.1.hook_resid_post"), edit.cache.steps("blocks.1.hook_resid_post")
    assert torch.equal(e[0], b[0])
    close(e[1], b[1] + vec)


def test_bad_generation_options_raise_before_running(omni_lens, prompt, omni_tok):
    calls = []
    handle = omni_lens.model.thinker.register_forward_pre_hook(lambda m, a: calls.append(1))
    try:
        with pytest.raises(ValueError, match=r"speaker='nobody': expected one of \['chelsie', 'ethan'\]"):
            omni_lens.generate(prompt, **{**GEN, "speaker": "nobody"})
        with pytest.raises(ValueError, match="return_audio=False"):
            omni_lens.generate(prompt, max_new_tokens=2, speaker="ethan", return_audio=False)
    finally:
        handle.remove()
    assert calls == []
    thinker = omnilens.load(tiny_omni_thinker(), tokenizer=omni_tok)
    with pytest.raises(ValueError, match="Thinker alone and has no Talker"):
        thinker.generate(prompt, max_new_tokens=2, return_audio=True)
    text = thinker.generate(prompt, reads="blocks.0.hook_resid_post", max_new_tokens=2)
    assert text.waveform is None and text.ids.shape[1] == prompt["input_ids"].shape[1] + 2
    assert len(text.cache.steps("blocks.0.hook_resid_post")) == 2


def test_nnsight_generate_matches_local(omni_lens, prompt):
    """The same Thinker edit through the nnsight executor gives the same ids, waveform and Talker input."""
    vec = steering_vector(omni_lens)
    writes = [("blocks.0.hook_resid_post", lambda x, s: x + vec)]
    local = omni_lens.generate(prompt, reads="talker.hook_hidden_proj", writes=writes, **GEN)
    nn = omni_lens.generate(prompt, reads="talker.hook_hidden_proj", writes=writes, executor="nnsight", **GEN)
    assert torch.equal(nn.ids, local.ids)
    assert torch.equal(nn.waveform, local.waveform)
    assert torch.equal(nn.cache["talker.hook_hidden_proj"], local.cache["talker.hook_hidden_proj"])


def test_remote_simulation_round_trip_on_thinker_trace(thinker_lens, prompt):
    """A Thinker trace with audio, a write and reads, serialised as a remote request and run: equals local."""
    kw = thinker_lens.to_inputs(prompt)
    vec = torch.randn(thinker_lens.config.text_config.hidden_size, generator=torch.Generator().manual_seed(2))
    names = ["audio.hook_out", "blocks.0.hook_resid_post", "blocks.1.mlp.hook_router_logits", "hook_logits"]
    reads = [Read(n) for n in names]
    writes = [Write("blocks.0.hook_resid_post", lambda x, s: x + vec)]
    with torch.no_grad():
        local = thinker_lens.executor("local").run(kw, reads, writes)
        remote = thinker_lens.executor("nnsight", remote="local").run(kw, reads, writes)
    for n in names:
        assert torch.equal(remote.values[n][0], local.values[n][0]), n
    plain = thinker_lens.model(**kw).logits
    assert not torch.allclose(local.values["hook_logits"][0], plain, atol=1e-4)


def test_generate_on_a_plain_causal_lm(omni_tok):
    """``Lens.generate`` is generic: a Qwen3 model gets text ids and one cache entry per step."""
    from omnilens.testing import tiny_qwen3

    lens = omnilens.load(tiny_qwen3(), tokenizer=omni_tok)
    ids = omni_tok(["the cat is"], return_tensors="pt")["input_ids"]
    out = lens.generate(ids, reads="blocks.1.hook_resid_post", max_new_tokens=3)
    ref = lens.model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
    assert torch.equal(out.ids, ref) and out.waveform is None
    steps = out.cache.steps("blocks.1.hook_resid_post")
    assert [s.shape[1] for s in steps] == [ids.shape[1], 1, 1]
    assert out.cache.meta["generation"]["towers"] == {"": {"module": "", "calls": 3}}
    with pytest.raises(ValueError, match="produces no audio"):
        lens.generate(ids, return_audio=True)

