"""Pooling of one site's ``batch pos`` axes per example: last token, mean, all tokens, or a token span."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from jaxtyping import Bool, Float, Int

SpanFn = Callable[[Int[torch.Tensor, " pos"]], tuple[int, int]]


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
