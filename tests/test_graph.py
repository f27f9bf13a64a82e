"""The hook graph: glob selection in forward order, lookup errors, opt-in sites, describe, head sizes."""

from __future__ import annotations

import pytest
import torch
from conftest import make_model

import omnilens
from omnilens.graph import HookGraph, HookSpec
from omnilens.views import SplitHeads


@pytest.fixture(scope="module")
def graph() -> HookGraph:
    return omnilens.load(make_model("dense")).graph


def test_glob_selects_in_forward_order(graph):
    assert graph.names("blocks.*.attn.hook_z") == ["blocks.0.attn.hook_z", "blocks.1.attn.hook_z"]
    # several patterns come back in forward order, not in the order they were given
    assert graph.names(["blocks.1.hook_resid_post", "hook_embed", "blocks.0.hook_resid_*"]) == [
        "hook_embed", "blocks.0.hook_resid_pre", "blocks.0.hook_resid_mid", "blocks.0.hook_resid_post",
        "blocks.1.hook_resid_post",
    ]
    everything = graph.names()
    assert [graph.order(n) for n in everything] == sorted(graph.order(n) for n in everything)
    assert everything[0] == "hook_embed" and everything[-1] == "hook_logits"
    block0 = graph.names("blocks.0.*")
    assert block0.index("blocks.0.hook_resid_pre") < block0.index("blocks.0.attn.hook_q") \
        < block0.index("blocks.0.attn.hook_pattern") < block0.index("blocks.0.attn.hook_z") \
        < block0.index("blocks.0.hook_resid_mid") < block0.index("blocks.0.mlp.hook_post") \
        < block0.index("blocks.0.hook_resid_post")
    assert graph.names(lambda n: n.endswith("hook_k")) == ["blocks.0.attn.hook_k", "blocks.1.attn.hook_k"]


def test_specs_carry_meaning_without_parsing_names(graph):
    spec = graph["blocks.1.attn.hook_k"]
    assert (spec.tower, spec.layer, spec.component, spec.site) == ("", 1, "attn", "hook_k")
    assert spec.axis_names == ("batch", "pos", "kv_head", "d_head") and spec.axis("kv_head") == 2
    assert spec.module == "model.layers.1.self_attn.k_proj" and spec.port == "output"
    assert graph["blocks.0.attn.hook_z"].port == "input"
    assert graph["hook_embed"].layer is None and graph["ln_final.hook_normalized"].component == "ln_final"
    assert graph.towers == [""] and graph.n_layers() == 2


def test_contains_and_len(graph):
    assert "blocks.0.attn.hook_z" in graph
    assert "blocks.0.attn.hook_result" in graph  # opt-in sites exist, they are only not selected by default
    assert "blocks.2.attn.hook_z" not in graph and "blocks.*.attn.hook_z" not in graph and 3 not in graph
    assert len(graph) == len(list(graph)) == len(graph.names(include_opt_in=True))


def test_unknown_name_lists_closest_valid_names(graph):
    with pytest.raises(KeyError) as err:
        graph["blocks.0.attn.hook_zz"]
    assert "blocks.0.attn.hook_z" in str(err.value) and "closest" in str(err.value)
    with pytest.raises(KeyError, match="blocks.1.hook_resid_post"):
        graph.names("blocks.1.hook_resid_pots")
    with pytest.raises(KeyError, match="hook_resid_pre"):
        graph.describe("blocks.0.hook_resid_per")
    with pytest.raises(KeyError, match="no_such"):
        graph.names("no_such.*")


def test_opt_in_sites(graph):
    assert not any("hook_result" in n for n in graph.names())
    assert not any("hook_result" in n for n in graph.names("blocks.0.attn.*"))
    assert "blocks.0.attn.hook_result" in graph.names("blocks.0.attn.*", include_opt_in=True)
    assert graph.names("blocks.0.attn.hook_result") == ["blocks.0.attn.hook_result"]  # named exactly
    # a glob that matches only opt-in sites asks for them
    assert graph.names("blocks.*.attn.hook_result") == ["blocks.0.attn.hook_result", "blocks.1.attn.hook_result"]
    no_opt_in = graph.names("blocks.0.attn.*", include_opt_in=False)
    assert no_opt_in and "blocks.0.attn.hook_result" not in no_opt_in
    assert graph["blocks.0.attn.hook_result"].opt_in and not graph["blocks.0.attn.hook_z"].opt_in


def test_describe_one_site(graph):
    text = graph.describe("blocks.0.attn.hook_z")
    for part in ("blocks.0.attn.hook_z", "batch pos head d_head", "model.layers.0.self_attn.o_proj", "input",
                 "4 heads x 16", "o_proj input"):
        assert part in text, part
    assert "opt-in" in graph.describe("blocks.0.attn.hook_result")
    assert "attention_points" in graph.describe("blocks.0.attn.hook_pattern")
    assert "in place" in graph.describe("blocks.0.hook_resid_mid")


def test_describe_table(graph):
    text = graph.describe()
    assert text.startswith(f"HookGraph for Qwen3ForCausalLM: {len(graph)} sites")
    assert "2 blocks" in text
    rows = [line for line in text.splitlines() if line.startswith("  ")]
    names = [row.split()[0] for row in rows]
    assert names[0] == "hook_embed" and "blocks.{i}.attn.hook_z" in names and names[-1] == "hook_logits"
    assert len(names) == len(set(names))  # one row per site kind, not per layer
    assert "blocks.{i}.attn.hook_result" in names and "(opt-in)" in text
    # the axes column is aligned
    assert len({row.index("[") for row in rows}) == 1


def test_head_sizes_come_from_config_head_dim():
    model = make_model("dense", hidden_size=48, num_attention_heads=4, num_key_value_heads=2, head_dim=20)
    graph = omnilens.load(model).graph
    assert graph["blocks.0.attn.hook_z"].view == SplitHeads(4, 20)
    assert graph["blocks.0.attn.hook_k"].view == SplitHeads(2, 20)
    _, cache = omnilens.load(model).run_with_cache(torch.tensor([[5, 6, 7]]), names=["blocks.0.attn.hook_*"])
    assert cache["blocks.0.attn.hook_q"].shape == (1, 3, 4, 20)
    assert cache["blocks.0.attn.hook_v"].shape == (1, 3, 2, 20)
    assert cache["blocks.0.attn.hook_z"].shape == (1, 3, 4, 20)
    assert cache["blocks.0.attn.hook_pattern"].shape == (1, 4, 3, 3)


def test_duplicate_names_are_rejected():
    spec = HookSpec(name="hook_embed", tower="", layer=None, component="embed", site="hook_embed",
                    axes="batch pos d_model", module="model.embed_tokens")
    with pytest.raises(ValueError, match="duplicate"):
        HookGraph([spec, spec])
