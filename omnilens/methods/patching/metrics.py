"""Patching metrics: functions of the model output that return one value per batch row.

Contract: ``metric(logits [rows pos vocab]) -> [rows]``. Patching stacks ``n`` copies of a ``B``-row
prompt batch, so ``rows = n * B``; per-prompt data (answer ids ``[B]``, reference logits ``[B ...]``)
is tiled with :func:`per_row`. A metric whose ``last_positions`` is ``k`` reads only the last ``k``
positions, so patching may hand it logits of just those (``[rows k vocab]``). A metric with a
``bind(clean, corrupted)`` method receives both base
outputs before patching starts (e.g. :class:`KLToClean`). Any callable following the contract works,
including functions of non-logit outputs (Talker / codec outputs), given ``output="model"``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
from jaxtyping import Float

Ids = int | Sequence[int] | torch.Tensor


def per_row(x: torch.Tensor, rows: int) -> torch.Tensor:
    """``x`` ``[B ...]`` tiled to ``[rows ...]`` (``rows`` a multiple of ``B``; copy-major)."""
    b = x.shape[0]
    if rows % b:
        raise ValueError(f"metric data has {b} rows, which does not divide the {rows} output rows")
    return x.repeat(rows // b, *([1] * (x.dim() - 1)))


def _ids(ids: Ids, rows: int, device: torch.device) -> torch.Tensor:
    t = torch.as_tensor(ids, dtype=torch.long, device=device).reshape(-1)
    return per_row(t, rows)


def _at(logits: torch.Tensor, pos: int) -> torch.Tensor:
    return logits[:, pos, :]


class _ReadsPos:
    """Mixin of the metrics that read position ``pos`` (``None``: every position)."""

    pos: int | None

    @property
    def last_positions(self) -> int | None:
        """How many last positions the metric needs (``None``: all)."""
        return -self.pos if self.pos is not None and self.pos < 0 else None


@dataclass(frozen=True, eq=False)
class LogitDiff(_ReadsPos):
    """``logits[pos, correct] - logits[pos, incorrect]`` per row (ids: one per prompt, or one for all)."""

    correct: Ids
    incorrect: Ids
    pos: int = -1
    name: str = "logit_diff"

    def __call__(self, logits: Float[torch.Tensor, "rows pos vocab"]) -> Float[torch.Tensor, " rows"]:
        last = _at(logits, self.pos)
        rows = last.shape[0]
        c, i = _ids(self.correct, rows, last.device), _ids(self.incorrect, rows, last.device)
        return last.gather(1, c[:, None])[:, 0] - last.gather(1, i[:, None])[:, 0]


@dataclass(frozen=True, eq=False)
class LogProb(_ReadsPos):
    """Log-probability of ``token`` at ``pos`` per row."""

    token: Ids
    pos: int = -1
    name: str = "log_prob"

    def __call__(self, logits: Float[torch.Tensor, "rows pos vocab"]) -> Float[torch.Tensor, " rows"]:
        logp = torch.log_softmax(_at(logits, self.pos).float(), -1)
        t = _ids(self.token, logp.shape[0], logp.device)
        return logp.gather(1, t[:, None])[:, 0]


@dataclass(frozen=True, eq=False)
class Prob(LogProb):
    """Probability of ``token`` at ``pos`` per row."""

    name: str = "prob"

    def __call__(self, logits: Float[torch.Tensor, "rows pos vocab"]) -> Float[torch.Tensor, " rows"]:
        return super().__call__(logits).exp()


@dataclass(frozen=True, eq=False)
class KLToClean(_ReadsPos):
    """``KL(p_clean || p)`` at ``pos`` (``None``: summed over positions) per row; 0 on the clean run.

    Bound to the clean logits by :meth:`bind` before patching starts.
    """

    pos: int | None = -1
    reference: torch.Tensor | None = None
    name: str = "kl_to_clean"

    def bind(self, clean: torch.Tensor, corrupted: torch.Tensor) -> KLToClean:
        """A copy holding the clean logits ``[B pos vocab]`` as its reference."""
        return replace(self, reference=clean.detach())

    def __call__(self, logits: Float[torch.Tensor, "rows pos vocab"]) -> Float[torch.Tensor, " rows"]:
        if self.reference is None:
            raise ValueError("KLToClean needs the clean logits: call bind(clean, corrupted) first")
        ref = per_row(self.reference.to(logits.device), logits.shape[0])
        if self.pos is not None:
            logits, ref = logits[:, self.pos:self.pos + 1 or None], ref[:, self.pos:self.pos + 1 or None]
        logp, logq = torch.log_softmax(ref.float(), -1), torch.log_softmax(logits.float(), -1)
        return (logp.exp() * (logp - logq)).sum(-1).sum(-1)


@dataclass(frozen=True, eq=False)
class LogitFn:
    """Any function of the logits returning one value per row, with a name for results."""

    fn: Callable[[torch.Tensor], torch.Tensor]
    name: str = "logit_fn"

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        return self.fn(logits)


def metric_name(metric: Callable) -> str:
    """The metric's ``name`` attribute, else its function name."""
    return getattr(metric, "name", None) or getattr(metric, "__name__", type(metric).__name__)


def bind(metric: Callable, clean: torch.Tensor, corrupted: torch.Tensor) -> Callable:
    """``metric.bind(clean, corrupted)`` when the metric has one, else the metric."""
    return metric.bind(clean, corrupted) if hasattr(metric, "bind") else metric


def check_metric(metric: Callable, example: torch.Tensor, rows: int) -> None:
    """Call ``metric`` on ``example`` (``rows`` rows) and raise ``ValueError`` unless it returns ``[rows]``."""
    try:
        value = bind(metric, example, example)(example)
    except Exception as exc:
        raise ValueError(f"metric {metric_name(metric)!r} failed on an output of shape {tuple(example.shape)}: "
                         f"{type(exc).__name__}: {exc}") from exc
    if not isinstance(value, torch.Tensor) or value.shape != (rows,):
        got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"metric {metric_name(metric)!r} must return one value per batch row, shape ({rows},); "
                         f"got {got} for an output of shape {tuple(example.shape)}")
