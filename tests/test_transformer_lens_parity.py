"""omnilens values for shared names equal TransformerLens 3.9's, both TransformerBridge (wraps the HF
modules) and HookedTransformer (its own re-implementation), loaded hub-free from a saved folder.

Names whose meaning differs (checked below, so the mapping cannot silently drift):
- ``ln1/ln2/ln_final.hook_normalized``: omnilens = the HF norm module's output (weight applied);
  TransformerLens = ``x / rms`` before the weight. TL's ``*.hook_out`` (bridge) equals ours, and
  TL's ``hook_normalized * weight`` equals ours.
- ``attn.hook_q_normed/hook_k_normed``: the bridge has them as ``[batch head pos d_head]`` (ours
  ``[batch pos head d_head]``); HookedTransformer has ``attn.q_norm.hook_normalized`` before the weight.
- ``hook_logits``: TL's model output (bridge: ``hook_unembed``).
- MoE layers: TL's bridge ``mlp.hook_pre``/``mlp.hook_post`` are the MoE block's input/output (omnilens
  has no ``mlp.hook_pre`` there; use ``ln2.hook_normalized`` and ``hook_mlp_out``); our
  ``mlp.hook_router_logits`` is the bridge's ``mlp.gate.hook_out``.
- ``attn.hook_q/k/v`` mean the same in all three: the projection output split per (kv) head, before
  q_norm/k_norm and RoPE; ``hook_rot_q/k`` are after q_norm/k_norm and RoPE.
"""

from __future__ import annotations

import pytest
import torch
from conftest import make_model

import omnilens
from omnilens.testing import tiny_tokenizer

TOL = 1e-5
SAME_NAMES = ["hook_embed", "hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out", "hook_mlp_out",
              "attn.hook_q", "attn.hook_k", "attn.hook_v", "attn.hook_rot_q", "attn.hook_rot_k", "attn.hook_pattern",
              "attn.hook_z", "mlp.hook_pre", "mlp.hook_pre_linear", "mlp.hook_post"]


def shared(name: str, n_layers: int) -> list[str]:
    return [name] if name == "hook_embed" else [f"blocks.{i}.{name}" for i in range(n_layers)]


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer):
    """A saved tiny Qwen3 (randomised norms), its lens, and our cache of every site on one prompt."""
    folder = tmp_path_factory.mktemp("qwen3")
    lens, tokens = saved_lens("dense", folder, tokenizer)
    logits, cache = lens.run_with_cache(tokens, names=lens.graph.names(include_opt_in=True))
    return folder, lens, tokens, logits, cache


def saved_lens(kind: str, folder, tokenizer) -> tuple[omnilens.Lens, torch.Tensor]:
    """A tiny Qwen3 of ``kind`` saved with ``tokenizer`` to ``folder``, its lens and the prompt's tokens ``[1 pos]``."""
    model = make_model(kind)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    lens = omnilens.load(model, tokenizer=tokenizer)
    return lens, lens.to_tokens("the cat is happy and the dog is sad")


def bridge_cache(folder, tokens: torch.Tensor):
    """TransformerBridge booted from ``folder``: ``(logits, cache)`` of ``tokens``."""
    from transformer_lens.model_bridge import TransformerBridge

    bridge = TransformerBridge.boot_transformers(str(folder), device="cpu")
    with torch.no_grad():
        return bridge.run_with_cache(tokens)


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a - b).abs().max().item()


def assert_same_sites(ours, tl, sites: list[str], n_layers: int) -> None:
    """Every layer's ``sites`` (and ``hook_embed``) agree within ``TOL`` under the same name."""
    for site in sites:
        for name in shared(site, n_layers):
            assert max_diff(ours[name], tl[name]) <= TOL, name


