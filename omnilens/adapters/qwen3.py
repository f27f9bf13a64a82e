"""Qwen3 (dense) and Qwen3-MoE causal language models."""

from __future__ import annotations

from omnilens.adapters.base import Adapter
from omnilens.adapters.decoder import DecoderLayout, decoder_specs
from omnilens.core.graph import HookGraph


def qwen3_layout(config, *, tower: str = "", root: str = "model", unembed: str | None = "lm_head") -> DecoderLayout:
    """The :class:`DecoderLayout` of a Qwen3 / Qwen3-MoE text decoder whose ``Qwen3Model`` sits at ``root``."""
    n = config.num_hidden_layers
    sparse = getattr(config, "num_experts", 0) or 0
    step = getattr(config, "decoder_sparse_step", 1) or 1
    mlp_only = set(getattr(config, "mlp_only_layers", []) or [])
    kinds = ["moe" if sparse > 0 and i not in mlp_only and (i + 1) % step == 0 else "dense" for i in range(n)]
    return DecoderLayout(
        tower=tower, layers=f"{root}.layers", n_layers=n, d_model=config.hidden_size,
        n_heads=config.num_attention_heads, n_kv_heads=config.num_key_value_heads,
        d_head=getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads,
        mlp_kinds=kinds, embed=f"{root}.embed_tokens", final_norm=f"{root}.norm", unembed=unembed,
        q_norm="q_norm", k_norm="k_norm",
    )


class Qwen3Adapter(Adapter):
    """``Qwen3ForCausalLM`` and ``Qwen3MoeForCausalLM``: the decoder is the root tower (``blocks.*``)."""

    architectures = ("Qwen3ForCausalLM", "Qwen3MoeForCausalLM")

    def build_graph(self) -> HookGraph:
        cfg = self.model.config
        return HookGraph(decoder_specs(qwen3_layout(cfg)), model_name=type(self.model).__name__)
