"""Contrastive concept vectors from a story corpus, their quality report, and the serving readout format.

    from omnilens.methods.concepts import build_concepts, load_readout
    run = build_concepts("corpus/", lambda: omnilens.load("path/to/model"), layers=[4, 8], out_dir="readout/")
    print(run.report.summary())
    vectors = load_readout("readout/")          # ConceptVectors: vectors[layer] fp16 [n_concepts hidden]
"""

from omnilens.methods.concepts.corpus import BASELINE, CorpusError, StoryCorpus, load_corpus, preflight, split_stories
from omnilens.methods.concepts.pipeline import ConceptRun, build_concepts
from omnilens.methods.concepts.quality import (
    ConceptQuality, QualityReport, Thresholds, down_projections, pc1_ratio, quality_report, ridge_r2, triage,
)
from omnilens.methods.concepts.readout import load_readout, save_readout
from omnilens.methods.concepts.vectors import ConceptVectors, concept_vectors, contrast

__all__ = [
    "BASELINE", "ConceptQuality", "ConceptRun", "ConceptVectors", "CorpusError", "QualityReport", "StoryCorpus",
    "Thresholds", "build_concepts", "concept_vectors", "contrast", "down_projections", "load_corpus",
    "load_readout", "pc1_ratio", "preflight", "quality_report", "ridge_r2", "save_readout", "split_stories",
    "triage",
]