def test_transformer_bridge_parity(saved):
    folder, lens, tokens, logits, ours = saved
    tl_logits, tl = bridge_cache(folder, tokens)
    assert_same_sites(ours, tl, SAME_NAMES, lens.config.num_hidden_layers)
    for i, layer in enumerate(lens.model.model.layers):
        for ln, module in (("ln1", layer.input_layernorm), ("ln2", layer.post_attention_layernorm)):
            name = f"blocks.{i}.{ln}.hook_normalized"
            assert max_diff(ours[name], tl[f"blocks.{i}.{ln}.hook_out"]) <= TOL
            assert max_diff(ours[name], tl[name] * module.weight) <= TOL
            assert max_diff(ours[name], tl[name]) > 1e-2  # the meaning differs: TL's excludes the weight
        for site in ("hook_q_normed", "hook_k_normed"):
            name = f"blocks.{i}.attn.{site}"
            assert max_diff(ours[name], tl[name].transpose(1, 2)) <= TOL
    assert max_diff(ours["ln_final.hook_normalized"], tl["ln_final.hook_out"]) <= TOL
    assert max_diff(ours["hook_logits"], tl["hook_unembed"]) <= TOL
    assert max_diff(logits, tl_logits) <= TOL


def test_hooked_transformer_parity(saved):
    from transformer_lens import HookedTransformer
    from transformer_lens import loading_from_pretrained as loading

    folder, lens, tokens, logits, ours = saved
    cfg = loading.get_pretrained_model_config(str(folder), device="cpu", dtype=torch.float32)
    state = loading.get_pretrained_state_dict(str(folder), cfg, lens.model)
    ht = HookedTransformer(cfg, tiny_tokenizer())  # its own: HookedTransformer edits the tokenizer it gets
    ht.load_and_process_state_dict(state, fold_ln=False, center_writing_weights=False, center_unembed=False)
    ht.set_use_attn_result(True)
    with torch.no_grad():
        tl_logits, tl = ht.run_with_cache(tokens)
    assert_same_sites(ours, tl, [*SAME_NAMES, "attn.hook_result"], lens.config.num_hidden_layers)
    for i, layer in enumerate(lens.model.model.layers):
        for ln, module in (("ln1", layer.input_layernorm), ("ln2", layer.post_attention_layernorm)):
            name = f"blocks.{i}.{ln}.hook_normalized"
            assert max_diff(ours[name], tl[name] * module.weight) <= TOL
        for site, norm in (("hook_q_normed", layer.self_attn.q_norm), ("hook_k_normed", layer.self_attn.k_norm)):
            ref = ours[f"blocks.{i}.attn.{site}"]  # HT flattens (batch pos head) into one axis here
            tl_normed = tl[f"blocks.{i}.attn.{site[5]}_norm.hook_normalized"].reshape(ref.shape)
            assert max_diff(ref, tl_normed * norm.weight) <= TOL
    assert max_diff(ours["ln_final.hook_normalized"], tl["ln_final.hook_normalized"] * lens.model.model.norm.weight) \
        <= TOL
    assert max_diff(logits, tl_logits) <= TOL


def test_transformer_bridge_parity_moe(tmp_path, tokenizer):
    lens, tokens = saved_lens("moe", tmp_path, tokenizer)
    logits, ours = lens.run_with_cache(tokens)
    tl_logits, tl = bridge_cache(tmp_path, tokens)
    n = lens.config.num_hidden_layers
    assert_same_sites(ours, tl, [s for s in SAME_NAMES if not s.startswith("mlp.")], n)
    for i in range(n):
        assert max_diff(ours[f"blocks.{i}.mlp.hook_router_logits"], tl[f"blocks.{i}.mlp.gate.hook_out"]) <= TOL
        assert max_diff(ours[f"blocks.{i}.ln2.hook_normalized"], tl[f"blocks.{i}.mlp.hook_pre"]) <= TOL
        assert max_diff(ours[f"blocks.{i}.hook_mlp_out"], tl[f"blocks.{i}.mlp.hook_post"]) <= TOL
    assert max_diff(logits, tl_logits) <= TOL
