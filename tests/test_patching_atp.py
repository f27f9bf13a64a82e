"""Attribution patching: AtP equals the first-order quantity (gradient · activation difference) computed
by hand with raw torch hooks; AtP* equals the pattern change of the real patched run times the pattern
gradient; rank correlations with exact patching are printed."""

from __future__ import annotations

import pytest
import scipy.stats
import torch
from conftest import CLEAN_PAIR, CORRUPT_PAIR

import omnilens
from omnilens.interventions import Patch
from omnilens.patching import Sweep, patch_attribution, patch_exact, rank_correlation

TOL = 1e-5


def hand_grads(lens, text, metric, module, port: str):
    """Per layer: (activation, d mean-metric / d activation) at ``module(layer)``'s input or output tensor,
    with plain torch hooks that route the tensor through a fresh copy (kept attached upstream, so each
    gradient is the total derivative)."""
    fresh = lambda x: x.clone() if x.requires_grad else x.detach().clone().requires_grad_(True)  # noqa: E731
    model, leaves, handles = lens.model, [], []
    for layer in model.model.layers:
        mod = module(layer)
        if port == "input":
            def pre(m, args, kwargs):
                x = args[0] if args else kwargs["hidden_states"]
                leaf = fresh(x)
                leaves.append(leaf)
                return ((leaf, *args[1:]), kwargs) if args else (args, {**kwargs, "hidden_states": leaf})
            handles.append(mod.register_forward_pre_hook(pre, with_kwargs=True))
        else:
            def post(m, args, out):
                leaf = fresh(out[0])
                leaves.append(leaf)
                return (leaf, *out[1:])
            handles.append(mod.register_forward_hook(post))
    try:
        logits = model(**lens.to_inputs(text)).logits
        value = metric(logits).mean()
        grads = torch.autograd.grad(value, leaves)
    finally:
        for h in handles:
            h.remove()
    return [leaf.detach() for leaf in leaves], list(grads), float(value.detach())


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_atp_resid_pre_equals_hand_first_order(dense_lens, swap_metric, direction):
    source, base = (CLEAN_PAIR, CORRUPT_PAIR) if direction == "denoise" else (CORRUPT_PAIR, CLEAN_PAIR)
    acts_b, grads, m_base = hand_grads(dense_lens, base, swap_metric, lambda layer: layer, "input")
    acts_s, _, _ = hand_grads(dense_lens, source, swap_metric, lambda layer: layer, "input")
    expected = torch.stack([((s - b) * g).sum((0, 2)) for s, b, g in zip(acts_s, acts_b, grads)])  # [layer pos]
    res = patch_attribution(dense_lens, CLEAN_PAIR, CORRUPT_PAIR, swap_metric, Sweep("hook_resid_pre"),
                            direction=direction)
    assert res.method == "atp" and res.axes == ("layer", "pos")
    assert ((res.raw - m_base) - expected).abs().max() < TOL
    assert expected.abs().max() > 1e-2


def test_atp_heads_and_attn_out_equal_hand_first_order(dense_lens, swap_metric):
    z_b, z_g, m_base = hand_grads(dense_lens, CORRUPT_PAIR, swap_metric, lambda layer: layer.self_attn.o_proj, "input")
    z_s, _, _ = hand_grads(dense_lens, CLEAN_PAIR, swap_metric, lambda layer: layer.self_attn.o_proj, "input")
    heads = lambda t: t.view(*t.shape[:-1], 4, 16)  # noqa: E731  [batch pos head d_head]
    per = torch.stack([((heads(s) - heads(b)) * heads(g)).sum((0, 3)) for s, b, g in zip(z_s, z_b, z_g)])
    a_b, a_g, _ = hand_grads(dense_lens, CORRUPT_PAIR, swap_metric, lambda layer: layer.self_attn, "output")
    a_s, _, _ = hand_grads(dense_lens, CLEAN_PAIR, swap_metric, lambda layer: layer.self_attn, "output")
    attn = torch.stack([((s - b) * g).sum((0, 2)) for s, b, g in zip(a_s, a_b, a_g)])
    by_pos, by_head, attn_out = patch_attribution(dense_lens, CLEAN_PAIR, CORRUPT_PAIR, swap_metric, [
        Sweep("hook_z", by=("layer", "pos", "head")), Sweep("hook_z", by=("layer", "head")), Sweep("hook_attn_out")])
    assert ((by_pos.raw - m_base) - per).abs().max() < TOL
    assert ((by_head.raw - m_base) - per.sum(1)).abs().max() < TOL
    assert ((attn_out.raw - m_base) - attn).abs().max() < TOL


