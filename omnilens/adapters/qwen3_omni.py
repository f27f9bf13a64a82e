"""Qwen3-Omni: the Thinker (audio encoder, vision encoder with deepstack, MoE text decoder), the Talker
(MoE decoder with shared expert), its code predictor and the code2wav codec decoder, on one hook graph.

Towers (DESIGN.md): the Thinker text decoder is the root (``blocks.*``); ``audio.*``, ``vision.*``,
``talker.*``, ``talker.code_predictor.*`` and ``code2wav.*`` carry prefixes. Every decoder tower is
described with :class:`~omnilens.adapters.decoder.DecoderLayout`; encoder blocks are packed (no batch
axis) and are adjusted where their modules differ from a decoder block (``_relocate``).

Deepstack: after Thinker block ``i < len(deepstack_visual_indexes)`` the vision tower's
``merger_list[i]`` features are added to the residual at the visual positions. That addition happens
in a method, not a module, so ``blocks.{i}.hook_deepstack`` is served by a temporary
:class:`~omnilens.core.hookpoints.HookPoint` (``deepstack_points``, installed only for runs that name it)
that carries the addition scattered to ``[batch pos d_model]`` (zeros elsewhere); the residual
``resid_post[i] + deepstack[i]`` is bit-identical to Hugging Face's.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn

from omnilens.adapters.base import Adapter, GenerationPlan
from omnilens.adapters.decoder import DecoderLayout, decoder_specs
from omnilens.adapters.qwen3 import qwen3_layout
from omnilens.adapters.vision import VisionTowerLayout, check_vision_media, image_segments, vision_specs
from omnilens.core.errors import HookError
from omnilens.core.graph import HookGraph, HookSpec
from omnilens.core.hookpoints import HookPoint
from omnilens.inputs.audio import clip_tokens
from omnilens.core.packed import Segments, spans_of
from omnilens.core.views import TupleItem

DEEPSTACK = frozenset({"deepstack_points"})


def _relocate(specs: list[HookSpec], changes: dict[str, dict[str, Any]], layers: str) -> list[HookSpec]:
    """Replace fields of block sites, keyed by the site's ``component.site`` (``"mlp.hook_pre"``).

    ``changes[key]`` maps field names to values; a ``module`` value is relative to the block
    (``{layers}.{layer}``, ``layers`` being the layout's ``DecoderLayout.layers``).
    """
    out = []
    for spec in specs:
        key = f"{spec.component}.{spec.site}"
        if spec.layer is None or key not in changes:
            out.append(spec)
            continue
        change = dict(changes[key])
        if "module" in change:
            change["module"] = f"{layers}.{spec.layer}.{change['module']}"
        out.append(dataclasses.replace(spec, **change))
    return out


def _site(tower: str, name: str, component: str, site: str, axes: str, module: str, doc: str, **kw) -> HookSpec:
    return HookSpec(name=name, tower=tower, layer=kw.pop("layer", None), component=component, site=site, axes=axes,
                    module=module, doc=doc, **kw)


class Qwen3OmniAdapter(Adapter):
    """``Qwen3OmniMoeForConditionalGeneration`` and ``Qwen3OmniMoeThinkerForConditionalGeneration``."""

    architectures = ("Qwen3OmniMoeForConditionalGeneration", "Qwen3OmniMoeThinkerForConditionalGeneration")

    def __init__(self, model: nn.Module):
        self.full = type(model).__name__ == "Qwen3OmniMoeForConditionalGeneration"
        self.thinker_path = "thinker." if self.full else ""
        self.thinker_config = model.config.thinker_config if self.full else model.config
        super().__init__(model)

    @property
    def has_talker(self) -> bool:
        """Whether the model carries the Talker and code2wav (audio output)."""
        return self.full and getattr(self.model, "has_talker", False)

    # graph ----------------------------------------------------------------------------------------
    def build_graph(self) -> HookGraph:
        root = f"{self.thinker_path}model"
        text = decoder_specs(qwen3_layout(self.thinker_config.text_config, root=f"{root}.language_model",
                                          unembed=f"{self.thinker_path}lm_head"))
        text = self._with_deepstack(text, f"{root}.language_model")
        specs = [text[0], *self._audio_specs(f"{root}.audio_tower"), *self._vision_specs(f"{root}.visual"), *text[1:]]
        if self.has_talker:
            specs += self._talker_specs()
        return HookGraph(specs, model_name=type(self.model).__name__, notes=self._notes(specs))

    def _audio_specs(self, at: str) -> list[HookSpec]:
        cfg = self.thinker_config.audio_config
        lay = DecoderLayout(
            tower="audio", layers=f"{at}.layers", n_layers=cfg.encoder_layers, d_model=cfg.d_model,
            n_heads=cfg.encoder_attention_heads, n_kv_heads=cfg.encoder_attention_heads,
            d_head=cfg.d_model // cfg.encoder_attention_heads, mlp_kinds=["dense"] * cfg.encoder_layers,
            seq_axes="frame", o="out_proj", ln1="self_attn_layer_norm", ln2="final_layer_norm",
            mlp_gate="fc1", mlp_up=None, mlp_down="fc2", attn_output_is_tuple=False, rotary=False,
        )
        blocks = _relocate(decoder_specs(lay), {
            "mlp.hook_pre": {"module": "fc1", "doc": "fc1 output (pre-activation)"},
            "mlp.hook_post": {"module": "fc2", "doc": "hidden activation (fc2 input)"},
            "resid.hook_mlp_out": {"module": "fc2", "doc": "MLP block output (fc2 output)"},
            "resid.hook_resid_post": {"view": TupleItem(0)},
            "attn.hook_pattern": {"doc": "softmax pattern of one attention window per visit (eager attention)"},
        }, lay.layers)
        conv = _site("audio", "audio.hook_conv", "conv", "hook_conv", "chunk time d_model", f"{at}.conv_out",
                     "conv front end output per padded feature chunk (before positions and packing)")
        out = _site("audio", "audio.hook_out", "out", "hook_out", "frame d_thinker", f"{at}.proj2",
                    "audio tokens handed to the Thinker (proj2 output), packed over clips")
        return [conv, *blocks, out]

    def _vision_specs(self, at: str) -> list[HookSpec]:
        cfg = self.thinker_config.vision_config
        lay = VisionTowerLayout(root=at, n_layers=cfg.depth, d_model=cfg.hidden_size, n_heads=cfg.num_heads,
                                mlp_gate="linear_fc1", mlp_down="linear_fc2")
        indexes = list(cfg.deepstack_visual_indexes)
        out = []
        for spec in vision_specs(lay):
            if spec.name == "vision.hook_merger":
                spec = dataclasses.replace(spec, axes="merged d_thinker")
            out.append(spec)
            if spec.site == "hook_resid_post" and spec.layer in indexes:  # its deepstack merger runs next
                k = indexes.index(spec.layer)
                out.append(_site("vision", f"vision.deepstack.{k}.hook_out", "deepstack", "hook_out",
                                 "merged d_thinker", f"{at}.merger_list.{k}",
                                 f"deepstack features of vision block {spec.layer}, added to the Thinker residual "
                                 f"after block {k} (blocks.{k}.hook_deepstack)"))
        return out

    def _with_deepstack(self, text: list[HookSpec], lm: str) -> list[HookSpec]:
        n = len(self.thinker_config.vision_config.deepstack_visual_indexes)
        out = []
        for spec in text:
            out.append(spec)
            if spec.tower == "" and spec.site == "hook_resid_post" and spec.layer is not None and spec.layer < n:
                out.append(_site("", f"blocks.{spec.layer}.hook_deepstack", "resid", "hook_deepstack",
                                 "batch pos d_model", f"{lm}.deepstack_points.{spec.layer}",
                                 "deepstack vision features added to the residual after this block (zero at "
                                 "non-visual positions): resid_post + deepstack = next resid_pre",
                                 layer=spec.layer, requires=DEEPSTACK))
        return out

    def _talker_specs(self) -> list[HookSpec]:
        tc = self.model.config.talker_config
        text_proj = _site("talker", "talker.hook_text_proj", "bridge", "hook_text_proj", "... d_model",
                          "talker.text_projection",
                          "Thinker embeddings projected into the Talker (text_projection output); visits: user "
                          "text tokens [token d], the TTS bos/eos/pad markers [1 3 d], the assistant turn "
                          "[batch pos d]")
        hidden_proj = _site("talker", "talker.hook_hidden_proj", "bridge", "hook_hidden_proj", "token d_model",
                            "talker.hidden_projection",
                            f"Thinker hidden states (layer {tc.accept_hidden_layer}) at audio/image/video "
                            "positions projected into the Talker (hidden_projection output)")
        talker = qwen3_layout(tc.text_config, tower="talker", root="talker.model", unembed="talker.codec_head")
        talker = dataclasses.replace(talker, embed=None, shared_expert="shared_expert",
                                     mlp_kinds=["moe"] * talker.n_layers)
        talker_specs = _relocate(decoder_specs(talker), {
            "mlp.shared_expert.hook_out": {"axes": "token d_model"},
        }, talker.layers)
        talker_specs[-1] = dataclasses.replace(talker_specs[-1], doc="codec group 0 logits (codec_head output)")
        cp_cfg = tc.code_predictor_config
        cp = qwen3_layout(cp_cfg, tower="talker.code_predictor", root="talker.code_predictor.model", unembed=None)
        cp = dataclasses.replace(cp, embed=None, mlp_kinds=["dense"] * cp.n_layers)
        cp_logits = [
            _site("talker.code_predictor", f"talker.code_predictor.hook_logits.{g}", "unembed", f"hook_logits.{g}",
                  "batch pos vocab", f"talker.code_predictor.lm_head.{g - 1}",
                  f"codec group {g} logits (lm_head.{g - 1}); one visit per Talker step")
            for g in range(1, tc.num_code_groups)
        ]
        c2w = qwen3_layout(self.model.config.code2wav_config, tower="code2wav", root="code2wav.pre_transformer",
                           unembed=None)
        c2w = dataclasses.replace(c2w, embed=None, q_norm=None, k_norm=None)  # its q/k norms are identities
        c2w_specs = _relocate(decoder_specs(c2w), {
            "resid.hook_attn_out": {"doc": "attention block output (before self_attn_layer_scale)"},
            "resid.hook_mlp_out": {"doc": "MLP block output (before mlp_layer_scale)"},
        }, c2w.layers)
        wav = _site("code2wav", "code2wav.hook_out", "out", "hook_out", "batch channel sample", "code2wav",
                    "waveform decoded from the codec frames (one visit per decoded chunk)")
        return [text_proj, hidden_proj, *talker_specs, *decoder_specs(cp), *cp_logits, *c2w_specs, wav]

    def _notes(self, specs: list[HookSpec]) -> list[str]:
        cfg = self.thinker_config
        n_deep = len(cfg.vision_config.deepstack_visual_indexes)
        notes = [
            f"audio -> root: audio.hook_out frames are scattered into the Thinker embedding at the "
            f"audio_token_id={cfg.audio_token_id} positions (blocks.0.hook_resid_pre); hook_embed is the text "
            f"embedding before the scatter",
            f"vision -> root: vision.hook_merger tokens are scattered at image_token_id={cfg.image_token_id} / "
            f"video_token_id={cfg.video_token_id} positions; vision.deepstack.k.hook_out (after vision blocks "
            f"{list(cfg.vision_config.deepstack_visual_indexes)}) is added after Thinker blocks 0..{n_deep - 1} "
            f"(blocks.k.hook_deepstack)",
            "encoder towers are packed (frame/patch axes, no batch): cache.meta['segments'] (and "
            "cache.meta['vision'] for omnilens.core.packed) splits them per clip/image; audio attention sites are "
            "visited once per attention window, vision ones once per image",
        ]
        if self.has_talker:
            tc = self.model.config.talker_config
            notes += [
                f"root -> talker: the Talker reads Thinker hidden_states[0] (embeddings) through "
                f"talker.hook_text_proj and hidden_states[{tc.accept_hidden_layer}] (= "
                f"{self._hidden_state_site(tc.accept_hidden_layer)}) at multimodal positions through "
                f"talker.hook_hidden_proj, once after the Thinker finished generating",
                f"talker -> talker.code_predictor: every Talker step predicts codec group 0 (talker.hook_logits); "
                f"the code predictor then runs {tc.num_code_groups - 1} steps (groups 1..{tc.num_code_groups - 1})",
                "talker -> code2wav: the codec frames (all groups) are decoded to the waveform (code2wav.hook_out)",
                "MoE experts are fused 3-D parameters: per-expert outputs are not offered",
            ]
        counts: dict[str, int] = {}
        for spec in specs:
            counts[spec.tower] = counts.get(spec.tower, 0) + 1
        notes.append("sites per tower: " + ", ".join(f"{t or '(root)'} {n}" for t, n in counts.items()))
        return notes

    def _hidden_state_site(self, k: int) -> str:
        """The root site Hugging Face's ``hidden_states[k]`` equals."""
        n = self.thinker_config.text_config.num_hidden_layers
        if k == 0:
            return "blocks.0.hook_resid_pre"
        if k == n:
            return "ln_final.hook_normalized"
        return f"blocks.{k - 1}.hook_resid_post, before any deepstack addition"

    # instrumentation ------------------------------------------------------------------------------
    @contextmanager
    def instrument(self, specs: Sequence[HookSpec]) -> Iterator[None]:
        """Attention points (base adapter), the deepstack points for ``hook_deepstack`` sites and, on the
        full model (which has no forward of its own), ``forward`` routed to the Thinker for the run."""
        with ExitStack() as stack:
            stack.enter_context(super().instrument(specs))
            if self.full:
                stack.enter_context(thinker_forward(self.model))
            if any(DEEPSTACK <= s.requires for s in specs):
                lm = self.module(f"{self.thinker_path}model.language_model")
                n = len(self.thinker_config.vision_config.deepstack_visual_indexes)
                stack.enter_context(deepstack_points(lm, n))
            yield

    # inputs ---------------------------------------------------------------------------------------
    def prepare_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Check audio features against their mask and the audio tokens, and images against their grid and
        the image tokens, before any forward runs."""
        cfg = self.thinker_config
        ids = inputs.get("input_ids")
        feats = inputs.get("input_features")
        n_audio_tokens = int((ids == cfg.audio_token_id).sum()) if ids is not None else None
        site = "audio.hook_conv"
        if feats is not None:
            mask = inputs.get("feature_attention_mask")
            if mask is None:
                raise HookError(site, "a feature_attention_mask [clip frame] alongside input_features", "none")
            mel = cfg.audio_config.num_mel_bins
            if feats.dim() != 3 or feats.shape[1] != mel:
                raise HookError(site, f"input_features of shape [clip {mel} frame] (num_mel_bins={mel})",
                                f"shape {tuple(feats.shape)}")
            want = (feats.shape[0], feats.shape[2])
            if tuple(mask.shape) != want:
                raise HookError(site, f"feature_attention_mask of shape {want} [clip frame] to match input_features "
                                f"{tuple(feats.shape)}", f"shape {tuple(mask.shape)}")
            n_tokens = sum(clip_tokens(inputs, cfg.audio_config.n_window))
            if n_audio_tokens is not None and n_audio_tokens != n_tokens:
                raise HookError(site, f"{n_tokens} audio tokens (id {cfg.audio_token_id}) in input_ids for feature "
                                f"lengths {mask.sum(-1).tolist()}", f"{n_audio_tokens}",
                                "Build inputs with omnilens.inputs.omni.omni_inputs.")
        elif n_audio_tokens:
            raise HookError(site, f"input_features for the {n_audio_tokens} audio tokens (id {cfg.audio_token_id}) "
                            "in input_ids", "no input_features")
        check_vision_media(inputs, cfg)
        return inputs

    def segments(self, inputs: dict[str, Any]) -> dict[str, list[tuple[int, int]]]:
        """``[start, end)`` of each clip / image along the packed encoder axes.

        Keys are axis names: ``"frame"`` (``audio.blocks.*``, ``audio.hook_out``), ``"patch"``
        (``vision.hook_patch_embed``, ``vision.blocks.*``) and ``"merged"`` (``vision.hook_merger``,
        ``vision.deepstack.*``).
        """
        out = super().segments(inputs)
        if inputs.get("input_features") is not None and inputs.get("feature_attention_mask") is not None:
            out = {"frame": spans_of(clip_tokens(inputs, self.thinker_config.audio_config.n_window)), **out}
        return out

    def image_segments(self, inputs: dict[str, Any]) -> Segments | None:
        """The images' :class:`~omnilens.core.packed.Segments` of a run (``None`` without images)."""
        return image_segments(inputs, self.thinker_config.vision_config.spatial_merge_size)

    # generation -----------------------------------------------------------------------------------
    def generation_plan(self, inputs: dict[str, Any], *, return_audio: bool | None = None,
                        speaker: str | None = None, **kwargs: Any) -> GenerationPlan:
        """Map ``Lens.generate`` options onto Omni ``generate`` (greedy unless ``do_sample`` is given).

        ``max_new_tokens`` / ``do_sample`` apply to the Thinker; ``talker_*`` options to the Talker.
        Raises before running for audio on a model without Talker and for unknown speakers.
        """
        name = type(self.model).__name__
        if not self.full:
            if return_audio:
                raise ValueError(f"return_audio=True: {name} is the Thinker alone and has no Talker or code2wav; "
                                 "load Qwen3OmniMoeForConditionalGeneration for audio output")
            if speaker is not None:
                raise ValueError(f"speaker={speaker!r}: {name} produces no audio")
            return super().generation_plan(inputs, **kwargs)
        audio = self.has_talker if return_audio is None else return_audio
        if audio and not self.has_talker:
            raise ValueError(f"return_audio=True: this {name} has its Talker disabled (enable_talker())")
        cfg = self.model.config
        gen = {"return_audio": audio, "thinker_eos_token_id": cfg.im_end_token_id}
        for key, value in kwargs.items():
            known = key.startswith(("thinker_", "talker_", "token2wav_")) or key in ("use_audio_in_video",)
            gen[key if known else f"thinker_{key}"] = value
        gen.setdefault("thinker_do_sample", False)
        towers = {"": "thinker"}
        parents: dict[str, str] = {}
        meta: dict[str, Any] = {}
        if audio:
            speakers = cfg.talker_config.speaker_id or {}
            speaker = speaker if speaker is not None else next(iter(speakers), None)
            if speaker is None or speaker.lower() not in speakers:
                raise ValueError(f"speaker={speaker!r}: expected one of {sorted(speakers)} (talker_config.speaker_id)")
            gen["speaker"] = speaker
            gen.setdefault("talker_do_sample", False)
            towers.update({"talker": "talker", "talker.code_predictor": "talker.code_predictor",
                           "code2wav": "code2wav"})
            parents = {"talker.code_predictor": "talker"}
            meta = {"code_groups": cfg.talker_config.num_code_groups,
                    "code_predictor_steps_per_talker_step": cfg.talker_config.num_code_groups - 1}
        elif speaker is not None:
            raise ValueError(f"speaker={speaker!r} given with return_audio=False")
        return GenerationPlan(kwargs=gen, towers=towers, parents=parents, unpack=_unpack_omni, meta=meta)


def _unpack_omni(output: Any) -> tuple[torch.Tensor, Any]:
    if isinstance(output, tuple):
        return output[0], output[1]
    return getattr(output, "sequences", output), None


@contextmanager
def deepstack_points(language_model: nn.Module, n: int) -> Iterator[None]:
    """Route the Thinker's deepstack additions through ``language_model.deepstack_points[i]`` for one run.

    The addition after block ``i`` passes through the point as ``[batch pos d_model]`` (the visual
    features at the visual positions, zeros elsewhere) and is added to the whole residual, which gives
    the same values as Hugging Face's masked in-place addition. Removed on exit, exceptions included.
    """
    points = nn.ModuleList([HookPoint() for _ in range(n)])
    calls = [0]

    def reset(module, args, kwargs):
        calls[0] = 0

    def process(hidden_states, visual_pos_masks, visual_embeds):
        i = calls[0]
        calls[0] += 1
        mask = visual_pos_masks.to(hidden_states.device)
        delta = torch.zeros_like(hidden_states)
        delta[mask, :] = visual_embeds.to(hidden_states.device, hidden_states.dtype)
        return hidden_states + language_model.deepstack_points[i](delta)

    language_model.add_module("deepstack_points", points)
    language_model._deepstack_process = process
    handle = language_model.register_forward_pre_hook(reset, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()
        del language_model._deepstack_process
        del language_model.deepstack_points


@contextmanager
def thinker_forward(model: nn.Module) -> Iterator[None]:
    """Give a ``Qwen3OmniMoeForConditionalGeneration`` a ``forward`` (the Thinker's) for one run; the
    model's own ``forward`` attribute (e.g. an nnsight controller) is restored on exit."""
    saved = model.__dict__.get("forward")

    def forward(*args: Any, **kwargs: Any) -> Any:
        return model.thinker(*args, **kwargs)

    model.forward = forward
    try:
        yield
    finally:
        if saved is None:
            del model.forward
        else:
            model.forward = saved
