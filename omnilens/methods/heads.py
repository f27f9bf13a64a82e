"""Per-head attribution, every result a (layer x head) :class:`HeadScores` with a plotly heatmap.

* :func:`direct_logit_attribution`: each head's direct effect on a logit (difference) at the last
  non-pad token. The final norm's scale is **frozen**: for each example the RMSNorm divisor ``s`` is
  taken from the actual run (``ln_final(x) = w * x / s``, ``s`` recovered from the final residual and
  the norm's output), so the final norm becomes the linear map ``x -> w * x / s`` and contributions of
  all components (embedding, heads, MLPs) add up exactly to the logit difference.
* :func:`diff_of_means_selectivity` / :func:`head_selectivity`: per head, the norm of the difference of
  the mean ``hook_z`` of a positive and a negative example set, over the negative set's spread (RMS
  distance of the negatives to their mean).
* :func:`head_atp`: attribution patching over ``hook_z`` per (layer, head), computed by
  :func:`omnilens.methods.patching.patch_attribution`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from jaxtyping import Float

from omnilens.methods.activations import ActivationDataset, collect


@dataclass
class HeadScores:
    """A score per (layer, head): ``values`` ``[layer head]``; ``sites[i]`` is the ``hook_z`` (or
    ``hook_result``) site of row ``i``, ``layers[i]`` its layer. ``per_example`` ``[example layer head]``
    when the score is a mean over examples; ``extra`` holds scores of other sites (e.g. DLA of
    ``hook_mlp_out``) per example."""

    name: str
    values: Float[torch.Tensor, "layer head"]
    layers: list[int]
    sites: list[str]
    per_example: Float[torch.Tensor, "example layer head"] | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    source: Any = field(default=None, repr=False)

    def top(self, k: int = 5, *, by_abs: bool = False) -> list[tuple[int, int, float]]:
        """The ``k`` highest heads as ``(layer, head, value)`` (by absolute value if ``by_abs``)."""
        return top_heads(self.values, self.layers, k, by_abs=by_abs)

    def figure(self):
        """Plotly heatmap, layer x head (diverging colours centred on 0 when values change sign)."""
        import plotly.graph_objects as go

        v = self.values.float().numpy()
        signed = bool((v < 0).any() and (v > 0).any())
        lim = float(abs(v).max()) if signed else None
        fig = go.Figure(go.Heatmap(z=v, y=self.layers, colorscale="RdBu" if signed else "Viridis",
                                   zmid=0 if signed else None, zmin=-lim if signed else None,
                                   zmax=lim if signed else None))
        fig.update_layout(title=self.name, xaxis_title="head", yaxis_title="layer")
        return fig


def top_heads(values: Float[torch.Tensor, "layer head"], layers: Sequence[int], k: int, *,
              by_abs: bool = False) -> list[tuple[int, int, float]]:
    """The ``k`` highest entries of ``values`` as ``(layers[row], head, value)``, highest first (by absolute
    value if ``by_abs``; ties: earlier row, then earlier head)."""
    flat = values.flatten()
    key = flat.abs() if by_abs else flat
    order = sorted(range(flat.numel()), key=lambda i: (-float(key[i]), i))[:k]
    n_heads = values.shape[1]
    return [(layers[i // n_heads], i % n_heads, float(flat[i])) for i in order]


def _block_sites(lens, site: str, tower: str) -> list:
    specs = sorted((s for s in lens.graph if s.tower == tower and s.site == site and s.layer is not None),
                   key=lambda s: s.layer)
    if not specs:
        raise KeyError(f"no {site} sites in tower {tower or '(root)'!r} of {lens.graph.model_name}")
    return specs


def _tower_site(lens, tower: str, component: str, site: str):
    for s in lens.graph:
        if s.tower == tower and s.layer is None and s.component == component and s.site == site:
            return s
    raise KeyError(f"tower {tower or '(root)'!r} of {lens.graph.model_name} has no {component} {site} site")


# direct logit attribution -----------------------------------------------------------------------
def frozen_inv_scale(
    resid: Float[torch.Tensor, "example d_model"], normalized: Float[torch.Tensor, "example d_model"],
    weight: Float[torch.Tensor, " d_model"],
) -> Float[torch.Tensor, " example"]:
    """``1 / s`` per example such that ``normalized = weight * resid / s`` (least squares, exact for RMSNorm)."""
    wx = resid * weight
    return (wx * normalized).sum(-1) / (wx * wx).sum(-1)


def _ids(ids: int | Sequence[int] | torch.Tensor, n: int, what: str) -> torch.Tensor:
    t = torch.as_tensor(ids, dtype=torch.long).reshape(-1)
    if t.numel() == 1:
        return t.expand(n)
    if t.numel() != n:
        raise ValueError(f"{what}: got {t.numel()} token ids for {n} examples (give one, or one per example)")
    return t


def direct_logit_attribution(
    lens, inputs: Any, target: int | Sequence[int] | torch.Tensor, baseline: int | Sequence[int] | torch.Tensor | None = None,
    *, tower: str = "", extra_sites: Sequence[str] = (), batch_size: int = 8,
) -> HeadScores:
    """Each head's direct contribution to ``logit[target] - logit[baseline]`` (or ``logit[target]``) at
    each example's last non-pad token, through the final norm with its scale frozen (module docstring).

    ``target`` / ``baseline``: one token id, or one per example. ``extra_sites`` (``d_model`` sites such
    as ``hook_embed`` or ``blocks.*.hook_mlp_out``) get the same attribution in ``scores.extra[site]``
    ``[example]``. Returns the mean over examples; ``per_example`` is ``[example layer head]``.
    """
    results = _block_sites(lens, "hook_result", tower)
    norm = _tower_site(lens, tower, "ln_final", "hook_normalized")
    unembed = _tower_site(lens, tower, "unembed", "hook_logits")
    final = _block_sites(lens, "hook_resid_post", tower)[-1]
    extra = lens.graph.names(list(extra_sites)) if extra_sites else []
    names = list(dict.fromkeys([s.name for s in results] + [final.name, norm.name] + extra))
    ds = collect(lens, inputs, names, "last", batch_size=batch_size)
    n = len(ds)
    w_u = lens.adapter.module(unembed.module).weight.detach().float().cpu()
    direction = w_u[_ids(target, n, "target")]
    if baseline is not None:
        direction = direction - w_u[_ids(baseline, n, "baseline")]
    weight = lens.adapter.module(norm.module).weight.detach().float().cpu()
    inv_s = frozen_inv_scale(ds[final.name], ds[norm.name], weight)

    def attribute(x: torch.Tensor) -> torch.Tensor:
        shape = (n,) + (1,) * (x.dim() - 2) + (-1,)
        return (x * weight * inv_s.view(*shape[:-1], 1) * direction.view(shape)).sum(-1)

    per = torch.stack([attribute(ds[s.name]) for s in results], 1)  # [example layer head]
    return HeadScores("direct logit attribution", per.mean(0), [s.layer for s in results],
                      [s.name for s in results], per, {s: attribute(ds[s]) for s in extra})


# diff-of-means selectivity ----------------------------------------------------------------------
def diff_of_means_selectivity(
    pos: Float[torch.Tensor, "n_pos layer head d_head"], neg: Float[torch.Tensor, "n_neg layer head d_head"],
) -> Float[torch.Tensor, "layer head"]:
    """``||mean(pos) - mean(neg)|| / sqrt(mean_i ||neg_i - mean(neg)||²)`` per head (``d_head`` axis reduced).

    A head whose negatives never vary gets ``inf`` (or ``nan`` if the means are equal too).
    """
    mu_n = neg.mean(0)
    diff = (pos.mean(0) - mu_n).norm(dim=-1)
    spread = (neg - mu_n).pow(2).sum(-1).mean(0).sqrt()
    return diff / spread


def head_selectivity(
    ds: ActivationDataset, positive: Any, negative: Any = None, *, site: str = "hook_z", pool: str | None = None,
) -> HeadScores:
    """Diff-of-means selectivity per head from the ``site`` (leaf name, default ``hook_z``) sites of a
    labelled dataset, values ``[example head d_head]``.

    Examples labelled ``positive`` form the positive set; ``negative`` (a label, or ``None`` for every
    other example) the negative set.
    """
    if ds.labels is None:
        raise ValueError("head_selectivity needs a labelled dataset (labels= in collect/stream)")
    names = ds.site_names(site=site)
    if not names:
        raise KeyError(f"the dataset has no {site} sites; sites: {', '.join(ds.sites)}")
    labels = list(ds.labels)
    is_pos = torch.tensor([lab == positive for lab in labels])
    is_neg = ~is_pos if negative is None else torch.tensor([lab == negative for lab in labels])
    if not is_pos.any() or not is_neg.any():
        raise ValueError(f"positive {positive!r} has {int(is_pos.sum())} and negative {negative!r} has "
                         f"{int(is_neg.sum())} examples; both sets need at least one")
    z = torch.stack([ds[s] if pool is None else ds[s, pool] for s in names], 1)  # [example layer head d_head]
    scores = diff_of_means_selectivity(z[is_pos].double(), z[is_neg].double()).float()
    return HeadScores(f"diff-of-means selectivity ({positive!r} vs {negative if negative is not None else 'rest'!r})",
                      scores, [ds.sites[s]["layer"] for s in names], names)


# attribution patching ---------------------------------------------------------------------------
def head_atp(
    lens, clean: Any, corrupted: Any, metric: Callable, *, direction: str = "denoise", tower: str = "",
) -> HeadScores:
    """AtP over ``hook_z`` per (layer, head) via :func:`omnilens.methods.patching.patch_attribution`.

    ``values`` are normalised effects (0 = corrupted metric, 1 = clean); ``source`` keeps the full
    :class:`~omnilens.methods.patching.PatchingResult` (``raw`` estimated metric values, provenance).
    """
    from omnilens.methods.patching import Sweep, patch_attribution

    res = patch_attribution(lens, clean, corrupted, metric, Sweep("hook_z", by=("layer", "head"), tower=tower),
                            direction=direction)
    return HeadScores(f"AtP over hook_z ({res.metric}, {direction})", res.values.float(),
                      [int(x) for x in res.labels["layer"]], list(res.sites), source=res)
