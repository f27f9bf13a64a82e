"""The shared decoder-block mapping: one place that turns a decoder layout into hook specs.

Every decoder tower (Qwen3's root decoder, Qwen2-VL's language model, the Omni Thinker, Talker and
code predictor, and the packed vision/audio encoders) describes its Hugging Face module names with a
:class:`DecoderLayout`; :func:`decoder_specs` emits the TransformerLens-style sites in forward order.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from omnilens.core.graph import HookSpec
from omnilens.core.views import HeadsFirst, PerHeadResult, SplitHeads, TupleItem, View

ATTENTION_POINTS = frozenset({"attention_points"})


@dataclass(frozen=True)
class DecoderLayout:
    """Hugging Face module names of one decoder tower, relative to the model root and to each layer.

    ``mlp_kinds`` gives ``"dense"`` or ``"moe"`` per layer. ``seq_axes`` is ``"batch pos"`` for a
    batched decoder and ``"patch"``/``"frame"`` for packed encoders. Paths set to ``None`` are absent
    sites (no hook that never fires).
    """

    tower: str
    layers: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    mlp_kinds: Sequence[str]
    seq_axes: str = "batch pos"
    embed: str | None = None
    final_norm: str | None = None
    unembed: str | None = None
    attn: str = "self_attn"
    q: str | None = "q_proj"
    k: str | None = "k_proj"
    v: str | None = "v_proj"
    o: str = "o_proj"
    q_norm: str | None = None
    k_norm: str | None = None
    ln1: str = "input_layernorm"
    ln2: str = "post_attention_layernorm"
    mlp: str = "mlp"
    mlp_gate: str | None = "gate_proj"
    mlp_up: str | None = "up_proj"
    mlp_down: str = "down_proj"
    router: str = "gate"
    shared_expert: str | None = None
    attn_output_is_tuple: bool = True
    rotary: bool = True
    extra_attn_sites: tuple[HookSpec, ...] = field(default=())

    @property
    def prefix(self) -> str:
        """The tower's name prefix of its site names (``"vision."``; ``""`` for the root tower)."""
        return f"{self.tower}." if self.tower else ""


def _spec(lay: DecoderLayout, layer: int | None, component: str, site: str, axes: str, module: str, **kw) -> HookSpec:
    if layer is None:
        name = f"{lay.prefix}{component + '.' if component not in ('', 'embed', 'unembed') else ''}{site}"
    else:
        comp = "" if component == "resid" else f"{component}."
        name = f"{lay.prefix}blocks.{layer}.{comp}{site}"
    return HookSpec(name=name, tower=lay.tower, layer=layer, component=component, site=site, axes=axes,
                    module=module, **kw)


