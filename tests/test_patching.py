"""Exact activation patching: the batched sweeps equal a one-forward-per-cell loop written here with
plain interventions, for every sweep kind and both directions; spans; metrics; errors raised before
any forward; labelled results (normalisation, top, aggregate, save/load)."""

from __future__ import annotations

import pytest
import torch

from omnilens.interventions import Patch
from omnilens.patching import KLToClean, LogitDiff, LogitFn, LogProb, PatchingResult, Prob, Sweep, patch_exact
from omnilens.patching.replay import TowerReplay

TOL = 1e-5
N_LAYERS, N_HEADS, N_KV = 2, 4, 2
CLEAN = "the cat is happy and the dog is sad"
CORRUPT = "the dog is sad and the cat is happy"


@pytest.fixture(scope="module")
def pair(tokenizer):
    """Clean ``[2 6]`` batch (second row right-padded) and a corrupted copy with two words swapped per row."""
    enc = tokenizer(["the cat is happy and sad", "a red bird"], return_tensors="pt", padding=True)
    clean = {k: enc[k] for k in ("input_ids", "attention_mask")}
    corrupted = {k: v.clone() for k, v in clean.items()}
    corrupted["input_ids"][0, [1, 5]] = clean["input_ids"][0, [5, 1]]
    corrupted["input_ids"][1, [0, 2]] = clean["input_ids"][1, [2, 0]]
    return clean, corrupted


@pytest.fixture(scope="module")
def metric(tokenizer):
    ids = tokenizer.convert_tokens_to_ids
    return LogitDiff([ids("cat"), ids("bird")], [ids("dog"), ids("red")])


def naive(lens, clean, corrupted, metric, site: str, axes: tuple[str, ...], direction="denoise") -> torch.Tensor:
    """One forward per cell with a :class:`Patch`; ``axes`` are intervention selectors after the layer."""
    source, base = (clean, corrupted) if direction == "denoise" else (corrupted, clean)
    _, cache = lens.run_with_cache(source)
    seq = lens.to_inputs(clean)["input_ids"].shape[1]
    sizes = {"pos": seq, "head": N_HEADS, "kv_head": N_KV}
    shape = (N_LAYERS,) + tuple(sizes[a] for a in axes)
    out = torch.empty(shape)
    for index in torch.cartesian_prod(*[torch.arange(n) for n in shape]).reshape(-1, len(shape)).tolist():
        name = site.format(index[0])
        patch = Patch.from_cache(cache, name, **{a: i for a, i in zip(axes, index[1:])})
        logits = lens.run(base, writes=patch.writes()).output.logits
        out[tuple(index)] = metric(logits).mean()
    return out


CASES = [  # (sweep, hand site template, selectors, directions)
    (Sweep("hook_resid_pre"), "blocks.{}.hook_resid_pre", ("pos",), ("denoise", "noise")),
    (Sweep("hook_resid_mid"), "blocks.{}.hook_resid_mid", ("pos",), ("denoise",)),
    (Sweep("hook_resid_post"), "blocks.{}.hook_resid_post", ("pos",), ("denoise",)),
    (Sweep("hook_attn_out"), "blocks.{}.hook_attn_out", ("pos",), ("denoise",)),
    (Sweep("hook_mlp_out"), "blocks.{}.hook_mlp_out", ("pos",), ("denoise",)),
    (Sweep("hook_z", by=("layer", "head")), "blocks.{}.attn.hook_z", ("head",), ("denoise", "noise")),
    (Sweep("hook_z", by=("layer", "head", "pos")), "blocks.{}.attn.hook_z", ("head", "pos"), ("denoise",)),
    (Sweep("hook_q", by=("layer", "head")), "blocks.{}.attn.hook_q", ("head",), ("denoise",)),
    (Sweep("hook_q", by=("layer", "head", "pos")), "blocks.{}.attn.hook_q", ("head", "pos"), ("denoise",)),
    (Sweep("hook_k", by=("layer", "head")), "blocks.{}.attn.hook_k", ("kv_head",), ("denoise", "noise")),
    (Sweep("hook_k", by=("layer", "head", "pos")), "blocks.{}.attn.hook_k", ("kv_head", "pos"), ("denoise",)),
    (Sweep("hook_v", by=("layer", "head")), "blocks.{}.attn.hook_v", ("kv_head",), ("denoise",)),
    (Sweep("hook_v", by=("layer", "head", "pos")), "blocks.{}.attn.hook_v", ("kv_head", "pos"), ("denoise",)),
    (Sweep("hook_pattern", by=("layer", "head")), "blocks.{}.attn.hook_pattern", ("head",), ("denoise", "noise")),
    (Sweep("hook_pattern", by=("layer", "head", "pos")), "blocks.{}.attn.hook_pattern", ("head", "pos"),
     ("denoise",)),
]


