"""Quality report of concept vectors, per concept and layer, with a triage summary.

For concept ``c`` at layer ``L`` with unit vector ``v``, positives ``P`` (its stories, ``[n hidden]``)
and negatives ``N`` (everything else), ``mu_N = mean(N)``:

* ``pc1_ratio``: first-PC variance ratio of the centred positives, ``s_1² / Σ s_i²`` (singular values of
  ``P - mean(P)``): near 1 = the stories vary along one direction (low rank).
* story projections ``p_i = (P_i - mu_N) · v``: ``proj_mean`` / ``proj_std`` (population) / ``proj_min`` /
  ``proj_max``; ``proj_mean`` equals ``||mean(P) - mu_N||``.
* ``alignment[i] = cos(P_i - mu_N, v)`` per story; ``outliers``: stories whose alignment is ``<= 0`` or
  more than ``outlier_z`` standard deviations below the mean alignment (indices into the dataset).
* ``best_neuron``: the MLP neuron of layer ``L`` whose output column of ``W_down`` (``[hidden d_mlp]``)
  has the largest ``|cos|`` with ``v`` (index and signed cosine).
* ``nearest``: the other concepts by cosine at ``L``, highest first (top 3).
* ``head_share``: the concept's diff of means at the o_proj input (``hook_z`` of layer ``L``) split
  per head, ``share_h = ||Δ_h||² / Σ ||Δ||²``: the top head, its share and the effective number of
  heads ``1 / Σ share²``.
* ``ridge_r2``: R² of ridge regression (``alpha``, with intercept, over the hidden dimensions) of
  ``v`` on the other concepts' vectors: near 1 = ``v`` is a combination of the others.

Triage (first rule that applies, thresholds in :class:`Thresholds`): ``redundant`` (ridge R² high),
``contaminated`` (nearest concept too close, or too many outlier stories), ``fragmented`` (stories do
not share the direction: low mean alignment), ``clean single-neuron`` (one neuron aligns), ``clean
low-rank`` (high first-PC ratio), else ``fragmented``.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from sklearn.linear_model import Ridge

from omnilens.methods.activations import ActivationDataset
from omnilens.methods.concepts.vectors import ConceptVectors
from omnilens.core.io import atomic_write_json, atomic_write_text

TRIAGE = ("clean single-neuron", "clean low-rank", "fragmented", "contaminated", "redundant")


@dataclass(frozen=True)
class Thresholds:
    """Triage thresholds (see the module docstring for the rules)."""

    redundant_r2: float = 0.9
    contaminated_cosine: float = 0.5
    contaminated_outliers: float = 0.25
    min_alignment: float = 0.2
    single_neuron_cosine: float = 0.5
    low_rank_pc1: float = 0.3


def pc1_ratio(x: Float[torch.Tensor, "n hidden"]) -> float:
    """First-PC variance ratio of the centred rows of ``x`` (``nan`` for fewer than two rows)."""
    if x.shape[0] < 2:
        return float("nan")
    s = torch.linalg.svdvals((x - x.mean(0)).double())
    total = float((s ** 2).sum())
    return float(s[0] ** 2) / total if total > 0 else float("nan")


def ridge_r2(target: Float[torch.Tensor, " hidden"], others: Float[torch.Tensor, "k hidden"], alpha: float) -> float:
    """R² of a ridge fit (with intercept) of ``target`` on the rows of ``others``, samples = hidden dims."""
    X, y = others.double().T.numpy(), target.double().numpy()
    return float(Ridge(alpha=alpha).fit(X, y).score(X, y))


def down_projections(lens, layers: Sequence[int], tower: str = "") -> dict[int, torch.Tensor]:
    """``W_down`` ``[hidden d_mlp]`` per layer: the weight of the module read by ``mlp.hook_post`` (from
    the graph spec). Layers without a dense MLP (MoE) are left out."""
    out = {}
    for spec in lens.graph:
        if spec.tower == tower and spec.layer in layers and spec.component == "mlp" and spec.site == "hook_post":
            out[spec.layer] = lens.adapter.module(spec.module).weight.detach().float().cpu()
    return out


@dataclass
class ConceptQuality:
    """Quality numbers of one concept at one layer (see the module docstring)."""

    concept: str
    layer: int
    site: str
    n_stories: int
    pc1_ratio: float
    proj_mean: float
    proj_std: float
    proj_min: float
    proj_max: float
    alignment: list[float]
    mean_alignment: float
    outliers: list[int]
    outlier_stories: list[str]
    best_neuron: dict[str, float] | None
    nearest: list[tuple[str, float]]
    head_share: dict[str, float] | None
    ridge_r2: float | None
    triage: str = ""


def triage(q: ConceptQuality, t: Thresholds) -> str:
    """The triage class of one concept at one layer."""
    if q.ridge_r2 is not None and q.ridge_r2 >= t.redundant_r2:
        return "redundant"
    if (q.nearest and q.nearest[0][1] >= t.contaminated_cosine) or \
            len(q.outliers) > t.contaminated_outliers * q.n_stories:
        return "contaminated"
    if q.mean_alignment < t.min_alignment:
        return "fragmented"
    if q.best_neuron is not None and abs(q.best_neuron["cosine"]) >= t.single_neuron_cosine:
        return "clean single-neuron"
    if q.pc1_ratio >= t.low_rank_pc1:
        return "clean low-rank"
    return "fragmented"


@dataclass
class QualityReport:
    """Every :class:`ConceptQuality`, in (concept, layer) order, and the thresholds used."""

    rows: list[ConceptQuality]
    thresholds: Thresholds = field(default_factory=Thresholds)

    def get(self, concept: str, layer: int) -> ConceptQuality:
        """The row of ``concept`` at ``layer``; ``KeyError`` naming both when absent."""
        for r in self.rows:
            if r.concept == concept and r.layer == layer:
                return r
        raise KeyError(f"no report row for concept {concept!r} at layer {layer}")

    def summary(self) -> str:
        """A text table: one line per concept, its triage class at each layer, then class counts."""
        concepts = list(dict.fromkeys(r.concept for r in self.rows))
        layers = sorted({r.layer for r in self.rows})
        width = max(len(c) for c in concepts + ["concept"])
        cells = {(r.concept, r.layer): f"{r.triage} ({r.proj_mean:.2g})" for r in self.rows}
        col = max(len(x) for x in [*cells.values(), *(f"L{lay}" for lay in layers)])
        lines = [f"{'concept':<{width}}  " + "  ".join(f"{'L' + str(lay):<{col}}" for lay in layers)]
        for c in concepts:
            lines.append(f"{c:<{width}}  " + "  ".join(f"{cells[(c, lay)]:<{col}}" for lay in layers))
        counts = {k: sum(r.triage == k for r in self.rows) for k in TRIAGE}
        lines.append("triage: " + ", ".join(f"{k} {n}" for k, n in counts.items() if n))
        return "\n".join(lines)

    def to_dict(self) -> dict[str, Any]:
        """JSON-able report: thresholds, every row, and (concept, layer) pairs per triage class."""
        return {"thresholds": asdict(self.thresholds), "rows": [asdict(r) for r in self.rows],
                "summary": {k: [[r.concept, r.layer] for r in self.rows if r.triage == k] for k in TRIAGE}}

    def to_html(self) -> str:
        """A self-contained HTML page: the triage table and per-(concept, layer) numbers."""
        colours = {"clean single-neuron": "#c8e6c9", "clean low-rank": "#dcedc8", "fragmented": "#fff9c4",
                   "contaminated": "#ffccbc", "redundant": "#e1bee7"}
        head = ("concept", "layer", "triage", "stories", "pc1 ratio", "proj mean", "proj std", "proj min",
                "proj max", "mean align", "outliers", "best neuron", "nearest", "top head share", "ridge R²")
        body = []
        for r in self.rows:
            neuron = f"#{int(r.best_neuron['index'])} ({r.best_neuron['cosine']:+.2f})" if r.best_neuron else "-"
            hs = f"h{int(r.head_share['head'])} {r.head_share['share']:.2f}" if r.head_share else "-"
            near = ", ".join(f"{c} {v:+.2f}" for c, v in r.nearest) or "-"
            cells = (r.concept, r.layer, r.triage, r.n_stories, f"{r.pc1_ratio:.3f}", f"{r.proj_mean:.3g}",
                     f"{r.proj_std:.3g}", f"{r.proj_min:.3g}", f"{r.proj_max:.3g}", f"{r.mean_alignment:.3f}",
                     "; ".join(r.outlier_stories) or "-", neuron, near, hs,
                     "-" if r.ridge_r2 is None else f"{r.ridge_r2:.3f}")
            tds = "".join(f"<td>{html.escape(str(c))}</td>" for c in cells)
            body.append(f'<tr style="background:{colours[r.triage]}">{tds}</tr>')
        ths = "".join(f"<th>{html.escape(h)}</th>" for h in head)
        summary = html.escape(self.summary())
        return ("<!DOCTYPE html><html><head><meta charset='utf-8'><title>concept quality report</title>"
                "<style>body{font-family:sans-serif}table{border-collapse:collapse}td,th{border:1px solid #999;"
                "padding:3px 6px;font-size:13px}</style></head><body><h1>Concept quality report</h1>"
                f"<pre>{summary}</pre><table><tr>{ths}</tr>{''.join(body)}</table>"
                f"<p>thresholds: {html.escape(json.dumps(asdict(self.thresholds)))}</p></body></html>")

    def save(self, out_dir: str | os.PathLike) -> tuple[Path, Path]:
        """Write ``quality.json`` and ``quality.html`` (atomically); returns their paths."""
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        jpath, hpath = out / "quality.json", out / "quality.html"
        atomic_write_json(jpath, self.to_dict())
        atomic_write_text(hpath, self.to_html())
        return jpath, hpath


def quality_report(
    ds: ActivationDataset, vectors: ConceptVectors, *, w_down: Mapping[int, torch.Tensor] | None = None,
    texts: Sequence[str] | None = None, pool: str | None = None, ridge_alpha: float = 0.01,
    outlier_z: float = 2.0, thresholds: Thresholds = Thresholds(), n_nearest: int = 3, verbose: bool = False,
) -> QualityReport:
    """Quality numbers for every concept of ``vectors`` at each of its layers, from the dataset they
    came from (sites in ``vectors.sites``; ``hook_z`` of the same layer and tower, if the dataset has
    it, for the head shares). ``w_down``: ``{layer: [hidden d_mlp]}`` (see :func:`down_projections`);
    ``texts`` names outlier stories. ``verbose`` prints the summary."""
    if ds.labels is None:
        raise ValueError("the quality report needs the labelled dataset the vectors came from")
    labels = [str(x) for x in ds.labels]
    rows = []
    for layer in vectors.layers:
        site = vectors.sites.get(layer)
        if site is None or site not in ds.sites:
            raise ValueError(f"layer {layer}: the vectors' site {site!r} is not in the dataset")
        x = (ds[site] if pool is None else ds[site, pool]).double()
        info = ds.sites[site]
        z_sites = ds.site_names(site="hook_z", layer=layer, tower=info["tower"])
        z = (ds[z_sites[0]] if pool is None else ds[z_sites[0], pool]).double() if z_sites else None
        v_all = vectors.vectors[layer].double()
        cos = vectors.cosine(layer).double()
        for ci, c in enumerate(vectors.concepts):
            pos = torch.tensor([lab == c for lab in labels])
            v = v_all[ci] / v_all[ci].norm()
            rows.append(_row(c, ci, layer, site, x, z, pos, v, v_all, cos, vectors.concepts,
                             None if w_down is None else w_down.get(layer), texts, ridge_alpha, outlier_z, n_nearest))
            rows[-1].triage = triage(rows[-1], thresholds)
    report = QualityReport(rows, thresholds)
    if verbose:
        print(report.summary())
    return report


def _row(c, ci, layer, site, x, z, pos, v, v_all, cos, concepts, w_down, texts, alpha, outlier_z, n_nearest):
    P, mu_n = x[pos], x[~pos].mean(0)
    centred = P - mu_n
    proj = centred @ v
    align = proj / centred.norm(dim=1)
    idx = pos.nonzero().flatten().tolist()
    a_mean, a_std = float(align.mean()), float(align.std(unbiased=False))
    out = [idx[i] for i in range(len(idx)) if align[i] <= 0 or align[i] < a_mean - outlier_z * a_std]
    best = None
    if w_down is not None:
        w = w_down.double()
        cols = (v @ w) / w.norm(dim=0)
        j = int(cols.abs().argmax())
        best = {"index": j, "cosine": float(cols[j])}
    head = None
    if z is not None:
        delta = z[pos].mean(0) - z[~pos].mean(0)  # [head d_head]
        energy = delta.pow(2).sum(-1)
        share = energy / energy.sum()
        h = int(share.argmax())
        head = {"head": h, "share": float(share[h]), "effective_heads": float(1 / share.pow(2).sum())}
    others = [k for k in range(len(concepts)) if k != ci]
    nearest = sorted(((concepts[k], float(cos[ci, k])) for k in others), key=lambda t: -t[1])[:n_nearest]
    r2 = ridge_r2(v, v_all[others], alpha) if others else None
    return ConceptQuality(
        concept=c, layer=layer, site=site, n_stories=len(idx), pc1_ratio=pc1_ratio(P),
        proj_mean=float(proj.mean()), proj_std=float(proj.std(unbiased=False)), proj_min=float(proj.min()),
        proj_max=float(proj.max()), alignment=align.tolist(), mean_alignment=a_mean, outliers=out,
        outlier_stories=[texts[i][:80] for i in out] if texts is not None else [str(i) for i in out],
        best_neuron=best, nearest=nearest, head_share=head, ridge_r2=r2,
    )
