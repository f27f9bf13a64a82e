"""Where does a model represent emotion, and can we steer it? Probes, per-head probes and a steering vector.

The research workflow (a stand-in for emotion localisation on MELD-style utterances): collect an
activation dataset of labelled prompts, fit a linear probe per layer to find where the emotion is
linearly decodable, fit a probe per attention head and keep the top-K heads (the recipe of PAS,
personality alignment by activation steering), then take the happy - sad difference of means at the best
layer and add it while generating from sad prompts: if the direction is causal, the continuations turn happy.

The model is the ``mood`` zoo model shipped with omnilens: a 4-layer Qwen3 trained on templated sentences
whose mood is set by cue words ("anna felt gloomy upset tearful at the park . the park was" ->
"grey and anna cried near the park . mood sad"). Runs in a few seconds on CPU:

    python tutorials/03_probes_and_steering.py [out_dir]      # default ./tutorial_out
"""

import sys
from pathlib import Path

import torch

from omnilens import activations, probing, viz, zoo
from omnilens.interventions import AddVector, apply
from omnilens.zoo import mood

out = Path(sys.argv[1] if len(sys.argv) > 1 else "tutorial_out")
out.mkdir(parents=True, exist_ok=True)
lens = zoo.load("mood")
tok = lens.tokenizer

# 1. A labelled activation dataset: 80 happy/sad prompts (held-out word combinations), the residual stream
#    after every block and every head's output (hook_z), pooled at the last prompt token. Every prompt of the
#    template has the same length, so token ids [example pos] go in directly (bos included by mood.encode).
sents = mood.sentences(80, ("happy", "sad"), split="heldout", seed=1)
ids = mood.encode(sents, tok, with_continuation=False)
labels = [s.mood for s in sents]
ds = activations.collect(lens, ids, ["blocks.*.hook_resid_post", "blocks.*.attn.hook_z"], "last",
                         labels=labels, batch_size=64)
print("dataset:", len(ds), "examples;", {s: tuple(ds[s].shape) for s in list(ds.sites)[:2]}, "...")

# 2. Probe sweep across layers: held-out (3-fold cross-validated) accuracy of a logistic probe per layer.
sweep = probing.probe_sweep(ds, "blocks.*.hook_resid_post", folds=3)
for site, acc in zip(sweep.sites, sweep.accuracy[:, 0].tolist()):
    print(f"  {site:28s} probe accuracy {acc:.2f}")
best_site, _, best_probe = sweep.best()
print("best site:", best_site)
viz.save(sweep.figure(), out / "probe_sweep.html", include_plotlyjs="directory")  # one shared plotly.min.js

# 3. Per-head probes on hook_z ([example head d_head]): rank heads, keep the top K (PAS). Their directions
#    map through each head's W_O slice to the residual stream, where they can be added as steering vectors.
heads = probing.head_probes(ds, "blocks.*.attn.hook_z", folds=3)
top = heads.top(3)
print("top heads (layer, head, accuracy):", [(lay, h, round(a, 2)) for lay, h, a in top])
viz.save(heads.figure(), out / "head_probes.html", include_plotlyjs="directory")
head_dirs = heads.residual_directions(lens, k=3, label="happy")            # {(site, head): [d_model]}
probing.save_directions(head_dirs, out / "head_directions.safetensors")
probe_dir = best_probe.direction("happy")
for (site, h), v in head_dirs.items():
    print(f"  {site} head {h}: cosine with the {best_site} probe direction {float(v @ probe_dir):+.2f}")

# 4. The steering vector: happy - sad difference of means at the best layer (unscaled, in the site's basis).
x, is_happy = ds[best_site], torch.tensor([y == "happy" for y in labels])
vector = x[is_happy].mean(0) - x[~is_happy].mean(0)
print(f"happy - sad vector at {best_site}: norm {vector.norm():.2f}")

# 5. Steer sad prompts: add the vector at every prompt position (generation step 0 is the prompt; later
#    steps see only the new token, which we leave alone) around an ordinary `generate`.
sad = mood.sentences(4, ("sad",), split="heldout", seed=3)
prompt = mood.encode(sad, tok, with_continuation=False)
gen = dict(max_new_tokens=11, do_sample=False, pad_token_id=tok.pad_token_id)
before = lens.model.generate(prompt, **gen)
with apply(lens, [AddVector(best_site, vector, steps=[0])]):
    after = lens.model.generate(prompt, **gen)
n = prompt.shape[1]
for s, b, a in zip(sad, before[:, n:], after[:, n:]):
    print(f"\nprompt : {s.prompt}\nbefore : {tok.decode(b)}\nsteered: {tok.decode(a)}")
flipped = sum("mood happy" in tok.decode(a) for a in after[:, n:])
print(f"\nlabel flipped to happy in {flipped}/{len(sad)} continuations")
