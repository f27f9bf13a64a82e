"""Activation datasets: run many inputs through a :class:`~omnilens.lens.Lens`, pool chosen sites per
example, keep the result in memory (:func:`collect`) or stream it to disk (:func:`stream`).

Inputs are a list of strings (tokenized per batch with the lens's tokenizer; left or right padding),
token ids ``[example pos]``, or a list of dicts of forward kwargs, one example each (batch axis of 1;
the multimodal builders' output). Pooling works on a site's ``batch pos`` axes and keeps the rest:

* ``"last"``: the last non-pad token of each example,
* ``"mean"``: the mean over non-pad tokens,
* ``"all"``: every non-pad token (stored flat, ``[token ...]``, with per-example lengths),
* :func:`span` ``(spans)``: the mean over a token span per example (or all of its tokens), positions
  counted from the example's first non-pad token; a span can be found per example, e.g. the run of
  an image or audio placeholder token (:func:`token_span`).

On disk a dataset is a folder of safetensors shards (one batch each: memory stays bounded by one
batch) plus ``manifest.json`` (sites with their layer and axes, pooling, labels, model provenance and a
fingerprint of the inputs). Every file is written atomically (temporary file + rename); an interrupted
run called again with the same arguments resumes after the last finished shard and produces the same
files as an uninterrupted run.
"""

from omnilens.methods.activations.collect import collect, load, stream
from omnilens.methods.activations.dataset import FORMAT, MANIFEST, ActivationDataset, fingerprint, provenance
from omnilens.methods.activations.pooling import Pooling, SpanFn, pool, span, token_span

__all__ = ["FORMAT", "MANIFEST", "ActivationDataset", "Pooling", "SpanFn", "collect", "fingerprint", "load", "pool",
           "provenance", "span", "stream", "token_span"]
