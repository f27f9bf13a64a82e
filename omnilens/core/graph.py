"""The named hook graph: one :class:`HookSpec` per site, collected in a :class:`HookGraph`.

Adapters build the graph; everything else reads meaning (tower, layer, component, axes) from the
specs, never from the name string.
"""

from __future__ import annotations

import difflib
import fnmatch
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from omnilens.core.errors import HookError
from omnilens.core.views import IDENTITY, View

Port = Literal["input", "output"]


@dataclass(frozen=True)
class HookSpec:
    """One named site of the hook graph.

    Attributes:
        name: TransformerLens-style name, e.g. ``blocks.3.attn.hook_z``.
        tower: the tower the site belongs to (``""`` for the main language decoder, ``"vision"``, ...).
        layer: block index inside the tower, or ``None`` for sites outside the blocks.
        component: the part of the block (``"resid"``, ``"attn"``, ``"mlp"``, ``"ln1"``, ``"embed"``, ...).
        site: the leaf hook name (``"hook_z"``).
        axes: space-separated axis names of the viewed tensor, e.g. ``"batch pos head d_head"``.
        module: dotted path of the Hugging Face module the site lives on.
        port: ``"input"`` (first tensor argument) or ``"output"`` of that module.
        view: turns the raw module tensor into the named view and back (see :mod:`omnilens.core.views`).
        doc: one-line description.
        inplace: writes replace the tensor's contents in place (sites whose tensor is also kept
            elsewhere by the forward, such as ``hook_resid_mid`` feeding both ``ln2`` and the residual).
        opt_in: excluded from the default "all sites" selection (extra compute or memory).
        requires: instrumentation the adapter must install for the site to fire (e.g. attention points).
    """

    name: str
    tower: str
    layer: int | None
    component: str
    site: str
    axes: str
    module: str
    port: Port = "output"
    view: View = IDENTITY
    doc: str = ""
    inplace: bool = False
    opt_in: bool = False
    requires: frozenset[str] = field(default_factory=frozenset)

    @property
    def axis_names(self) -> tuple[str, ...]:
        """The axes as a tuple, e.g. ``("batch", "pos", "head", "d_head")``."""
        return tuple(self.axes.split())

    def axis(self, name: str) -> int | None:
        """Index of axis ``name`` in the viewed tensor, or ``None`` if the site has no such axis."""
        names = self.axis_names
        return names.index(name) if name in names else None

    def check_shape(self, expected: torch.Size, actual: Any) -> None:
        """Raise :class:`~omnilens.core.errors.HookError` unless ``actual`` is a tensor of shape ``expected``."""
        if not isinstance(actual, torch.Tensor):
            raise HookError(self.name, f"a tensor of shape {tuple(expected)} [{self.axes}]", type(actual).__name__)
        if actual.shape != expected:
            raise HookError(self.name, f"shape {tuple(expected)} [{self.axes}]", f"shape {tuple(actual.shape)}")


