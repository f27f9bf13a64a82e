"""Plotly heatmaps of labelled results: tokens (or the last axis) on x, the other axes (layer, layer.head)
on y, a diverging colour scale centred at 0, hover text with the exact values. Saved as HTML, and as
PNG where a static renderer (kaleido) is importable."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import plotly.graph_objects as go
import torch

from omnilens.core.types import POS_AXES
from omnilens.core.io import atomic_write

X_AXES = (*POS_AXES, "span", "key")
PREFIX = {"layer": "L", "head": "H", "kv_head": "KV"}


def heatmap(result, *, title: str | None = None, zmax: float | None = None, raw: bool = False) -> go.Figure:
    """A heatmap of a :class:`~omnilens.methods.patching.PatchingResult` (``raw=True`` plots the metric itself).

    The position-like axis (``pos``, ``query``, ``span``...) goes on x, else the last axis; the remaining
    axes are flattened onto y (``L3``, ``L3.H5``). The colour scale is centred at 0, symmetric up to
    ``zmax`` (default: the largest absolute value).
    """
    values = (result.raw if raw else result.values).detach().float()
    axes = list(result.axes)
    x_axis = next((a for a in axes if a in X_AXES), axes[-1])
    y_axes = [a for a in axes if a != x_axis] if len(axes) > 1 else []
    z = values.permute([axes.index(a) for a in y_axes] + [axes.index(x_axis)])
    z = z.reshape(-1, z.shape[-1]) if y_axes else z.reshape(1, -1)
    y_labels = _row_labels(result.labels, y_axes)
    x_labels = list(result.labels[x_axis])
    other = (result.values if raw else result.raw).detach().float()
    other = other.permute([axes.index(a) for a in y_axes] + [axes.index(x_axis)]).reshape(z.shape)
    kind = "raw" if not raw else "normalised"
    hover = [[f"{y} · {x_axis} {x}<br>{'metric' if raw else 'effect'} {z[i, j]:.6g}<br>{kind} {other[i, j]:.6g}"
              for j, x in enumerate(x_labels)] for i, y in enumerate(y_labels)]
    finite = z[torch.isfinite(z)]
    zmax = zmax if zmax is not None else (float(finite.abs().max()) if finite.numel() else 1.0) or 1.0
    fig = go.Figure(go.Heatmap(
        z=z.tolist(), x=_unique(x_labels), y=_unique(y_labels), colorscale="RdBu", zmid=0.0, zmin=-zmax,
        zmax=zmax, text=hover, hoverinfo="text", colorbar={"title": result.metric if raw else "effect"},
    ))
    site = result.sites[0] if result.sites else ""
    more = " …" if len(result.sites) > 1 else ""
    default = f"{result.method} ({result.direction}) · {result.metric} · {site}{more}"
    fig.update_layout(title=title or default, xaxis_title=x_axis, yaxis_title=".".join(y_axes) or "",
                      xaxis={"type": "category"}, yaxis={"type": "category", "autorange": "reversed"},
                      template="plotly_white")
    return fig


def _row_labels(labels, y_axes: list[str]) -> list[str]:
    rows = [""]
    for a in y_axes:
        pre = PREFIX.get(a, f"{a}=")
        rows = [f"{r}.{pre}{lab}" if r else f"{pre}{lab}" for r in rows for lab in labels[a]]
    return rows if y_axes else [""]


def _unique(labels: list[str]) -> list[str]:
    """Labels made distinct (plotly merges equal category labels): repeats get a zero-width suffix."""
    seen: dict[str, int] = {}
    out = []
    for lab in labels:
        seen[lab] = seen.get(lab, 0) + 1
        out.append(lab + "\u200b" * (seen[lab] - 1))
    return out


def png_available() -> bool:
    """Whether a static image renderer (kaleido) is importable."""
    return importlib.util.find_spec("kaleido") is not None


def save(figure_or_result, path: str | os.PathLike, *, png: bool | None = None,
         include_plotlyjs: bool | str = True) -> list[Path]:
    """Write a figure (or a result's figure) to ``path`` as HTML; also ``path`` with ``.png`` when
    ``png`` is true, or when ``png`` is ``None`` and kaleido is importable. Returns the written paths.

    ``include_plotlyjs`` is plotly's option: ``True`` (default) inlines plotly.js (about 4.7 MB) so the
    file stands alone; ``"directory"`` references a ``plotly.min.js`` beside it, written once per folder
    (still viewable offline while the folder stays together; returned when this call wrote it); ``"cdn"``
    needs a network connection to view. ``png=True`` without kaleido raises ``RuntimeError`` naming the
    missing package.
    """
    fig = figure_or_result if isinstance(figure_or_result, go.Figure) else heatmap(figure_or_result)
    path = Path(path)
    html = path.with_suffix(".html")
    html.parent.mkdir(parents=True, exist_ok=True)
    bundle = html.parent / "plotly.min.js"
    new_bundle = include_plotlyjs == "directory" and not bundle.exists()
    atomic_write(html, lambda tmp: fig.write_html(tmp, include_plotlyjs=include_plotlyjs))
    written = [html, bundle] if new_bundle else [html]
    want_png = png_available() if png is None else png
    if want_png:
        if not png_available():
            raise RuntimeError("PNG export needs the 'kaleido' package (pip install kaleido); HTML was written")
        fig.write_image(str(path.with_suffix(".png")))
        written.append(path.with_suffix(".png"))
    return written
