"""Activation patching on a real circuit: where does the induction model copy the next word from?

The research workflow: take clean/corrupted prompt pairs that differ in one token, measure a logit
difference, and patch clean activations into the corrupted run component by component (exact
patching), then estimate the same effects from one forward and one backward (attribution patching,
AtP; Nanda 2023, Kramár et al. 2024). Heatmaps over (layer x position) and (layer x head) show which
components carry the information; the top head's attention pattern shows *how* it does it.

The model is the ``induction`` zoo model shipped with omnilens: a 2-layer Qwen3 trained on random words
with repeated segments, so it has a previous-token head in layer 0 and an induction head in layer 1
(Olsson et al. 2022). Runs in a few seconds on CPU:

    python tutorials/02_patching_heatmaps.py [out_dir]      # default ./tutorial_out

Open ``out_dir/*.html`` in a browser (they share ``out_dir/plotly.min.js``, so keep the folder together);
hover over a cell for the exact values.
"""

import sys
from pathlib import Path

import plotly.graph_objects as go

from omnilens import viz, zoo
from omnilens.patching import LogitDiff, Sweep, patch_attribution, patch_exact, rank_correlation
from omnilens.zoo.induction import induction_pairs

out = Path(sys.argv[1] if len(sys.argv) > 1 else "tutorial_out")
out.mkdir(parents=True, exist_ok=True)

# 1. The model and the contrast. ``clean`` is bos + segment A + A[:query+1]: the last token occurred
#    before, so an induction circuit predicts the word that followed it (``answer``). ``corrupted`` replaces
#    that earlier occurrence by a word not in A (``wrong``): nothing left to copy.
lens = zoo.load("induction")
pairs = induction_pairs(batch=8, seg_len=8, seed=123)
print("clean    :", " ".join(lens.to_str_tokens(pairs.clean[0])))
print("corrupted:", " ".join(lens.to_str_tokens(pairs.corrupted[0])))
print("answer   :", lens.to_str_tokens(pairs.answer[:1])[0], "| position of the earlier occurrence:", pairs.prev_pos)

# The metric: logit(answer) - logit(wrong) at the last position, one value per prompt row.
metric = LogitDiff(pairs.answer, pairs.wrong)

# 2. Exact patching (denoising: clean activations into the corrupted run), two sweeps in one call:
#    the residual stream per (layer, position), and every attention head's output (hook_z) per (layer, head).
#    Results are normalised: 0 = the corrupted run's metric, 1 = the clean run's.
resid_sweep = Sweep("hook_resid_pre", by=("layer", "pos"))
head_sweep = Sweep("hook_z", by=("layer", "head"))
resid, heads = patch_exact(lens, pairs.clean, pairs.corrupted, metric, [resid_sweep, head_sweep])
print(f"\n{resid}\n{heads}")
print(f"logit diff: clean {heads.clean:.2f}, corrupted {heads.corrupted:.2f}")

# 3. Attribution patching: the same sweeps, first-order estimates from one forward + one backward.
resid_atp, heads_atp = patch_attribution(lens, pairs.clean, pairs.corrupted, metric, [resid_sweep, head_sweep])
print(f"exact vs AtP rank correlation: resid {rank_correlation(resid.values, resid_atp.values):.2f}, "
      f"heads {rank_correlation(heads.values, heads_atp.values):.2f}")

# 4. Heatmaps (HTML; PNG too when kaleido is installed) and the results themselves (safetensors + labels).
#    What to look for in resid_exact: entering layer 0 only the changed token (prev_pos) matters; entering
#    layer 1 the information sits one position on (prev_pos + 1, written there by the previous-token head),
#    where the induction head's keys read it. heads_exact shows which heads carry it.
for name, res in [("resid_exact", resid), ("resid_atp", resid_atp), ("heads_exact", heads), ("heads_atp", heads_atp)]:
    viz.save(res, out / f"{name}.html", include_plotlyjs="directory")  # one shared plotly.min.js
heads.save(out / "heads_exact.safetensors")
print("\ntop components (exact):")
for labels, value in heads.top(3):
    print(f"  head {labels}: {value:+.2f}")
for labels, value in resid.top(3):
    print(f"  resid {labels}: {value:+.2f}")

# 5. Which layer-1 head does induction? Read the attention patterns on the clean prompts: an induction head's
#    last query attends to the token *after* the earlier occurrence of the current token (key prev_pos + 1).
#    Compare with where patching ranked it.
_, cache = lens.run_with_cache(pairs.clean, "blocks.1.attn.hook_pattern")
pattern = cache["blocks.1.attn.hook_pattern"]                         # [batch head query key]
score = pattern[:, :, -1, pairs.prev_pos + 1].mean(0)                 # [head]
ind_head = int(score.argmax())
rank = int((heads.values[1] > heads.values[1, ind_head]).sum()) + 1
print("\nattention from the last query to key prev_pos + 1, per layer-1 head:", [round(v, 2) for v in score.tolist()])
print(f"induction head L1.H{ind_head}: attends there with weight {score[ind_head]:.2f}; exact patching ranks it "
      f"#{rank} of layer 1 (effect {heads.values[1, ind_head]:+.2f})")
tokens = [f"{i}:{t}" for i, t in enumerate(lens.to_str_tokens(pairs.clean[0]))]   # unique axis labels
fig = go.Figure(go.Heatmap(z=pattern[0, ind_head].tolist(), x=tokens, y=tokens, colorscale="Blues", zmin=0, zmax=1))
fig.update_layout(title=f"L1.H{ind_head} attention pattern (clean prompt 0)", xaxis_title="key",
                  yaxis_title="query", yaxis={"autorange": "reversed"})
viz.save(fig, out / "induction_head_pattern.html", include_plotlyjs="directory")
print("wrote", ", ".join(sorted(p.name for p in out.glob("*.html"))))
