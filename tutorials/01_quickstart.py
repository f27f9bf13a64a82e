"""Quickstart: the named hook graph, caching, editing one head, and hooks that stay on for `generate`.

Runs in a few seconds on CPU with a tiny random Qwen3 (no download):

    python tutorials/01_quickstart.py

With a real checkpoint, replace the first lines by ``lens = omnilens.load("Qwen/Qwen3-0.6B")``.
"""

import torch

import omnilens
from omnilens.testing import tiny_qwen3, tiny_tokenizer

# 1. Wrap a Hugging Face model: the adapter maps its modules onto TransformerLens-style names.
lens = omnilens.load(tiny_qwen3(), tokenizer=tiny_tokenizer())
print(lens.graph.describe())                       # every kind of site, its axes and what it is
print(lens.graph.describe("blocks.0.attn.hook_z"))  # one site: module, port, view
print(lens.graph.names("blocks.*.attn.hook_pattern"))

# 2. Cache activations. Values are shaped by the site's axes (see describe()).
prompt = "the cat is happy and the dog is"
logits, cache = lens.run_with_cache(prompt, names=["blocks.*.hook_resid_post", "blocks.1.attn.hook_pattern"])
resid = cache.stack("blocks.*.hook_resid_post")    # [layer batch pos d_model]
pattern = cache["blocks.1.attn.hook_pattern"]      # [batch head query key]; read with eager attention,
print("resid_post", tuple(resid.shape), "pattern", tuple(pattern.shape))  # the model's own is restored
print("next token:", lens.to_str_tokens(logits[0, -1].argmax()))


# 3. Edit one attention head: hook_z is the o_proj input split per head, [batch pos head d_head].
def zero_head_1(z: torch.Tensor, site: omnilens.HookSpec) -> torch.Tensor:
    z[:, :, 1] = 0  # in place is fine; returning a new tensor of the same shape works too
    return z


patched = lens.run_with_hooks(prompt, hooks=[("blocks.1.attn.hook_z", zero_head_1)])
print("max logit change from ablating head 1.1:", (patched - logits).abs().max().item())

# 4. Keep hooks on for any forward or generate inside a block; everything is removed on exit.
with lens.hooks(hooks=[("blocks.1.attn.hook_z", zero_head_1)], cache="blocks.1.hook_resid_post") as live:
    ids = lens.model.generate(lens.to_tokens(prompt), max_new_tokens=3, do_sample=False, pad_token_id=0)
print("generated:", lens.tokenizer.decode(ids[0]))
print("resid_post visits during generate:", len(live.steps("blocks.1.hook_resid_post")))  # prefill + 2 steps

# 5. Mistakes are reported with the site, the expected and the actual shape; the model is left clean.
try:
    lens.run_with_hooks(prompt, hooks=[("blocks.0.attn.hook_v", lambda v, site: v[..., :-1])])
except omnilens.HookError as err:
    print("HookError:", err)
