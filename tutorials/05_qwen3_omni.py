"""Qwen3-Omni end to end: Thinker, audio encoder, Talker and code predictor in one hook graph, steered speech.

The research workflow: look at the model's towers and sites, feed a conversation with text and an audio
clip, cache sites in every tower during ``generate`` (the Thinker writes text, the Talker turns the Thinker's
hidden states into codec frames, the code predictor fills each frame's remaining codebooks, code2wav makes
the waveform), read how their steps nest, then steer the Thinker with a delta vector (the difference of its
residual stream on two prompts) and check that the edit reaches the Talker and changes the waveform.

The model is the tiny Qwen3-Omni from ``omnilens.testing`` with RANDOM weights: every tower, cache and
generation loop is the real Hugging Face code, the words and the audio are noise. With a checkpoint, use
``lens = omnilens.load("Qwen/Qwen3-Omni-30B-A3B-Instruct")``. Runs in seconds on CPU:

    python tutorials/05_qwen3_omni.py [out_dir]      # default ./tutorial_out
"""

import json
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

import omnilens
from omnilens.interventions import AddVector
from omnilens.inputs.omni import omni_inputs
from omnilens.testing import tiny_omni, tiny_omni_feature_extractor, tiny_omni_tokenizer

out = Path(sys.argv[1] if len(sys.argv) > 1 else "tutorial_out")
out.mkdir(parents=True, exist_ok=True)
tok = tiny_omni_tokenizer()
lens = omnilens.load(tiny_omni(), tokenizer=tok)                   # random weights (see docstring)

# 1. The towers and their sites: "" is the Thinker (text), then audio, vision, talker, code predictor, code2wav.
print(lens.graph.describe())
print(lens.graph.describe("talker.hook_hidden_proj"))   # the Thinker -> Talker bridge, in detail

# 2. Inputs: a text + audio user turn in the chat layout. The clip is a synthetic 1 s waveform at 16 kHz
#    (a 440 Hz tone plus noise), turned into log-mel features by the Whisper-style feature extractor.
t = np.arange(16000) / 16000
clip = (0.3 * np.sin(2 * np.pi * 440 * t) + 0.05 * np.random.RandomState(0).randn(16000)).astype(np.float32)
fe = tiny_omni_feature_extractor()
prompt = omni_inputs(tok, lens.config, ["the cat", {"type": "audio", "audio": clip}, "is happy"], feature_extractor=fe)
audio_span = prompt.spans[0]["audio"][0]
print("input_ids", tuple(prompt["input_ids"].shape), "| audio tokens at", audio_span,
      "| input_features", tuple(prompt["input_features"].shape))

# 3. Generate text and speech, caching sites in the Thinker, the audio encoder and the Talker at every step.
GEN = dict(max_new_tokens=3, talker_max_new_tokens=4, speaker="ethan", return_audio=True)
reads = ["blocks.1.hook_resid_post", "audio.hook_out", "talker.hook_hidden_proj", "talker.blocks.0.hook_resid_post",
         "talker.code_predictor.blocks.0.hook_resid_post"]
base = lens.generate(prompt, reads=reads, **GEN)
print("\ngenerated text ids:", base.ids[0, prompt["input_ids"].shape[1]:].tolist(),
      "| waveform", tuple(base.waveform.shape))

# Step axes: every visit of a site is one step. The Thinker's first step is the prefill (all positions),
# later steps see one new token; the audio encoder runs once; each Talker step emits one codec frame whose
# remaining codebooks the code predictor fills in several nested calls.
for name in reads:
    print(f"  {name:48s} steps {len(base.cache.steps(name)):2d}, shapes",
          sorted({tuple(s.shape) for s in base.cache.steps(name)}))
meta = base.cache.meta["generation"]
nest = meta["nesting"]["talker.code_predictor"]
print("tower calls:", {k: v["calls"] for k, v in meta["towers"].items()})
print("code predictor call k follows Talker step", nest["parent_step"], "as codebook group",
      [g + 1 for g in nest["inner_step"]])
(out / "generation_meta.json").write_text(json.dumps(meta, indent=1, default=str))

# 4. A Thinker-delta steering vector: the Thinker's mean resid_post at layer 0 on a "happy" minus a "sad"
#    text prompt, added at every step of generate (an AddVector intervention is a list of executor writes).
def thinker_mean(text: str) -> torch.Tensor:
    _, cache = lens.run_with_cache(omni_inputs(tok, lens.config, [text]), "blocks.0.hook_resid_post")
    return cache["blocks.0.hook_resid_post"][0].mean(0)                         # [d_model]


delta = thinker_mean("i feel happy and glad today") - thinker_mean("i feel sad and gloomy today")
steer = AddVector("blocks.0.hook_resid_post", delta, alpha=8.0)
steered = lens.generate(prompt, reads=reads, writes=steer.writes(), **GEN)

# The edit reaches the Talker through the bridge (hook_hidden_proj projects the Thinker's hidden states).
before, after = base.cache["talker.hook_hidden_proj"], steered.cache["talker.hook_hidden_proj"]
print(f"\ndelta norm {delta.norm():.2f}; Talker input change {(after - before).abs().max():.3f}")
print("text ids before/after:", base.ids[0, -3:].tolist(), steered.ids[0, -3:].tolist())
n = min(base.waveform.shape[-1], steered.waveform.shape[-1])
diff = (base.waveform[..., :n] - steered.waveform[..., :n]).abs().max().item()
print(f"waveform samples {base.waveform.shape[-1]} -> {steered.waveform.shape[-1]}, max change {diff:.4f}, "
      f"changed: {not torch.equal(base.waveform, steered.waveform)}")
save_file({"base": base.waveform.contiguous(), "steered": steered.waveform.contiguous(), "delta": delta},
          str(out / "omni_waveforms.safetensors"))
