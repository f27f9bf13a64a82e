"""`PatchingResult`: a labelled tensor of patching effects, normalised 0 = corrupted, 1 = clean."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Float
from safetensors.torch import load_file

from omnilens.core.io import atomic_save_safetensors


@dataclass(frozen=True, eq=False)
class PatchingResult:
    """Patching effects over labelled axes.

    Attributes:
        values: normalised effect, ``(raw - corrupted) / (clean - corrupted)``: 0 = the corrupted
            run's metric, 1 = the clean run's (for AtP, the first-order estimate of it).
        raw: the metric value of each patched run (or its estimate), shape of ``values``.
        axes: axis names, e.g. ``("layer", "pos")``, ``("layer", "kv_head")``.
        labels: per axis, one label per index (token strings for positions, span names, layers, heads).
        sites: the hook name patched at each layer index.
        metric: metric name; ``clean`` / ``corrupted``: its value on the unpatched runs.
        method: ``"exact"``, ``"atp"`` or ``"atp*"``; ``direction``: ``"denoise"`` (clean into
            corrupted) or ``"noise"`` (corrupted into clean).
        provenance: model class, name or path, config digest, omnilens version, executor.
    """

    values: Float[torch.Tensor, "..."]
    raw: Float[torch.Tensor, "..."]
    axes: tuple[str, ...]
    labels: Mapping[str, tuple[str, ...]]
    sites: tuple[str, ...]
    metric: str
    clean: float
    corrupted: float
    method: str = "exact"
    direction: str = "denoise"
    provenance: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        shape = tuple(len(self.labels[a]) for a in self.axes)
        if tuple(self.values.shape) != shape or self.raw.shape != self.values.shape:
            raise ValueError(f"values {tuple(self.values.shape)} / raw {tuple(self.raw.shape)} do not match "
                             f"the labelled axes {dict(zip(self.axes, shape))}")

    @property
    def shape(self) -> tuple[int, ...]:
        """Sizes of the result's axes, in ``axes`` order."""
        return tuple(self.values.shape)

    def __repr__(self) -> str:
        dims = ", ".join(f"{a}={n}" for a, n in zip(self.axes, self.shape))
        return (f"PatchingResult({self.method}, {self.direction}, {self.metric}, [{dims}], "
                f"clean={self.clean:.4g}, corrupted={self.corrupted:.4g})")

    def top(self, k: int = 10, *, by_abs: bool = True, reference: float = 0.0) -> list[tuple[dict[str, str], float]]:
        """The ``k`` largest effects as ``(labels, value)``, ranked by ``value - reference`` (its absolute
        value unless ``by_abs=False``); ``reference=1.0`` ranks by distance from the clean run."""
        flat = self.values.reshape(-1)
        key = flat - reference
        order = (key.abs() if by_abs else key).argsort(descending=True)[:k]
        out = []
        for i in order.tolist():
            idx = torch.unravel_index(torch.tensor(i), self.shape)
            out.append(({a: self.labels[a][int(j)] for a, j in zip(self.axes, idx)}, float(flat[i])))
        return out

    def aggregate(self, axis: str, spans: Mapping[str, Sequence[int]], reduce: str = "sum") -> PatchingResult:
        """Combine indices of ``axis`` into named spans (``"sum"`` or ``"mean"``), e.g. all audio tokens.

        For attribution (additive) estimates ``sum`` is the span's estimate; for exact results it is a
        summary only (patching a whole span is a sweep with ``spans=``).
        """
        if reduce not in ("sum", "mean"):
            raise ValueError(f"reduce must be 'sum' or 'mean', got {reduce!r}")
        d = self.axes.index(axis)
        n = self.shape[d]

        def agg(t):
            parts = []
            for name, idx in spans.items():
                idx = list(idx)
                if not idx or not all(-n <= i < n for i in idx):
                    raise IndexError(f"span {name!r}: indices {idx} outside axis {axis!r} of length {n}")
                part = t.index_select(d, torch.tensor(idx))
                parts.append(part.sum(d) if reduce == "sum" else part.mean(d))
            return torch.stack(parts, d)

        labels = {**self.labels, axis: tuple(spans)}
        return replace(self, values=agg(self.values), raw=agg(self.raw), labels=labels)

    def to_figure(self, **kwargs):
        """A plotly heatmap (see :func:`omnilens.viz.heatmap`)."""
        from omnilens.viz import heatmap

        return heatmap(self, **kwargs)

    # persistence ---------------------------------------------------------------------------------
    def save(self, path: str | os.PathLike) -> Path:
        """Write to a ``.safetensors`` file (tensors + JSON metadata), atomically (temp file + rename)."""
        path = Path(path)
        meta = {"axes": list(self.axes), "labels": {a: list(v) for a, v in self.labels.items()},
                "sites": list(self.sites), "metric": self.metric, "clean": self.clean,
                "corrupted": self.corrupted, "method": self.method, "direction": self.direction,
                "provenance": dict(self.provenance)}
        path.parent.mkdir(parents=True, exist_ok=True)
        return atomic_save_safetensors(path, {"values": self.values.contiguous(), "raw": self.raw.contiguous()},
                                       metadata={"omnilens.patching": json.dumps(meta)})

    @classmethod
    def load(cls, path: str | os.PathLike) -> PatchingResult:
        """Read a result written by :meth:`save`."""
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            header = (f.metadata() or {}).get("omnilens.patching")
        if header is None:
            raise ValueError(f"{path} is not an omnilens patching result (no 'omnilens.patching' metadata)")
        meta = json.loads(header)
        tensors = load_file(str(path))
        return cls(values=tensors["values"], raw=tensors["raw"], axes=tuple(meta["axes"]),
                   labels={a: tuple(v) for a, v in meta["labels"].items()}, sites=tuple(meta["sites"]),
                   metric=meta["metric"], clean=meta["clean"], corrupted=meta["corrupted"],
                   method=meta["method"], direction=meta["direction"], provenance=meta["provenance"])


def normalise(raw: torch.Tensor, clean: float, corrupted: float) -> torch.Tensor:
    """``(raw - corrupted) / (clean - corrupted)``; raises if the two base runs agree."""
    if clean == corrupted:
        raise ValueError(f"clean and corrupted metric values are equal ({clean}); the 0 = corrupted, 1 = clean "
                         "normalisation is undefined: choose inputs or a metric that tell them apart")
    return (raw - corrupted) / (clean - corrupted)


def rank_correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two equally shaped tensors (average ranks for ties)."""
    x, y = _ranks(a.reshape(-1).double()), _ranks(b.reshape(-1).double())
    x, y = x - x.mean(), y - y.mean()
    return float((x @ y) / (x.norm() * y.norm()))


def _ranks(v: torch.Tensor) -> torch.Tensor:
    order = v.argsort()
    ranks = torch.empty_like(v)
    ranks[order] = torch.arange(len(v), dtype=v.dtype)
    for val in v.unique()[v.unique(return_counts=True)[1] > 1]:  # ties share their mean rank
        tie = v == val
        ranks[tie] = ranks[tie].mean()
    return ranks
