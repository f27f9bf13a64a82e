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

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from jaxtyping import Bool, Float, Int
from safetensors.torch import load_file
from tqdm.auto import tqdm

from omnilens.executors.base import Read
from omnilens.io import atomic_save_safetensors, atomic_write_json

FORMAT = "omnilens.activations/1"
MANIFEST = "manifest.json"
SpanFn = Callable[[Int[torch.Tensor, " pos"]], tuple[int, int]]


# pooling ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Pooling:
    """How one example's tokens are pooled: ``kind`` is ``"last"``, ``"mean"``, ``"all"`` or ``"span"``.

    For ``"span"``: ``spans`` is a list of ``(start, end)`` per example or a function of the example's
    non-pad token ids ``[pos]`` returning ``(start, end)``; ``reduce`` is ``"mean"`` or ``"all"``.
    """

    kind: str
    spans: Sequence[tuple[int, int]] | SpanFn | None = None
    reduce: str = "mean"

    def __post_init__(self):
        if self.kind not in ("last", "mean", "all", "span"):
            raise ValueError(f"unknown pooling {self.kind!r}; expected 'last', 'mean', 'all' or span(...)")
        if self.kind == "span" and (self.spans is None or self.reduce not in ("mean", "all")):
            raise ValueError("span pooling needs spans (a list of (start, end) or a function) and reduce 'mean'|'all'")

    @property
    def variable(self) -> bool:
        """True when each example keeps a variable number of tokens (stored flat)."""
        return self.kind == "all" or (self.kind == "span" and self.reduce == "all")

    def describe(self) -> dict[str, Any]:
        """The pooling as JSON-able data (kind; for spans, the reduction and where the spans came from)."""
        out: dict[str, Any] = {"kind": self.kind}
        if self.kind == "span":
            out["reduce"] = self.reduce
            out["spans"] = "per-example list" if not callable(self.spans) else getattr(self.spans, "__name__", "function")
        return out


def span(spans: Sequence[tuple[int, int]] | SpanFn, reduce: str = "mean") -> Pooling:
    """Span pooling: ``spans[i] = (start, end)`` (end exclusive, from the first non-pad token) or a function."""
    return Pooling("span", spans, reduce)


def token_span(token_id: int) -> SpanFn:
    """A span function: the first contiguous run of ``token_id`` (e.g. an image or audio placeholder)."""

    def find(ids: torch.Tensor) -> tuple[int, int]:
        hits = (ids == token_id).nonzero().flatten()
        if hits.numel() == 0:
            raise ValueError(f"token id {token_id} does not occur in the example")
        start = int(hits[0])
        end = start
        while end < ids.numel() and int(ids[end]) == token_id:
            end += 1
        return start, end

    find.__name__ = f"token_span({token_id})"
    return find


def _as_pooling(p: str | Pooling) -> Pooling:
    return p if isinstance(p, Pooling) else Pooling(p)


def _poolings(pooling: str | Pooling | Mapping[str, str | Pooling]) -> dict[str, Pooling]:
    if isinstance(pooling, Mapping):
        if not pooling:
            raise ValueError("pooling mapping is empty")
        return {str(k): _as_pooling(v) for k, v in pooling.items()}
    p = _as_pooling(pooling)
    return {p.kind: p}


def pool(
    value: Float[torch.Tensor, "batch pos *rest"], mask: Bool[torch.Tensor, "batch pos"], pooling: Pooling,
    spans: Int[torch.Tensor, "batch 2"] | None = None,
) -> tuple[torch.Tensor, Int[torch.Tensor, " batch"] | None]:
    """Pool ``value`` over its ``pos`` axis per example, ignoring pad positions (``mask`` False).

    Returns ``([batch *rest], None)`` for fixed-size poolings and ``([token *rest], lengths [batch])``
    for variable ones. ``spans`` are absolute ``[start, end)`` positions (needed for span pooling).
    """
    mask = mask.to(value.device, torch.bool)
    if pooling.kind == "span":
        pos = torch.arange(mask.shape[1], device=value.device)
        s = spans.to(value.device)
        mask = mask & (pos >= s[:, :1]) & (pos < s[:, 1:])
        kind = pooling.reduce
    else:
        kind = pooling.kind
    if kind == "last":
        last = mask.shape[1] - 1 - mask.flip(-1).to(torch.int8).argmax(-1)
        return value[torch.arange(value.shape[0], device=value.device), last], None
    if kind == "mean":
        w = mask.to(value.dtype).view(*mask.shape, *([1] * (value.dim() - 2)))
        return (value * w).sum(1) / w.sum(1), None
    return value[mask], mask.sum(1)


