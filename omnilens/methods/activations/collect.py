"""Running inputs through a lens in batches: :func:`collect` (in memory), :func:`stream` (shards on disk,
resumable) and :func:`load` (a finished stream)."""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from tqdm.auto import tqdm

from omnilens.core.io import atomic_save_safetensors, atomic_write_json
from omnilens.executors.base import Read
from omnilens.methods.activations.dataset import (
    FORMAT, MANIFEST, ActivationDataset, _assemble, _site_info, fingerprint, provenance,
)
from omnilens.methods.activations.pooling import Pooling, _poolings, pool


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
