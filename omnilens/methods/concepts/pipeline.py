"""Corpus to readout in one call: preflight, (load the model), collect, vectors, quality report, export."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from omnilens.methods.activations import ActivationDataset, collect
from omnilens.methods.concepts.corpus import StoryCorpus, preflight
from omnilens.methods.concepts.quality import QualityReport, Thresholds, down_projections, quality_report
from omnilens.methods.concepts.readout import save_readout
from omnilens.methods.concepts.vectors import ConceptVectors, concept_vectors


@dataclass
class ConceptRun:
    """What :func:`build_concepts` produced."""

    corpus: StoryCorpus
    dataset: ActivationDataset
    vectors: ConceptVectors
    report: QualityReport


def build_concepts(
    corpus_root: str | os.PathLike, lens, *, layers: Sequence[int] | None = None, site: str = "hook_resid_post",
    pooling: str = "mean", out_dir: str | os.PathLike | None = None, concepts: Sequence[str] | None = None,
    batch_size: int = 8, thresholds: Thresholds = Thresholds(), progress: bool = False, verbose: bool = True,
) -> ConceptRun:
    """Concept vectors and their quality report from a story corpus.

    ``lens`` is a :class:`~omnilens.Lens` or a zero-argument function returning one: the function is
    called only after :func:`~omnilens.methods.concepts.corpus.preflight` passed, so a bad corpus fails
    before any model loads. Reads ``site`` (a block site leaf, e.g. ``hook_resid_post``) of the root
    tower at ``layers`` (default all) plus ``attn.hook_z`` there, pooled by ``pooling``. With
    ``out_dir``, writes ``readout.safetensors``/``readout.json`` and ``quality.json``/``quality.html``.
    """
    corpus = preflight(corpus_root, list(concepts) if concepts else None)
    if callable(lens) and not hasattr(lens, "graph"):
        lens = lens()
    specs = [s for s in lens.graph if s.tower == "" and s.layer is not None and s.site == site]
    if not specs:
        raise KeyError(f"no block site {site!r} in {lens.graph.model_name}")
    wanted = sorted({s.layer for s in specs}) if layers is None else list(layers)
    missing = sorted(set(wanted) - {s.layer for s in specs})
    if missing:
        raise ValueError(f"layers {missing} do not exist; {site} has layers 0..{max(s.layer for s in specs)}")
    read = [s.name for s in specs if s.layer in wanted]
    read += [s.name for s in lens.graph if s.tower == "" and s.layer in wanted and s.site == "hook_z"]
    texts, labels = corpus.examples()
    ds = collect(lens, texts, read, pooling, labels=labels, batch_size=batch_size, progress=progress)
    vectors = concept_vectors(ds, corpus.concepts, sites=[s.name for s in specs if s.layer in wanted])
    report = quality_report(ds, vectors, w_down=down_projections(lens, wanted), texts=texts, thresholds=thresholds,
                            verbose=verbose)
    if out_dir is not None:
        save_readout(vectors, out_dir)
        report.save(Path(out_dir))
    return ConceptRun(corpus, ds, vectors, report)