# the dataset ------------------------------------------------------------------------------------
@dataclass
class ActivationDataset:
    """Pooled activations per (site, pooling), with labels and provenance.

    ``ds[site]`` (one pooling) or ``ds[site, pool]`` is ``[example *rest]`` (``rest`` = the site's axes
    after ``batch pos``, e.g. ``head d_head`` for ``hook_z``); variable poolings are ``[token *rest]``
    with ``ds.lengths[pool]`` ``[example]``. ``sites`` maps each name to its spec fields (``layer``,
    ``tower``, ``component``, ``site``, ``axes``), so consumers never parse names.
    """

    sites: dict[str, dict[str, Any]]
    pools: dict[str, dict[str, Any]]
    data: dict[tuple[str, str], torch.Tensor]
    labels: list[Any] | None = None
    lengths: dict[str, torch.Tensor] = field(default_factory=dict)
    spans: dict[str, torch.Tensor] = field(default_factory=dict)
    provenance: dict[str, Any] = field(default_factory=dict)

    def __getitem__(self, key: str | tuple[str, str]) -> torch.Tensor:
        site, pool_name = key if isinstance(key, tuple) else (key, None)
        if site not in self.sites:
            raise KeyError(f"site {site!r} is not in this dataset; sites: {', '.join(self.sites)}")
        if pool_name is None:
            if len(self.pools) != 1:
                raise KeyError(f"several poolings {list(self.pools)}: index as ds[{site!r}, pool]")
            pool_name = next(iter(self.pools))
        if pool_name not in self.pools:
            raise KeyError(f"pooling {pool_name!r} is not in this dataset; poolings: {', '.join(self.pools)}")
        return self.data[(site, pool_name)]

    def __len__(self) -> int:
        site, pool_name = next(iter(self.data))
        return len(self.lengths[pool_name]) if pool_name in self.lengths else len(self.data[(site, pool_name)])

    def site_names(self, **fields: Any) -> list[str]:
        """Sites whose spec fields equal ``fields`` (e.g. ``site="hook_z"``), in forward order."""
        return [n for n, info in self.sites.items() if all(info.get(k) == v for k, v in fields.items())]


# running ----------------------------------------------------------------------------------------
def _batches(inputs: Any, batch_size: int) -> list[tuple[int, int]]:
    n = _n_examples(inputs)
    if isinstance(inputs, Sequence) and not isinstance(inputs, str) and n and isinstance(inputs[0], Mapping):
        batch_size = 1  # each dict is one example's forward kwargs
    return [(a, min(a + batch_size, n)) for a in range(0, n, batch_size)]


def _n_examples(inputs: Any) -> int:
    if isinstance(inputs, str):
        raise TypeError("inputs must be a list of examples, not a single string")
    return int(inputs.shape[0]) if isinstance(inputs, torch.Tensor) else len(inputs)


def _model_inputs(lens, inputs: Any, a: int, b: int) -> dict[str, Any]:
    chunk = inputs[a:b]
    if isinstance(chunk, Sequence) and chunk and isinstance(chunk[0], Mapping):
        return lens.to_inputs(dict(chunk[0]))
    return lens.to_inputs(list(chunk) if not isinstance(chunk, torch.Tensor) else chunk)


def _input_mask(kw: Mapping[str, Any]) -> torch.Tensor | None:
    """``[batch pos]`` non-pad mask from the forward kwargs (all ones without an attention mask)."""
    m = kw.get("attention_mask")
    if isinstance(m, torch.Tensor) and m.dim() == 2:
        return m.bool().cpu()
    ids = kw.get("input_ids")
    return torch.ones(ids.shape[:2], dtype=torch.bool) if isinstance(ids, torch.Tensor) and ids.dim() == 2 else None