def test_atp_star_equals_real_pattern_change_times_pattern_gradient(dense_lens, swap_metric):
    patterns = [f"blocks.{i}.attn.hook_pattern" for i in range(2)]
    out, base = dense_lens.run_with_cache(CORRUPT_PAIR, patterns, grad=True, to=None)
    value = swap_metric(out).mean()
    grads = torch.autograd.grad(value, [base[p] for p in patterns])
    _, clean = dense_lens.run_with_cache(CLEAN_PAIR, ["blocks.0.attn.hook_q", "blocks.1.attn.hook_q",
                                           "blocks.0.attn.hook_k", "blocks.1.attn.hook_k"])
    q_star, k_star = patch_attribution(dense_lens, CLEAN_PAIR, CORRUPT_PAIR, swap_metric, [
        Sweep("hook_q", by=("layer", "head", "pos")), Sweep("hook_k", by=("layer", "head"))], star=True)
    assert q_star.method == k_star.method == "atp*"
    for res, site, axis in ((q_star, "hook_q", "head"), (k_star, "hook_k", "kv_head")):
        for cell in torch.cartesian_prod(*[torch.arange(n) for n in res.shape]).tolist():
            layer, rest = cell[0], cell[1:]
            sel = {axis: rest[0]} | ({"pos": rest[1]} if len(rest) > 1 else {})
            name = f"blocks.{layer}.attn.{site}"
            res_run = dense_lens.run(CORRUPT_PAIR, [omnilens.Read(patterns[layer])],
                               Patch.from_cache(clean, name, **sel).writes())
            new = res_run.values[patterns[layer]][0]
            expected = float(((new - base[patterns[layer]].detach()) * grads[layer]).sum())
            assert abs(float(res.raw[tuple(cell)]) - float(value.detach()) - expected) < TOL, (site, cell)


def test_rank_correlation_with_exact_is_reported(dense_lens, swap_metric, capsys):
    sweeps = [Sweep("hook_resid_pre"), Sweep("hook_attn_out"), Sweep("hook_mlp_out"),
              Sweep("hook_z", by=("layer", "head", "pos")), Sweep("hook_v", by=("layer", "head", "pos")),
              Sweep("hook_pattern", by=("layer", "head", "pos")), Sweep("hook_q", by=("layer", "head", "pos")),
              Sweep("hook_k", by=("layer", "head", "pos"))]
    exact = patch_exact(dense_lens, CLEAN_PAIR, CORRUPT_PAIR, swap_metric, sweeps)
    atp = patch_attribution(dense_lens, CLEAN_PAIR, CORRUPT_PAIR, swap_metric, sweeps)
    star = patch_attribution(dense_lens, CLEAN_PAIR, CORRUPT_PAIR, swap_metric, sweeps[-2:], star=True)
    lines, corr = [], {}
    for e, a in zip(exact, atp):
        rho = corr[e.sites[0]] = rank_correlation(a.values, e.values)
        lines.append(f"  {e.sites[0].split('.', 2)[-1]:<18} {'x'.join(e.axes):<20} AtP  spearman {rho:+.3f}")
    for e, s in zip(exact[-2:], star):
        rho = rank_correlation(s.values, e.values)
        lines.append(f"  {e.sites[0].split('.', 2)[-1]:<18} {'x'.join(e.axes):<20} AtP* spearman {rho:+.3f}")
        plain_err = (atp[sweeps.index(Sweep(e.sites[0].rsplit('.', 1)[-1], by=('layer', 'head', 'pos')))].values
                     - e.values).abs().mean()
        assert (s.values - e.values).abs().mean() < plain_err  # AtP* is closer to exact than AtP on q/k
    with capsys.disabled():
        print("\nAtP vs exact patching, rank correlation (tiny Qwen3, 2 prompts, denoising):\n" + "\n".join(lines))
    ref = scipy.stats.spearmanr(atp[3].values.reshape(-1), exact[3].values.reshape(-1)).statistic
    assert abs(corr["blocks.0.attn.hook_z"] - ref) < 1e-6
    assert corr["blocks.0.attn.hook_v"] > 0.9 and corr["blocks.0.attn.hook_pattern"] > 0.9


def test_atp_errors_before_any_forward(dense_lens, swap_metric):
    with pytest.raises(ValueError, match="same shape"):
        patch_attribution(dense_lens, "the cat", "the big cat", swap_metric, Sweep("hook_resid_pre"))
    with pytest.raises(ValueError, match="one value per batch row"):
        patch_attribution(dense_lens, CLEAN_PAIR, CORRUPT_PAIR, lambda logits: logits.sum(), Sweep("hook_resid_pre"))
