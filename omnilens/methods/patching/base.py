"""What exact and attribution patching share: input checks, sweep resolution, metric checks,
the metric of a run, and provenance. Everything here runs before any forward, or on its outputs."""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from omnilens.core.graph import HookSpec
from omnilens.core.types import POS_AXES
from omnilens.core.versions import __version__
from omnilens.methods.patching.metrics import check_metric, metric_name
from omnilens.methods.patching.results import PatchingResult, normalise
from omnilens.methods.patching.sweeps import Grid, Sweep, known_sizes

DIRECTIONS = ("denoise", "noise")


@dataclass(frozen=True)
class Setup:
    """Validated inputs of a patching job: ``base`` is run and patched from ``source``."""

    clean: dict[str, Any]
    corrupted: dict[str, Any]
    direction: str
    rows: int
    seq_len: int | None

    @property
    def base(self) -> dict[str, Any]:
        """The inputs of the run that gets patched (corrupted when denoising, clean when noising)."""
        return self.corrupted if self.direction == "denoise" else self.clean

    @property
    def source(self) -> dict[str, Any]:
        """The inputs of the run the patched values come from."""
        return self.clean if self.direction == "denoise" else self.corrupted


def setup(lens, clean: Any, corrupted: Any, metric: Callable, direction: str, output: str) -> Setup:
    """Turn ``clean``/``corrupted`` into forward kwargs and check them and the metric, before any forward.

    Raises ``ValueError`` when the inputs differ in shape (e.g. tokenize to different lengths) or the
    metric does not return one value per row on logits shaped like the model's.
    """
    if direction not in DIRECTIONS:
        raise ValueError(f"direction must be one of {DIRECTIONS}, got {direction!r}")
    if output not in ("logits", "model"):
        raise ValueError(f"output must be 'logits' or 'model', got {output!r}")
    c_kw, x_kw = lens.to_inputs(clean), lens.to_inputs(corrupted)
    if set(c_kw) != set(x_kw):
        raise ValueError(f"clean and corrupted inputs have different keys: {sorted(c_kw)} vs {sorted(x_kw)}")
    for key in c_kw:
        a, b = c_kw[key], x_kw[key]
        if isinstance(a, torch.Tensor) and a.shape != b.shape:
            detail = ""
            if key == "input_ids" and lens.tokenizer is not None and a.dim() == 2 and b.dim() == 2:
                detail = (f": clean {lens.to_str_tokens(a[0])} vs corrupted {lens.to_str_tokens(b[0])}")
            raise ValueError(f"clean and corrupted inputs must have the same shape; {key!r} is "
                             f"{tuple(a.shape)} vs {tuple(b.shape)}{detail}")
    ids = c_kw.get("input_ids")
    rows = ids.shape[0] if isinstance(ids, torch.Tensor) else 1
    seq_len = ids.shape[-1] if isinstance(ids, torch.Tensor) else None
    if output == "logits" and seq_len is not None:
        vocab = lens.config.get_text_config().vocab_size
        check_metric(metric, torch.zeros(2 * rows, seq_len, vocab), 2 * rows)
    return Setup(c_kw, x_kw, direction, rows, seq_len)


def resolve(lens, sweep: Sweep, seq_len: int | None, shapes: Mapping[str, torch.Size] | None = None) -> Grid:
    """Resolve ``sweep``; axis sizes come from the inputs and graph, else from ``shapes`` (cached values)."""
    sizes = {}
    for spec in sweep.specs(lens.graph):
        s = known_sizes(lens.graph, spec, seq_len)
        if shapes is not None and spec.name in shapes:
            s = {a: n for a, n in zip(spec.axis_names, shapes[spec.name])} | s
        sizes[spec.name] = _Sizes(spec.name, s)
    return sweep.resolve(lens.graph, sizes)


class _Sizes(dict):
    """Axis sizes of one site; a missing axis raises naming the site."""

    def __init__(self, site: str, sizes: Mapping[str, int]):
        super().__init__(sizes)
        self.site = site

    def __missing__(self, axis: str) -> int:
        raise _Deferred(f"length of axis {axis!r} of {self.site} is only known after a forward")


class _Deferred(KeyError):
    pass


def try_resolve(lens, sweeps: Sequence[Sweep], seq_len: int | None) -> list[Grid | None]:
    """Grids resolvable before any forward (selector ranges checked now); ``None`` where sizes need one."""
    out = []
    for sweep in sweeps:
        try:
            out.append(resolve(lens, sweep, seq_len))
        except _Deferred:
            out.append(None)
    return out


