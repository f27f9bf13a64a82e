"""`omnilens.load` (in memory and from a saved folder), the `Lens` entry points and `lens.hooks`."""

from __future__ import annotations

import runpy
from pathlib import Path

import pytest
import torch
from conftest import TEXTS, assert_clean, hook_counts, hooks_on, make_model
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

import omnilens
from omnilens.hookpoints import HookPoint


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_load_from_saved_folder_matches_in_memory(tmp_path, tokenizer, batch, kind):
    model = make_model(kind)
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    lens = omnilens.load(tmp_path)
    assert type(lens.model) is type(model) and lens.tokenizer is not None
    assert lens.processor is None  # text-only: no processor, not a second tokenizer
    assert torch.equal(lens.to_tokens(TEXTS), batch["input_ids"])
    with torch.no_grad():
        expected = model(**batch).logits
    logits, cache = lens.run_with_cache(TEXTS, names="blocks.0.hook_resid_post")
    assert torch.equal(logits, expected) and cache["blocks.0.hook_resid_post"].shape == (2, 9, 64)
    assert torch.equal(omnilens.load(model, tokenizer=tokenizer).run_with_hooks(TEXTS, hooks=[]), expected)


def _gpt2():
    return GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=16, vocab_size=50, n_positions=32))


def _llama():
    return LlamaForCausalLM(LlamaConfig(num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                        hidden_size=16, intermediate_size=32, vocab_size=50))


@pytest.mark.parametrize("make", [_gpt2, _llama], ids=["gpt2", "llama"])
def test_unsupported_architecture_lists_supported_ones(tmp_path, make):
    model = make()
    with pytest.raises(omnilens.UnsupportedModelError) as err:
        omnilens.load(model)
    assert type(model).__name__ in str(err.value)
    assert "Qwen3ForCausalLM" in str(err.value) and "Qwen3MoeForCausalLM" in str(err.value)
    model.save_pretrained(tmp_path)
    with pytest.raises(omnilens.UnsupportedModelError) as err:
        omnilens.load(tmp_path)
    assert type(model).__name__ in str(err.value) and "Qwen3ForCausalLM" in str(err.value)


def test_run_with_cache_positions_devices_and_steps(lens, batch):
    _, full = lens.run_with_cache(batch, names=["blocks.0.hook_resid_post", "blocks.0.attn.hook_pattern"])
    _, last = lens.run_with_cache(batch, names=["blocks.0.hook_resid_post", "blocks.0.attn.hook_pattern"], pos=-1)
    assert torch.equal(last["blocks.0.hook_resid_post"], full["blocks.0.hook_resid_post"][:, -1:])
    assert torch.equal(last["blocks.0.attn.hook_pattern"], full["blocks.0.attn.hook_pattern"][:, :, -1:])
    # (every run here reads the pattern, so all run the same eager attention)
    _, some = lens.run_with_cache(batch, names=["blocks.0.hook_resid_post", "blocks.0.attn.hook_pattern"], pos=[0, 2])
    assert torch.equal(some["blocks.0.hook_resid_post"], full["blocks.0.hook_resid_post"][:, [0, 2]])
    assert full["blocks.0.hook_resid_post"].device.type == "cpu"
    assert list(full) == ["blocks.0.attn.hook_pattern", "blocks.0.hook_resid_post"]  # forward order
    assert full.steps("blocks.0.hook_resid_post")[0] is full["blocks.0.hook_resid_post"]
    stacked = lens.run_with_cache(batch, names="blocks.*.hook_resid_post")[1].stack("blocks.*.hook_resid_post")
    assert stacked.shape == (2, *full["blocks.0.hook_resid_post"].shape)
    with pytest.raises(KeyError, match="not cached"):
        full["blocks.1.hook_resid_post"]
    with pytest.raises(KeyError, match="closest"):
        full["blocks.0.hook_resid_postt"]


def test_cached_values_are_not_changed_by_later_in_place_writes(lens, batch):
    """A read taken before an in-place write downstream keeps the value it had when read."""
    def zero(x, site):
        x.zero_()
        return x

    _, cache = lens.run_with_cache(batch, names=["hook_embed", "blocks.0.hook_resid_pre"],
                                   hooks=[("blocks.0.hook_resid_pre", zero)])
    assert cache["hook_embed"].abs().sum() > 0
    assert torch.equal(cache["blocks.0.hook_resid_pre"], torch.zeros_like(cache["hook_embed"]))


