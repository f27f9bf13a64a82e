"""Attention points: identity modules that expose what happens inside attention.

Rotated queries/keys and the attention pattern are computed inside Hugging Face's attention
function, not at a module boundary. While a run reads or writes such a site, omnilens

1. switches the model to eager attention (restored afterwards),
2. routes the ``"eager"`` attention function through :func:`pointed_eager_attention`, which performs
   exactly the operations of Hugging Face's eager attention and passes the rotated queries, rotated
   keys and the softmax pattern through :class:`HookPoint` modules attached to each attention module
   (``hook_rot_q``, ``hook_rot_k``, ``hook_pattern``),
3. removes the points and the routing on exit, exceptions included.

Because the points are modules, every executor reads and writes them like any other site.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

POINT_NAMES = ("hook_rot_q", "hook_rot_k", "hook_pattern")
_lock = threading.RLock()
_depth = 0
_previous_eager = None  # an "eager" entry that was registered before the outermost run, restored after it


class HookPoint(nn.Module):
    """An identity module: a place for hooks to read and write a tensor."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def _repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    if n_rep == 1:
        return x
    b, h, s, d = x.shape
    return x[:, :, None, :, :].expand(b, h, n_rep, s, d).reshape(b, h * n_rep, s, d)


def pointed_eager_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Hugging Face eager attention, with the rotated q/k and the pattern passed through hook points.

    ``query`` ``[batch head q_pos d_head]``, ``key``/``value`` ``[batch kv_head k_pos d_head]``.
    Modules without attached points (or calls outside an instrumented run) behave as plain eager.
    """
    points = getattr(module, "hook_pattern", None)
    if points is not None:
        query = module.hook_rot_q(query)
        key = module.hook_rot_k(key)
    n_rep = query.shape[1] // key.shape[1]
    key_states = _repeat_kv(key, n_rep)
    value_states = _repeat_kv(value, n_rep)
    attn_weights = torch.matmul(query, key_states.transpose(2, 3)) * scaling
    if attention_mask is not None:
        attn_weights = attn_weights + attention_mask
    attn_weights = nn.functional.softmax(attn_weights, dim=-1, dtype=torch.float32).to(query.dtype)
    if points is not None:
        attn_weights = module.hook_pattern(attn_weights)
    attn_weights = nn.functional.dropout(attn_weights, p=dropout, training=module.training)
    attn_output = torch.matmul(attn_weights, value_states)
    attn_output = attn_output.transpose(1, 2).contiguous()
    return attn_output, attn_weights


def _eager_configs(model: nn.Module) -> list:
    """Every config reachable from the model's modules (composite models have one per tower)."""
    seen: dict[int, object] = {}
    for mod in model.modules():
        cfg = getattr(mod, "config", None)
        if cfg is not None and hasattr(cfg, "_attn_implementation_internal"):
            seen.setdefault(id(cfg), cfg)
    return list(seen.values())


@contextmanager
def attention_points(model: nn.Module, attention_modules: Iterable[nn.Module]) -> Iterator[None]:
    """Attach hook points to ``attention_modules`` and run ``model`` with pointed eager attention.

    Restores the model's attention implementation and removes the points on exit.
    """
    global _depth, _previous_eager
    modules = list(attention_modules)
    configs = _eager_configs(model)
    saved = [(cfg, cfg._attn_implementation_internal) for cfg in configs]
    with _lock:
        added = []
        for mod in modules:
            if getattr(mod, "hook_pattern", None) is None:
                for name in POINT_NAMES:
                    mod.add_module(name, HookPoint())
                added.append(mod)
        if _depth == 0:
            _previous_eager = ALL_ATTENTION_FUNCTIONS.get("eager")
            ALL_ATTENTION_FUNCTIONS["eager"] = pointed_eager_attention
        _depth += 1
        try:
            for cfg, _ in saved:
                cfg._attn_implementation_internal = "eager"
            yield
        finally:
            for cfg, impl in saved:
                cfg._attn_implementation_internal = impl
            _depth -= 1
            if _depth == 0:
                del ALL_ATTENTION_FUNCTIONS["eager"]
                if _previous_eager is not None:
                    ALL_ATTENTION_FUNCTIONS["eager"] = _previous_eager
            for mod in added:
                for name in POINT_NAMES:
                    delattr(mod, name)