def sweep_sites(lens, sweeps: Sequence[Sweep]) -> list[str]:
    """Names of the sites the ``sweeps`` patch, each once, in sweep order."""
    return list(dict.fromkeys(s.name for sweep in sweeps for s in sweep.specs(lens.graph)))


def single_visits(values: dict[str, list[torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The one value of each site; sites visited several times per forward cannot be patched cell by cell."""
    many = {n: len(vs) for n, vs in values.items() if len(vs) != 1}
    if many:
        raise ValueError(f"sites visited other than once in one forward cannot be swept: {many} "
                         "(e.g. per-image vision attention internals: sweep them with one image)")
    return {n: vs[0] for n, vs in values.items()}


def selectors(spec: HookSpec, select: Mapping[str, Sequence[int]]) -> dict[str, list[int]]:
    """Cell selection (site axis -> indices) as intervention selectors (``pos``, ``head``, ``kv_head``)."""
    return {("pos" if axis in POS_AXES else axis): list(idx) for axis, idx in select.items()}


def run(lens, inputs: dict[str, Any], reads=(), writes=(), executor: Any = None):
    """``lens.run`` without autograd, with ``executor`` a name (``"local"``, ``"nnsight"``) or an executor
    object (e.g. ``lens.executor("nnsight", remote="local")``)."""
    if executor is None or isinstance(executor, str):
        return lens.run(inputs, reads, writes, executor=executor)
    with torch.no_grad():
        return executor.run(lens.to_inputs(inputs), reads, writes)


def model_output(output: Any, kind: str) -> Any:
    """The logits of a model output (``kind="logits"``), or the output itself."""
    if kind == "model":
        return output
    logits = getattr(output, "logits", None)
    return logits if logits is not None else output


def mean_metric(metric: Callable, out: Any, rows: int, n: int = 1) -> torch.Tensor:
    """Metric of ``n`` stacked copies of a ``rows``-row batch, averaged over the rows: ``[n]``."""
    value = metric(out)
    if not isinstance(value, torch.Tensor) or value.shape != (n * rows,):
        got = tuple(value.shape) if isinstance(value, torch.Tensor) else type(value).__name__
        raise ValueError(f"metric {metric_name(metric)!r} must return shape ({n * rows},), got {got}")
    return value.view(n, rows).mean(1)


def provenance(lens, executor: Any) -> dict[str, Any]:
    """Model class, name or path, a digest of its config, the omnilens version and the executor."""
    cfg = lens.config
    return {"model": type(lens.model).__name__, "name_or_path": getattr(cfg, "_name_or_path", "") or "",
            "config_sha1": hashlib.sha1(cfg.to_json_string().encode()).hexdigest(),
            "omnilens": __version__, "executor": _executor_name(lens, executor)}


def _executor_name(lens, executor: Any) -> str:
    if executor is None or isinstance(executor, str):
        return executor or lens.default_executor
    remote = getattr(executor, "remote", False)
    return f"{type(executor).__name__}(remote={remote!r})"


def pos_labels(lens, grid: Grid, setup_: Setup) -> Grid:
    """``grid`` with position labels replaced by ``index:token`` strings of the clean input (batch row 0)."""
    ids = setup_.clean.get("input_ids")
    if ids is None or lens.tokenizer is None:
        return grid
    toks = lens.to_str_tokens(ids[0])
    labels = dict(grid.labels)
    for axis in grid.axes:
        if axis in POS_AXES and len(labels[axis]) == len(toks):
            labels[axis] = tuple(f"{i}:{t}" for i, t in enumerate(toks))
    return Grid(grid.axes, labels, grid.sites, grid.cells)


def make_result(lens, grid: Grid, raw: torch.Tensor, clean: float, corrupted: float, metric: Callable,
                method: str, setup_: Setup, executor: Any) -> PatchingResult:
    """The result of a sweep: ``raw`` metric ``[*grid.shape]``, normalised against ``clean`` / ``corrupted``,
    position axes labelled with the prompt's tokens, provenance of ``lens``."""
    grid = pos_labels(lens, grid, setup_)
    return PatchingResult(values=normalise(raw, clean, corrupted), raw=raw, axes=grid.axes, labels=grid.labels,
                          sites=grid.sites, metric=metric_name(metric), clean=clean, corrupted=corrupted,
                          method=method, direction=setup_.direction, provenance=provenance(lens, executor))
