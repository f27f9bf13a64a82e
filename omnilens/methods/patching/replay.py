"""Replay a decoder tower from block ``L``: patched copies skip the work the base run already did.

Blocks before a chunk's first patched layer compute the same values for every stacked copy, so
exact patching on the local executor runs them once (the base run) and replays only blocks ``L..``,
the final norm and the unembedding on the stacked copies. With causal attention, positions before a
chunk's first patched position are unchanged too: a *suffix* replay recomputes positions ``p..`` only,
the earlier ones attending through the base run's keys and values (a stand-in cache). The replay calls
the very modules (so every hook at their sites fires) with the arguments captured from the base run's
calls, repeated per copy.

This reaches into the modules behind the graph's sites (block = ``hook_resid_pre``'s module, final
norm, unembedding), so it checks itself before use: the base run must be a plain chain (block ``i + 1``
receives block ``i``'s output, the final norm the last block's, the unembedding the norm's, and the model
returns the unembedding's output), and replaying the last block (whole, and from the middle position)
must reproduce the base logits. Otherwise patching runs full forwards (or whole-sequence replays).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
import inspect
from typing import Any

import torch

# Hugging Face renamed the decoder layer's cache argument (``past_key_values`` -> ``cache``, transformers 5.24)
_CACHE_ARGS = ("cache", "past_key_values")


@dataclass
class _Call:
    args: tuple
    kwargs: dict
    output: Any = None


@dataclass
class TowerReplay:
    """Block, final-norm and unembedding modules of one tower, with their calls in the base run."""

    blocks: list[torch.nn.Module]
    norm: torch.nn.Module
    unembed: torch.nn.Module
    calls: dict[int, _Call]
    rows: int
    suffixable: bool = False
    _past: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None

    @classmethod
    def modules(cls, lens, tower: str) -> tuple[list[torch.nn.Module], torch.nn.Module, torch.nn.Module] | None:
        """The tower's blocks (from ``hook_resid_pre``), final norm and unembedding modules, if it has all."""
        specs = [s for s in lens.graph if s.tower == tower]
        pre = sorted((s for s in specs if s.site == "hook_resid_pre" and s.port == "input"), key=lambda s: s.layer)
        norm = next((s for s in specs if s.component == "ln_final"), None)
        unembed = next((s for s in specs if s.site == "hook_logits"), None)
        if not pre or norm is None or unembed is None or [s.layer for s in pre] != list(range(len(pre))):
            return None
        return [lens.adapter.module(s.module) for s in pre], lens.adapter.module(norm.module), \
            lens.adapter.module(unembed.module)

    @classmethod
    @contextmanager
    def capture(cls, lens, tower: str, rows: int) -> Iterator[list[TowerReplay | None]]:
        """Record the calls of the tower's modules during the block; yields ``[replay or None]``, filled on exit
        with a replay when the recorded calls form a plain chain."""
        found = cls.modules(lens, tower)
        box: list[TowerReplay | None] = [None]
        if found is None:
            yield box
            return
        blocks, norm, unembed = found
        calls: dict[int, _Call] = {}
        handles = []
        for i, mod in enumerate([*blocks, norm, unembed]):
            handles.append(mod.register_forward_pre_hook(_pre(calls, i), with_kwargs=True))
            handles.append(mod.register_forward_hook(_post(calls, i)))
        try:
            yield box
        finally:
            for h in handles:
                h.remove()
        box[0] = cls(blocks, norm, unembed, calls, rows) if _is_chain(calls, len(blocks)) else None

    def verify(self, logits: torch.Tensor) -> bool:
        """Whether the model's logits are the unembedding's output of the base run, and replaying the last
        block on two copies reproduces them (the captured arguments repeat correctly per copy). Also decides
        whether suffix replays work (:meth:`run` with ``suffix``): the last block replayed from the middle
        position must reproduce the base logits there."""
        if not torch.equal(self.calls[len(self.blocks) + 1].output, logits):
            return False
        tile = logits.repeat(2, *([1] * (logits.dim() - 1)))
        if not _close(lambda: self.run(len(self.blocks) - 1, 2), tile):
            return False
        half = logits.shape[1] // 2
        self.suffixable = half > 0 and _close(lambda: self.run(len(self.blocks) - 1, 2, suffix=half), tile[:, half:])
        return True

    def run(self, start: int, copies: int, last: int | None = None, suffix: int = 0) -> torch.Tensor:
        """Logits ``[copies * rows, pos, vocab]`` from replaying blocks ``start..`` on ``copies`` stacked copies.

        ``last=k`` unembeds only the last ``k`` positions. ``suffix=p`` recomputes only positions ``p..``
        (``[copies * rows, pos - p, vocab]``): earlier positions attend as in the base run, through its
        keys and values (causal attention: a patch at position ``>= p`` cannot change them).
        """
        n = len(self.blocks)
        hidden = _repeat(self.calls[start].args[0][:, suffix:], copies, self.rows)
        past = _Past(self.past(), suffix, copies, self.rows) if suffix else None
        for i in range(start, n):
            call = self.calls[i]
            kwargs = _repeat(call.kwargs, copies, self.rows)
            if suffix:
                kwargs = with_cache(_suffix_kwargs(kwargs, suffix, hidden), self.blocks[i], past)
            hidden = self.blocks[i](hidden, *_repeat(call.args[1:], copies, self.rows), **kwargs)
        normed = self.norm(hidden, *_repeat(self.calls[n].args[1:], copies, self.rows))
        return self.unembed(normed if last is None else normed[:, -last:])

    def past(self) -> dict[int, tuple[torch.Tensor, torch.Tensor]]:
        """Keys and values ``[rows kv_head pos d_head]`` of every block in the base run (recorded once, by
        replaying the base through a recording cache)."""
        if self._past is None:
            record = _Record()
            hidden = self.calls[0].args[0]
            with torch.no_grad():
                for i, block in enumerate(self.blocks):
                    call = self.calls[i]
                    hidden = block(hidden, *call.args[1:], **with_cache(call.kwargs, block, record))
            self._past = record.kv
        return self._past


