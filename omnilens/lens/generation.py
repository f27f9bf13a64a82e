"""Generation with reads and writes on the hook graph.

``Lens.generate`` runs the model's ``generate`` through an executor with the requested reads and
writes attached for the whole call. Every visit of a site is one step: ``cache.steps(name)`` lists
them in order (the Thinker's prefill first, then one per new token; an encoder tower is visited in the
prefill only). ``Write.steps`` selects visits; ``None`` writes every visit.

How visits nest is recorded in ``cache.meta["generation"]`` from the forward calls of each tower's
step module (the adapter's :class:`~omnilens.adapters.base.GenerationPlan`):

* ``towers[name]``: ``{"module": path, "calls": n}``; a site inside a tower's forward is visited once
  per call, so its visit ``k`` is that tower's call ``k``.
* ``nesting[child]``: ``{"parent": tower, "parent_step": [...], "inner_step": [...]}``, one entry per
  call of the nested tower: the parent call it follows and its index inside that parent step. For
  Qwen3-Omni, ``talker.code_predictor`` call ``k`` completes the codec frame of Talker step
  ``parent_step[k]`` and predicts codec group ``inner_step[k] + 1``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Float, Int

from omnilens.adapters.base import GenerationPlan
from omnilens.core.cache import ActivationCache
from omnilens.executors.base import HookFn, Read, Write, as_writes
from omnilens.core.graph import HookGraph

ReadsArg = str | Iterable[str | Read] | None
WritesArg = Iterable[Write | tuple[str, HookFn] | tuple[str, HookFn, Sequence[int] | None]]


@dataclass
class Generation:
    """What :meth:`Lens.generate` returns.

    Attributes:
        ids: prompt and generated token ids ``[batch pos]``.
        waveform: ``[batch channel sample]`` (batch of one) or a list of ``[sample]`` tensors (batched),
            ``None`` without audio output.
        cache: the read sites, one entry per visit (``cache.steps(name)``), with ``meta["generation"]``.
    """

    ids: Int[torch.Tensor, "batch pos"]
    waveform: Float[torch.Tensor, "batch channel sample"] | list[torch.Tensor] | None
    cache: ActivationCache


def generate(lens: Any, inputs: Any, *, reads: ReadsArg = None, writes: WritesArg = (),
             return_audio: bool | None = None, executor: str | None = None, **kwargs: Any) -> Generation:
    """Run ``generate`` on ``inputs`` with ``reads`` and ``writes`` attached to every step.

    Args:
        reads: site names or globs (or :class:`Read` objects) to cache at every visit; ``None`` caches none.
        writes: :class:`Write` objects, or ``(name_or_glob, fn)`` / ``(name_or_glob, fn, steps)`` tuples.
        return_audio: ask for the waveform (models with a Talker); raises before running otherwise.
        executor: ``"local"`` (default) or ``"nnsight"``.
        kwargs: generation options, mapped by the adapter (Qwen3-Omni: ``max_new_tokens``, ``speaker``,
            ``talker_max_new_tokens``, ...); greedy unless ``do_sample`` is given.
    """
    kw = lens.to_inputs(inputs)
    plan = lens.adapter.generation_plan(kw, return_audio=return_audio, **kwargs)
    read_list = _reads(lens.graph, reads)
    write_list = as_writes(lens.graph, writes)
    with _record_steps(lens.adapter.model, plan) as steps:
        res = lens.run(kw, read_list, write_list, executor=executor, method="generate", **plan.kwargs)
    ids, waveform = plan.unpack(res.output)
    meta = {**res.meta, "generation": {**steps, **plan.meta}}
    return Generation(ids, waveform, ActivationCache(res.values, lens.graph, meta))


def _reads(graph: HookGraph, reads: ReadsArg) -> list[Read]:
    if reads is None:
        return []
    if isinstance(reads, str):
        reads = [reads]
    out: list[Read] = []
    for r in reads:
        out += [r] if isinstance(r, Read) else [Read(n) for n in graph.names(r)]
    return out


@contextmanager
def _record_steps(model: torch.nn.Module, plan: GenerationPlan) -> Iterator[dict[str, Any]]:
    """Count the forward calls of each tower's step module and, for nested towers, their parent step."""
    calls = {tower: 0 for tower in plan.towers}
    nesting = {child: {"parent": parent, "parent_step": [], "inner_step": []} for child, parent in plan.parents.items()}
    since_parent = dict.fromkeys(plan.parents, 0)
    record: dict[str, Any] = {"towers": {}, "nesting": nesting}

    def pre_hook(tower: str):
        def hook(module, args):
            calls[tower] += 1
            for child in plan.parents:
                if plan.parents[child] == tower:
                    since_parent[child] = 0
            if tower in nesting:
                nesting[tower]["parent_step"].append(calls[plan.parents[tower]] - 1)
                nesting[tower]["inner_step"].append(since_parent[tower])
                since_parent[tower] += 1
        return hook

    handles = [model.get_submodule(path).register_forward_pre_hook(pre_hook(tower))
               for tower, path in plan.towers.items()]
    try:
        yield record
    finally:
        for h in handles:
            h.remove()
        record["towers"].update({t: {"module": p, "calls": calls[t]} for t, p in plan.towers.items()})