def _resolve_spans(p: Pooling, kw: Mapping[str, Any], mask: torch.Tensor, a: int) -> torch.Tensor:
    """Absolute ``[start, end)`` per example of the batch starting at example ``a``."""
    first = mask.to(torch.int8).argmax(-1)
    length = mask.sum(-1)
    ids = kw.get("input_ids")
    out = []
    for i in range(mask.shape[0]):
        if callable(p.spans):
            if ids is None:
                raise ValueError("a span function needs input_ids in the inputs")
            row = ids[i].cpu()[mask[i]]
            s, e = p.spans(row)
        else:
            s, e = p.spans[a + i]
        if not 0 <= s < e <= int(length[i]):
            raise ValueError(f"example {a + i}: span ({s}, {e}) is empty or outside its {int(length[i])} tokens")
        out.append((int(first[i]) + s, int(first[i]) + e))
    return torch.tensor(out, dtype=torch.long)


def _check_batch(n: int, a: int, b: int, where: str) -> None:
    if n != b - a:
        raise ValueError(f"examples {a}..{b - 1} gave a batch of {n} in {where}; "
                         "each dict input must hold exactly one example (batch axis of 1)")


def _run_batch(lens, inputs, a, b, site_names, pools, dtype) -> dict[str, torch.Tensor]:
    """Tensors of one batch: ``site|pool`` values, ``__lengths__|pool`` and ``__spans__|pool``.

    Spans are resolved (and checked) before the forward; the mask comes from the inputs.
    """
    kw = _model_inputs(lens, inputs, a, b)
    mask = _input_mask(kw)
    if mask is not None:
        _check_batch(mask.shape[0], a, b, "the inputs")
    out: dict[str, torch.Tensor] = {}
    span_of: dict[str, torch.Tensor] = {}
    for pname, p in pools.items():
        if p.kind == "span":
            if mask is None:
                raise ValueError("span pooling needs input_ids or an attention_mask in the inputs")
            span_of[pname] = out[f"__spans__|{pname}"] = _resolve_spans(p, kw, mask, a)
    res = lens.run(kw, [Read(n, to=None) for n in site_names])
    for name in site_names:
        spec = lens.graph[name]
        visits = res.values[name]
        if len(visits) != 1:
            raise ValueError(f"site {name!r} fired {len(visits)} times in one forward; pooling needs one visit")
        value = visits[0].movedim((spec.axis("batch"), spec.axis("pos")), (0, 1))
        _check_batch(value.shape[0], a, b, f"site {name!r}")
        if mask is None:
            mask = torch.ones(value.shape[:2], dtype=torch.bool)
        if tuple(mask.shape) != tuple(value.shape[:2]):
            raise ValueError(f"site {name!r} is [batch pos] = {tuple(value.shape[:2])} but the attention_mask is "
                             f"{tuple(mask.shape)}; pooling needs one mask entry per position")
        for pname, p in pools.items():
            pooled, lengths = pool(value.to(dtype), mask, p, span_of.get(pname))
            out[f"{name}|{pname}"] = pooled.cpu().contiguous()
            if lengths is not None:
                out[f"__lengths__|{pname}"] = lengths.cpu()
    return out


def _site_info(lens, names: Sequence[str]) -> dict[str, dict[str, Any]]:
    return {n: {"layer": s.layer, "tower": s.tower, "component": s.component, "site": s.site, "axes": s.axes}
            for n in names for s in [lens.graph[n]]}


def provenance(lens) -> dict[str, Any]:
    """Model class, a hash of its config, parameter dtype, tokenizer padding side and omnilens version."""
    from omnilens import __version__

    cfg = lens.model.config.to_dict()
    cfg.pop("_attn_implementation_internal", None)
    digest = hashlib.sha256(json.dumps(cfg, sort_keys=True, default=str).encode()).hexdigest()
    param = next(lens.model.parameters(), None)
    return {
        "model_class": type(lens.model).__name__, "config_sha256": digest,
        "dtype": str(param.dtype) if param is not None else None,
        "padding_side": getattr(lens.tokenizer, "padding_side", None), "omnilens_version": __version__,
    }