@pytest.mark.parametrize("sweep,site,axes,directions", CASES, ids=lambda c: getattr(c, "site", None))
def test_batched_equals_one_forward_per_cell(dense_lens, pair, metric, sweep, site, axes, directions):
    clean, corrupted = pair
    for direction in directions:
        res = patch_exact(dense_lens, clean, corrupted, metric, sweep, direction=direction, chunk_size=7)
        ref = naive(dense_lens, clean, corrupted, metric, site, axes, direction)
        assert res.raw.shape == ref.shape
        assert (res.raw - ref).abs().max() < TOL, (sweep, direction)
        assert res.raw.std() > 1e-3  # the sweep is not flat: the comparison can fail
        expected_axes = ("layer",) + tuple("query" if (a == "pos" and "pattern" in site) else a for a in axes)
        assert res.axes == expected_axes and res.direction == direction


def test_chunking_does_not_change_results(dense_lens, pair, metric):
    clean, corrupted = pair
    sweep = Sweep("hook_z", by=("layer", "head", "pos"))
    one = patch_exact(dense_lens, clean, corrupted, metric, sweep, chunk_size=1)
    many = patch_exact(dense_lens, clean, corrupted, metric, sweep, memory_budget=1 << 40)
    assert (one.raw - many.raw).abs().max() < TOL
    early = LogProb([3, 4], pos=-4)  # reads the last 4 positions: suffix replays must start before them
    fast = patch_exact(dense_lens, clean, corrupted, early, Sweep("hook_resid_mid"))
    full = patch_exact(dense_lens, clean, corrupted, early, Sweep("hook_resid_mid"), replay=False)
    assert (fast.raw - full.raw).abs().max() < TOL and fast.raw.std() > 1e-3


def test_replay_and_noop_cells_save_forwards_without_changing_results(dense_lens, tokenizer):
    """Clean and corrupted differ only at the last token: every earlier (layer, pos) cell is a no-op, and
    the replay starts each chunk at its own block, so block 0 sees the three base runs, the one-row replay that
    records the base keys and values (for suffix replays), and one patched row."""
    ids = dense_lens.to_tokens(CLEAN)
    corrupted = ids.clone()
    corrupted[0, -1] = tokenizer.convert_tokens_to_ids("happy")
    rows = []
    handle = dense_lens.model.model.layers[0].register_forward_pre_hook(lambda m, a: rows.append(a[0].shape[0]))
    try:
        metric = LogProb(tokenizer.convert_tokens_to_ids("sad"))
        fast = patch_exact(dense_lens, ids, corrupted, metric, Sweep("hook_resid_pre"))
        assert sum(rows) == 5
        rows.clear()
        full = patch_exact(dense_lens, ids, corrupted, metric, Sweep("hook_resid_pre"), replay=False)
        assert sum(rows) == 2 + 2  # base runs + the two non-no-op cells, stacked in one full forward
    finally:
        handle.remove()
    assert (fast.raw - full.raw).abs().max() < TOL
    assert torch.equal(fast.raw[:, :-1], torch.full_like(fast.raw[:, :-1], fast.corrupted))
    assert (fast.values[:, -1] - 1).abs().max() < 1e-4


def test_suffix_replay_recomputes_only_positions_after_the_patch(dense_lens, pair, tokenizer):
    """A replay from block ``start`` of positions ``p..`` (earlier positions attend through the base run's
    keys and values) reproduces the base logits there, on a padded two-row batch, feeding each block only
    ``pos - p`` positions; and patching with it equals full forwards when every cell is real work."""
    base = pair[1]
    with TowerReplay.capture(dense_lens, "", rows=2) as box:
        logits = dense_lens.run(base, use_cache=False).output.logits
    replay = box[0]
    assert replay is not None and replay.verify(logits) and replay.suffixable
    seen = []
    handle = dense_lens.model.model.layers[1].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
    try:
        for start in (0, 1):
            for p in range(1, logits.shape[1]):
                seen.clear()
                got = replay.run(start, 3, suffix=p)
                assert (got - logits.repeat(3, 1, 1)[:, p:]).abs().max() < TOL
                assert seen == [logits.shape[1] - p]
    finally:
        handle.remove()
    ids = dense_lens.to_tokens(CLEAN)
    corrupted = ids.clone()
    corrupted[0, 0] = tokenizer.convert_tokens_to_ids("a")
    metric = LogProb(tokenizer.convert_tokens_to_ids("sad"))
    fast = patch_exact(dense_lens, ids, corrupted, metric, Sweep("hook_resid_pre"))
    full = patch_exact(dense_lens, ids, corrupted, metric, Sweep("hook_resid_pre"), replay=False)
    assert (fast.raw - full.raw).abs().max() < TOL and fast.raw.std() > 1e-3