class HookGraph:
    """An ordered collection of :class:`HookSpec`, in forward order.

    ``graph.names("blocks.*.attn.hook_z")`` filters with shell-style globs; ``graph["name"]`` looks a
    spec up and raises a ``KeyError`` listing the closest valid names when it is unknown.
    """

    def __init__(self, specs: Iterable[HookSpec], *, model_name: str = "", notes: Iterable[str] = ()):
        self._specs: dict[str, HookSpec] = {}
        for spec in specs:
            if spec.name in self._specs:
                raise ValueError(f"duplicate hook name {spec.name!r}")
            self._specs[spec.name] = spec
        self._order = {name: i for i, name in enumerate(self._specs)}
        self.model_name = model_name
        self.notes = tuple(notes)

    # lookup -------------------------------------------------------------------------------
    def __contains__(self, name: object) -> bool:
        return name in self._specs

    def __getitem__(self, name: str) -> HookSpec:
        try:
            return self._specs[name]
        except KeyError:
            close = difflib.get_close_matches(name, list(self._specs), n=5, cutoff=0.5)
            hint = f"; closest valid names: {', '.join(close)}" if close else ""
            raise KeyError(f"unknown hook name {name!r} for {self.model_name or 'this model'}{hint}") from None

    def __iter__(self) -> Iterator[HookSpec]:
        return iter(self._specs.values())

    def __len__(self) -> int:
        return len(self._specs)

    def order(self, name: str) -> int:
        """Position of ``name`` in forward order."""
        return self._order[self[name].name]

    @property
    def towers(self) -> list[str]:
        """Tower names in forward order (``""`` is the main language decoder)."""
        return list(dict.fromkeys(spec.tower for spec in self))

    def n_layers(self, tower: str = "") -> int:
        """Number of blocks in ``tower``."""
        layers = [s.layer for s in self if s.tower == tower and s.layer is not None]
        return max(layers) + 1 if layers else 0

    # selection ----------------------------------------------------------------------------
    def names(
        self,
        pattern: str | Iterable[str] | Callable[[str], bool] | None = None,
        *,
        include_opt_in: bool | None = None,
    ) -> list[str]:
        """Names matching ``pattern`` in forward order.

        ``pattern`` is a glob (``"blocks.*.hook_resid_post"``), an exact name, a list of either, or a
        predicate on names; ``None`` selects every site. Opt-in sites (e.g. ``attn.hook_result``) are
        included when named exactly, when ``include_opt_in=True``, or (``include_opt_in=None``) when
        a glob matches nothing but opt-in sites; ``include_opt_in=False`` leaves them out of globs.
        A pattern that matches no site raises ``KeyError`` with the closest names.
        """
        if pattern is None:
            return [s.name for s in self if include_opt_in or not s.opt_in]
        if callable(pattern):
            return [s.name for s in self if pattern(s.name) and (include_opt_in or not s.opt_in)]
        patterns = [pattern] if isinstance(pattern, str) else list(pattern)
        selected: set[str] = set()
        for pat in patterns:
            if pat in self._specs:
                selected.add(pat)
                continue
            hits = [s.name for s in self if fnmatch.fnmatchcase(s.name, pat)]
            only_opt_in = include_opt_in is None and all(self._specs[h].opt_in for h in hits)
            hits = [h for h in hits if include_opt_in or only_opt_in or not self._specs[h].opt_in]
            if not hits:
                self[pat]  # raises KeyError with suggestions
            selected.update(hits)
        return sorted(selected, key=self._order.__getitem__)

    def specs(self, pattern: str | Iterable[str] | Callable[[str], bool] | None = None, **kw: Any) -> list[HookSpec]:
        """Like :meth:`names`, returning the specs."""
        return [self._specs[n] for n in self.names(pattern, **kw)]

    # description --------------------------------------------------------------------------
    def describe(self, name: str | None = None) -> str:
        """A readable description of one site, or a table of towers and site kinds when ``name`` is None."""
        if name is not None:
            s = self[name]
            lines = [
                f"{s.name}",
                f"  tower     : {s.tower or '(main language decoder)'}",
                f"  layer     : {s.layer}",
                f"  component : {s.component}",
                f"  axes      : [{s.axes}]",
                f"  module    : {s.module} ({s.port}{', in place' if s.inplace else ''})",
                f"  view      : {s.view}",
            ]
            if s.opt_in:
                lines.append("  opt-in    : yes (name it explicitly to read or write it)")
            if s.requires:
                lines.append(f"  requires  : {', '.join(sorted(s.requires))}")
            lines.append(f"  doc       : {s.doc}")
            return "\n".join(lines)
        out = [f"HookGraph for {self.model_name or 'model'}: {len(self)} sites"]
        for tower in self.towers:
            specs = [s for s in self if s.tower == tower]
            n_layers = self.n_layers(tower)
            title = tower or "(root) main language decoder"
            out.append(f"\n{title}: {len(specs)} sites, {n_layers} blocks")
            kinds: dict[str, HookSpec] = {}
            for s in specs:
                key = s.name if s.layer is None else _block_pattern(s)
                kinds.setdefault(key, s)
            width = max(len(k) for k in kinds)
            axes_width = max(len(s.axes) for s in kinds.values()) + 2
            for key, s in kinds.items():
                flag = " (opt-in)" if s.opt_in else ""
                out.append(f"  {key:<{width}}  {f'[{s.axes}]':<{axes_width}}{flag}  {s.doc}")
        if self.notes:
            out.append("\nNotes:")
            out.extend(f"  - {n}" for n in self.notes)
        return "\n".join(out)

    def __repr__(self) -> str:
        return f"HookGraph({self.model_name!r}, {len(self)} sites, towers={self.towers})"


def _block_pattern(spec: HookSpec) -> str:
    """The spec's name with its layer index shown as ``{i}`` (built from the spec's fields)."""
    prefix = f"{spec.tower}.blocks" if spec.tower else "blocks"
    head = f"{prefix}.{spec.layer}."
    return f"{prefix}.{{i}}." + spec.name[len(head):]