def fingerprint(inputs: Any) -> str:
    """sha256 over the examples (strings, tensors, dicts of either): resuming checks it is unchanged."""
    h = hashlib.sha256()

    def feed(x: Any) -> None:
        if isinstance(x, str):
            h.update(b"s" + x.encode())
        elif isinstance(x, torch.Tensor):
            t = x.detach().cpu().contiguous()
            h.update(f"t{t.dtype}{tuple(t.shape)}".encode() + t.view(torch.uint8).numpy().tobytes())
        elif isinstance(x, Mapping):
            for k in sorted(x):
                h.update(f"k{k}".encode())
                feed(x[k])
        elif isinstance(x, Sequence):
            h.update(f"l{len(x)}".encode())
            for item in x:
                feed(item)
        else:
            h.update(f"o{x!r}".encode())

    feed(inputs)
    return h.hexdigest()


def _prepare(lens, inputs, sites, pooling, labels):
    """Check everything that can be checked before any forward runs."""
    names = lens.graph.names(sites, include_opt_in=None)
    for name in names:
        spec = lens.graph[name]
        if spec.axis("batch") is None or spec.axis("pos") is None:
            raise ValueError(f"site {name!r} has axes [{spec.axes}]; pooling needs 'batch' and 'pos' axes")
    pools = _poolings(pooling)
    n = _n_examples(inputs)
    if n == 0:
        raise ValueError("inputs are empty")
    if labels is not None:
        if len(labels) != n:
            raise ValueError(f"got {len(labels)} labels for {n} inputs")
        labels = [x.item() if hasattr(x, "item") else x for x in labels]  # numpy / torch scalars -> JSON
    for pname, p in pools.items():
        if p.kind == "span" and not callable(p.spans) and len(p.spans) != n:
            raise ValueError(f"pooling {pname!r}: got {len(p.spans)} spans for {n} inputs")
    return names, pools, n, labels


def _iter_batches(lens, inputs, names, pools, batch_size, dtype, start, progress, desc,
                  stop: int | None = None) -> Iterator[tuple[int, int, dict]]:
    """``(start, stop, tensors)`` for batches ``start`` to ``stop``, with a progress bar (ETA) over examples."""
    batches = _batches(inputs, batch_size)
    n = _n_examples(inputs)
    with tqdm(total=n, initial=batches[start][0] if start < len(batches) else n,
              unit="ex", desc=desc, disable=not progress) as bar:
        for a, b in batches[start:stop]:
            yield a, b, _run_batch(lens, inputs, a, b, names, pools, dtype)
            bar.update(b - a)


def _assemble(parts: list[dict[str, torch.Tensor]], sites, pools_desc, labels, prov) -> ActivationDataset:
    keys = parts[0].keys()
    cat = {k: torch.cat([p[k] for p in parts]) for k in keys}
    data = {(s, p): cat[f"{s}|{p}"] for s in sites for p in pools_desc}
    lengths = {p: cat[f"__lengths__|{p}"] for p in pools_desc if f"__lengths__|{p}" in cat}
    spans = {p: cat[f"__spans__|{p}"] for p in pools_desc if f"__spans__|{p}" in cat}
    return ActivationDataset(sites, pools_desc, data, labels, lengths, spans, prov)


