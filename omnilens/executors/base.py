"""The executor protocol: run a set of reads and writes on the hook graph."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from omnilens.core.errors import HookError
from omnilens.core.graph import HookGraph, HookSpec
from omnilens.core.types import HookFn, PosSelector
from omnilens.core.views import CallContext



@dataclass(frozen=True)
class Read:
    """Read site ``name``; ``pos`` selects along its ``pos`` (or ``query``) axis, ``to`` moves the value
    (``None`` keeps the device), ``grad`` keeps it attached to the autograd graph."""

    name: str
    pos: PosSelector = None
    to: str | torch.device | None = "cpu"
    grad: bool = False


@dataclass(frozen=True)
class Write:
    """Replace site ``name`` by ``fn(activation, spec)`` (``None`` keeps it); ``steps`` limits the write
    to chosen visits of the site (generation steps), ``None`` means every visit."""

    name: str
    fn: HookFn
    steps: Sequence[int] | None = None


@dataclass
class RunResult:
    """What a run returns: the model output and, per read site, one tensor per visit."""

    output: Any
    values: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


class Executor(Protocol):
    """Runs a model method with reads and writes at named sites."""

    def run(
        self, inputs: dict[str, Any], reads: Sequence[Read], writes: Sequence[Write], *, method: str = "forward",
        **kwargs: Any,
    ) -> RunResult: ...


def select_pos(spec: HookSpec, value: torch.Tensor, pos: PosSelector) -> torch.Tensor:
    """``value`` restricted to ``pos`` along the spec's ``pos`` (else ``query``) axis; unchanged if none."""
    if pos is None:
        return value
    axis = spec.axis("pos")
    if axis is None:
        axis = spec.axis("query")
    if axis is None:
        return value
    if isinstance(pos, int):
        return value.select(axis, pos).unsqueeze(axis)
    if isinstance(pos, slice):
        return value[(slice(None),) * axis + (pos,)]
    idx = torch.as_tensor(pos, device=value.device, dtype=torch.long)
    return value.index_select(axis, idx)


def apply_write(spec: HookSpec, write: Write, value: torch.Tensor) -> torch.Tensor:
    """Call ``write.fn`` on ``value``; check its result's shape, naming the site on any failure."""
    try:
        new = write.fn(value, spec)
    except HookError:
        raise
    except Exception as exc:
        raise HookError(spec.name, f"the hook function to return a tensor of shape {tuple(value.shape)} "
                        f"[{spec.axes}] or None", f"{type(exc).__name__}: {exc}",
                        "The hook raised; all hooks were removed.") from exc
    if new is None:
        return value
    spec.check_shape(value.shape, new)
    return new.to(value.dtype) if new.dtype != value.dtype else new


def unview_into(spec: HookSpec, new: torch.Tensor, raw: Any, ctx: CallContext) -> Any:
    """The raw module value carrying the edited view ``new``; in-place sites copy into the existing tensor."""
    if spec.inplace:
        raw_new = spec.view.unview(new, raw, ctx)
        if raw_new is not raw:
            raw.copy_(raw_new)
        return raw
    return spec.view.unview(new, raw, ctx)


@dataclass(frozen=True)
class SiteTask:
    """One site of a run: its spec and the reads and writes asked of it."""

    spec: HookSpec
    reads: tuple[Read, ...]
    writes: tuple[Write, ...]


def site_tasks(graph: HookGraph, reads: Sequence[Read], writes: Sequence[Write]) -> list[SiteTask]:
    """One :class:`SiteTask` per site that ``reads`` and ``writes`` name, in forward order (an unknown
    name raises ``KeyError`` with the closest valid names)."""
    reads_by: dict[str, list[Read]] = defaultdict(list)
    writes_by: dict[str, list[Write]] = defaultdict(list)
    for r in reads:
        reads_by[r.name].append(r)
    for w in writes:
        writes_by[w.name].append(w)
    names = sorted(reads_by.keys() | writes_by.keys(), key=graph.order)
    return [SiteTask(graph[n], tuple(reads_by[n]), tuple(writes_by[n])) for n in names]


def writes_for(graph: HookGraph, pattern: str | Sequence[str], fn: HookFn,
               steps: Sequence[int] | None = None) -> list[Write]:
    """One :class:`Write` of ``fn`` per site ``pattern`` selects (opt-in sites included when named or
    when only they match, see :meth:`HookGraph.names`)."""
    return [Write(n, fn, steps) for n in graph.names(pattern, include_opt_in=None)]


def as_writes(graph: HookGraph, items: Iterable[Write | tuple]) -> list[Write]:
    """:class:`Write` s from ``Write`` objects (kept as they are; their names are checked before the run)
    and ``(name_or_glob, fn[, steps])`` pairs or triples (expanded with :func:`writes_for`)."""
    out: list[Write] = []
    for item in items:
        if isinstance(item, Write):
            out.append(item)
        else:
            pattern, fn, *rest = item
            out += writes_for(graph, pattern, fn, rest[0] if rest else None)
    return out


def serve_site(spec: HookSpec, raw: Any, ctx: CallContext, reads: Sequence[Read], writes: Sequence[Write],
               step: int, values: dict[str, list[torch.Tensor]], *, guard_reads: bool = False) -> tuple[Any, bool]:
    """One visit of ``spec`` (visit number ``step``), the same for every executor.

    Applies ``writes`` (those whose ``steps`` include ``step``) through the site's view, then appends each
    read's value to ``values[spec.name]``. ``guard_reads`` (the run has writes) clones a read that shares
    memory with the live tensor, so a later in-place write cannot change it. Returns the raw module value
    (a new one if a write replaced it) and whether it changed.
    """
    changed = False
    view = spec.view.view(raw, ctx)
    for w in writes:
        if w.steps is not None and step not in w.steps:
            continue
        # an in-place site under autograd: the write works on a copy, so that its graph never saves the
        # tensor that is then overwritten (backward would fail on the bumped version counter)
        detached = spec.inplace and raw.requires_grad
        if detached:
            view = spec.view.view(raw.clone(), ctx)
        new = apply_write(spec, w, view)
        if new is not view or not spec.view.aliases or detached:  # in-place edits of a computed view too
            raw = unview_into(spec, new, raw, ctx)
            changed = True
            # a computed view (per-head result) cannot be recovered from the new raw value: keep the written one
            view = spec.view.view(raw, ctx) if spec.view.aliases else new
    for r in reads:
        val = select_pos(spec, view, r.pos)
        if not r.grad:
            val = val.detach()
        if r.to is not None:
            val = val.to(r.to)
        if guard_reads and val.untyped_storage().data_ptr() == view.untyped_storage().data_ptr():
            val = val.clone()
        values.setdefault(spec.name, []).append(val)
    return raw, changed
