"""Activation datasets: pooling under left/right padding, streaming, resume, provenance, errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import omnilens
from omnilens import activations as act
from omnilens.inputs import vision_inputs
from omnilens.testing import tiny_qwen2_vl, tiny_qwen3, tiny_tokenizer

TEXTS = [
    "the cat is happy",
    "a dog was sad and upset today",
    "red sun",
    "my friend is calm in the morning and the evening",
    "the bird",
    "we love the sea",
    "she is afraid of the dark night",
]
SITES = ["blocks.0.hook_resid_post", "blocks.1.attn.hook_z"]


@pytest.fixture(scope="module")
def model():
    return tiny_qwen3(seed=3)


def make_lens(model, side: str):
    tok = tiny_tokenizer()
    tok.padding_side = side
    return omnilens.load(model, tokenizer=tok)


def single_runs(lens, texts, site):
    """Per example: the unpadded forward's activation ``[pos *rest]`` at ``site``."""
    out = []
    for t in texts:
        _, cache = lens.run_with_cache([t], names=[site])
        out.append(cache[site][0])
    return out


@pytest.mark.parametrize("side", ["left", "right"])
def test_pooling_with_padding_equals_unpadded_single_runs(model, side):
    lens = make_lens(model, side)
    spans = [(1, 3), (0, 2), (1, 2), (2, 6), (0, 1), (1, 4), (3, 5)]
    pools = {"last": "last", "mean": "mean", "span": act.span(spans), "all": "all"}
    ds = act.collect(lens, TEXTS, SITES, pools, batch_size=4)
    kw = lens.to_inputs(TEXTS[:4])
    assert (kw["attention_mask"] == 0).any(), "the batch must contain padding"
    pad_col = 0 if side == "left" else -1
    assert (kw["attention_mask"][:, pad_col] == 0).any()
    for site in SITES:
        ref = single_runs(lens, TEXTS, site)
        torch.testing.assert_close(ds[site, "last"], torch.stack([r[-1] for r in ref]), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(ds[site, "mean"], torch.stack([r.mean(0) for r in ref]), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(ds[site, "span"], torch.stack([r[s:e].mean(0) for r, (s, e) in zip(ref, spans)]),
                                   atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(ds[site, "all"], torch.cat(ref), atol=1e-6, rtol=1e-5)
    assert ds.lengths["all"].tolist() == [len(r) for r in ref]
    assert ds.sites["blocks.1.attn.hook_z"]["layer"] == 1
    assert ds.sites["blocks.1.attn.hook_z"]["axes"] == "batch pos head d_head"
    assert ds["blocks.1.attn.hook_z", "last"].shape == (len(TEXTS), 4, 16)


def test_dict_inputs_and_token_span(model):
    """Dict inputs (one example each, as multimodal builders produce) with a span found from a token id."""
    lens = make_lens(model, "right")
    tok = lens.tokenizer
    pad_id = tok.convert_tokens_to_ids("<|image_pad|>")
    texts = ["the <|image_pad|> <|image_pad|> <|image_pad|> cat", "a dog <|image_pad|> <|image_pad|> is here"]
    dicts = [dict(tok(t, return_tensors="pt")) for t in texts]
    ds = act.collect(lens, dicts, "blocks.1.hook_resid_post", {"img": act.span(act.token_span(pad_id)),
                                                               "img_all": act.span(act.token_span(pad_id), "all")})
    ref = single_runs(lens, texts, "blocks.1.hook_resid_post")
    torch.testing.assert_close(ds["blocks.1.hook_resid_post", "img"], torch.stack([ref[0][1:4].mean(0), ref[1][2:4].mean(0)]))
    torch.testing.assert_close(ds["blocks.1.hook_resid_post", "img_all"], torch.cat([ref[0][1:4], ref[1][2:4]]))
    assert ds.spans["img"].tolist() == [[1, 4], [2, 4]]


def test_multimodal_builder_inputs_with_image_token_spans():
    """Qwen2-VL inputs from the vision builder (one dict per example), pooled over each image's tokens."""
    tok = tiny_tokenizer()
    lens = omnilens.load(tiny_qwen2_vl(), tokenizer=tok)
    rng = np.random.RandomState(0)
    examples = [vision_inputs(tok, [rng.randint(0, 256, (h, w, 3), dtype=np.uint8)], f"the <image> {t}",
                              config=lens.config) for h, w, t in ((8, 8, "cat"), (16, 12, "red dog ?"))]
    spans = [(vi.image_spans[0].start, vi.image_spans[0].stop) for vi in examples]
    site = "blocks.1.hook_resid_post"
    ds = act.collect(lens, examples, site, {"image": act.span(spans), "found": act.span(act.token_span(
        lens.config.image_token_id)), "last": "last"})
    for i, vi in enumerate(examples):
        _, cache = lens.run_with_cache(dict(vi), names=[site])
        torch.testing.assert_close(ds[site, "image"][i], cache[site][0, vi.image_spans[0]].mean(0))
        torch.testing.assert_close(ds[site, "last"][i], cache[site][0, -1])
    assert torch.equal(ds[site, "found"], ds[site, "image"])
    assert ds.spans["image"].tolist() == [list(s) for s in spans] and spans[0][1] - spans[0][0] == 4


def test_stream_equals_collect_and_resume_gives_same_files(model, tmp_path, capsys):
    lens = make_lens(model, "left")
    labels = [i % 2 for i in range(len(TEXTS))]
    labels[0] = torch.tensor(0)  # scalars of tensors / numpy are stored as plain JSON numbers
    pools = {"last": "last", "mean": "mean"}
    mem = act.collect(lens, TEXTS, SITES, pools, labels=labels, batch_size=2)
    full = act.stream(lens, TEXTS, SITES, tmp_path / "full", pools, labels=labels, batch_size=2)
    bar = capsys.readouterr().err
    assert "7/7" in bar and "ex/s" in bar and "<" in bar  # tqdm: count, rate, elapsed<remaining (ETA)
    ds = act.load(full)
    shard = load_file(full / "shard_00000.safetensors")  # one batch per shard: memory bounded by a batch
    assert {tuple(v.shape[:1]) for v in shard.values()} == {(2,)}
    for key, value in mem.data.items():
        assert torch.equal(ds.data[key], value), key
    assert ds.labels == [i % 2 for i in range(len(TEXTS))] and len(ds) == len(TEXTS)

    class Interrupt(Exception):
        pass

    def boom(i):
        if i == 1:
            raise Interrupt

    part = tmp_path / "part"
    with pytest.raises(Interrupt):
        act.stream(lens, TEXTS, SITES, part, pools, labels=labels, batch_size=2, progress=False, on_batch=boom)
    with pytest.raises(ValueError, match="incomplete"):
        act.load(part)
    act.stream(lens, TEXTS, SITES, part, pools, labels=labels, batch_size=2, progress=False, max_batches=1)
    assert json.loads((part / "manifest.json").read_text())["complete"] is False
    act.stream(lens, TEXTS, SITES, part, pools, labels=labels, batch_size=2, progress=False)
    names = sorted(p.name for p in (tmp_path / "full").iterdir())
    assert names == sorted(p.name for p in part.iterdir())
    assert names == ["manifest.json"] + [f"shard_{i:05d}.safetensors" for i in range(4)]  # no temp files left
    for name in names:
        assert (part / name).read_bytes() == (tmp_path / "full" / name).read_bytes(), name

    sub = act.load(part, sites=["blocks.1.attn.hook_z"])
    assert list(sub.sites) == ["blocks.1.attn.hook_z"] and torch.equal(sub["blocks.1.attn.hook_z", "mean"],
                                                                       mem["blocks.1.attn.hook_z", "mean"])
    with pytest.raises(KeyError, match="not in"):
        act.load(part, sites=["blocks.0.hook_mlp_out"])
    m = json.loads((part / "manifest.json").read_text())
    assert m["provenance"]["model_class"] == "Qwen3ForCausalLM"
    assert m["provenance"]["padding_side"] == "left"
    assert m["sites"]["blocks.1.attn.hook_z"]["layer"] == 1
    with pytest.raises(ValueError, match="'inputs_sha256' differs"):
        act.stream(lens, TEXTS[::-1], SITES, part, pools, labels=labels, batch_size=2, progress=False)
    with pytest.raises(ValueError, match="'provenance' differs"):
        act.stream(omnilens.load(tiny_qwen3(seed=3, hidden_size=32, head_dim=8), tokenizer=lens.tokenizer), TEXTS,
                   SITES, part, pools, labels=labels, batch_size=2, progress=False)


def test_bad_inputs_raise_clear_errors(model):
    lens = make_lens(model, "right")
    forwards = []
    handle = model.register_forward_pre_hook(lambda m, args, kw: forwards.append(1), with_kwargs=True)
    with pytest.raises(ValueError, match=r"example 2: span \(0, 5\)"):
        act.collect(lens, TEXTS, SITES, act.span([(0, 1), (0, 1), (0, 5)] + [(0, 1)] * 4))
    with pytest.raises(ValueError, match="hook_pattern.*'batch' and 'pos'"):
        act.collect(lens, TEXTS, "blocks.0.attn.hook_pattern")
    handle.remove()
    assert forwards == []  # both raised before the model ran
    assert sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules()) == 0
    with pytest.raises(ValueError, match="got 2 labels for 7 inputs"):
        act.collect(lens, TEXTS, SITES, labels=[0, 1])
    with pytest.raises(ValueError, match="unknown pooling 'max'"):
        act.collect(lens, TEXTS, SITES, "max")
    with pytest.raises(KeyError, match="closest valid names"):
        act.collect(lens, TEXTS, "blocks.0.hook_resid_pots")
    two = dict(lens.tokenizer(TEXTS[:2], return_tensors="pt", padding=True))
    with pytest.raises(ValueError, match="gave a batch of 2 in the inputs; each dict input must hold exactly one"):
        act.collect(lens, [two], SITES)
