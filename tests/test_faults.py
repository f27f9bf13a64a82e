"""Faults: a failing or malformed hook raises `HookError` naming the site, expected and actual shapes,
and leaves the model exactly as it was (no hooks, attention implementation restored, same logits)."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_clean, make_model

import omnilens


def assert_model_untouched(lens: omnilens.Lens, batch: dict, logits_before: torch.Tensor) -> None:
    model = lens.model
    assert_clean(model)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, logits_before)


def raising(x, site):
    raise ValueError("boom")


def wrong_shape(x, site):
    return x[..., :-1]


@pytest.fixture
def before(lens, batch) -> torch.Tensor:
    with torch.no_grad():
        return lens.model(**batch).logits


SITES = ["blocks.0.attn.hook_z", "blocks.1.hook_resid_mid", "blocks.0.attn.hook_pattern",
         "blocks.1.attn.hook_rot_k", "blocks.0.attn.hook_result", "blocks.1.hook_attn_out", "hook_logits"]


@pytest.mark.parametrize("site", SITES)
def test_raising_hook_names_site_and_shape(lens, batch, before, site):
    with pytest.raises(omnilens.HookError) as err:
        lens.run_with_hooks(batch, hooks=[(site, raising)])
    e = err.value
    assert e.site == site and site in str(e)
    assert "ValueError: boom" in e.actual and isinstance(e.__cause__, ValueError)
    assert lens.graph[site].axes in e.expected and "shape (" in e.expected
    assert_model_untouched(lens, batch, before)


@pytest.mark.parametrize("site", SITES)
def test_wrong_shape_names_site_expected_and_actual(lens, batch, before, site):
    _, cache = lens.run_with_cache(batch, names=site)
    shape = tuple(cache[site].shape)
    with pytest.raises(omnilens.HookError) as err:
        lens.run_with_hooks(batch, hooks=[(site, wrong_shape)])
    e = err.value
    assert e.site == site
    assert str(shape) in e.expected and lens.graph[site].axes in e.expected
    assert str((*shape[:-1], shape[-1] - 1)) in e.actual
    assert_model_untouched(lens, batch, before)


def test_non_tensor_return_is_rejected(lens, batch, before):
    with pytest.raises(omnilens.HookError) as err:
        lens.run_with_hooks(batch, hooks=[("blocks.0.hook_resid_pre", lambda x, site: x.tolist())])
    assert err.value.site == "blocks.0.hook_resid_pre" and err.value.actual == "list"
    assert_model_untouched(lens, batch, before)


def test_router_write_with_wrong_shape(batch):
    lens = omnilens.load(make_model("moe"))
    with torch.no_grad():
        before = lens.model(**batch).logits
    with pytest.raises(omnilens.HookError) as err:
        lens.run_with_hooks(batch, hooks=[("blocks.1.mlp.hook_topk_idx", lambda x, site: x[:, :1])])
    assert err.value.site == "blocks.1.mlp.hook_topk_idx" and "token k" in err.value.expected
    assert_model_untouched(lens, batch, before)


def test_error_after_earlier_sites_fired_during_attention_internals_run(lens, batch, before):
    """Reads and writes at earlier sites already ran (and switched attention) when the error comes."""
    with pytest.raises(omnilens.HookError, match="blocks.1.attn.hook_pattern"):
        lens.run_with_cache(batch, names=["blocks.*.attn.hook_pattern", "blocks.0.attn.hook_rot_q"],
                            hooks=[("blocks.0.attn.hook_z", lambda x, site: x * 2),
                                   ("blocks.1.attn.hook_pattern", raising)])
    assert_model_untouched(lens, batch, before)


def test_error_in_the_middle_of_generate_inside_hooks_context(lens, batch, before):
    calls = []

    def fail_on_third_visit(x, site):
        calls.append(x.shape)
        if len(calls) == 3:
            raise RuntimeError("third step")

    with pytest.raises(omnilens.HookError, match="third step"):
        with lens.hooks(hooks=[("blocks.0.attn.hook_pattern", fail_on_third_visit)], cache="blocks.*.hook_resid_post"):
            lens.model.generate(batch["input_ids"][:1, :3], max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert len(calls) == 3
    assert_model_untouched(lens, batch, before)


def test_unknown_names_and_bad_inputs_fail_before_the_model_runs(lens, batch, before):
    forwards = []
    handle = lens.model.register_forward_pre_hook(lambda m, a: forwards.append(1))
    try:
        with pytest.raises(KeyError, match="blocks.0.attn.hook_z"):
            lens.run_with_hooks(batch, hooks=[("blocks.0.attn.hook_zz", lambda x, site: x)])
        with pytest.raises(KeyError, match="closest"):
            lens.run_with_cache(batch, names=["blocks.0.hook_resid_post", "blocks.9.hook_resid_post"])
        with pytest.raises(TypeError, match="integer"):
            lens.run_with_cache(batch["input_ids"].float())
        with pytest.raises(KeyError):
            with lens.hooks(hooks=[("blocks.*.attn.hook_zz", lambda x, site: x)]):
                pass
    finally:
        handle.remove()
    assert forwards == []
    assert_model_untouched(lens, batch, before)
