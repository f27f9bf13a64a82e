"""Vision-language latent steering, Stroop-style: layer-wise vision embeddings, and swapping an image's tokens.

The research workflow (a stand-in for a Stroop study on Qwen2-VL, where an image shows a colour word in a
conflicting ink colour): build labelled images, extract one pooled vector per image and vision layer to
safetensors, inspect the packed vision activations per image (split, patch grid, pooling), then replace one
image's merged vision tokens by another image's and generate, to ask whether the answer follows the tokens.

The model here is the tiny Qwen2-VL from ``omnilens.testing`` with RANDOM weights: the mechanics are real
(real Hugging Face model, processor, hooks), the generated words are not meaningful. With a checkpoint,
use ``lens = omnilens.load("Qwen/Qwen2-VL-2B-Instruct")`` and real Stroop images. Runs in seconds on CPU:

    python tutorials/04_qwen2_vl_vision.py [out_dir]      # default ./tutorial_out
"""

import sys
from pathlib import Path

import numpy as np
import torch

import omnilens
from omnilens.inputs import vision_inputs
from omnilens.packed import per_image, pool, replace_segment, to_grid
from omnilens.testing import tiny_qwen2_vl, tiny_tokenizer
from omnilens.vision_embeddings import extract_vision_embeddings, generate_with_image_embeddings, load_vision_embeddings

out = Path(sys.argv[1] if len(sys.argv) > 1 else "tutorial_out")
out.mkdir(parents=True, exist_ok=True)
lens = omnilens.load(tiny_qwen2_vl(seed=0), tokenizer=tiny_tokenizer())   # random weights (see docstring)

# 1. Stimuli: colour patches drawn with numpy, [H W C] uint8. The "ink" fills the patch; a darker band
#    stands in for the printed word. Sizes may differ between images (here 16x16 and 16x24 pixels).
INKS = {"red": (220, 30, 30), "green": (30, 180, 60), "blue": (40, 60, 220), "yellow": (230, 210, 40)}


def patch(ink: str, h: int = 16, w: int = 16) -> np.ndarray:
    img = np.empty((h, w, 3), dtype=np.uint8)
    img[:] = INKS[ink]
    img[h // 2 - 2:h // 2 + 2, 2:-2] //= 3          # the "word" band
    return img


images = [patch(ink, 16, 16 if i % 2 == 0 else 24) for i, ink in enumerate(INKS) for _ in range(2)]
labels = [ink for ink in INKS for _ in range(2)]

# 2. Layer-wise vision embeddings to disk: every vision block's resid_post and the merger, mean-pooled per
#    image, streamed in shards with a JSON manifest (labels, sites, layers, model config hash).
manifest = extract_vision_embeddings(lens, images, labels, out / "vision_embeddings", batch_size=4, progress=False)
emb, meta = load_vision_embeddings(out / "vision_embeddings")
print("wrote", manifest.relative_to(out), "and", len(meta["shards"]), "shards")
for site, layer in zip(meta["sites"], meta["layers"]):
    x = emb[site]                                                 # [image d]
    same = torch.cosine_similarity(x[0::2], x[1::2]).mean()       # the two images of each ink
    other = torch.cosine_similarity(x[0::2], x[0::2].roll(1, 0)).mean()   # images of different inks
    print(f"  {site:34s} layer {layer}  {tuple(x.shape)}  cosine same ink {same:.2f}, other ink {other:.2f}")

# 3. One image + text through the whole model. Vision sites are *packed*: no batch axis, every image's
#    patches concatenated ([patch d]); the merger emits one language token per 2x2 patch block ([merged d]).
prompt = "<image> the word red . what colour is the <image> ?"
vi = vision_inputs(lens.tokenizer, [images[0], images[2]], prompt, config=lens.config)
print("\nimage token spans in the sequence:", vi.image_spans, "| patch grids (t, h, w):", vi.segments.grid_thw)
_, cache = lens.run_with_cache(vi, ["vision.blocks.1.hook_resid_post", "vision.hook_merger"])
print("packed vision.blocks.1.hook_resid_post:", tuple(cache["vision.blocks.1.hook_resid_post"].shape))
per_img = per_image(cache, "vision.blocks.1.hook_resid_post")       # one [patch d] per image
thw = vi.segments.grid_thw[1]
grid = to_grid(per_img[1], thw, vi.segments.merge_size)             # [t h w d], raster order
print("per image:", [tuple(p.shape) for p in per_img], "| image 1 as a grid:", tuple(grid.shape))
centre = pool(per_img[1], thw, vi.segments.merge_size, ("patch", (0, thw[1] // 2, thw[2] // 2)))
print("image 1: mean-pooled vs centre-patch vector, cosine",
      f"{torch.cosine_similarity(pool(per_img[1], thw, vi.segments.merge_size), centre, dim=0):.2f}")

# 4. Swap image 0's merged vision tokens for those of a different-ink image of the same size and generate.
#    The replacement must have image 0's number of merged tokens; a mismatch raises HookError before running.
donor = vision_inputs(lens.tokenizer, [images[4]], "", config=lens.config)   # a blue 16x16 patch
_, donor_cache = lens.run_with_cache(donor, "vision.hook_merger")
tokens = donor_cache["vision.hook_merger"]                           # [merged d_model]
plain = lens.model.generate(**vi.inputs, max_new_tokens=5, do_sample=False)
swapped = generate_with_image_embeddings(lens, vi, 0, tokens, max_new_tokens=5)
n = vi["input_ids"].shape[1]
print("\nplain   :", lens.tokenizer.decode(plain[0, n:]))
print("swapped :", lens.tokenizer.decode(swapped[0, n:]), "(random weights: only the mechanics are meaningful)")

# The same edit as a hook over image 0's rows of the merger, checked on the language model's input:
_, edited = lens.run_with_cache(vi, "blocks.0.hook_resid_pre", hooks=[("vision.hook_merger",
                                                                        replace_segment(vi.segments, 0, tokens))])
_, clean = lens.run_with_cache(vi, "blocks.0.hook_resid_pre")
changed = (edited["blocks.0.hook_resid_pre"] - clean["blocks.0.hook_resid_pre"])[0].abs().amax(-1) > 0
print("positions changed in the LM input:", changed.nonzero()[:, 0].tolist(), "= image 0's span", vi.image_spans[0])
