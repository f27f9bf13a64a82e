"""Concept vectors: corpus preflight, hand-computed vectors and quality numbers, readout round trip,
and recovery of a planted direction end to end."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from test_probing import planted_lens, planted_texts

from omnilens.activations import ActivationDataset
from omnilens.concepts import (
    ConceptVectors, CorpusError, Thresholds, build_concepts, concept_vectors, down_projections, load_readout,
    preflight, quality_report, save_readout, triage,
)

RESID, Z = "blocks.3.hook_resid_post", "blocks.3.attn.hook_z"


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def good_corpus(root):
    write(root / "stories" / "happy.txt", "the cat is happy\n\na dog is happy today\n")
    write(root / "stories" / "sad.txt", "the cat is sad\n\n\na dog is sad\ntoday\n")
    write(root / "paired" / "park" / "happy.txt", "we walk in the city and we are happy")
    write(root / "paired" / "park" / "baseline.txt", "we walk in the city")
    write(root / "paired" / "sea" / "baseline.txt", "the sea is blue\n\nthe sky is blue")
    return root


# corpus -----------------------------------------------------------------------------------------
def test_preflight_loads_a_good_corpus(tmp_path):
    corpus = preflight(good_corpus(tmp_path))
    assert corpus.concepts == ["happy", "sad"]
    assert corpus.stories["happy"] == ["the cat is happy", "a dog is happy today", "we walk in the city and we are happy"]
    assert corpus.stories["sad"] == ["the cat is sad", "a dog is sad today"]
    assert corpus.baselines == ["we walk in the city", "the sea is blue", "the sky is blue"]
    texts, labels = corpus.examples()
    assert len(texts) == 8 and labels == ["happy"] * 3 + ["sad"] * 2 + ["baseline"] * 3


@pytest.mark.parametrize("breaks, message", [
    (lambda r: write(r / "stories" / "sad.txt", "\n \n"), "stories/sad.txt: empty"),
    (lambda r: write(r / "stories" / "Angry.txt", "x\n\ny"), "'Angry' is not a lowercase identifier"),
    (lambda r: write(r / "stories" / "calm.md", "x\n\ny"), "stories/calm.md: misnamed, expected a .txt"),
    (lambda r: write(r / "paired" / "park" / "hapy.txt", "x"), "'hapy' is not a concept of stories/"),
    (lambda r: (r / "paired" / "sea" / "baseline.txt").rename(r / "paired" / "sea" / "base.txt"),
     "paired/sea: no baseline.txt"),
    (lambda r: write(r / "stories" / "baseline.txt", "x\n\ny"), "'baseline' is reserved"),
    (lambda r: write(r / "storys" / "x.txt", "x"), "unexpected entries at the top level: storys"),
])
def test_preflight_fails_fast_on_bad_corpora(tmp_path, breaks, message):
    root = good_corpus(tmp_path)
    breaks(root)
    loaded = []
    with pytest.raises(CorpusError, match=message):
        build_concepts(root, lambda: loaded.append(1))
    assert loaded == []  # the model loader never ran


def test_preflight_reports_every_problem(tmp_path):
    write(tmp_path / "stories" / "happy.txt", "")
    write(tmp_path / "stories" / "Sad.txt", "x")
    with pytest.raises(CorpusError) as err:
        preflight(tmp_path, concepts=["calm"])
    assert len(err.value.problems) == 3
    with pytest.raises(CorpusError, match="does not exist"):
        preflight(tmp_path / "nowhere")
    write(tmp_path / "one" / "stories" / "happy.txt", "a\n\nb")
    with pytest.raises(CorpusError, match="at least two concepts"):
        preflight(tmp_path / "one")


# hand computations ------------------------------------------------------------------------------
@pytest.fixture
def synthetic():
    """A labelled dataset of random activations: 3 concepts + baselines, a d_model site and hook_z at layer 3."""
    gen = torch.Generator().manual_seed(0)
    labels = ["a"] * 5 + ["b"] * 4 + ["c"] * 4 + ["baseline"] * 3
    n, d = len(labels), 6
    x = torch.randn(n, d, generator=gen, dtype=torch.float64).float()
    x[:5, 0] += 3.0  # concept a lives mostly along dimension 0
    x[4] = -x[4]  # ... except one outlier story
    z = torch.randn(n, 3, 2, generator=gen).float()
    z[:5, 1] += 2.0  # and at the o_proj input in head 1
    sites = {RESID: {"layer": 3, "tower": "", "component": "resid", "site": "hook_resid_post", "axes": "batch pos d_model"},
             Z: {"layer": 3, "tower": "", "component": "attn", "site": "hook_z", "axes": "batch pos head d_head"}}
    ds = ActivationDataset(sites, {"mean": {"kind": "mean"}}, {(RESID, "mean"): x, (Z, "mean"): z}, labels)
    w_down = torch.randn(d, 5, generator=gen)
    w_down[:, 2] = torch.tensor([4.0, 0.1, 0, 0, 0.2, 0])
    return ds, x.double().numpy(), z.double().numpy(), np.array(labels), w_down


def unit(v):
    return v / np.linalg.norm(v)


def test_concept_vectors_and_quality_equal_hand_computation(synthetic):
    ds, x, z, labels, w_down = synthetic
    vecs = concept_vectors(ds)
    assert vecs.concepts == ["a", "b", "c"] and vecs.layers == [3] and vecs.sites == {3: RESID}
    hand = {c: unit(x[labels == c].mean(0) - x[labels != c].mean(0)) for c in "abc"}
    for i, c in enumerate("abc"):
        np.testing.assert_allclose(vecs.vectors[3][i].numpy(), hand[c], atol=1e-6)

    report = quality_report(ds, vecs, w_down={3: w_down}, ridge_alpha=0.05)
    assert [(r.concept, r.layer) for r in report.rows] == [("a", 3), ("b", 3), ("c", 3)]
    V = np.stack([vecs.vectors[3][i].double().numpy() for i in range(3)])
    for i, c in enumerate("abc"):
        r = report.get(c, 3)
        v = V[i] / np.linalg.norm(V[i])
        P, mu_n = x[labels == c], x[labels != c].mean(0)
        s = np.linalg.svd(P - P.mean(0), compute_uv=False)
        assert r.pc1_ratio == pytest.approx(s[0] ** 2 / (s ** 2).sum(), abs=1e-12)
        proj = (P - mu_n) @ v
        assert (r.proj_mean, r.proj_std, r.proj_min, r.proj_max) == pytest.approx(
            (proj.mean(), proj.std(), proj.min(), proj.max()), abs=1e-9)
        align = proj / np.linalg.norm(P - mu_n, axis=1)
        np.testing.assert_allclose(r.alignment, align, atol=1e-9)
        cols = (v @ w_down.double().numpy()) / np.linalg.norm(w_down.double().numpy(), axis=0)
        assert r.best_neuron["index"] == int(np.abs(cols).argmax())
        assert r.best_neuron["cosine"] == pytest.approx(cols[np.abs(cols).argmax()], abs=1e-9)
        delta = z[labels == c].mean(0) - z[labels != c].mean(0)
        share = (delta ** 2).sum(-1) / (delta ** 2).sum()
        assert r.head_share["head"] == int(share.argmax())
        assert r.head_share["share"] == pytest.approx(share.max(), abs=1e-9)
        assert r.head_share["effective_heads"] == pytest.approx(1 / (share ** 2).sum(), abs=1e-9)
        # ridge with intercept, closed form on centred data (samples = hidden dimensions)
        X = np.delete(V, i, axis=0).T
        y = V[i]
        Xc, yc = X - X.mean(0), y - y.mean()
        beta = np.linalg.solve(Xc.T @ Xc + 0.05 * np.eye(2), Xc.T @ yc)
        resid = yc - Xc @ beta
        assert r.ridge_r2 == pytest.approx(1 - (resid ** 2).sum() / (yc ** 2).sum(), abs=1e-9)
        cos = V @ V.T / np.outer(np.linalg.norm(V, axis=1), np.linalg.norm(V, axis=1))
        others = sorted((k for k in range(3) if k != i), key=lambda k: -cos[i, k])
        assert [n for n, _ in r.nearest] == ["abc"[k] for k in others]
        assert [v for _, v in r.nearest] == pytest.approx([cos[i, k] for k in others], abs=1e-6)
    a = report.get("a", 3)
    assert a.outliers == [4] and a.best_neuron["index"] == 2 and a.head_share["head"] == 1
    assert a.triage == triage(a, Thresholds())


def test_triage_rules(synthetic):
    ds, *_ , w_down = synthetic
    base = quality_report(ds, concept_vectors(ds), w_down={3: w_down}).get("a", 3)
    clean = replace(base, ridge_r2=0.1, nearest=[("b", 0.1)], outliers=[], mean_alignment=0.8, pc1_ratio=0.9,
                    best_neuron={"index": 0, "cosine": 0.1})
    t = Thresholds()
    assert triage(clean, t) == "clean low-rank"
    assert triage(replace(clean, best_neuron={"index": 0, "cosine": -0.7}), t) == "clean single-neuron"
    assert triage(replace(clean, pc1_ratio=0.1), t) == "fragmented"
    assert triage(replace(clean, mean_alignment=0.05), t) == "fragmented"
    assert triage(replace(clean, nearest=[("b", 0.6)]), t) == "contaminated"
    assert triage(replace(clean, outliers=[0, 1, 2]), t) == "contaminated"
    assert triage(replace(clean, ridge_r2=0.95, nearest=[("b", 0.9)]), t) == "redundant"


def test_report_files_and_summary(synthetic, tmp_path, capsys):
    ds, *_, w_down = synthetic
    report = quality_report(ds, concept_vectors(ds), w_down={3: w_down}, verbose=True)
    printed = capsys.readouterr().out
    assert "triage:" in printed and printed.strip() == report.summary()
    jpath, hpath = report.save(tmp_path / "q")
    data = json.loads(jpath.read_text())
    assert [r["concept"] for r in data["rows"]] == ["a", "b", "c"]
    assert sum(len(v) for v in data["summary"].values()) == 3
    assert data["rows"][0]["pc1_ratio"] == report.rows[0].pc1_ratio
    page = hpath.read_text()
    assert page.startswith("<!DOCTYPE html>") and page.count("<tr") == 4
    assert sorted(p.name for p in (tmp_path / "q").iterdir()) == ["quality.html", "quality.json"]


# readout ----------------------------------------------------------------------------------------
def test_readout_round_trip_is_exact(synthetic, tmp_path):
    ds, *_ = synthetic
    vecs = concept_vectors(ds)
    vecs = ConceptVectors(vecs.concepts, [3, 5], {3: vecs.vectors[3], 5: -vecs.vectors[3]}, {})
    save_readout(vecs, tmp_path / "r")
    manifest = json.loads((tmp_path / "r" / "readout.json").read_text())
    assert manifest == {"concepts": ["a", "b", "c"], "layers": [3, 5], "hidden_size": 6, "dtype": "float16"}
    tensors = load_file(tmp_path / "r" / "readout.safetensors")
    assert set(tensors) == {"layer_3.vectors", "layer_5.vectors"} and tensors["layer_3.vectors"].dtype == torch.float16
    loaded = load_readout(tmp_path / "r")
    assert loaded.concepts == vecs.concepts and loaded.layers == [3, 5]
    for lay in (3, 5):
        assert torch.equal(loaded.vectors[lay], vecs.vectors[lay].half())
    save_readout(loaded, tmp_path / "again")
    for name in ("readout.json", "readout.safetensors"):
        assert (tmp_path / "again" / name).read_bytes() == (tmp_path / "r" / name).read_bytes()


@pytest.mark.parametrize("edit, message", [
    (lambda m, t: m.update(hidden_size=8), r"shape \(3, 6\), but the manifest says \[n_concepts, hidden_size\] = \[3, 8\]"),
    (lambda m, t: m.update(layers=[3]), r"manifest layers \[3\] need tensors \['layer_3.vectors'\]"),
    (lambda m, t: m.update(layers=[3, 5, 7]), "need tensors"),
    (lambda m, t: m.update(concepts=["a", "b"]), r"\[n_concepts, hidden_size\] = \[2, 6\]"),
    (lambda m, t: m.pop("dtype"), r"missing keys \['dtype'\]"),
    (lambda m, t: m.update(dtype="bfloat16"), "dtype 'bfloat16' is not supported"),
    (lambda m, t: t.update({"layer_5.vectors": t["layer_5.vectors"].float()}), "is torch.float32, but the manifest says float16"),
])
def test_bad_readout_manifests_raise_clear_errors(synthetic, tmp_path, edit, message):
    ds, *_ = synthetic
    v = concept_vectors(ds).vectors[3]
    save_readout(ConceptVectors(["a", "b", "c"], [3, 5], {3: v, 5: v}), tmp_path)
    m = json.loads((tmp_path / "readout.json").read_text())
    t = load_file(tmp_path / "readout.safetensors")
    edit(m, t)
    (tmp_path / "readout.json").write_text(json.dumps(m))
    save_file(t, tmp_path / "readout.safetensors")
    with pytest.raises(ValueError, match=message):
        load_readout(tmp_path)


# planted direction, end to end ------------------------------------------------------------------
def test_planted_concept_recovered_end_to_end(tmp_path):
    """A corpus on disk -> vectors, report and readout; the planted "happy"/"sad" direction u is recovered."""
    lens, u, _ = planted_lens()
    texts, labels = planted_texts(n=6, words=("happy", "sad", "calm"))
    by = {k: [t for t, lab in zip(texts, labels) if lab == k] for k in range(3)}
    write(tmp_path / "corpus" / "stories" / "happy.txt", "\n\n".join(by[0][:4]))
    write(tmp_path / "corpus" / "stories" / "sad.txt", "\n\n".join(by[1][:4]))
    for i in range(4, 6):
        write(tmp_path / "corpus" / "paired" / f"s{i}" / "happy.txt", by[0][i])
        write(tmp_path / "corpus" / "paired" / f"s{i}" / "sad.txt", by[1][i])
        write(tmp_path / "corpus" / "paired" / f"s{i}" / "baseline.txt", by[2][i])
    run = build_concepts(tmp_path / "corpus", lambda: lens, out_dir=tmp_path / "out", verbose=False)
    assert run.vectors.concepts == ["happy", "sad"] and run.vectors.layers == [0, 1]
    for layer in (0, 1):
        assert float(run.vectors.vector("happy", layer) @ u) >= 0.9
        assert float(run.vectors.vector("sad", layer) @ u) <= -0.9
        r = run.report.get("happy", layer)
        assert r.n_stories == 6 and r.head_share is not None and r.best_neuron is not None
        assert r.nearest[0][0] == "sad" and r.nearest[0][1] < -0.9
    w = down_projections(lens, [0, 1])
    assert torch.equal(w[1], lens.model.model.layers[1].mlp.down_proj.weight.detach())
    loaded = load_readout(tmp_path / "out")
    assert torch.equal(loaded.vectors[1], run.vectors.vectors[1].half())
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "quality.html", "quality.json", "readout.json", "readout.safetensors"]
    with pytest.raises(ValueError, match=r"layers \[9\] do not exist"):
        build_concepts(tmp_path / "corpus", lens, layers=[9])
