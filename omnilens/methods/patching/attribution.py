"""Attribution patching (AtP, Nanda 2023; Kramár et al. 2024): every sweep from one source forward,
one base forward and one backward.

A cell's effect is estimated to first order, ``(a_source - a_base) · ∂metric/∂a`` at the base run,
summed over the cell's selection (and averaged over prompt rows, as exact patching does). For
``denoise`` the base is the corrupted run and the source the clean one; for ``noise`` the reverse.

AtP* (``star=True``) fixes attention saturation for query/key sweeps: the patched scores are
recomputed and pushed through the softmax, and only the change of the pattern is linearised
(``Δpattern · ∂metric/∂pattern``). It relies on queries and keys reaching the scores through maps
that act on each (position, head) separately (q/k norm, rotary), so a patch of ``hook_q`` /
``hook_k`` at some (position, head) equals a patch of ``hook_rot_q`` / ``hook_rot_k`` there, and on
scaled dot-product scores (``d_head ** -0.5``) with a causal mask; both are checked against the
model's own pattern before any estimate is used.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from omnilens.executors.base import Read, Write
from omnilens.methods.interventions import region
from omnilens.methods.patching.base import (make_result, mean_metric, model_output, normalise, resolve, selectors, setup,
                                    single_visits, sweep_sites, try_resolve)
from omnilens.methods.patching.metrics import bind
from omnilens.methods.patching.results import PatchingResult
from omnilens.methods.patching.sweeps import Sweep

QK_SITES = {"hook_q": "hook_rot_q", "hook_q_normed": "hook_rot_q", "hook_rot_q": "hook_rot_q",
            "hook_k": "hook_rot_k", "hook_k_normed": "hook_rot_k", "hook_rot_k": "hook_rot_k"}
STAR_CHUNK_FLOATS = 1 << 25


def patch_attribution(
    lens, clean: Any, corrupted: Any, metric: Callable, sweeps: Sweep | Sequence[Sweep], *,
    direction: str = "denoise", star: bool = False, output: str = "logits",
) -> PatchingResult | list[PatchingResult]:
    """AtP estimates for every cell of ``sweeps`` (arguments as :func:`~omnilens.methods.patching.patch_exact`).

    ``star=True`` applies AtP* to query/key sweeps. Runs on the local executor (the backward needs the
    live autograd graph). Returns one result per sweep (method ``"atp"`` or ``"atp*"``), with ``raw``
    the estimated metric and ``values`` normalised 0 = corrupted, 1 = clean.
    """
    single = isinstance(sweeps, Sweep)
    sweeps = [sweeps] if single else list(sweeps)
    st = setup(lens, clean, corrupted, metric, direction, output)
    grids = try_resolve(lens, sweeps, st.seq_len)
    sites = sweep_sites(lens, sweeps)
    stars = {n: _star_sites(lens, n) for n in sites if star and lens.graph[n].site in QK_SITES}
    rot = list(dict.fromkeys(s for trio in stars.values() for s in trio[1:]))
    captured = list(dict.fromkeys(sites + [trio[0] for trio in stars.values()]))

    src = lens.run(st.source, [Read(n, to=None) for n in dict.fromkeys(sites + rot)], executor="local")
    leaves: dict[str, torch.Tensor] = {}
    with torch.enable_grad():
        base = lens.run(st.base, [Read(n, to=None) for n in rot], [Write(n, _capture(leaves)) for n in captured],
                        executor="local", grad=True)
        base_out, src_out = model_output(base.output, output), model_output(src.output, output)
        clean_out, corr_out = (src_out, base_out) if direction == "denoise" else (base_out, src_out)
        metric = bind(metric, _detach(clean_out), _detach(corr_out))
        m_base_t = mean_metric(metric, base_out, st.rows)[0]
        m_base = float(m_base_t.detach())
        m_src = float(mean_metric(metric, src_out, st.rows)[0])
        m_clean, m_corr = (m_src, m_base) if direction == "denoise" else (m_base, m_src)
        normalise(torch.zeros(()), m_clean, m_corr)
        grads = dict(zip(leaves, torch.autograd.grad(m_base_t, list(leaves.values()), allow_unused=True)))
    sources = single_visits(src.values)
    base_rot = {n: vs[0].detach() for n, vs in base.values.items()}
    results = []
    for sweep, grid in zip(sweeps, grids):
        if grid is None:
            grid = resolve(lens, sweep, st.seq_len, {n: v.shape for n, v in sources.items()})
        is_star = all(n in stars for n in grid.sites)
        delta = torch.zeros(grid.shape, dtype=torch.float64)
        for site in grid.sites:
            cells = [c for c in grid.cells if c.site == site]
            if is_star:
                pat, rq, rk = stars[site]
                values = _star_deltas(lens, site, cells, pat, rq, rk, leaves, grads, sources, base_rot, st)
            else:
                values = _linear_deltas(lens, site, cells, leaves[site].detach(), grads[site], sources[site])
            for cell, v in zip(cells, values):
                delta[cell.index] = v
        raw = (m_base + delta).float()
        results.append(make_result(lens, grid, raw, m_clean, m_corr, metric, "atp*" if is_star else "atp", st,
                                   "local"))
    return results[0] if single else results


def _capture(leaves: dict[str, torch.Tensor]):
    """A write that routes the site through a fresh tensor whose gradient the backward returns."""

    def fn(act: torch.Tensor, spec) -> torch.Tensor:
        leaf = act.clone() if act.requires_grad else act.detach().clone().requires_grad_(True)
        leaves[spec.name] = leaf
        return leaf

    return fn


def _detach(out: Any) -> Any:
    return out.detach() if isinstance(out, torch.Tensor) else out


def _linear_deltas(lens, site: str, cells, base_act, grad, source) -> list[float]:
    """``Σ_selection (source - base) · grad`` per cell (summed over the batch and unswept axes)."""
    spec = lens.graph[site]
    if grad is None:
        return [0.0] * len(cells)
    contrib = ((source.to(base_act) - base_act) * grad).double()
    swept = {a for c in cells for a in c.select}
    keep = [i for i, a in enumerate(spec.axis_names) if a in swept]
    drop = [i for i in range(contrib.dim()) if i not in keep]
    reduced = contrib.sum(drop, keepdim=True) if drop else contrib
    out = []
    for cell in cells:
        if all(len(v) == 1 for v in cell.select.values()):
            idx = tuple(cell.select[a][0] if a in cell.select else 0 for a in spec.axis_names)
            out.append(float(reduced[idx]))
        else:
            out.append(float(reduced[region(spec, reduced.shape, selectors(spec, cell.select))].sum()))
    return out


def _star_sites(lens, site: str) -> tuple[str, str, str]:
    """(pattern, rotated q, rotated k) site names of the block holding q/k site ``site``."""
    spec = lens.graph[site]
    found = {s.site: s.name for s in lens.graph if s.tower == spec.tower and s.layer == spec.layer
             and s.site in ("hook_pattern", "hook_rot_q", "hook_rot_k")}
    if len(found) != 3:
        raise ValueError(f"AtP* for {site} needs hook_pattern, hook_rot_q and hook_rot_k in its block; "
                         f"found {sorted(found)}")
    return found["hook_pattern"], found["hook_rot_q"], found["hook_rot_k"]


def _star_deltas(lens, site, cells, pat, rq, rk, leaves, grads, sources, base_rot, st) -> list[float]:
    """``Σ ∂metric/∂pattern · (softmax(patched scores) - pattern)`` per cell, cells batched."""
    is_q = QK_SITES[lens.graph[site].site] == "hook_rot_q"
    q, k = base_rot[rq], base_rot[rk]  # [B pos head d], [B pos kv d]
    pattern, g = leaves[pat].detach(), grads[pat]  # [B head q k]
    if g is None:
        return [0.0] * len(cells)
    mask = _score_mask(st.base, q.shape[1], q.device)
    scale = q.shape[-1] ** -0.5
    rebuilt = _softmax_pattern(q.unsqueeze(0), k.unsqueeze(0), mask, scale)[0]
    err = float((rebuilt - pattern).abs().max())
    if err > 1e-4:
        raise RuntimeError(f"AtP* cannot rebuild the attention pattern of {pat} from {rq}/{rk} "
                           f"(max error {err:.2e}): the model's scores are not scaled dot products with a causal mask")
    spec = lens.graph[rq if is_q else rk]
    src = sources[rq if is_q else rk].to(q)
    base = q if is_q else k
    n = max(1, STAR_CHUNK_FLOATS // pattern.numel())
    out = []
    for start in range(0, len(cells), n):
        chunk = cells[start:start + n]
        m = torch.zeros((len(chunk), 1) + tuple(base.shape[1:]), dtype=torch.bool, device=base.device)
        for j, cell in enumerate(chunk):
            m[j][region(spec, m.shape[1:], selectors(spec, cell.select), base.device)] = True
        patched = torch.where(m, src.unsqueeze(0), base.unsqueeze(0))
        new = _softmax_pattern(patched, k.unsqueeze(0), mask, scale) if is_q else \
            _softmax_pattern(q.unsqueeze(0), patched, mask, scale)
        out += ((new - pattern.unsqueeze(0)) * g.unsqueeze(0)).double().sum((1, 2, 3, 4)).tolist()
    return out


def _score_mask(inputs: dict[str, Any], seq: int, device) -> torch.Tensor:
    """Additive mask ``[B or 1, 1, q, k]``: causal, plus key padding from ``attention_mask``."""
    causal = torch.ones(seq, seq, dtype=torch.bool, device=device).tril()
    allowed = causal[None, None]
    am = inputs.get("attention_mask")
    if isinstance(am, torch.Tensor):
        allowed = allowed & am.bool().to(device)[:, None, None, :]
    return torch.zeros(allowed.shape, device=device).masked_fill(~allowed, torch.finfo(torch.float32).min)


def _softmax_pattern(q: torch.Tensor, k: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Pattern ``[n B head q k]`` from rotated q ``[n B pos head d]`` and k ``[n B pos kv d]`` (GQA repeat)."""
    rep = q.shape[-2] // k.shape[-2]
    k = k.repeat_interleave(rep, dim=-2) if rep > 1 else k
    n = max(q.shape[0], k.shape[0])
    q, k = q.expand(n, *q.shape[1:]), k.expand(n, *k.shape[1:])
    scores = torch.einsum("nbqhd,nbkhd->nbhqk", q.float(), k.float()) * scale + mask.unsqueeze(0)
    return torch.softmax(scores, -1)