def decoder_specs(lay: DecoderLayout) -> list[HookSpec]:
    """Hook specs for every site of ``lay``, in forward order (see DESIGN.md for the grammar)."""
    s, d = lay.seq_axes, "d_model"
    specs: list[HookSpec] = []
    if lay.embed:
        specs.append(_spec(lay, None, "embed", "hook_embed", f"{s} {d}", lay.embed, doc="token embeddings"))
    for i in range(lay.n_layers):
        blk = f"{lay.layers}.{i}"
        att = f"{blk}.{lay.attn}"
        heads_q = SplitHeads(lay.n_heads, lay.d_head)
        heads_kv = SplitHeads(lay.n_kv_heads, lay.d_head)
        specs += [
            _spec(lay, i, "resid", "hook_resid_pre", f"{s} {d}", blk, port="input",
                  doc="residual stream entering the block"),
            _spec(lay, i, "ln1", "hook_normalized", f"{s} {d}", f"{blk}.{lay.ln1}", doc="pre-attention norm output"),
        ]
        if lay.q:
            specs += [
                _spec(lay, i, "attn", "hook_q", f"{s} head d_head", f"{att}.{lay.q}", view=heads_q,
                      doc="queries (q_proj output, split per head)"),
                _spec(lay, i, "attn", "hook_k", f"{s} kv_head d_head", f"{att}.{lay.k}", view=heads_kv,
                      doc="keys (k_proj output, split per kv head)"),
                _spec(lay, i, "attn", "hook_v", f"{s} kv_head d_head", f"{att}.{lay.v}", view=heads_kv,
                      doc="values (v_proj output, split per kv head)"),
            ]
        specs += list(spec for spec in lay.extra_attn_sites if spec.layer == i)
        if lay.q_norm:
            specs += [
                _spec(lay, i, "attn", "hook_q_normed", f"{s} head d_head", f"{att}.{lay.q_norm}",
                      doc="queries after the per-head q_norm"),
                _spec(lay, i, "attn", "hook_k_normed", f"{s} kv_head d_head", f"{att}.{lay.k_norm}",
                      doc="keys after the per-head k_norm"),
            ]
        if lay.rotary:
            specs += [
                _spec(lay, i, "attn", "hook_rot_q", f"{s} head d_head", f"{att}.hook_rot_q", view=HeadsFirst(),
                      requires=ATTENTION_POINTS, doc="queries after rotary embedding (eager attention)"),
                _spec(lay, i, "attn", "hook_rot_k", f"{s} kv_head d_head", f"{att}.hook_rot_k",
                      view=HeadsFirst(), requires=ATTENTION_POINTS, doc="keys after rotary embedding (eager attention)"),
            ]
        pat_axes = "batch head query key" if lay.seq_axes == "batch pos" else "segment head query key"
        specs += [
            _spec(lay, i, "attn", "hook_pattern", pat_axes, f"{att}.hook_pattern", requires=ATTENTION_POINTS,
                  doc="softmax attention pattern (eager attention)"),
            _spec(lay, i, "attn", "hook_z", f"{s} head d_head", f"{att}.{lay.o}", port="input", view=heads_q,
                  doc="attention output per head (o_proj input)"),
            _spec(lay, i, "attn", "hook_result", f"{s} head {d}", f"{att}.{lay.o}", view=PerHeadResult(lay.n_heads, lay.d_head),
                  opt_in=True, doc="per-head o_proj contribution, bias excluded"),
            _spec(lay, i, "resid", "hook_attn_out", f"{s} {d}", att,
                  view=TupleItem(0) if lay.attn_output_is_tuple else View(), doc="attention block output"),
            _spec(lay, i, "resid", "hook_resid_mid", f"{s} {d}", f"{blk}.{lay.ln2}", port="input", inplace=True,
                  doc="residual stream between attention and MLP"),
            _spec(lay, i, "ln2", "hook_normalized", f"{s} {d}", f"{blk}.{lay.ln2}", doc="pre-MLP norm output"),
        ]
        specs += _mlp_specs(lay, i, f"{blk}.{lay.mlp}")
        specs += [
            _spec(lay, i, "resid", "hook_mlp_out", f"{s} {d}", f"{blk}.{lay.mlp}", doc="MLP block output"),
            _spec(lay, i, "resid", "hook_resid_post", f"{s} {d}", blk, doc="residual stream leaving the block"),
        ]
    if lay.final_norm:
        specs.append(_spec(lay, None, "ln_final", "hook_normalized", f"{s} {d}", lay.final_norm, doc="final norm output"))
    if lay.unembed:
        specs.append(_spec(lay, None, "unembed", "hook_logits", f"{s} vocab", lay.unembed, doc="output logits"))
    return specs


def _mlp_specs(lay: DecoderLayout, i: int, mlp: str) -> list[HookSpec]:
    s = lay.seq_axes
    if lay.mlp_kinds[i] == "dense":
        out = []
        if lay.mlp_gate:
            out.append(_spec(lay, i, "mlp", "hook_pre", f"{s} d_mlp", f"{mlp}.{lay.mlp_gate}",
                             doc="gate pre-activation (gate_proj output)"))
        if lay.mlp_up:
            out.append(_spec(lay, i, "mlp", "hook_pre_linear", f"{s} d_mlp", f"{mlp}.{lay.mlp_up}",
                             doc="linear branch (up_proj output)"))
        out.append(_spec(lay, i, "mlp", "hook_post", f"{s} d_mlp", f"{mlp}.{lay.mlp_down}", port="input",
                         doc="hidden activation (down_proj input)"))
        return out
    router = f"{mlp}.{lay.router}"
    out = [
        _spec(lay, i, "mlp", "hook_router_logits", "token expert", router, view=TupleItem(0),
              doc="router logits over flattened tokens (writes do not change routing)"),
        _spec(lay, i, "mlp", "hook_topk_weights", "token k", router, view=TupleItem(1),
              doc="routing weights of the chosen experts"),
        _spec(lay, i, "mlp", "hook_topk_idx", "token k", router, view=TupleItem(2), doc="chosen expert indices"),
    ]
    if lay.shared_expert:
        out.append(_spec(lay, i, "mlp.shared_expert", "hook_out", f"{s} d_model", f"{mlp}.{lay.shared_expert}",
                         doc="shared expert output (before its gate)"))
    return out