class _Record:
    """A stand-in cache that records each layer's keys and values and returns them unchanged."""

    def __init__(self):
        self.kv: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def update(self, key, value, layer_idx, *args, **kwargs):
        self.kv[layer_idx] = (key, value)
        return key, value


class _Past:
    """A stand-in cache holding the base run's keys and values before position ``p`` (per copy)."""

    def __init__(self, kv: dict[int, tuple[torch.Tensor, torch.Tensor]], p: int, copies: int, rows: int):
        self.kv, self.p, self.copies, self.rows = kv, p, copies, rows

    def update(self, key, value, layer_idx, *args, **kwargs):
        k, v = (_repeat(t[:, :, :self.p], self.copies, self.rows) for t in self.kv[layer_idx])
        return torch.cat([k, key], -2), torch.cat([v, value], -2)


def with_cache(kwargs: dict[str, Any], block: torch.nn.Module, cache: Any) -> dict[str, Any]:
    """``kwargs`` with ``cache`` passed under the name ``block.forward`` takes it by (read from its signature;
    any other spelling dropped)."""
    params = inspect.signature(block.forward).parameters
    name = next((n for n in _CACHE_ARGS if n in params), None)
    if name is None:
        raise TypeError(f"{type(block).__name__}.forward takes no cache argument (expected one of "
                        f"{_CACHE_ARGS}); its parameters: {list(params)}")
    return {**{k: v for k, v in kwargs.items() if k not in _CACHE_ARGS}, name: cache}


def _suffix_kwargs(kwargs: dict[str, Any], p: int, hidden: torch.Tensor) -> dict[str, Any]:
    """Block keyword arguments for positions ``p..`` (Hugging Face conventions: rotary ``position_embeddings``
    ``(cos, sin)`` ``[.. pos d]``, ``position_ids`` / ``cache_position`` ``[.. pos]``, a 4-D additive or
    boolean ``attention_mask`` ``[batch 1 query key]`` or ``None`` for causal)."""
    out = dict(kwargs)
    if out.get("position_embeddings") is not None:
        out["position_embeddings"] = tuple(t[..., p:, :] for t in out["position_embeddings"])
    for key in ("position_ids", "cache_position"):
        if isinstance(out.get(key), torch.Tensor):
            out[key] = out[key][..., p:]
    mask = out.get("attention_mask")
    if mask is None:
        total = p + hidden.shape[1]
        allowed = torch.ones(total, total, dtype=torch.bool, device=hidden.device).tril()[p:]
        mask = torch.zeros(allowed.shape, dtype=hidden.dtype, device=hidden.device).masked_fill(
            ~allowed, torch.finfo(hidden.dtype).min)[None, None]
    else:
        mask = mask[:, :, p:, :]
    out["attention_mask"] = mask
    return out


def _close(make, expected: torch.Tensor) -> bool:
    try:
        with torch.no_grad():
            got = make()
    except (RuntimeError, ValueError, IndexError, TypeError, AttributeError):
        return False
    return got.shape == expected.shape and bool(torch.allclose(got, expected, atol=1e-5, rtol=1e-5))


def _pre(calls: dict[int, _Call], i: int):
    def hook(module, args, kwargs):
        calls[i] = _Call(args, kwargs)
    return hook


def _post(calls: dict[int, _Call], i: int):
    def hook(module, args, output):
        calls[i].output = output
    return hook


def _is_chain(calls: dict[int, _Call], n: int) -> bool:
    """Each module called once, with a tensor first argument equal to the previous module's output."""
    if sorted(calls) != list(range(n + 2)):
        return False
    for i in range(n + 2):
        c = calls[i]
        if not c.args or not isinstance(c.args[0], torch.Tensor) or not isinstance(c.output, torch.Tensor):
            return False
        prev = calls[i - 1].output if i else None
        if i and c.args[0] is not prev and (c.args[0].shape != prev.shape or not torch.equal(c.args[0], prev)):
            return False
    return True


def _repeat(value: Any, copies: int, rows: int) -> Any:
    """Tensors with a leading ``rows`` axis repeated ``copies`` times (copy-major), through tuples and dicts."""
    if isinstance(value, torch.Tensor):
        if value.dim() and value.shape[0] == rows and copies > 1:
            return value.repeat(copies, *([1] * (value.dim() - 1)))
        return value
    if isinstance(value, tuple):
        return tuple(_repeat(v, copies, rows) for v in value)
    if isinstance(value, list):
        return [_repeat(v, copies, rows) for v in value]
    if isinstance(value, dict):
        return {k: _repeat(v, copies, rows) for k, v in value.items()}
    return value
