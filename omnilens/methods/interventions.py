"""Interventions as data: patch, add a vector, ablate, scale, project out, or a user function.

Each intervention is a small frozen object naming one site and selectors over that site's axes
(positions, heads, kv heads, experts, batch rows, generation steps). It *is* its own hook function,
``intervention(activation, spec) -> activation``, and :meth:`Intervention.writes` turns it into the
executor protocol's :class:`~omnilens.executors.base.Write` s, so the local and nnsight executors
apply it alike. Interventions compose: a list is applied in order, site by site.

    with omnilens.methods.interventions.apply(lens, [ZeroAblate("blocks.1.attn.hook_z", head=2)]):
        logits = lens.model(**inputs).logits            # any forward or generate

Selectors: ``pos`` acts on the site's ``pos`` axis (``query`` for attention patterns, ``patch`` /
``frame`` for packed encoder towers), ``head`` on ``head``, ``kv_head`` on ``kv_head``, ``expert`` on
``expert``, ``batch`` on ``batch``; each is an int, a slice, a list of ints or ``None`` (all).
Several selectors select their outer product. ``steps`` limits the write to chosen visits of the site
(during ``generate`` step 0 is the prompt; later steps see only the new position, so patch prompt
positions with ``steps=[0]``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import KW_ONLY, dataclass

import torch
from jaxtyping import Bool, Float

from omnilens.core.cache import ActivationCache
from omnilens.core.errors import HookError
from omnilens.executors.base import Write
from omnilens.core.graph import HookSpec
from omnilens.core.types import POS_AXES, SELECTOR_AXES

Selector = int | slice | Sequence[int] | torch.Tensor | None


def selector_axis(spec: HookSpec, selector: str) -> int:
    """Index of the axis of ``spec`` that selector ``selector`` acts on; raises naming the site's axes."""
    for name in SELECTOR_AXES[selector]:
        axis = spec.axis(name)
        if axis is not None:
            return axis
    raise HookError(spec.name, f"an axis for selector {selector!r} ({' or '.join(SELECTOR_AXES[selector])})",
                    f"axes [{spec.axes}]")


def selector_indices(spec: HookSpec, selector: str, value: Selector, size: int) -> torch.Tensor:
    """``value`` as sorted-as-given long indices into an axis of ``size``; negative ints count from the end."""
    if isinstance(value, slice):
        return torch.arange(size)[value]
    idx = torch.as_tensor([value] if isinstance(value, int) else value, dtype=torch.long).reshape(-1).cpu()
    bad = (idx >= size) | (idx < -size)
    if bad.any():
        raise HookError(spec.name, f"{selector} indices in [-{size}, {size})", f"{idx[bad].tolist()}",
                        "Selector out of range; all hooks were removed.")
    return idx % size


def region(spec: HookSpec, shape: torch.Size, selectors: dict[str, Selector],
           device: torch.device | None = None) -> tuple[torch.Tensor, ...] | None:
    """Open-mesh index of the selected block of a tensor of ``shape`` shaped by ``spec.axes``.

    ``x[region]`` is the block (one axis per site axis, in order); ``None`` means the whole tensor.
    """
    chosen = {selector_axis(spec, k): (k, v) for k, v in selectors.items() if v is not None}
    if not chosen:
        return None
    mesh = []
    for axis, size in enumerate(shape):
        idx = selector_indices(spec, *chosen[axis], size) if axis in chosen else torch.arange(size)
        mesh.append(idx.to(device).view([-1 if a == axis else 1 for a in range(len(shape))]))
    return tuple(mesh)


def _block(x: torch.Tensor, act: torch.Tensor, mesh: tuple[torch.Tensor, ...] | None) -> torch.Tensor:
    """``x`` moved to ``act``'s device and dtype, broadcast to its shape and restricted to ``mesh``."""
    x = x.to(act.device, act.dtype)
    x = x.expand(act.shape) if x.shape != act.shape else x
    return x if mesh is None else x[mesh]


@dataclass(frozen=True, eq=False)
class Intervention:
    """Base class: edit the selected block of site ``site``. Subclasses implement :meth:`edit`."""

    site: str
    _: KW_ONLY
    pos: Selector = None
    head: Selector = None
    kv_head: Selector = None
    expert: Selector = None
    batch: Selector = None
    steps: Sequence[int] | None = None

    @property
    def selectors(self) -> dict[str, Selector]:
        """Selector name (``pos``, ``head``, ``kv_head``, ``expert``, ``batch``) -> its value."""
        return {"pos": self.pos, "head": self.head, "kv_head": self.kv_head, "expert": self.expert,
                "batch": self.batch}

    def edit(self, block: torch.Tensor, act: torch.Tensor, mesh: tuple[torch.Tensor, ...] | None,
             spec: HookSpec) -> torch.Tensor:
        """New values for ``block`` (= ``act[mesh]``, or ``act`` when ``mesh`` is None)."""
        raise NotImplementedError

    def __call__(self, act: torch.Tensor, spec: HookSpec) -> torch.Tensor:
        mesh = region(spec, act.shape, self.selectors, act.device)
        if mesh is None:
            return self.edit(act, act, None, spec)
        out = act.clone()
        out[mesh] = self.edit(act[mesh], act, mesh, spec).to(act.dtype)
        return out

    def check(self, graph) -> None:
        """Raise before any forward if the site is unknown or lacks an axis a selector needs."""
        spec = graph[self.site]
        for name, value in self.selectors.items():
            if value is not None:
                selector_axis(spec, name)

    def writes(self) -> list[Write]:
        """The executor writes that apply this intervention."""
        return [Write(self.site, self, self.steps)]


