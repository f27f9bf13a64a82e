"""Replay a decoder tower from block ``L``: patched copies skip the blocks before the first patch.

Blocks before a chunk's first patched layer compute the same values for every stacked copy, so
exact patching on the local executor runs them once (the base run) and replays only blocks ``L..``,
the final norm and the unembedding on the stacked copies. The replay calls the very modules (and so
fires every hook at their sites) with the arguments captured from the base run's calls, repeated per
copy. It is used only after the base run proved that the tower is a plain chain (block ``i + 1``
receives block ``i``'s output, the final norm the last block's, the unembedding the norm's, and the
model returns the unembedding's output); otherwise patching runs full forwards.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch


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

    def check_output(self, logits: torch.Tensor) -> bool:
        """Whether the model's logits are the unembedding's output of the base run."""
        return torch.equal(self.calls[len(self.blocks) + 1].output, logits)

    def run(self, start: int, copies: int, last: int | None = None) -> torch.Tensor:
        """Logits ``[copies * rows, pos, vocab]`` from replaying blocks ``start..`` on ``copies`` stacked copies;
        ``last=k`` unembeds only the last ``k`` positions (``[copies * rows, k, vocab]``)."""
        n = len(self.blocks)
        hidden = _repeat(self.calls[start].args[0], copies, self.rows)
        for i in range(start, n):
            call = self.calls[i]
            hidden = self.blocks[i](hidden, *_repeat(call.args[1:], copies, self.rows),
                                    **_repeat(call.kwargs, copies, self.rows))
        normed = self.norm(hidden, *_repeat(self.calls[n].args[1:], copies, self.rows))
        return self.unembed(normed if last is None else normed[:, -last:])


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