def test_full_span_patch_recovers_clean_and_corrupted(dense_lens, tokenizer):
    seq = dense_lens.to_tokens(CLEAN).shape[1]
    sweep = Sweep("hook_resid_pre", spans={"all": range(seq), "first half": range(seq // 2)}, layers=[0])
    for metric in (LogProb(tokenizer.convert_tokens_to_ids("sad")), KLToClean(pos=None), KLToClean(),
                   Prob(tokenizer.convert_tokens_to_ids("happy"), pos=3)):
        den = patch_exact(dense_lens, CLEAN, CORRUPT, metric, sweep)
        noi = patch_exact(dense_lens, CLEAN, CORRUPT, metric, sweep, direction="noise")
        assert den.axes == ("layer", "span") and den.labels["span"] == ("all", "first half")
        assert abs(float(den.values[0, 0]) - 1) < 1e-4 and abs(float(noi.values[0, 0])) < 1e-4
        assert abs(den.raw[0, 0] - den.clean) < TOL and abs(noi.raw[0, 0] - noi.corrupted) < TOL
    assert den.clean == 0.0 if isinstance(metric, KLToClean) else True


def test_metrics_against_hand_computation(dense_lens, tokenizer):
    logits = dense_lens.run(CLEAN).output.logits
    a, b = tokenizer.convert_tokens_to_ids("sad"), tokenizer.convert_tokens_to_ids("happy")
    last = logits[0, -1]
    logp = last.log_softmax(-1)
    assert torch.allclose(LogitDiff(a, b)(logits), (last[a] - last[b]).reshape(1), atol=TOL)
    assert torch.allclose(LogProb(a)(logits), logp[a].reshape(1), atol=TOL)
    assert torch.allclose(Prob(b, pos=2)(logits), logits[0, 2].softmax(-1)[b].reshape(1), atol=TOL)
    other = dense_lens.run(CORRUPT).output.logits
    kl = KLToClean().bind(logits, other)(other)
    p, q = logits[0, -1].softmax(-1), other[0, -1].softmax(-1)
    assert torch.allclose(kl, (p * (p.log() - q.log())).sum().reshape(1), atol=TOL)
    stacked = torch.cat([other, logits, other])  # per-prompt data tiles over stacked copies
    assert torch.allclose(KLToClean().bind(logits, other)(stacked), torch.cat([kl, torch.zeros(1), kl]), atol=TOL)
    fn = LogitFn(lambda x: x[:, -1].max(-1).values, name="max_logit")
    res = patch_exact(dense_lens, CLEAN, CORRUPT, fn, Sweep("hook_mlp_out", layers=[1]))
    assert res.metric == "max_logit" and abs(res.clean - float(last.max())) < TOL


def test_metric_of_the_whole_model_output(dense_lens, tokenizer):
    """``output="model"``: the metric receives the model's output object (e.g. Talker/codec outputs)."""
    sad = tokenizer.convert_tokens_to_ids("sad")
    by_logits = patch_exact(dense_lens, CLEAN, CORRUPT, LogitFn(lambda x: x[:, -1, sad]), Sweep("hook_attn_out"))
    by_output = patch_exact(dense_lens, CLEAN, CORRUPT, LogitFn(lambda out: out.logits[:, -1, sad]),
                            Sweep("hook_attn_out"), output="model")
    assert (by_logits.raw - by_output.raw).abs().max() < TOL and by_logits.raw.std() > 1e-3


class Counter:
    """Counts forwards of the model's decoder (``Lens.run`` calls ``model.forward`` directly)."""

    def __init__(self, model):
        self.n = 0
        self.handle = model.model.register_forward_pre_hook(self)

    def __call__(self, *args):
        self.n += 1


def test_errors_before_any_forward(dense_lens, metric):
    counter = Counter(dense_lens.model)
    try:
        with pytest.raises(ValueError, match="same shape.*input_ids.*\\(1, 3\\) vs \\(1, 4\\)"):
            patch_exact(dense_lens, "the cat sat", "the big cat sat", metric, Sweep("hook_resid_pre"))
        with pytest.raises(IndexError, match="layers \\[5\\] out of range"):
            patch_exact(dense_lens, CLEAN, CORRUPT, metric, Sweep("hook_resid_pre", layers=[5]))
        with pytest.raises(IndexError, match="span 'late' has positions \\[40\\]"):
            patch_exact(dense_lens, CLEAN, CORRUPT, metric, Sweep("hook_z", spans={"late": [2, 40]}))
        with pytest.raises(ValueError, match="one value per batch row, shape \\(2,\\); got \\(\\)"):
            patch_exact(dense_lens, CLEAN, CORRUPT, lambda logits: logits[:, -1, 0].mean(), Sweep("hook_resid_pre"))
        with pytest.raises(ValueError, match="cannot sweep blocks.0.hook_resid_pre by 'head'"):
            patch_exact(dense_lens, CLEAN, CORRUPT, metric, Sweep("hook_resid_pre", by=("layer", "head")))
        with pytest.raises(KeyError, match="no block site 'hook_zz'"):
            patch_exact(dense_lens, CLEAN, CORRUPT, metric, Sweep("hook_zz"))
        with pytest.raises(KeyError, match="ambiguous.*ln1"):
            patch_exact(dense_lens, CLEAN, CORRUPT, metric, Sweep("hook_normalized"))
        with pytest.raises(ValueError, match="direction"):
            patch_exact(dense_lens, CLEAN, CORRUPT, metric, Sweep("hook_resid_pre"), direction="sideways")
        assert counter.n == 0
        with pytest.raises(ValueError, match="normalisation is undefined"):
            patch_exact(dense_lens, CLEAN, CLEAN, LogProb(3), Sweep("hook_resid_pre"))
        assert counter.n == 2  # the two base runs, no patched forward
    finally:
        counter.handle.remove()


def test_result_labels_top_aggregate_save_load(dense_lens, tokenizer, tmp_path):
    metric = LogProb(tokenizer.convert_tokens_to_ids("sad"))
    res = patch_exact(dense_lens, CLEAN, CORRUPT, metric, Sweep("hook_z", by=("layer", "head", "pos")))
    toks = dense_lens.to_str_tokens(CLEAN)
    assert res.labels["pos"] == tuple(f"{i}:{t}" for i, t in enumerate(toks))
    assert res.labels["layer"] == ("0", "1") and res.labels["head"] == ("0", "1", "2", "3")
    assert res.sites == ("blocks.0.attn.hook_z", "blocks.1.attn.hook_z")
    assert res.provenance["model"] == "Qwen3ForCausalLM" and len(res.provenance["config_sha1"]) == 40
    assert torch.allclose(res.values, (res.raw - res.corrupted) / (res.clean - res.corrupted))
    top = res.top(3)
    assert [v for _, v in top] == sorted([v for _, v in top], key=abs, reverse=True)
    assert abs(top[0][1]) == float(res.values.abs().max())
    layer, head, pos = (int(top[0][0]["layer"]), int(top[0][0]["head"]), int(top[0][0]["pos"].split(":")[0]))
    assert float(res.values[layer, head, pos]) == top[0][1]
    near_clean = res.top(len(res.values.reshape(-1)), reference=1.0)  # every cell, furthest from clean first
    distance = (torch.tensor([v for _, v in near_clean]) - 1).abs()  # float32, as the values
    assert (distance[:-1] >= distance[1:]).all() and distance[0] == (res.values - 1).abs().max()
    assert sorted(v for _, v in near_clean) == sorted(res.values.reshape(-1).tolist())
    agg = res.aggregate("pos", {"first": [0, 1], "rest": range(2, len(toks))})
    assert agg.shape == (2, 4, 2) and torch.allclose(agg.values[..., 0], res.values[..., :2].sum(-1))
    path = res.save(tmp_path / "sub" / "z.safetensors")
    assert sorted(p.name for p in path.parent.iterdir()) == ["z.safetensors"]  # no temp file left
    back = PatchingResult.load(path)
    assert torch.equal(back.values, res.values) and torch.equal(back.raw, res.raw)
    assert (back.axes, back.labels, back.sites, back.metric, back.clean, back.provenance) == \
        (res.axes, res.labels, res.sites, res.metric, res.clean, dict(res.provenance))
    other = tmp_path / "plain.safetensors"
    from safetensors.torch import save_file
    save_file({"x": torch.zeros(1)}, str(other))
    with pytest.raises(ValueError, match="not an omnilens patching result"):
        PatchingResult.load(other)


def test_progress_bar_counts_every_cell_and_changes_nothing(dense_lens, pair, metric, capsys):
    clean, corrupted = pair
    sweeps = [Sweep("hook_resid_pre"), Sweep("hook_z", by=("layer", "head"))]
    quiet = patch_exact(dense_lens, clean, corrupted, metric, sweeps)
    shown = patch_exact(dense_lens, clean, corrupted, metric, sweeps, progress=True)
    for a, b in zip(quiet, shown):
        assert torch.equal(a.raw, b.raw)
    n_cells = sum(r.raw.numel() for r in shown)
    err = capsys.readouterr().err
    assert "exact patching" in err and f"{n_cells}/{n_cells}" in err