def test_hooks_context_is_active_for_forwards_and_generate_and_removed_after(lens, batch):
    model = lens.model
    d_head = lens.config.head_dim

    def zero_head_0(z, site):
        z = z.clone()
        z[:, :, 0] = 0
        return z

    def by_hand(module, args):
        x = args[0].clone()
        x[..., :d_head] = 0
        return (x,)

    with torch.no_grad():
        plain = model(**batch).logits
    handle = model.model.layers[0].self_attn.o_proj.register_forward_pre_hook(by_hand)
    model.set_attn_implementation("eager")  # the context reads the pattern, so it runs eager attention
    with torch.no_grad():
        expected = model(**batch).logits
    model.set_attn_implementation("sdpa")
    handle.remove()
    ids = batch["input_ids"][:1, :4]
    with lens.hooks(hooks=[("blocks.0.attn.hook_z", zero_head_0)],
                    cache=["blocks.1.hook_resid_post", "blocks.0.attn.hook_pattern"]) as cache:
        with torch.no_grad():
            assert torch.equal(model(**batch).logits, expected)
            assert torch.equal(model(**batch).logits, expected)  # still active for a second forward
        assert hook_counts(model) > 0 and model.config._attn_implementation == "eager"
        generated = model.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=0)
        n_visits = len(cache.steps("blocks.1.hook_resid_post"))
    assert n_visits == 2 + 3  # two forwards, then the prompt and two new tokens
    patterns = cache.steps("blocks.0.attn.hook_pattern")
    assert patterns[2].shape[-2:] == (4, 4) and patterns[3].shape[-2:] == (1, 5)  # prefill, then one step
    assert generated.shape == (1, 7)
    assert_clean(model)
    with torch.no_grad():
        assert torch.equal(model(**batch).logits, plain)


def test_hooks_context_cleans_up_when_the_block_raises(lens, batch):
    with pytest.raises(RuntimeError, match="inside the block"):
        with lens.hooks(hooks=[("blocks.0.attn.hook_pattern", lambda x, site: x)]):
            assert lens.model.config._attn_implementation == "eager"
            raise RuntimeError("inside the block")
    assert_clean(lens.model)


def test_a_previously_registered_eager_attention_survives_a_pattern_run(lens, batch):
    from transformers.models.qwen3.modeling_qwen3 import eager_attention_forward

    ALL_ATTENTION_FUNCTIONS["eager"] = eager_attention_forward
    try:
        with pytest.raises(omnilens.HookError):
            lens.run_with_hooks(batch, hooks=[("blocks.0.attn.hook_pattern", lambda x, site: x[0])])
        lens.run_with_cache(batch, names="blocks.0.attn.hook_pattern")
        assert ALL_ATTENTION_FUNCTIONS["eager"] is eager_attention_forward
    finally:
        del ALL_ATTENTION_FUNCTIONS["eager"]


def test_text_inputs_and_tokens(lens, tokenizer, batch):
    lens.tokenizer = tokenizer
    assert torch.equal(lens.to_tokens(TEXTS), batch["input_ids"])
    assert lens.to_str_tokens("a red bird") == ["a", "red", "bird"]
    with torch.no_grad():
        expected = lens.model(**batch).logits
    assert torch.equal(lens.run_with_hooks(TEXTS, hooks=[]), expected)
    assert torch.equal(lens.run_with_hooks(batch["input_ids"][0], hooks=[]), lens.run_with_hooks(
        batch["input_ids"][:1], hooks=[]))
    with pytest.raises(TypeError, match="integer"):
        lens.run_with_hooks(batch["input_ids"].float(), hooks=[])


def test_quickstart_tutorial_runs(capsys):
    runpy.run_path(str(Path(__file__).parents[1] / "tutorials" / "01_quickstart.py"), run_name="__main__")
    out = capsys.readouterr().out
    assert "HookError: at site 'blocks.0.attn.hook_v'" in out and "visits during generate: 3" in out


