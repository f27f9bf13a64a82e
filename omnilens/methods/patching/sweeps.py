"""Sweep definitions: which site, over which axes, with which labels; resolved into cells.

A :class:`Sweep` names a block site by its leaf (``"hook_resid_pre"``, ``"hook_z"``, ``"hook_k"``,
``"hook_pattern"``...) in one tower, and the axes it runs over (``by``): ``"layer"`` plus any of
``"pos"`` (the site's position axis: ``pos``, ``query`` for patterns, ``patch``/``frame`` for packed
encoders), ``"head"`` (``kv_head`` on key/value sites, so GQA sweeps kv heads). ``spans`` replaces
single positions by named token spans (e.g. ``{"image 1": range(3, 19), "text": [0, 1, 2]}``), so the
same sweep covers vision/audio tokens of multimodal towers. Each cell patches one site on one block.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from omnilens.core.graph import HookGraph, HookSpec
from omnilens.core.types import HEAD_AXES, POS_AXES


@dataclass(frozen=True)
class Cell:
    """One patch: the result index it fills, the site and the selection (site axis -> indices)."""

    index: tuple[int, ...]
    site: str
    select: Mapping[str, tuple[int, ...]]


@dataclass(frozen=True)
class Grid:
    """A resolved sweep: result axes, their labels, the site per layer and every cell."""

    axes: tuple[str, ...]
    labels: Mapping[str, tuple[str, ...]]
    sites: tuple[str, ...]
    cells: tuple[Cell, ...]

    @property
    def shape(self) -> tuple[int, ...]:
        """Sizes of the grid's axes, in ``axes`` order."""
        return tuple(len(self.labels[a]) for a in self.axes)


@dataclass(frozen=True)
class Sweep:
    """Patch ``site`` (a block site's leaf name) over ``by`` axes in ``tower``.

    ``component`` disambiguates leaves shared by several components (``"ln1"``/``"ln2"`` for
    ``hook_normalized``). ``layers`` restricts the layers; ``spans`` groups positions.
    """

    site: str
    by: tuple[str, ...] = ("layer", "pos")
    tower: str = ""
    component: str | None = None
    layers: Sequence[int] | None = None
    spans: Mapping[str, Sequence[int]] | None = None

    def specs(self, graph: HookGraph) -> list[HookSpec]:
        """The block specs of the sweep, one per layer, in layer order."""
        specs = [s for s in graph if s.tower == self.tower and s.site == self.site and s.layer is not None
                 and (self.component is None or s.component == self.component)]
        if not specs:
            kinds = sorted({s.site for s in graph if s.tower == self.tower and s.layer is not None})
            raise KeyError(f"no block site {self.site!r} in tower {self.tower or '(root)'!r}; "
                           f"block sites: {', '.join(kinds)}")
        if len({s.layer for s in specs}) != len(specs):
            comps = sorted({s.component for s in specs})
            raise KeyError(f"site {self.site!r} is ambiguous in tower {self.tower or '(root)'!r}; "
                           f"pass component= one of {comps}")
        n = len(specs)
        layers = range(n) if self.layers is None else list(self.layers)
        bad = [i for i in layers if not -n <= i < n]
        if bad:
            raise IndexError(f"sweep over {self.site!r}: layers {bad} out of range [0, {n})")
        by_layer = {s.layer: s for s in specs}
        return [by_layer[sorted(by_layer)[i]] for i in layers]

    def resolve(self, graph: HookGraph, sizes: Mapping[str, Mapping[str, int]]) -> Grid:
        """Cells of the sweep; ``sizes[site][axis]`` gives each swept axis's length.

        Raises ``ValueError``/``IndexError`` naming the site and axis for unknown axes or spans out of range.
        """
        if not self.by or self.by[0] != "layer":
            raise ValueError(f"sweep axes must start with 'layer', got {self.by}")
        specs = self.specs(graph)
        spec_axes = [_site_axes(s, self.by[1:]) for s in specs]
        out_axes = ("layer",) + tuple("span" if (a in POS_AXES and self.spans is not None) else a
                                      for a in spec_axes[0])
        labels: dict[str, tuple[str, ...]] = {"layer": tuple(str(s.layer) for s in specs)}
        choices: list[list[tuple[str, tuple[int, ...]]]] = []
        for k, axis in enumerate(spec_axes[0]):
            size = min(sizes[s.name][spec_axes[j][k]] for j, s in enumerate(specs))
            if axis in POS_AXES and self.spans is not None:
                opts = [(name, _check_span(self.site, name, pos, size)) for name, pos in self.spans.items()]
            else:
                opts = [(str(i), (i,)) for i in range(size)]
            labels[out_axes[k + 1]] = tuple(o[0] for o in opts)
            choices.append(opts)
        cells = []
        for li, spec in enumerate(specs):
            for combo in itertools.product(*(list(enumerate(c)) for c in choices)):
                select = {spec_axes[li][k]: opt[1] for k, (_, opt) in enumerate(combo)}
                cells.append(Cell((li,) + tuple(i for i, _ in combo), spec.name, select))
        return Grid(out_axes, labels, tuple(s.name for s in specs), tuple(cells))


def _site_axes(spec: HookSpec, by: Sequence[str]) -> tuple[str, ...]:
    """The site axes the sweep axes ``by`` map to (``pos`` -> pos/query/patch/frame, ``head`` -> head/kv_head)."""
    out = []
    for want in by:
        options = POS_AXES if want in POS_AXES else HEAD_AXES if want in HEAD_AXES else (want,)
        found = next((a for a in options if spec.axis(a) is not None), None)
        if found is None:
            raise ValueError(f"cannot sweep {spec.name} by {want!r}: its axes are [{spec.axes}]")
        out.append(found)
    return tuple(out)


def _check_span(site: str, name: str, positions: Sequence[int], size: int) -> tuple[int, ...]:
    pos = tuple(int(p) for p in positions)
    bad = [p for p in pos if not 0 <= p < size]
    if not pos or bad:
        raise IndexError(f"sweep over {site!r}: span {name!r} has positions {bad or 'none'} outside [0, {size})")
    return pos


def known_sizes(graph: HookGraph, spec: HookSpec, seq_len: int | None) -> dict[str, int]:
    """Axis lengths of ``spec`` known before any forward: positions from the input, heads from the
    head-splitting views of the block's sites (``hook_q`` for ``head``, ``hook_k`` for ``kv_head``)."""
    sizes: dict[str, int] = {}
    for axis in spec.axis_names:
        if axis in ("pos", "query", "key") and seq_len is not None:
            sizes[axis] = seq_len
        elif axis in HEAD_AXES:
            for s in graph:
                n = getattr(s.view, "n_heads", None)
                if s.tower == spec.tower and s.layer == spec.layer and n is not None and s.axis(axis) is not None:
                    sizes[axis] = n
                    break
    return sizes
