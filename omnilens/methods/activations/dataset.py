"""The pooled-activation dataset: values per (site, pooling), labels, provenance; the files it lives in."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from omnilens.core.versions import __version__

FORMAT = "omnilens.activations/1"
MANIFEST = "manifest.json"


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


def _site_info(lens, names: Sequence[str]) -> dict[str, dict[str, Any]]:
    return {n: {"layer": s.layer, "tower": s.tower, "component": s.component, "site": s.site, "axes": s.axes}
            for n in names for s in [lens.graph[n]]}


def provenance(lens) -> dict[str, Any]:
    """Model class, a hash of its config, parameter dtype, tokenizer padding side and omnilens version."""
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


def _assemble(parts: list[dict[str, torch.Tensor]], sites, pools_desc, labels, prov) -> ActivationDataset:
    keys = parts[0].keys()
    cat = {k: torch.cat([p[k] for p in parts]) for k in keys}
    data = {(s, p): cat[f"{s}|{p}"] for s in sites for p in pools_desc}
    lengths = {p: cat[f"__lengths__|{p}"] for p in pools_desc if f"__lengths__|{p}" in cat}
    spans = {p: cat[f"__spans__|{p}"] for p in pools_desc if f"__spans__|{p}" in cat}
    return ActivationDataset(sites, pools_desc, data, labels, lengths, spans, prov)
