"""Heatmaps: tokens on x, layers / layer.head on y, a diverging scale centred at 0, exact values in the
hover text, span aggregation, HTML (and PNG only where a renderer exists)."""

from __future__ import annotations

import plotly.graph_objects as go
import pytest
import torch
from conftest import make_model

import omnilens
from omnilens import viz
from omnilens.patching import LogProb, PatchingResult, Sweep, patch_attribution, patch_exact

CLEAN = "the cat is happy and the dog is sad"
CORRUPT = "the dog is sad and the cat is happy"


@pytest.fixture(scope="module")
def results(tokenizer):
    lens = omnilens.load(make_model("dense"), tokenizer=tokenizer)
    metric = LogProb(tokenizer.convert_tokens_to_ids("sad"))
    exact = patch_exact(lens, CLEAN, CORRUPT, metric, [Sweep("hook_resid_pre"), Sweep("hook_z", by=("layer", "head")),
                                                       Sweep("hook_z", by=("layer", "pos", "head"))])
    return exact, lens.to_str_tokens(CLEAN)


def test_layer_by_position_heatmap(results):
    (resid, _, _), toks = results
    fig = resid.to_figure()
    hm = fig.data[0]
    assert isinstance(fig, go.Figure) and isinstance(hm, go.Heatmap)
    assert list(hm.x) == [f"{i}:{t}" for i, t in enumerate(toks)] and list(hm.y) == ["L0", "L1"]
    assert hm.zmid == 0 and hm.zmin == -hm.zmax and hm.zmax == pytest.approx(float(resid.values.abs().max()))
    assert torch.allclose(torch.tensor(hm.z), resid.values)
    assert f"effect {float(resid.values[1, 3]):.6g}" in hm.text[1][3]
    assert f"raw {float(resid.raw[1, 3]):.6g}" in hm.text[1][3]
    assert "resid_pre" in fig.layout.title.text


def test_head_heatmaps_put_tokens_on_x_and_layer_head_on_y(results):
    (_, heads, by_pos), toks = results
    hm = viz.heatmap(heads).data[0]
    assert list(hm.y) == ["L0", "L1"] and list(hm.x) == ["0", "1", "2", "3"]
    hm = viz.heatmap(by_pos, raw=True).data[0]
    assert list(hm.y) == [f"L{layer}.H{h}" for layer in range(2) for h in range(4)]
    assert len(hm.x) == len(toks)
    z = torch.tensor(hm.z)  # [layer.head, pos] from the result's [layer, pos, head]
    assert torch.allclose(z[4 + 2], by_pos.raw[1, :, 2])
    assert "metric" in hm.text[0][0]


def test_repeated_tokens_stay_distinct_columns(results):
    (resid, _, _), _ = results
    labels = {**resid.labels, "pos": ("the",) * resid.shape[1]}
    same = PatchingResult(resid.values, resid.raw, resid.axes, labels, resid.sites, resid.metric, resid.clean,
                          resid.corrupted)
    assert len(set(viz.heatmap(same).data[0].x)) == resid.shape[1]


def test_span_aggregation_heatmap(results):
    (resid, _, _), toks = results
    agg = resid.aggregate("pos", {"animals": [1, 6], "rest": [i for i in range(len(toks)) if i not in (1, 6)]})
    hm = agg.to_figure().data[0]
    assert list(hm.x) == ["animals", "rest"]
    assert torch.allclose(torch.tensor(hm.z)[:, 0], resid.values[:, [1, 6]].sum(1))
    mean = resid.aggregate("pos", {"animals": [1, 6]}, reduce="mean")
    assert torch.allclose(mean.raw[:, 0], resid.raw[:, [1, 6]].mean(1))
    with pytest.raises(IndexError, match="span 'far'"):
        resid.aggregate("pos", {"far": [99]})


def test_save_html_and_png_only_with_a_renderer(results, tmp_path):
    (resid, _, _), _ = results
    written = viz.save(resid, tmp_path / "resid_pre.html", png=False)
    assert written == [tmp_path / "resid_pre.html"]
    html = written[0].read_text()
    assert '"type":"heatmap"' in html and "L1" in html
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())
    if viz.png_available():
        assert viz.save(resid, tmp_path / "r.png", png=True)[-1].stat().st_size > 0
    else:
        with pytest.raises(RuntimeError, match="kaleido"):
            viz.save(resid, tmp_path / "r.png", png=True)


def test_save_shares_plotlyjs_in_the_folder_on_request(results, tmp_path):
    """Default: plotly.js inlined in each file; ``"directory"``: one ``plotly.min.js`` beside the files,
    written by the first save only, referenced by a relative script tag (viewable offline)."""
    from plotly.offline import get_plotlyjs

    (resid, heads, _), _ = results
    alone = viz.save(resid, tmp_path / "alone" / "resid.html", png=False)[0]
    assert get_plotlyjs()[:1000] in alone.read_text()
    first = viz.save(resid, tmp_path / "shared" / "resid.html", png=False, include_plotlyjs="directory")
    second = viz.save(heads, tmp_path / "shared" / "heads.html", png=False, include_plotlyjs="directory")
    bundle = tmp_path / "shared" / "plotly.min.js"
    assert first == [tmp_path / "shared" / "resid.html", bundle] and second == [tmp_path / "shared" / "heads.html"]
    assert bundle.read_text() == get_plotlyjs()
    for html in (first[0], second[0]):
        text = html.read_text()
        assert 'src="plotly.min.js"></script>' in text and get_plotlyjs()[:1000] not in text
        assert '"type":"heatmap"' in text and html.stat().st_size < alone.stat().st_size / 20


def test_attribution_results_plot_too(tokenizer):
    lens = omnilens.load(make_model("dense"), tokenizer=tokenizer)
    metric = LogProb(tokenizer.convert_tokens_to_ids("sad"))
    atp = patch_attribution(lens, CLEAN, CORRUPT, metric, Sweep("hook_k", by=("layer", "head", "pos")), star=True)
    hm = atp.to_figure().data[0]
    assert list(hm.y) == [f"L{layer}.KV{h}" for layer in range(2) for h in range(2)]
    assert "atp*" in atp.to_figure().layout.title.text
