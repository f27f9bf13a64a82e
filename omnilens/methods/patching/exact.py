"""Exact activation patching, many patches per forward.

The base input is stacked ``n`` times along the batch axis; copy ``j`` receives cell ``j``'s patch (a
:class:`~omnilens.methods.interventions.StackedPatch` per site), so one forward evaluates ``n`` cells. Chunks
are sized to a memory budget. Cells whose patch would write the values already there (e.g. positions
before the first token where clean and corrupted differ) take the base run's metric without a
forward. On the local executor, a chunk's copies start at its first patched block
(:mod:`omnilens.methods.patching.replay`): the blocks before it are the base run's. Sites without a batch
axis (packed encoder towers) fall back to one forward per cell. Results equal the
one-forward-per-cell loop up to float rounding.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import torch
from tqdm.auto import tqdm

from omnilens.executors.base import Read
from omnilens.methods.interventions import Patch, StackedPatch, region
from omnilens.methods.patching.base import (make_result, mean_metric, model_output, normalise, resolve, run, selectors, setup,
                                    single_visits, sweep_sites, try_resolve)
from omnilens.methods.patching.metrics import bind
from omnilens.methods.patching.replay import TowerReplay
from omnilens.methods.patching.results import PatchingResult
from omnilens.methods.patching.sweeps import Cell, Grid, Sweep

DEFAULT_BUDGET = 1 << 30
POS_CHUNKS = 8


def patch_exact(
    lens, clean: Any, corrupted: Any, metric: Callable, sweeps: Sweep | Sequence[Sweep], *,
    direction: str = "denoise", chunk_size: int | None = None, memory_budget: int = DEFAULT_BUDGET,
    executor: Any = None, output: str = "logits", replay: bool = True, progress: bool = False,
) -> PatchingResult | list[PatchingResult]:
    """Patch every cell of ``sweeps`` and measure ``metric``; one result per sweep.

    Args:
        clean, corrupted: inputs of the same shape (text, token ids ``[batch pos]`` or forward kwargs).
        metric: ``metric(logits [rows pos vocab]) -> [rows]`` (see :mod:`omnilens.methods.patching.metrics`);
            a cell's value is its mean over the prompt rows.
        direction: ``"denoise"`` patches clean activations into the corrupted run, ``"noise"``
            corrupted activations into the clean run.
        chunk_size: cells per forward (default: as many as ``memory_budget`` bytes allow).
        executor: ``"local"`` or ``"nnsight"`` (default: the lens's), or an executor object such as
            ``lens.executor("nnsight", remote="local")``.
        output: ``"logits"`` or ``"model"`` (the metric receives the whole model output).
        replay: on the local executor, run the blocks before a chunk's first patched layer once and
            replay the rest on the stacked copies (:mod:`omnilens.methods.patching.replay`); ``False`` runs
            full forwards.
        progress: show a progress bar over the cells (on stderr).

    Returns:
        :class:`PatchingResult` (a list when ``sweeps`` is a list), normalised 0 = corrupted, 1 = clean.
    """
    single = isinstance(sweeps, Sweep)
    sweeps = [sweeps] if single else list(sweeps)
    st = setup(lens, clean, corrupted, metric, direction, output)
    grids = try_resolve(lens, sweeps, st.seq_len)
    sites = sweep_sites(lens, sweeps)
    src = run(lens, st.source, [Read(n, to=None) for n in sites], executor=executor)
    base = run(lens, st.base, [Read(n, to=None) for n in sites], executor=executor)
    src_out, base_out = model_output(src.output, output), model_output(base.output, output)
    clean_out, corr_out = (src_out, base_out) if direction == "denoise" else (base_out, src_out)
    metric = bind(metric, clean_out, corr_out)
    m_clean = float(mean_metric(metric, clean_out, st.rows)[0])
    m_corr = float(mean_metric(metric, corr_out, st.rows)[0])
    normalise(torch.zeros(()), m_clean, m_corr)  # undefined normalisation raises before patching
    sources, bases = single_visits(src.values), single_visits(base.values)
    m_base = m_corr if direction == "denoise" else m_clean
    grids = [grid if grid is not None else resolve(lens, sweep, st.seq_len, {n: v.shape for n, v in sources.items()})
             for sweep, grid in zip(sweeps, grids)]
    results = []
    with tqdm(total=sum(len(g.cells) for g in grids), desc="exact patching", unit="cell", disable=not progress,
              file=sys.stderr) as bar:
        for grid in grids:
            raw = torch.full(grid.shape, float("nan"))
            todo = []
            for cell in grid.cells:  # a patch that writes the values already there leaves the base run unchanged
                if _is_noop(lens, cell, sources[cell.site], bases[cell.site]):
                    raw[cell.index] = m_base
                    bar.update(1)
                else:
                    todo.append(cell)
            _run_cells(lens, grid, todo, raw, sources, st, metric, chunk_size, memory_budget, executor, output,
                       replay, bar)
            results.append(make_result(lens, grid, raw, m_clean, m_corr, metric, "exact", st, executor))
    return results[0] if single else results


def _is_noop(lens, cell: Cell, source: torch.Tensor, base: torch.Tensor) -> bool:
    """Whether the cell's selection holds the same values in the source and base runs."""
    spec = lens.graph[cell.site]
    mesh = region(spec, source.shape, selectors(spec, cell.select), source.device)
    return torch.equal(source[mesh], base[mesh]) if mesh is not None else torch.equal(source, base)


def _run_cells(lens, grid: Grid, cells: list[Cell], raw: torch.Tensor, sources, st, metric, chunk_size, budget,
               executor, output, replay, bar) -> None:
    """Fill ``raw`` at ``cells`` with the metric of their patched runs; advance ``bar`` per cell done."""
    if not cells:
        return
    stackable = all(lens.graph[s].axis("batch") == 0 for s in grid.sites)
    tower = _replay(lens, grid, st, executor, output) if stackable and replay else None
    stackable = stackable and (tower is not None or _batch_led(st.base, st.rows))
    n = 1 if not stackable else chunk_size or max(1, budget // max(1, _row_bytes(lens, st) * st.rows))
    suffix = tower is not None and tower.suffixable and _suffix_sites(lens, grid)
    last = getattr(metric, "last_positions", None)
    for chunk in _chunks(lens, cells, n, by_layer=tower is not None, by_pos=suffix):
        if not stackable:
            writes = cell_patch(lens, chunk[0], sources[chunk[0].site]).writes()
            out = model_output(run(lens, st.base, (), writes, executor).output, output)
        else:
            # positions before the chunk's first patch keep their base values; the metric's must be replayed
            p = min(_first_pos(lens, c) for c in chunk) if suffix and last is not None else 0
            p = max(0, min(p, st.seq_len - last)) if p else 0
            writes = [w for iv in _stacked_patches(lens, chunk, sources, p) for w in iv.writes()]
            if tower is not None:
                with lens.executor("local").attach((), writes), torch.no_grad():
                    out = tower.run(min(lens.graph[c.site].layer for c in chunk), len(chunk), last, suffix=p)
            else:
                inputs = _stack_inputs(st.base, len(chunk), st.rows)
                out = model_output(run(lens, inputs, (), writes, executor).output, output)
        values = mean_metric(metric, out, st.rows, len(chunk))
        for cell, v in zip(chunk, values.tolist()):
            raw[cell.index] = v
        bar.update(len(chunk))


def _chunks(lens, cells: list[Cell], n: int, by_layer: bool, by_pos: bool) -> list[list[Cell]]:
    """``cells`` in chunks of at most ``n``; with ``by_layer`` a chunk never spans two layers; with ``by_pos``
    each layer's cells are sorted by first patched position and cut into up to ``POS_CHUNKS`` chunks, so
    suffix replays start late."""
    groups: dict[Any, list[Cell]] = defaultdict(list)
    for cell in cells:
        groups[lens.graph[cell.site].layer if by_layer else None].append(cell)
    out = []
    for group in groups.values():
        size = n
        if by_pos and any(_first_pos(lens, c) for c in group):
            group = sorted(group, key=lambda c: _first_pos(lens, c))
            size = min(n, -(-len(group) // POS_CHUNKS))
        out += [group[i:i + size] for i in range(0, len(group), size)]
    return out


def _first_pos(lens, cell: Cell) -> int:
    """The first position the cell patches (0 when it patches every position)."""
    axis = _pos_axis(lens.graph[cell.site])
    return min(cell.select[axis]) if axis in cell.select else 0


def _pos_axis(spec) -> str | None:
    return next((a for a in ("pos", "query") if spec.axis(a) is not None), None)


def _suffix_sites(lens, grid: Grid) -> bool:
    """Whether every site of the grid sees only the recomputed positions in a suffix replay (attention
    internals other than the pattern's query rows see cached keys too)."""
    return all(_pos_axis(spec) is not None and (not spec.requires or spec.axis("query") is not None)
               for spec in (lens.graph[s] for s in grid.sites))


def _replay(lens, grid: Grid, st, executor, output) -> TowerReplay | None:
    """A replay of the grid's tower from the base run, when the local executor runs and the tower is a chain."""
    if output != "logits" or (executor or lens.default_executor) != "local":
        return None
    towers = {lens.graph[s].tower for s in grid.sites}
    if len(towers) != 1:
        return None
    with TowerReplay.capture(lens, towers.pop(), st.rows) as box:  # same instrumentation as the patched runs
        base = lens.run(st.base, [Read(s, to=None) for s in grid.sites], executor="local", use_cache=False)
    tower = box[0]
    return tower if tower is not None and tower.verify(model_output(base.output, "logits")) else None


def cell_patch(lens, cell: Cell, source: torch.Tensor) -> Patch:
    """The :class:`~omnilens.methods.interventions.Patch` that applies one cell."""
    return Patch(cell.site, source, **selectors(lens.graph[cell.site], cell.select))


def _stacked_patches(lens, chunk: list[Cell], sources, offset: int = 0) -> list[StackedPatch]:
    """One :class:`StackedPatch` per site of ``chunk``; ``offset`` drops the positions before it (suffix replays)."""
    by_site: dict[str, list[tuple[int, Cell]]] = defaultdict(list)
    for j, cell in enumerate(chunk):
        by_site[cell.site].append((j, cell))
    out = []
    for site, cells in by_site.items():
        spec, source = lens.graph[site], sources[site]
        if offset:
            axis = _pos_axis(spec)
            source = source.narrow(spec.axis(axis), offset, source.shape[spec.axis(axis)] - offset)
            cells = [(j, Cell(c.index, c.site, {a: tuple(i - offset for i in idx) if a == axis else idx
                                                for a, idx in c.select.items()})) for j, c in cells]
        swept = {a for _, c in cells for a in c.select}
        shape = (1,) + tuple(n if a in swept else 1 for a, n in zip(spec.axis_names[1:], source.shape[1:]))
        mask = torch.zeros((len(chunk),) + shape, dtype=torch.bool, device=source.device)
        for j, cell in cells:
            mesh = region(spec, torch.Size(shape), selectors(spec, cell.select), source.device)
            mask[j][mesh] = True
        out.append(StackedPatch(site, source, mask))
    return out


def _batch_led(inputs: dict[str, Any], rows: int) -> bool:
    """Whether every tensor input has a leading batch axis (packed pixel or audio features do not)."""
    return all(v.dim() == 0 or v.shape[0] == rows for v in inputs.values() if isinstance(v, torch.Tensor))


def _stack_inputs(inputs: dict[str, Any], n: int, rows: int) -> dict[str, Any]:
    """Forward kwargs with every batch-leading tensor repeated ``n`` times (copy-major)."""
    return {k: v.repeat(n, *([1] * (v.dim() - 1))) if isinstance(v, torch.Tensor) and v.dim() and v.shape[0] == rows
            else v for k, v in inputs.items()}


def _row_bytes(lens, st) -> int:
    """Rough peak bytes of one batch row in a no-grad forward: logits, a block's temporaries, attention scores."""
    cfg = lens.config.get_text_config()
    seq = st.seq_len or 1
    d, mlp = cfg.hidden_size, getattr(cfg, "intermediate_size", 4 * cfg.hidden_size)
    heads = cfg.num_attention_heads
    return 4 * seq * (cfg.vocab_size + 12 * d + 3 * mlp + 2 * heads * seq)
