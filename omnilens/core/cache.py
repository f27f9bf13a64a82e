"""ActivationCache: a mapping from site name to activation, with the specs that give it meaning."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch

from omnilens.core.graph import HookGraph, HookSpec


class ActivationCache(Mapping[str, Any]):
    """Cached activations keyed by hook name, in forward order.

    ``cache[name]`` is a tensor shaped by the site's axes (``cache.spec(name).axes``). A site visited
    several times in one run (generation) holds one tensor per visit: ``cache[name]`` is then a list
    and ``cache.steps(name)`` returns it in every case. ``meta`` carries run metadata (e.g. segment
    offsets of packed encoder towers, generation nesting).
    """

    def __init__(self, values: Mapping[str, list[torch.Tensor]], graph: HookGraph, meta: dict | None = None):
        self._values = values  # live: a cache yielded by ``Lens.hooks`` fills while the model runs
        self.graph = graph
        self.meta = dict(meta or {})

    def __getitem__(self, name: str) -> Any:
        if name not in self._values:
            if name in self.graph:
                raise KeyError(f"{name!r} was not cached in this run; cached: {len(self)} sites "
                               f"(pass names=... to run_with_cache to select it)")
            self.graph[name]  # raises with suggestions
        visits = self._values[name]
        return visits[0] if len(visits) == 1 else visits

    def __iter__(self) -> Iterator[str]:
        return iter(sorted(self._values, key=self.graph.order))

    def __len__(self) -> int:
        return len(self._values)

    def steps(self, name: str) -> list[torch.Tensor]:
        """Every visit of ``name`` in order (one entry per forward call of its module)."""
        self[name]
        return list(self._values[name])

    def spec(self, name: str) -> HookSpec:
        """The :class:`HookSpec` of a cached site."""
        return self.graph[name]

    def stack(self, pattern: str) -> torch.Tensor:
        """Stack the cached sites matching ``pattern`` along a new leading ``site`` axis.

        E.g. ``cache.stack("blocks.*.hook_resid_post")`` -> ``[layer batch pos d_model]``.
        """
        names = [n for n in self.graph.names(pattern) if n in self._values]
        if not names:
            raise KeyError(f"no cached site matches {pattern!r}")
        multi = [n for n in names if len(self._values[n]) != 1]
        if multi:
            raise ValueError(f"cannot stack sites visited several times in this run ({', '.join(multi[:3])}"
                             f"{', ...' if len(multi) > 3 else ''}); stack cache.steps(name) per site instead")
        return torch.stack([self[n] for n in names])

    def to(self, device: str | torch.device) -> ActivationCache:
        """A copy with every tensor moved to ``device``."""
        return ActivationCache({n: [v.to(device) for v in vs] for n, vs in self._values.items()}, self.graph, self.meta)

    def __repr__(self) -> str:
        return f"ActivationCache({len(self)} sites)"
