"""Contrastive concept vectors (contrastive activation addition), per concept and layer.

For concept ``c`` at a layer: ``v_c = unit(mean(positives) - mean(negatives))`` where the positives are
the examples labelled ``c`` and the negatives every other example (the other concepts' positives and
the neutral baselines), each example weighted equally.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from jaxtyping import Float

from omnilens.methods.activations import ActivationDataset


@dataclass
class ConceptVectors:
    """Unit concept directions: ``vectors[layer]`` is ``[n_concepts hidden]`` (rows in ``concepts`` order).

    ``sites[layer]`` is the site the vectors were read at (empty when loaded from a readout file).
    """

    concepts: list[str]
    layers: list[int]
    vectors: dict[int, Float[torch.Tensor, "concept hidden"]]
    sites: dict[int, str] = field(default_factory=dict)

    @property
    def hidden_size(self) -> int:
        """Width of the vectors (the residual stream's ``d_model``)."""
        return int(self.vectors[self.layers[0]].shape[1])

    def vector(self, concept: str, layer: int) -> Float[torch.Tensor, " hidden"]:
        """The unit vector of ``concept`` at ``layer``."""
        if concept not in self.concepts:
            raise KeyError(f"unknown concept {concept!r}; concepts: {', '.join(self.concepts)}")
        if layer not in self.vectors:
            raise KeyError(f"no vectors at layer {layer}; layers: {self.layers}")
        return self.vectors[layer][self.concepts.index(concept)]

    def cosine(self, layer: int) -> Float[torch.Tensor, "concept concept"]:
        """Cosine similarity between the concepts at ``layer``."""
        v = self.vectors[layer].float()
        v = v / v.norm(dim=1, keepdim=True)
        return v @ v.T


def contrast(
    x: Float[torch.Tensor, "example hidden"], labels: Sequence[str], concepts: Sequence[str],
) -> Float[torch.Tensor, "concept hidden"]:
    """Unit ``mean(x[label == c]) - mean(x[label != c])`` per concept (computed in float64)."""
    x = x.double()
    rows = []
    for c in concepts:
        pos = torch.tensor([lab == c for lab in labels])
        if not pos.any() or pos.all():
            raise ValueError(f"concept {c!r} has {int(pos.sum())} positives and {int((~pos).sum())} negatives; "
                             "both sets need at least one example")
        diff = x[pos].mean(0) - x[~pos].mean(0)
        rows.append(diff / diff.norm())
    return torch.stack(rows).float()


def concept_vectors(
    ds: ActivationDataset, concepts: Sequence[str] | None = None, *, sites: Sequence[str] | None = None,
    pool: str | None = None, baseline: str = "baseline",
) -> ConceptVectors:
    """Concept vectors from a labelled dataset (labels are concept names, or ``baseline`` for neutral).

    ``sites`` default to every ``d_model`` site of ``ds`` (one per layer); ``concepts`` to every label
    except ``baseline``, sorted.
    """
    if ds.labels is None:
        raise ValueError("concept vectors need a labelled dataset (labels= in collect/stream)")
    labels = [str(lab) for lab in ds.labels]
    concepts = list(concepts) if concepts else sorted(set(labels) - {baseline})
    if sites is None:
        sites = [s for s, info in ds.sites.items() if info["axes"].split()[-1] == "d_model" and info["layer"] is not None]
    by_layer: dict[int, str] = {}
    for s in sites:
        layer = ds.sites[s]["layer"]
        if layer is None:
            raise ValueError(f"site {s!r} is not inside a block (no layer); readout vectors are per layer")
        if layer in by_layer:
            raise ValueError(f"sites {by_layer[layer]!r} and {s!r} are both at layer {layer}; pass one site per layer")
        by_layer[layer] = s
    if not by_layer:
        raise ValueError(f"no d_model block sites in the dataset; sites: {', '.join(ds.sites)}")
    layers = sorted(by_layer)
    vecs = {lay: contrast(ds[by_layer[lay]] if pool is None else ds[by_layer[lay], pool], labels, concepts)
            for lay in layers}
    return ConceptVectors(concepts, layers, vecs, by_layer)
