"""Head attribution: DLA against Hugging Face internals, diff-of-means selectivity, AtP over hook_z."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import randomise_norms
from test_probing import PLANTED_HEAD, planted_lens, planted_texts

import omnilens
from omnilens import activations as act
from omnilens import heads
from omnilens.patching import LogitDiff
from omnilens.testing import tiny_qwen3, tiny_tokenizer

TEXTS = ["the cat is happy", "a dog was sad and upset today", "red sun", "my friend is calm"]
TARGET, BASELINE = [5, 7, 9, 30], [11, 12, 13, 31]


def make_lens(side: str):
    tok = tiny_tokenizer()
    tok.padding_side = side
    return omnilens.load(randomise_norms(tiny_qwen3(seed=1)), tokenizer=tok)


def hf_last_token_parts(model, tok, texts):
    """Per example, unpadded, from plain PyTorch hooks on the HF modules, at the last token: the o_proj
    inputs ``[example layer n_heads*d_head]``, the final norm's input ``[example d_model]`` and the logits."""
    zs, finals, logits = [], [], []
    for t in texts:
        got = {}
        hooks = [layer.self_attn.o_proj.register_forward_pre_hook(
            lambda m, args, i=i: got.__setitem__(i, args[0][0, -1].detach())) for i, layer in enumerate(model.model.layers)]
        hooks.append(model.model.norm.register_forward_pre_hook(
            lambda m, args: got.__setitem__("final", args[0][0, -1].detach())))
        with torch.no_grad():
            logits.append(model(**tok(t, return_tensors="pt")).logits[0, -1])
        for h in hooks:
            h.remove()
        zs.append(torch.stack([got[i] for i in range(len(model.model.layers))]))
        finals.append(got["final"])
    return torch.stack(zs), torch.stack(finals), torch.stack(logits)


@pytest.mark.parametrize("side", ["left", "right"])
def test_dla_matches_hand_computation_and_components_sum_to_logit_diff(side):
    lens = make_lens(side)
    model, tok = lens.model, lens.tokenizer
    scores = heads.direct_logit_attribution(lens, TEXTS, TARGET, BASELINE,
                                            extra_sites=["hook_embed", "blocks.*.hook_mlp_out"])
    assert scores.values.shape == (2, 4) and scores.per_example.shape == (4, 2, 4)
    assert scores.layers == [0, 1] and set(scores.extra) == {"hook_embed", "blocks.0.hook_mlp_out", "blocks.1.hook_mlp_out"}

    # independent: o_proj inputs from HF hooks, the final RMSNorm scale from its own formula (eps included)
    z, x, logits = hf_last_token_parts(model, tok, TEXTS)
    norm = model.model.norm
    w_u = model.lm_head.weight.detach()
    direction = w_u[TARGET] - w_u[BASELINE]
    s = torch.sqrt(x.pow(2).mean(-1) + norm.variance_epsilon)
    for layer in range(2):
        w_o = model.model.layers[layer].self_attn.o_proj.weight.detach()
        for head in range(4):
            contrib = z[:, layer, head * 16:(head + 1) * 16] @ w_o[:, head * 16:(head + 1) * 16].T  # [ex d_model]
            ref = ((contrib * norm.weight.detach() / s[:, None]) * direction).sum(-1)
            torch.testing.assert_close(scores.per_example[:, layer, head], ref, atol=1e-6, rtol=1e-5)
    total = scores.per_example.sum((1, 2)) + sum(scores.extra.values())
    logit_diff = logits[range(4), TARGET] - logits[range(4), BASELINE]
    torch.testing.assert_close(total, logit_diff, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(scores.values, scores.per_example.mean(0))
    fig = scores.figure()
    assert fig.data[0].z.shape == (2, 4)
    with pytest.raises(ValueError, match="got 2 token ids for 4 examples"):
        heads.direct_logit_attribution(lens, TEXTS, [1, 2])


def test_selectivity_equals_hand_computation():
    gen = torch.Generator().manual_seed(0)
    pos = torch.randn(5, 2, 3, 4, generator=gen, dtype=torch.float64)
    neg = torch.randn(7, 2, 3, 4, generator=gen, dtype=torch.float64)
    got = heads.diff_of_means_selectivity(pos, neg)
    p, n = pos.numpy(), neg.numpy()
    for layer in range(2):
        for head in range(3):
            mp, mn = p[:, layer, head].mean(0), n[:, layer, head].mean(0)
            spread = np.sqrt(np.mean([np.sum((row - mn) ** 2) for row in n[:, layer, head]]))
            assert abs(float(got[layer, head]) - np.linalg.norm(mp - mn) / spread) < 1e-12


def test_planted_head_ranks_first_by_selectivity():
    lens, _, _ = planted_lens()
    texts, labels = planted_texts(n=8, words=("happy", "sad", "calm"))
    ds = act.collect(lens, texts, "blocks.*.attn.hook_z", "last", labels=labels, batch_size=24)
    sel = heads.head_selectivity(ds, positive=0, negative=1)  # happy vs sad
    assert sel.values.shape == (2, 4) and sel.sites == ["blocks.0.attn.hook_z", "blocks.1.attn.hook_z"]
    (layer, head, top), (_, _, second) = sel.top(2)
    assert (layer, head) == PLANTED_HEAD and top > 1.0
    assert second < 1e-4 * top  # happy and sad differ only along u, which no other head reads
    rest = heads.head_selectivity(ds, positive=0)  # happy vs sad + calm ("calm" also changes the RMS)
    assert rest.top(1)[0][:2] == PLANTED_HEAD
    with pytest.raises(ValueError, match="positive 'x' has 0"):
        heads.head_selectivity(ds, positive="x")


def test_head_atp_equals_gradient_times_difference():
    lens = make_lens("right")
    model, tok = lens.model, lens.tokenizer
    clean, corrupt = ["the cat is happy and the dog"], ["the cat is sad and the bird"]
    metric = LogitDiff(5, 7)
    scores = heads.head_atp(lens, clean, corrupt, metric)
    assert scores.values.shape == (2, 4) and scores.layers == [0, 1]

    def z_and_grad(text, need_grad):
        zs, deltas = {}, {}

        def hook(i):
            def fn(m, args):
                d = torch.zeros_like(args[0], requires_grad=True)
                deltas[i] = d
                zs[i] = args[0].detach()
                return (args[0] + d,)
            return fn
        hs = [layer.self_attn.o_proj.register_forward_pre_hook(hook(i)) for i, layer in enumerate(model.model.layers)]
        with torch.enable_grad():
            logits = model(**tok(text, return_tensors="pt")).logits
            m = logits[0, -1, 5] - logits[0, -1, 7]
            grads = torch.autograd.grad(m, [deltas[i] for i in range(2)]) if need_grad else None
        for h in hs:
            h.remove()
        return zs, grads, float(m.detach())

    z_clean, _, m_clean = z_and_grad(clean, False)
    z_corr, g_corr, m_corr = z_and_grad(corrupt, True)
    for layer in range(2):
        diff = (z_clean[layer] - z_corr[layer]) * g_corr[layer]  # [1 pos 64]
        for head in range(4):
            est = m_corr + float(diff[..., head * 16:(head + 1) * 16].sum())
            assert abs(float(scores.source.raw[layer, head]) - est) < 1e-5
            assert abs(float(scores.values[layer, head]) - (est - m_corr) / (m_clean - m_corr)) < 1e-4
    assert scores.figure().data[0].z.shape == (2, 4)
