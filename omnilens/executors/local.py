"""The local executor: plain PyTorch forward hooks, the fast default."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from omnilens.adapters.base import Adapter
from omnilens.core.errors import HookError
from omnilens.executors.base import Read, RunResult, SiteTask, Write, serve_site, site_tasks
from omnilens.core.views import CallContext


class LocalExecutor:
    """Registers one hook per (module, port) for the requested sites; removes them on exit."""

    def __init__(self, adapter: Adapter):
        self.adapter = adapter

    def run(self, inputs: dict[str, Any], reads: Sequence[Read], writes: Sequence[Write], *,
            method: str = "forward", **kwargs: Any) -> RunResult:
        """Call ``model.<method>(**inputs, **kwargs)`` with the reads and writes attached."""
        with self.attach(reads, writes) as values:
            output = getattr(self.adapter.model, method)(**inputs, **kwargs)
        return RunResult(output, dict(values))

    @contextmanager
    def attach(self, reads: Sequence[Read], writes: Sequence[Write]) -> Iterator[dict[str, list[torch.Tensor]]]:
        """Attach reads and writes for the duration of the block; yields the per-site values."""
        tasks = site_tasks(self.adapter.graph, reads, writes)
        groups: dict[tuple[str, str], list[SiteTask]] = defaultdict(list)
        for task in tasks:
            groups[(task.spec.module, task.spec.port)].append(task)
        values: dict[str, list[torch.Tensor]] = defaultdict(list)
        visits: dict[str, int] = defaultdict(int)
        guard_reads = bool(writes)
        handles = []

        def process(site_list: list[SiteTask], raw: Any, ctx: CallContext) -> tuple[Any, bool]:
            changed = False
            for site in site_list:
                name = site.spec.name
                step = visits[name]
                visits[name] = step + 1
                raw, hit = serve_site(site.spec, raw, ctx, site.reads, site.writes, step, values,
                                      guard_reads=guard_reads)
                changed = changed or hit
            return raw, changed

        def output_hook(site_list):
            def hook(module, args, output):
                raw, changed = process(site_list, output, CallContext(module, args, output))
                return raw if changed else None
            return hook

        def input_hook(site_list):
            def hook(module, args, kwargs):
                if args:
                    raw, changed = process(site_list, args[0], CallContext(module, args))
                    return ((raw, *args[1:]), kwargs) if changed else None
                key = next((k for k, v in kwargs.items() if isinstance(v, torch.Tensor)), None)
                if key is None:
                    raise HookError(site_list[0].spec.name, "a tensor argument to the hooked module",
                                    f"arguments {sorted(kwargs)} with no tensor")
                raw, changed = process(site_list, kwargs[key], CallContext(module, (kwargs[key],)))
                return (args, {**kwargs, key: raw}) if changed else None
            return hook

        with self.adapter.instrument([task.spec for task in tasks]):
            try:
                for (path, port), site_list in groups.items():
                    module = self.adapter.module(path)
                    if port == "output":
                        hook = _ours(output_hook(site_list))
                        handles.append(module.register_forward_hook(hook))
                        _ahead_of_foreign(module._forward_hooks)
                    else:
                        hook = _ours(input_hook(site_list))
                        handles.append(module.register_forward_pre_hook(hook, with_kwargs=True))
                        _ahead_of_foreign(module._forward_pre_hooks)
                yield values
            finally:
                for h in handles:
                    h.remove()


def _ours(hook):
    hook._omnilens = True
    return hook


def _ahead_of_foreign(hooks: dict) -> None:
    """Order a module's hooks: omnilens hooks first (in registration order), then everyone else's, so that
    hooks installed by others (Hugging Face's output recorders, installed lazily on a first call) see the
    writes on every call."""
    items = list(hooks.items())
    ordered = [kv for kv in items if getattr(kv[1], "_omnilens", False)] + \
              [kv for kv in items if not getattr(kv[1], "_omnilens", False)]
    hooks.clear()
    hooks.update(ordered)