def test_hf_hidden_states_see_writes_on_every_call(lens, batch):
    """HF records hidden states with its own hooks, installed lazily: ours must run first, every call."""
    vec = torch.ones(lens.config.hidden_size)
    with torch.no_grad():
        plain = lens.model(**batch, output_hidden_states=True).hidden_states[1]
    hf_recorders = hooks_on(lens.model)  # HF keeps its recorders once installed
    for _ in range(2):
        with lens.hooks(hooks=[("blocks.0.hook_resid_post", lambda x, site: x + vec)]):
            with torch.no_grad():
                edited = lens.model(**batch, output_hidden_states=True).hidden_states[1]
        assert torch.equal(edited, plain + vec)
    assert hooks_on(lens.model) == hf_recorders


def test_a_glob_hook_gets_each_site_spec(lens, batch):
    seen = []

    def record(z, site):
        seen.append((site.name, site.layer, site.axes))

    lens.run_with_hooks(batch, hooks=[("blocks.*.attn.hook_z", record)])
    assert seen == [(f"blocks.{i}.attn.hook_z", i, "batch pos head d_head") for i in range(2)]


def test_load_options_dtype_and_attention_implementation(tmp_path, tokenizer):
    make_model("dense").save_pretrained(tmp_path)
    lens = omnilens.load(tmp_path, tokenizer=tokenizer, dtype=torch.float64, attn_implementation="eager")
    assert lens.model.dtype == torch.float64 and lens.model.config._attn_implementation == "eager"
    _, cache = lens.run_with_cache("a red bird", names=["blocks.0.attn.hook_pattern", "blocks.0.hook_resid_post"])
    assert cache["blocks.0.hook_resid_post"].dtype == torch.float64
    assert torch.allclose(cache["blocks.0.attn.hook_pattern"].sum(-1), torch.ones((), dtype=torch.float64))
    assert lens.model.config._attn_implementation == "eager"  # restored to what it was, not to sdpa


def test_nested_runs_keep_the_outer_attention_points(lens, batch):
    with lens.hooks(cache="blocks.0.attn.hook_pattern") as outer:
        _, inner = lens.run_with_cache(batch, names="blocks.*.attn.hook_pattern")
        assert lens.model.config._attn_implementation == "eager"
        assert isinstance(lens.model.model.layers[0].self_attn.hook_pattern, HookPoint)
        with torch.no_grad():
            lens.model(**batch)
    assert len(outer.steps("blocks.0.attn.hook_pattern")) == 2  # the inner run and the plain forward
    assert torch.equal(outer.steps("blocks.0.attn.hook_pattern")[1], inner["blocks.0.attn.hook_pattern"])
    assert_clean(lens.model)


def test_submodules_are_attributes_of_the_package():
    import omnilens

    assert omnilens.zoo.names() == ["induction", "mood"]
    assert callable(omnilens.patching.patch_exact)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        omnilens.nope


def test_stack_refuses_sites_visited_at_several_steps():
    import omnilens
    from omnilens.testing import tiny_qwen3, tiny_tokenizer

    lens = omnilens.load(tiny_qwen3(), tokenizer=tiny_tokenizer())
    gen = lens.generate("the cat", reads="blocks.*.hook_resid_post", max_new_tokens=2)
    assert len(gen.cache.steps("blocks.0.hook_resid_post")) == 2
    with pytest.raises(ValueError, match="visited several times.*cache.steps"):
        gen.cache.stack("blocks.*.hook_resid_post")
    _, cache = lens.run_with_cache("the cat", names="blocks.*.hook_resid_post")
    assert cache.stack("blocks.*.hook_resid_post").shape == (2, 1, 2, 64)


def test_hooks_accept_steps_and_write_objects():
    import omnilens
    from omnilens.testing import tiny_qwen3, tiny_tokenizer

    lens = omnilens.load(tiny_qwen3(), tokenizer=tiny_tokenizer())
    seen: list[int] = []

    def count(x, site):
        seen.append(x.shape[1])

    kw = lens.to_inputs("the cat is")
    with lens.hooks([("blocks.0.hook_resid_post", count, [1]), omnilens.Write("blocks.1.hook_resid_post", count, [0])]):
        lens.model.generate(**kw, max_new_tokens=3, do_sample=False)
    assert seen == [kw["input_ids"].shape[1], 1]  # block 1 at the prefill, block 0 at the first new token
