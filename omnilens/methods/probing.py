"""Linear probes on activation datasets: per site and pooling (layer sweeps), and per attention head.

A probe is scikit-learn's ``LogisticRegression`` (L2, ``C``), scored by stratified k-fold
cross-validation (held-out accuracy and macro-F1, mean over folds), then refit on every example for
its direction. Features are used as they are by default: the L2 penalty is then isotropic in the
site's basis and the direction stays close to the class-mean difference. ``standardize=True`` scales
each feature first (helps models with outlier dimensions); the weights are mapped back (``w / std``),
but the direction then leans toward the within-class-whitened (LDA-like) normal. Directions are unit
vectors in the site's own basis, ready to add at that site as steering vectors; per-head
directions live in the head's ``d_head`` basis and map to ``d_model`` through the head's slice of
``W_O`` (:meth:`HeadProbes.residual_directions`).

The per-head sweep over ``hook_z`` (every head its own probe, heads ranked by held-out accuracy,
top-K picked) is the recipe of PAS (personality alignment by activation steering).
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from jaxtyping import Float
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import accuracy_score, f1_score
from sklearn.model_selection import StratifiedKFold
from sklearn.preprocessing import StandardScaler

from omnilens.methods.activations import ActivationDataset
from omnilens.methods.heads import top_heads
from omnilens.core.io import atomic_save_safetensors


@dataclass
class ProbeResult:
    """One probe: held-out scores and the refit model's weights in the site's basis.

    ``coef`` is ``[n_directions d]``: one row for a binary probe (pointing to ``classes[1]``), one per
    class otherwise.
    """

    accuracy: float
    macro_f1: float
    fold_accuracy: list[float]
    fold_macro_f1: list[float]
    classes: list[Any]
    coef: Float[torch.Tensor, "n_directions d"]
    intercept: Float[torch.Tensor, " n_directions"]

    def direction(self, label: Any = None) -> Float[torch.Tensor, " d"]:
        """Unit vector pointing toward ``label`` (default: ``classes[1]`` for binary, else required)."""
        if len(self.classes) == 2:
            label = self.classes[1] if label is None else label
            sign = {self.classes[1]: 1.0, self.classes[0]: -1.0}.get(label)
            if sign is None:
                raise KeyError(f"label {label!r} is not one of the probe's classes {self.classes}")
            w = sign * self.coef[0]
        else:
            if label not in self.classes:
                raise KeyError(f"label {label!r} is not one of the probe's classes {self.classes}")
            w = self.coef[self.classes.index(label)]
        if not w.norm() > 0:
            raise ValueError("the probe's weights are zero (no linear signal for it to point along)")
        return w / w.norm()


    def predict(self, x: Float[torch.Tensor, "example d"]) -> list[Any]:
        """Predicted class per example from the refit weights (``x`` in the site's basis, extra axes flattened)."""
        scores = x.reshape(x.shape[0], -1).to(self.coef) @ self.coef.T + self.intercept
        if len(self.classes) == 2:
            return [self.classes[int(s > 0)] for s in scores[:, 0]]
        return [self.classes[int(i)] for i in scores.argmax(1)]


def fit_probe(
    x: Float[torch.Tensor, "example d"], y: Sequence[Any], *, folds: int = 5, C: float = 1.0, seed: int = 0,
    standardize: bool = False, max_iter: int = 2000,
) -> ProbeResult:
    """Logistic-regression probe with stratified ``folds``-fold cross-validation.

    ``x`` is ``[example d]`` (extra axes are flattened); ``folds`` shrinks to the smallest class count
    when a class has fewer examples (at least 2 are needed).
    """
    X = x.reshape(x.shape[0], -1).double().numpy()
    y = np.asarray(list(y))
    if len(y) != len(X):
        raise ValueError(f"got {len(y)} labels for {len(X)} examples")
    classes, counts = np.unique(y, return_counts=True)
    if len(classes) < 2:
        raise ValueError(f"a probe needs at least two classes, got {classes.tolist()}")
    k = min(folds, int(counts.min()))
    if k < 2:
        raise ValueError(f"class {classes[counts.argmin()]!r} has {counts.min()} example(s); cross-validation needs 2")

    def fit(rows: np.ndarray) -> tuple[StandardScaler | None, LogisticRegression]:
        scaler = StandardScaler().fit(X[rows]) if standardize else None
        xs = scaler.transform(X[rows]) if scaler is not None else X[rows]
        return scaler, LogisticRegression(C=C, max_iter=max_iter).fit(xs, y[rows])

    accs, f1s = [], []
    for train, test in StratifiedKFold(k, shuffle=True, random_state=seed).split(X, y):
        scaler, lr = fit(train)
        pred = lr.predict(scaler.transform(X[test]) if scaler is not None else X[test])
        accs.append(float(accuracy_score(y[test], pred)))
        f1s.append(float(f1_score(y[test], pred, average="macro", zero_division=0)))
    scaler, lr = fit(np.arange(len(y)))
    coef = lr.coef_ / scaler.scale_ if scaler is not None else lr.coef_
    intercept = lr.intercept_ - coef @ scaler.mean_ if scaler is not None else lr.intercept_
    return ProbeResult(
        accuracy=float(np.mean(accs)), macro_f1=float(np.mean(f1s)), fold_accuracy=accs, fold_macro_f1=f1s,
        classes=lr.classes_.tolist(), coef=torch.from_numpy(coef).float(),
        intercept=torch.from_numpy(np.asarray(intercept)).float(),
    )


def _labels(ds: ActivationDataset, labels: Sequence[Any] | None) -> list[Any]:
    if labels is None:
        labels = ds.labels
    if labels is None:
        raise ValueError("the dataset has no labels: pass labels=")
    return list(labels)


def _select_sites(ds: ActivationDataset, sites: str | Sequence[str] | None) -> list[str]:
    if sites is None:
        return list(ds.sites)
    pats = [sites] if isinstance(sites, str) else list(sites)
    out = [n for n in ds.sites if any(fnmatch.fnmatchcase(n, p) for p in pats)]
    if not out:
        raise KeyError(f"no dataset site matches {pats}; sites: {', '.join(ds.sites)}")
    return out


def _fixed_pools(ds: ActivationDataset, pools: Sequence[str] | None) -> list[str]:
    pools = list(ds.pools) if pools is None else list(pools)
    for p in pools:
        if p not in ds.pools:
            raise KeyError(f"pooling {p!r} is not in the dataset; poolings: {', '.join(ds.pools)}")
        if p in ds.lengths:
            raise ValueError(f"pooling {p!r} keeps every token; probes need one vector per example")
    return pools


# layer sweep ------------------------------------------------------------------------------------
@dataclass
class ProbeSweep:
    """Probe scores per site (rows, forward order, with their layers) and pooling (columns).

    ``accuracy`` and ``macro_f1`` are ``[site pool]``; ``results[(site, pool)]`` the full probes.
    """

    sites: list[str]
    layers: list[int | None]
    pools: list[str]
    accuracy: Float[torch.Tensor, "site pool"]
    macro_f1: Float[torch.Tensor, "site pool"]
    results: dict[tuple[str, str], ProbeResult] = field(repr=False)

    def best(self, metric: str = "accuracy") -> tuple[str, str, ProbeResult]:
        """``(site, pool, probe)`` with the highest held-out ``metric`` (first in forward order on ties)."""
        scores = getattr(self, metric)
        i, j = divmod(int(scores.flatten().argmax()), scores.shape[1])
        return self.sites[i], self.pools[j], self.results[(self.sites[i], self.pools[j])]

    def steering_directions(self, label: Any = None, pool: str | None = None) -> dict[str, torch.Tensor]:
        """Unit direction toward ``label`` per site (``[d]``, the site's basis) for one pooling."""
        pool = pool or self.pools[0]
        return {s: self.results[(s, pool)].direction(label) for s in self.sites}

    def figure(self, metric: str = "accuracy", kind: str = "line"):
        """Plotly figure: ``"line"`` (held-out ``metric`` over layers, one line per pooling) or
        ``"heatmap"`` (layer x pooling / token span)."""
        import plotly.graph_objects as go

        scores = getattr(self, metric).numpy()
        x = [lay if lay is not None else s for lay, s in zip(self.layers, self.sites)]
        if kind == "heatmap":
            fig = go.Figure(go.Heatmap(z=scores.T, x=x, y=self.pools, colorscale="Viridis", zmin=0, zmax=1,
                                       hovertext=[[f"{s} / {p}" for s in self.sites] for p in self.pools]))
            fig.update_layout(xaxis_title="layer", yaxis_title="token span / pooling")
        elif kind == "line":
            fig = go.Figure([go.Scatter(x=x, y=scores[:, j], mode="lines+markers", name=p, text=self.sites)
                             for j, p in enumerate(self.pools)])
            fig.update_layout(xaxis_title="layer", yaxis_title=f"held-out {metric}", yaxis_range=[0, 1.02])
        else:
            raise ValueError(f"unknown figure kind {kind!r}; expected 'line' or 'heatmap'")
        fig.update_layout(title=f"probe {metric} per layer")
        return fig


def probe_sweep(
    ds: ActivationDataset, sites: str | Sequence[str] | None = None, pools: Sequence[str] | None = None, *,
    labels: Sequence[Any] | None = None, **probe_kw: Any,
) -> ProbeSweep:
    """One probe per (site, pooling) of ``ds``; ``sites`` are globs over the dataset's sites."""
    y = _labels(ds, labels)
    names = _select_sites(ds, sites)
    pools = _fixed_pools(ds, pools)
    results = {(s, p): fit_probe(ds[s, p], y, **probe_kw) for s in names for p in pools}
    acc = torch.tensor([[results[(s, p)].accuracy for p in pools] for s in names])
    f1 = torch.tensor([[results[(s, p)].macro_f1 for p in pools] for s in names])
    return ProbeSweep(names, [ds.sites[s]["layer"] for s in names], pools, acc, f1, results)


# per-head probes --------------------------------------------------------------------------------
@dataclass
class HeadProbes:
    """One probe per attention head: ``accuracy`` and ``macro_f1`` are ``[layer head]``.

    ``sites[i]`` is the ``hook_z`` site of row ``i`` and ``layers[i]`` its layer.
    """

    sites: list[str]
    layers: list[int]
    accuracy: Float[torch.Tensor, "layer head"]
    macro_f1: Float[torch.Tensor, "layer head"]
    results: dict[tuple[int, int], ProbeResult] = field(repr=False)

    def top(self, k: int = 5) -> list[tuple[int, int, float]]:
        """The ``k`` best heads as ``(layer, head, accuracy)``, best first (ties: earlier first)."""
        return top_heads(self.accuracy, self.layers, k)

    def directions(self, k: int = 5, label: Any = None, heads: Sequence[tuple[int, int]] | None = None,
                   ) -> dict[tuple[str, int], torch.Tensor]:
        """Unit ``[d_head]`` directions of the top ``k`` heads (or of ``heads``, ``(layer, head)`` pairs),
        keyed ``(hook_z site, head)``."""
        row = dict(zip(self.layers, self.sites))
        chosen = [(lay, h) for lay, h, _ in self.top(k)] if heads is None else list(heads)
        return {(row[lay], h): self.results[(lay, h)].direction(label) for lay, h in chosen}

    def residual_directions(self, lens, k: int = 5, label: Any = None,
                            heads: Sequence[tuple[int, int]] | None = None) -> dict[tuple[str, int], torch.Tensor]:
        """The heads' directions (as :meth:`directions`) mapped through their ``W_O`` slice to unit
        ``[d_model]`` vectors. ``W_O`` is the weight of the module the ``hook_z`` site reads (the
        o_proj, found through the graph spec). A head whose ``W_O`` slice sends the direction to zero
        raises ``ValueError``."""
        out = {}
        for (site, h), v in self.directions(k, label, heads).items():
            w = head_out_weight(lens, site, h)
            u = (w @ v.to(w.device, w.dtype)).float().cpu()
            if not u.norm() > 0:
                raise ValueError(f"{site!r} head {h}: W_O maps the probe direction to zero; no residual direction")
            out[(site, h)] = u / u.norm()
        return out

    def figure(self, metric: str = "accuracy"):
        """Plotly heatmap of held-out ``metric``, layer x head."""
        import plotly.graph_objects as go

        fig = go.Figure(go.Heatmap(z=getattr(self, metric).numpy(), y=self.layers, colorscale="Viridis",
                                   zmin=0, zmax=1))
        fig.update_layout(title=f"per-head probe {metric} (hook_z)", xaxis_title="head", yaxis_title="layer")
        return fig


def head_out_weight(lens, site: str, head: int) -> Float[torch.Tensor, "d_model d_head"]:
    """Columns of the output projection that ``head`` of the ``hook_z`` ``site`` writes through."""
    spec = lens.graph[site]
    if spec.site != "hook_z":
        raise ValueError(f"{site!r} is a {spec.site} site; expected a hook_z site")
    weight = lens.adapter.module(spec.module).weight.detach()
    n_heads, d_head = spec.view.n_heads, spec.view.d_head
    if not 0 <= head < n_heads:
        raise ValueError(f"{site!r}: head {head} out of range 0..{n_heads - 1}")
    return weight[:, head * d_head:(head + 1) * d_head]


def head_probes(
    ds: ActivationDataset, sites: str | Sequence[str] = "*hook_z", pool: str | None = None, *,
    labels: Sequence[Any] | None = None, **probe_kw: Any,
) -> HeadProbes:
    """A probe on every head of every ``hook_z`` site of ``ds`` (values ``[example head d_head]``)."""
    y = _labels(ds, labels)
    names = [s for s in _select_sites(ds, sites) if ds.sites[s]["site"] == "hook_z"]
    if not names:
        raise KeyError(f"no hook_z site in the dataset matches {sites!r}")
    pool = _fixed_pools(ds, [pool] if pool else None)[0]
    layers = [ds.sites[s]["layer"] for s in names]
    results = {}
    for s, lay in zip(names, layers):
        x = ds[s, pool]
        for h in range(x.shape[1]):
            results[(lay, h)] = fit_probe(x[:, h], y, **probe_kw)
    n_heads = ds[names[0], pool].shape[1]
    acc = torch.tensor([[results[(lay, h)].accuracy for h in range(n_heads)] for lay in layers])
    f1 = torch.tensor([[results[(lay, h)].macro_f1 for h in range(n_heads)] for lay in layers])
    return HeadProbes(names, layers, acc, f1, results)


def save_directions(directions: dict[Any, torch.Tensor], path: str | os.PathLike) -> None:
    """Write steering directions to a safetensors file (atomically); keys ``site`` or ``site|head``."""
    tensors = {(k if isinstance(k, str) else f"{k[0]}|{k[1]}"): v.detach().float().contiguous()
               for k, v in directions.items()}
    atomic_save_safetensors(path, tensors)
