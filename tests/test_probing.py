"""Probes: a planted residual direction and a planted head are recovered; sweeps, figures, exports.

The planted model is a tiny Qwen3 whose weights are edited so that the label lives in one known
place (see :func:`planted_lens`).
"""

from __future__ import annotations

import random

import pytest
import torch
from safetensors.torch import load_file

import omnilens
from omnilens import activations as act
from omnilens import probing
from omnilens.testing import tiny_qwen3, tiny_tokenizer

FILLER = ("the a cat dog bird fish tree house car road city river sea sky sun moon star rain snow wind "
          "red green blue big small old new").split()
PLANTED_HEAD = (0, 2)


def planted_lens(alpha: float = 2.0, beta: float = 1.0, seed: int = 0):
    """A tiny Qwen3 (4 heads, 4 kv heads) whose label ("happy" vs "sad") is carried by a known direction.

    * ``u`` (unit, ``d_model``): "happy" and "sad" share one base embedding (that of "calm") plus
      ``+alpha * u`` / ``-alpha * u``; every other embedding is made orthogonal to ``u``.
    * No component reads or writes ``u``: q/k/v/gate/up weights are projected off ``u`` on their input
      side, o_proj/down_proj weights off ``u`` on their output side. So the residual stream carries the
      label only as ``±alpha * u`` at the label token (the norms' RMS is the same for both labels).
    * Head 2 of layer 0 alone reads ``u``: its value rows get ``beta * a uᵀ`` (``a`` unit, ``d_head``), and its
      o_proj columns are zeroed so the label never leaves ``hook_z`` of that head.

    Returns ``(lens, u, a)``.
    """
    tok = tiny_tokenizer()
    model = tiny_qwen3(seed=seed, num_key_value_heads=4)
    d, dh = model.config.hidden_size, model.config.head_dim
    gen = torch.Generator().manual_seed(seed + 1)
    u = torch.randn(d, generator=gen)
    u /= u.norm()
    a = torch.randn(dh, generator=gen)
    a /= a.norm()
    proj = torch.eye(d) - torch.outer(u, u)
    ids = {w: tok.convert_tokens_to_ids(w) for w in ("happy", "sad", "calm")}
    layer, head = PLANTED_HEAD
    with torch.no_grad():
        emb = model.model.embed_tokens.weight
        emb.copy_(emb @ proj)
        emb[ids["happy"]] = emb[ids["calm"]] + alpha * u
        emb[ids["sad"]] = emb[ids["calm"]] - alpha * u
        for block in model.model.layers:
            att, mlp = block.self_attn, block.mlp
            for lin in (att.q_proj, att.k_proj, att.v_proj, mlp.gate_proj, mlp.up_proj):
                lin.weight.copy_(lin.weight @ proj)
            for lin in (att.o_proj, mlp.down_proj):
                lin.weight.copy_(proj @ lin.weight)
        att = model.model.layers[layer].self_attn
        att.v_proj.weight[head * dh:(head + 1) * dh] += beta * torch.outer(a, u)
        att.o_proj.weight[:, head * dh:(head + 1) * dh] = 0
    return omnilens.load(model, tokenizer=tok), u, a


def planted_texts(n: int = 16, seed: int = 0, words: tuple[str, ...] = ("happy", "sad")):
    """``n`` random filler sentences, each once per word in ``words`` (label = index of the word)."""
    rng = random.Random(seed)
    texts, labels = [], []
    for _ in range(n):
        filler = rng.sample(FILLER, rng.randint(3, 7))
        at = rng.randint(0, len(filler))
        for label, w in enumerate(words):
            texts.append(" ".join(filler[:at] + [w] + filler[at:]))
            labels.append(1 - label if len(words) == 2 else label)  # binary: happy = 1
    return texts, labels


@pytest.fixture(scope="module")
def planted():
    lens, u, a = planted_lens()
    texts, labels = planted_texts()
    ds = act.collect(lens, texts, ["hook_embed", "blocks.*.hook_resid_post", "blocks.*.attn.hook_z"],
                     {"mean": "mean", "last": "last"}, labels=labels, batch_size=16)
    return lens, u, a, ds


