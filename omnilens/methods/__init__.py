"""Interpretability methods on the hook graph, each taking a :class:`~omnilens.Lens` and site names:
interventions, patching, activation datasets, probes, head attribution, concept vectors, vision embeddings.
Public paths are the short ones (``omnilens.patching``, ``omnilens.probing``, ...)."""