def collect(
    lens, inputs: Any, sites: str | Sequence[str], pooling: str | Pooling | Mapping[str, str | Pooling] = "last", *,
    labels: Sequence[Any] | None = None, batch_size: int = 8, dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> ActivationDataset:
    """Pooled activations of ``sites`` (names or globs) for every input, in memory.

    ``pooling`` is one pooling or a mapping ``name -> pooling`` (several poolings from one forward).
    Values are stored as ``dtype`` on the CPU.
    """
    names, pools, _, labels = _prepare(lens, inputs, sites, pooling, labels)
    parts = [t for _, _, t in _iter_batches(lens, inputs, names, pools, batch_size, dtype, 0, progress, "activations")]
    return _assemble(parts, _site_info(lens, names), {k: p.describe() for k, p in pools.items()},
                     list(labels) if labels is not None else None, provenance(lens))


def stream(
    lens, inputs: Any, sites: str | Sequence[str], out_dir: str | os.PathLike,
    pooling: str | Pooling | Mapping[str, str | Pooling] = "last", *, labels: Sequence[Any] | None = None,
    batch_size: int = 8, dtype: torch.dtype = torch.float32, progress: bool = True, max_batches: int | None = None,
    on_batch: Callable[[int], None] | None = None,
) -> Path:
    """Like :func:`collect`, streamed to ``out_dir`` one shard per batch; returns the folder.

    Calling it again with the same arguments resumes an interrupted run (and does nothing for a
    finished one); different sites, pooling, labels, batch size, inputs or model raise ``ValueError``.
    ``max_batches`` stops after that many new shards (the manifest stays incomplete);
    ``on_batch(i)`` is called after shard ``i`` is on disk. Read the result with :func:`load`.
    """
    names, pools, n, labels = _prepare(lens, inputs, sites, pooling, labels)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    manifest = {
        "format": FORMAT, "sites": _site_info(lens, names), "pooling": {k: p.describe() for k, p in pools.items()},
        "labels": list(labels) if labels is not None else None, "n_examples": n, "batch_size": batch_size,
        "dtype": str(dtype), "inputs_sha256": fingerprint(inputs), "provenance": provenance(lens),
        "shards": [], "complete": False,
    }
    path = out / MANIFEST
    if path.exists():
        old = json.loads(path.read_text())
        for key in [k for k in manifest if k not in ("shards", "complete")]:
            if old.get(key) != manifest[key]:
                raise ValueError(f"{path}: cannot resume, {key!r} differs from the existing run "
                                 f"(existing {old.get(key)!r}, now {manifest[key]!r}); use another folder")
        manifest["shards"], manifest["complete"] = old["shards"], old["complete"]
    else:
        atomic_write_json(path, manifest, sort_keys=True, default=str)
    n_batches = len(_batches(inputs, batch_size))
    first = len(manifest["shards"])
    stop = None if max_batches is None else first + max_batches
    for a, b, tensors in _iter_batches(lens, inputs, names, pools, batch_size, dtype, first, progress,
                                       "activations", stop):
        i = len(manifest["shards"])
        fname = f"shard_{i:05d}.safetensors"
        # no safetensors metadata: its key order is not deterministic, and resumed files must equal a full run's
        atomic_save_safetensors(out / fname, tensors)
        manifest["shards"].append({"file": fname, "start": a, "stop": b})
        manifest["complete"] = len(manifest["shards"]) == n_batches
        atomic_write_json(path, manifest, sort_keys=True, default=str)
        if on_batch is not None:
            on_batch(i)
    return out


def load(out_dir: str | os.PathLike, sites: Sequence[str] | None = None) -> ActivationDataset:
    """An :class:`ActivationDataset` from a finished :func:`stream` folder (optionally only ``sites``)."""
    path = Path(out_dir) / MANIFEST
    if not path.exists():
        raise FileNotFoundError(f"{path} does not exist: not an activation dataset folder")
    m = json.loads(path.read_text())
    if m.get("format") != FORMAT:
        raise ValueError(f"{path}: format {m.get('format')!r}, expected {FORMAT!r}")
    if not m["complete"]:
        raise ValueError(f"{path}: the run is incomplete ({len(m['shards'])} shards); call stream(...) again to resume")
    unknown = [s for s in sites or [] if s not in m["sites"]]
    if unknown:
        raise KeyError(f"sites {unknown} are not in {out_dir}; sites: {', '.join(m['sites'])}")
    keep = m["sites"] if sites is None else {s: m["sites"][s] for s in sites}
    parts = []
    for shard in m["shards"]:
        tensors = load_file(Path(out_dir) / shard["file"])
        parts.append({k: v for k, v in tensors.items() if k.startswith("__") or k.split("|", 1)[0] in keep})
    return _assemble(parts, keep, m["pooling"], m["labels"], m["provenance"])