@dataclass(frozen=True, eq=False)
class Patch(Intervention):
    """Replace the block by the same block of ``source`` (site-shaped, or broadcastable to it, e.g. batch 1)."""

    source: Float[torch.Tensor, "..."]

    @classmethod
    def from_cache(cls, cache: ActivationCache, site: str, **selectors) -> Patch:
        """Patch ``site`` from another run's cache."""
        return cls(site, cache[site], **selectors)

    def edit(self, block, act, mesh, spec):
        return _block(self.source, act, mesh)


@dataclass(frozen=True, eq=False)
class AddVector(Intervention):
    """Add ``alpha * vector`` (broadcast over the block's leading axes, e.g. a ``[d_model]`` direction)."""

    vector: Float[torch.Tensor, "..."]
    alpha: float = 1.0

    def edit(self, block, act, mesh, spec):
        return block + self.alpha * self.vector.to(act.device, act.dtype)


@dataclass(frozen=True, eq=False)
class ZeroAblate(Intervention):
    """Set the block to zero."""

    def edit(self, block, act, mesh, spec):
        return torch.zeros_like(block)


@dataclass(frozen=True, eq=False)
class MeanAblate(Intervention):
    """Replace the block by ``mean`` (site-shaped or broadcastable, e.g. ``[1 pos d_model]``)."""

    mean: Float[torch.Tensor, "..."]

    @classmethod
    def from_cache(cls, cache: ActivationCache, site: str, **selectors) -> MeanAblate:
        """Mean over the batch axis of ``site`` in ``cache`` (kept as a size-1 axis)."""
        spec = cache.spec(site)
        axis = spec.axis("batch")
        value = cache[site]
        return cls(site, value.mean(axis, keepdim=True) if axis is not None else value, **selectors)

    def edit(self, block, act, mesh, spec):
        return _block(self.mean, act, mesh)


@dataclass(frozen=True, eq=False)
class ResampleAblate(Intervention):
    """Replace the block by ``source`` (another run's activations) with its batch rows shuffled (``seed``)."""

    source: Float[torch.Tensor, "batch ..."]
    seed: int = 0

    def edit(self, block, act, mesh, spec):
        axis = selector_axis(spec, "batch")
        gen = torch.Generator().manual_seed(self.seed)
        perm = torch.randperm(self.source.shape[axis], generator=gen)
        shuffled = self.source.index_select(axis, perm.to(self.source.device))
        return _block(shuffled, act, mesh)


@dataclass(frozen=True, eq=False)
class Scale(Intervention):
    """Multiply the block by ``factor``."""

    factor: float

    def edit(self, block, act, mesh, spec):
        return block * self.factor


@dataclass(frozen=True, eq=False)
class ProjectOut(Intervention):
    """Remove the component along ``direction`` (last axis, e.g. ``[d_model]``): ``x - (x·d̂) d̂``."""

    direction: Float[torch.Tensor, " d"]

    def edit(self, block, act, mesh, spec):
        d = self.direction.to(act.device, act.dtype)
        d = d / d.norm()
        return block - (block @ d).unsqueeze(-1) * d


@dataclass(frozen=True, eq=False)
class Apply(Intervention):
    """A user function ``fn(block, spec) -> block`` on the selected block (same shape)."""

    fn: Callable[[torch.Tensor, HookSpec], torch.Tensor]

    def edit(self, block, act, mesh, spec):
        new = self.fn(block, spec)
        if not isinstance(new, torch.Tensor) or new.shape != block.shape:
            got = tuple(new.shape) if isinstance(new, torch.Tensor) else type(new).__name__
            raise HookError(spec.name, f"fn to return the selected block's shape {tuple(block.shape)}", f"{got}")
        return new


@dataclass(frozen=True, eq=False)
class StackedPatch(Intervention):
    """Batched patching: the batch holds ``n`` stacked copies of a ``B``-row input; copy ``j`` takes
    ``source`` where ``mask[j]`` is true and keeps its own activation elsewhere.

    ``source`` ``[B, *rest]`` (site-shaped for one copy), ``mask`` ``[n, 1, *rest]`` (broadcastable).
    """

    source: Float[torch.Tensor, "B ..."]
    mask: Bool[torch.Tensor, "n 1 ..."]

    def __call__(self, act: torch.Tensor, spec: HookSpec) -> torch.Tensor:
        if spec.axis("batch") != 0:
            raise HookError(spec.name, "a leading batch axis for stacked patching", f"axes [{spec.axes}]")
        n, b = self.mask.shape[0], self.source.shape[0]
        if act.shape[0] != n * b:
            raise HookError(spec.name, f"batch {n} copies x {b} rows = {n * b}", f"batch {act.shape[0]}")
        stacked = act.view(n, b, *act.shape[1:])
        src = self.source.to(act.device, act.dtype).unsqueeze(0)
        return torch.where(self.mask.to(act.device), src, stacked).view(act.shape)


def to_writes(interventions: Sequence[Intervention]) -> list[Write]:
    """The writes of ``interventions``, in order."""
    return [w for iv in interventions for w in iv.writes()]


@contextmanager
def apply(lens, interventions: Sequence[Intervention]) -> Iterator[None]:
    """Apply ``interventions`` to every forward or ``generate`` of ``lens.model`` inside the block.

    Site names and selector axes are checked before anything is attached; hooks are removed on exit,
    exceptions included.
    """
    for iv in interventions:
        iv.check(lens.graph)
    with lens.hooks(to_writes(interventions)):
        yield
