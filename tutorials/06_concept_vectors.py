"""Contrastive concept vectors from a story corpus: build, triage, export to a serving readout, load back.

The research workflow: write short stories per concept (and the same scenario told once per concept and
once neutrally), read the residual stream per story, take each concept's difference of means against every
other story (contrastive activation addition), and triage each (concept, layer) vector before using it:
is it carried by one neuron or a low-rank direction, is it fragmented across stories, contaminated by a
neighbouring concept, or redundant with the others? The vectors go to a small fp16 readout file that a
serving process loads to score new text.

The model is the ``mood`` zoo model (4-layer Qwen3 trained on sentences whose mood is set by cue words);
the corpus is generated from its templates, so every word is in its vocabulary. With a real model, point
``build_concepts`` at your own ``stories/`` folder. Runs in a few seconds on CPU:

    python tutorials/06_concept_vectors.py [out_dir]      # default ./tutorial_out
"""

import json
import sys
import tempfile
from pathlib import Path

import torch

from omnilens import zoo
from omnilens.concepts import build_concepts, load_readout
from omnilens.concepts.corpus import CorpusError
from omnilens.zoo import mood

out = Path(sys.argv[1] if len(sys.argv) > 1 else "tutorial_out")
out.mkdir(parents=True, exist_ok=True)
CONCEPTS = ("happy", "sad", "angry")

# 1. The corpus layout: stories/<concept>.txt (stories separated by blank lines) and
#    paired/<scenario>/{<concept>,baseline}.txt (one scenario told per concept, and neutrally).
tmp = tempfile.TemporaryDirectory(prefix="stories_")      # removed when the script exits
corpus = Path(tmp.name) / "corpus"
(corpus / "stories").mkdir(parents=True)
for seed, concept in enumerate(CONCEPTS):  # template sentences, without the trailing "mood <label>" tokens
    stories = [f"{s.prompt} {s.continuation.rsplit(' mood ', 1)[0]}" for s in mood.sentences(8, (concept,), seed=seed)]
    (corpus / "stories" / f"{concept}.txt").write_text("\n\n".join(stories) + "\n")
# Plenty of neutral baselines matter: if the negatives were (almost) only the other concepts' stories, the
# one-vs-rest differences of means would sum to ~0 across concepts, so every vector would be a combination of
# the others and the report would flag them all "redundant".
for scenario, (subject, topic) in {"park": ("anna", "park"), "harbor": ("ben", "harbor")}.items():
    folder = corpus / "paired" / scenario
    folder.mkdir(parents=True)
    for concept in CONCEPTS:
        cues, adj, verb = mood.CUES[concept][:3], mood.ADJECTIVES[concept][0], mood.VERBS[concept][0]
        story = (f"{subject} felt {' '.join(cues)} at the {topic} . "
                 f"the {topic} was {adj} and {subject} {verb} near the {topic} .")
        (folder / f"{concept}.txt").write_text(story + "\n")
    neutral = [f"{name} was {at} the {topic} . the {topic} was the {topic} ."
               for name in mood.SUBJECTS for at in mood.AT]
    (folder / "baseline.txt").write_text("\n\n".join(neutral) + "\n")
print("corpus:", sorted(str(p.relative_to(corpus)) for p in corpus.rglob("*.txt")))

# A broken corpus fails in the preflight, before the model is loaded (the loader is only called after it).
(bad := Path(tmp.name) / "bad").mkdir()
(bad / "stories").mkdir()
(bad / "stories" / "Happy.txt").write_text("")
try:
    build_concepts(bad, lambda: zoo.load("mood"))
except CorpusError as err:
    print("\npreflight:", err)

# 2. Build: resid_post (mean over each story's tokens) at every layer, one unit vector per concept and layer,
#    the quality report (printed as a triage table), and the exports.
run = build_concepts(corpus, lambda: zoo.load("mood"), out_dir=out / "concepts", verbose=False)
print("\n" + run.report.summary())
q = run.report.get("sad", 2)                            # one (concept, layer) cell of the report in detail
print(f"\nsad @ L2: pc1 ratio {q.pc1_ratio:.2f}, mean story alignment {q.mean_alignment:.2f}, "
      f"nearest {[(c, round(v, 2)) for c, v in q.nearest]}, best neuron #{int(q.best_neuron['index'])} "
      f"(cos {q.best_neuron['cosine']:+.2f}), top head h{int(q.head_share['head'])} "
      f"(share {q.head_share['share']:.2f}), outlier stories {len(q.outliers)}")
# Reading the table: a "contaminated" layer has a concept too close to another (cosine >= 0.5), e.g. when
# every mood shares an "emotional vs neutral" component; pick layers where the vectors are clean.
report = json.loads((out / "concepts" / "quality.json").read_text())
print("quality.json triage:", {k: len(v) for k, v in report["summary"].items() if v})

# 3. The serving readout: readout.safetensors (fp16 [n_concepts hidden] per layer) + readout.json.
readout = load_readout(out / "concepts")
print("\nreadout.json:", json.dumps(json.loads((out / "concepts" / "readout.json").read_text())))
for layer in readout.layers:
    err = (readout.vectors[layer].float() - run.vectors.vectors[layer].float()).abs().max()
    print(f"  layer {layer}: {tuple(readout.vectors[layer].shape)} {readout.vectors[layer].dtype}, "
          f"max fp16 round-trip error {err:.1e}")

# 4. Use it: score unseen sentences by projecting their mean resid_post at layer 2 on the concept vectors.
lens = zoo.load("mood")
layer = 2
tests = mood.sentences(6, CONCEPTS, split="heldout", seed=9)
ids = mood.encode(tests, lens.tokenizer, with_continuation=False)
_, cache = lens.run_with_cache(ids, f"blocks.{layer}.hook_resid_post")
scores = cache[f"blocks.{layer}.hook_resid_post"].mean(1) @ readout.vectors[layer].float().T   # [example concept]
for s, row in zip(tests, scores):
    print(f"  {s.mood:6s} -> {readout.concepts[int(row.argmax())]:6s}  | {s.prompt}")
hits = sum(s.mood == readout.concepts[int(r.argmax())] for s, r in zip(tests, scores))
print(f"readout picks the mood of {hits}/{len(tests)} held-out prompts")