def test_planted_residual_direction_is_recovered(planted):
    lens, u, _, ds = planted
    sweep = probing.probe_sweep(ds, ["hook_embed", "*hook_resid_post"], ["mean"], folds=4)
    assert sweep.sites == ["hook_embed", "blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]
    assert sweep.layers == [None, 0, 1]
    assert sweep.accuracy.shape == (3, 1)
    assert bool((sweep.accuracy >= 0.95).all()) and bool((sweep.macro_f1 >= 0.95).all())
    for site, v in sweep.steering_directions(label=1).items():
        assert abs(v.norm().item() - 1) < 1e-5
        assert float(v @ u) >= 0.9, site  # points toward "happy"
        assert float(sweep.steering_directions(label=0)[site] @ u) <= -0.9
    site, pool, best = sweep.best()
    assert pool == "mean" and best.accuracy == sweep.accuracy.max()


def test_planted_head_ranks_first_and_maps_through_w_o(planted):
    lens, _, a, ds = planted
    hp = probing.head_probes(ds, pool="last", folds=4)
    assert hp.accuracy.shape == (2, 4) and hp.sites == ["blocks.0.attn.hook_z", "blocks.1.attn.hook_z"]
    (layer, head, acc), second = hp.top(2)
    assert (layer, head) == PLANTED_HEAD and acc >= 0.95
    assert second[2] <= 0.75  # every other head is blind to the label
    v = hp.directions(1)[("blocks.0.attn.hook_z", 2)]
    assert v.shape == (16,) and float(v @ a) >= 0.9
    with pytest.raises(ValueError, match="weights are zero"):
        hp.directions(heads=[(1, 1)])  # a label-blind head: identical inputs in both classes, w = 0
    shuffled = ds.labels[:]
    random.Random(2).shuffle(shuffled)
    noisy = probing.head_probes(ds, "blocks.*.attn.hook_z", pool="last", labels=shuffled, folds=2)
    others = [(1, 1), (0, 3)]
    res = noisy.residual_directions(lens, heads=others)
    dirs = noisy.directions(heads=others)
    assert list(res) == [("blocks.1.attn.hook_z", 1), ("blocks.0.attn.hook_z", 3)]
    for (site, h), r in res.items():
        w_o = lens.model.model.layers[lens.graph[site].layer].self_attn.o_proj.weight.detach()
        ref = w_o[:, h * 16:(h + 1) * 16] @ dirs[(site, h)]
        torch.testing.assert_close(r, ref / ref.norm())
    with pytest.raises(ValueError, match="head 2: W_O maps the probe direction to zero"):
        hp.residual_directions(lens, k=1)  # the planted head's o_proj columns are zero
    with pytest.raises(ValueError, match="blocks.0.hook_resid_post' is a hook_resid_post site"):
        probing.head_out_weight(lens, "blocks.0.hook_resid_post", 0)
    fig = hp.figure()
    assert fig.data[0].z.shape == (2, 4)


def test_sweep_figures_and_chance_on_shuffled_labels(planted, tmp_path):
    lens, u, _, ds = planted
    shuffled = ds.labels[:]
    random.Random(1).shuffle(shuffled)
    sweep = probing.probe_sweep(ds, "*hook_resid_post", labels=shuffled, folds=4)
    assert sweep.pools == ["mean", "last"]
    assert float(sweep.accuracy[:, 0].max()) < 0.8  # held-out scores do not leak training labels
    line = sweep.figure()
    assert [t.name for t in line.data] == ["mean", "last"] and list(line.data[0].x) == [0, 1]
    heat = sweep.figure("macro_f1", kind="heatmap")
    assert heat.data[0].z.shape == (2, 2)
    with pytest.raises(ValueError, match="unknown figure kind"):
        sweep.figure(kind="bar")
    probing.save_directions(sweep.steering_directions(), tmp_path / "dirs.safetensors")
    loaded = load_file(tmp_path / "dirs.safetensors")
    assert set(loaded) == {"blocks.0.hook_resid_post", "blocks.1.hook_resid_post"}


def test_multiclass_probe_and_standardised_weights(planted):
    lens, u, _, _ = planted
    texts, labels = planted_texts(n=10, words=("happy", "sad", "calm"))
    ds = act.collect(lens, texts, "blocks.1.hook_resid_post", "mean", labels=labels, batch_size=16)
    # three classes along one axis (sad < calm < happy): weak regularisation for the thresholds
    res = probing.fit_probe(ds["blocks.1.hook_resid_post"], labels, folds=3, C=100.0)
    assert res.classes == [0, 1, 2] and res.coef.shape == (3, 64) and res.accuracy >= 0.9
    assert float(res.direction(0) @ u) >= 0.9 and float(res.direction(1) @ u) <= -0.9
    std = probing.fit_probe(ds["blocks.1.hook_resid_post"], labels, folds=3, standardize=True)
    x = ds["blocks.1.hook_resid_post"].double()
    logits = x @ std.coef.double().T + std.intercept.double()  # raw-basis weights reproduce predictions
    assert (logits.argmax(1) == torch.tensor(labels)).float().mean() >= 0.9
    with pytest.raises(KeyError, match="not one of the probe's classes"):
        res.direction(7)


def test_probe_errors(planted):
    _, _, _, ds = planted
    x = ds["blocks.1.hook_resid_post", "mean"]
    with pytest.raises(ValueError, match="at least two classes"):
        probing.fit_probe(x, [0] * len(x))
    with pytest.raises(ValueError, match="has 1 example"):
        probing.fit_probe(x, [1] + [0] * (len(x) - 1))
    with pytest.raises(KeyError, match="no dataset site matches"):
        probing.probe_sweep(ds, "*hook_mlp_out")
    lens = planted[0]
    all_ds = act.collect(lens, ["the cat", "the dog"], "hook_embed", "all", labels=[0, 1])
    with pytest.raises(ValueError, match="keeps every token"):
        probing.probe_sweep(all_ds)


def test_mood_zoo_sweep_peaks_in_the_middle_and_generalises():
    """The zoo's ``mood`` model: happy/sad at the last prompt token peaks at a middle block, >= 0.95 held out."""
    zoo = pytest.importorskip("omnilens.zoo")
    if "mood" not in zoo.names():
        pytest.skip("the mood zoo model is not shipped")
    from omnilens.zoo import mood

    lens = zoo.load("mood")
    moods = ("happy", "sad")
    train = mood.sentences(300, moods=moods, split="train", seed=1)
    held = mood.sentences(300, moods=moods, split="heldout", seed=2)  # unseen subject/cue/topic combinations
    sites = "blocks.*.hook_resid_post"

    def dataset(sents):
        ids = mood.encode(sents, lens.tokenizer, with_continuation=False)
        return act.collect(lens, ids, sites, "last", labels=[s.mood for s in sents], batch_size=100)

    ds, dh = dataset(train), dataset(held)
    sweep = probing.probe_sweep(ds)
    n_layers = lens.config.num_hidden_layers
    assert sweep.layers == list(range(n_layers))
    middle = range(1, n_layers - 1)
    cv = sweep.accuracy[:, 0].tolist()
    # the peak is reached at a middle block (a plateau that includes one counts: the model may saturate)
    assert max(cv[i] for i in middle) == max(cv) >= 0.95, cv
    held_acc = [sum(p == y for p, y in zip(sweep.results[(s, "last")].predict(dh[s]), dh.labels)) / len(dh)
                for s in sweep.sites]
    assert max(held_acc[i] for i in middle) == max(held_acc) >= 0.95, held_acc


def test_probe_directions_steer_through_interventions(planted):
    """Exported directions plug into ``AddVector``: adding the "happy" direction flips the probes on "sad"."""
    from omnilens.interventions import AddVector, apply

    lens, _, _, ds = planted
    site, z_site = "blocks.0.hook_resid_post", "blocks.0.attn.hook_z"
    probe = probing.fit_probe(ds[site, "mean"], ds.labels, folds=4)
    heads = probing.head_probes(ds, z_site, pool="last", folds=4)
    head_probe = heads.results[PLANTED_HEAD]
    sad = [t for t, y in zip(*planted_texts()) if y == 0]
    before = act.collect(lens, sad, [site, z_site], {"mean": "mean", "last": "last"}, batch_size=16)
    assert set(probe.predict(before[site, "mean"])) == {0}
    assert set(head_probe.predict(before[z_site, "last"][:, 2])) == {0}
    happy = probing.probe_sweep(ds, site, ["mean"], folds=4).steering_directions(label=1)[site]
    steer = [AddVector(site, happy, alpha=3.0),
             AddVector(z_site, heads.directions(1, label=1)[(z_site, 2)], alpha=3.0, head=2)]
    with apply(lens, steer):
        after = act.collect(lens, sad, [site, z_site], {"mean": "mean", "last": "last"}, batch_size=16)
    assert set(probe.predict(after[site, "mean"])) == {1}
    assert set(head_probe.predict(after[z_site, "last"][:, 2])) == {1}
    torch.testing.assert_close(after[z_site, "last"][:, 3], before[z_site, "last"][:, 3])  # other heads untouched
