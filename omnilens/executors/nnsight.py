"""The nnsight executor: the same reads and writes as an nnsight trace, run locally or on an NDIF backend.

Each hooked module gets its own worker (an empty ``tracer.invoke()`` seeing the whole batch), so the
workers need not agree on the order modules run in; inside a worker the module's input is served
before its output. Values pass through the site's view exactly as in the local executor.

``remote``:

- ``False``: a plain ``nnsight.NNsight`` wrapper, run in-process.
- ``"local"``: a ``TransformersModel`` wrapper run through nnsight's ``LocalSimulationBackend``, which
  serialises the trace as a remote request would, deserialises it with non-installed modules hidden
  and runs it in-process: the proof that the trace is shippable. omnilens is registered to travel by
  value. Attention-internal sites work here only because the simulation runs against the local,
  instrumented model.
- ``True``: the same wrapper sent to the NDIF host nnsight is configured for (``NDIF_HOST``,
  ``NDIF_API_KEY``); the model must be a hub checkpoint the server serves. Sites that need attention
  points (``hook_rot_q``, ``hook_rot_k``, ``hook_pattern``) cannot run there: the server has neither our
  hook points nor our attention function, so they raise before anything is sent.

Wrapping installs nnsight's controllers as the ``forward`` of every module (inert outside a trace,
no torch hooks); the attention points of a run are mirrored into the envoy tree for that run.
"""

from __future__ import annotations

import copy
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from omnilens.adapters.base import Adapter
from omnilens.executors.base import Read, RunResult, Write, serve_site
from omnilens.graph import HookSpec
from omnilens.views import CallContext

REMOTE_MODES = (False, "local", True)


@dataclass(frozen=True)
class SiteTask:
    """One site of a module: its spec and the reads and writes asked of it."""

    spec: HookSpec
    reads: tuple[Read, ...]
    writes: tuple[Write, ...]


@dataclass(frozen=True)
class ModuleTask:
    """The sites of one module, served by one worker: ``inputs`` (first argument) then ``outputs``."""

    envoy: Any
    inputs: tuple[SiteTask, ...]
    outputs: tuple[SiteTask, ...]
    guard_reads: bool = False  # the run writes: reads sharing memory with the live tensor are cloned


class NNsightExecutor:
    """Runs reads and writes at named sites as an nnsight trace (the :class:`~omnilens.executors.base.Executor`
    protocol).

    Args:
        adapter: the model's adapter (module paths, views, instrumentation).
        tokenizer: handed to nnsight's ``TransformersModel`` (remote modes).
        remote: ``False`` (in-process), ``"local"`` (remote-simulation round trip) or ``True`` (NDIF).
        backend: an nnsight ``Backend`` that runs the captured trace instead (overrides ``remote``'s).
    """

    def __init__(self, adapter: Adapter, tokenizer: Any = None, remote: bool | str = False, backend: Any = None):
        if not (remote is False or remote is True or remote == "local"):
            raise ValueError(f"remote must be one of {REMOTE_MODES}, got {remote!r}")
        if remote and backend is None and tokenizer is None:
            raise ValueError("remote execution wraps the model in nnsight's TransformersModel, which needs a "
                             "tokenizer: pass tokenizer= to omnilens.load (or to NNsightExecutor)")
        self.adapter = adapter
        self.tokenizer = tokenizer
        self.remote = remote
        self.backend = backend
        self._envoy = None

    @property
    def envoy(self):
        """The nnsight wrapper of the model (built on first use)."""
        if self._envoy is None:
            if self.remote:
                from nnsight.modeling.transformers import TransformersModel

                # a copy: TransformersModel sets padding_side on the tokenizer it is given
                self._envoy = TransformersModel(self.adapter.model, tokenizer=copy.deepcopy(self.tokenizer))
            else:
                from nnsight import NNsight

                self._envoy = NNsight(self.adapter.model)
        return self._envoy

    def run(self, inputs: dict[str, Any], reads: Sequence[Read], writes: Sequence[Write], *,
            method: str = "forward", **kwargs: Any) -> RunResult:
        """Trace ``model.<method>(**inputs, **kwargs)`` with the reads and writes as interventions.

        ``method="forward"`` serves one visit per site; any other method (``generate``) serves every
        visit, one per step, and honours ``Write.steps``.
        """
        graph = self.adapter.graph
        specs = [graph[n] for n in dict.fromkeys([r.name for r in reads] + [w.name for w in writes])]
        if self.remote is True:
            _check_remote_sites(specs)
        reads_by: dict[str, list[Read]] = defaultdict(list)
        writes_by: dict[str, list[Write]] = defaultdict(list)
        for r in reads:
            reads_by[r.name].append(r)
        for w in writes:
            writes_by[w.name].append(w)
        by_module: dict[str, dict[str, list[SiteTask]]] = defaultdict(lambda: {"input": [], "output": []})
        for spec in sorted(specs, key=lambda s: graph.order(s.name)):
            task = SiteTask(spec, tuple(reads_by[spec.name]), tuple(writes_by[spec.name]))
            by_module[spec.module][spec.port].append(task)
        trace_options: dict[str, Any] = {}
        if self.backend is not None:
            trace_options["backend"] = self.backend
        elif self.remote:
            trace_options["remote"] = self.remote
        if self.remote:
            _ship_by_value()
        with self.adapter.instrument(specs):
            envoy = self.envoy
            tasks = [ModuleTask(_envoy_at(envoy, path), tuple(ports["input"]), tuple(ports["output"]), bool(writes))
                     for path, ports in by_module.items()]
            output, values = _trace(envoy, tasks, inputs, kwargs, method, trace_options, method != "forward")
        return RunResult(output, {name: list(vals) for name, vals in values.items()})


def _trace(envoy, tasks: list[ModuleTask], inputs: dict[str, Any], call_kwargs: dict[str, Any], method: str,
           trace_options: dict[str, Any], every_visit: bool) -> tuple[Any, dict[str, list[torch.Tensor]]]:
    """Run the trace: one invoke carries the inputs and saves the result, one worker per hooked module."""
    import nnsight

    with envoy.trace(fn=method, **trace_options) as tracer:
        values = nnsight.save(dict())
        with tracer.invoke(**inputs, **call_kwargs):
            output = nnsight.save(tracer.result)
        for task in tasks:
            with tracer.invoke():
                serve_module(task, values, tracer if every_visit else None)
    return output, values


def serve_module(task: ModuleTask, values: dict[str, list[torch.Tensor]], tracer: Any = None) -> None:
    """Serve the sites of one module inside a trace worker: one visit, or every visit when ``tracer`` is given.

    A module the run does not call (or calls fewer times) yields fewer values, as with the local executor.
    """
    from nnsight.intervention.interleaver import OutOfOrderError

    try:
        if tracer is None:
            _visit(task, values, 0)
        else:
            for step in tracer.iter[:]:
                _visit(task, values, step)
    except OutOfOrderError:  # the run ended without (another) call of this module
        pass


def _visit(task: ModuleTask, values: dict[str, list[torch.Tensor]], step: int) -> None:
    envoy = task.envoy
    module = envoy._module
    raw = envoy.input  # also the call context of output sites (per-head result needs the o_proj input)
    if task.inputs:
        new = _serve(task, task.inputs, raw, CallContext(module, (raw,)), values, step)
        if new is not raw:
            envoy.input = raw = new
    if task.outputs:
        out = envoy.output
        new = _serve(task, task.outputs, out, CallContext(module, (raw,), out), values, step)
        if new is not out:
            envoy.output = new


def _serve(task: ModuleTask, sites: Sequence[SiteTask], raw: Any, ctx: CallContext,
           values: dict[str, list[torch.Tensor]], step: int) -> Any:
    """Serve ``sites`` on one raw module value; return the (possibly new) raw value."""
    for site in sites:
        raw, _ = serve_site(site.spec, raw, ctx, site.reads, site.writes, step, values, guard_reads=task.guard_reads)
    return raw


def _envoy_at(root, path: str):
    """The envoy of the module at dotted ``path``, (re)mirroring modules attached after wrapping
    (the hook points of this run)."""
    envoy = root
    for part in path.split("."):
        module = envoy._module._modules.get(part)
        if module is None:
            raise KeyError(f"module path {path!r} has no part {part!r} on the model")
        child = envoy._child_map.get(part)
        if child is None or child._module is not module:
            child = envoy._wrap_envoy(part, module)
        envoy = child
    return envoy


def _check_remote_sites(specs: Sequence[HookSpec]) -> None:
    needs = [s.name for s in specs if "attention_points" in s.requires]
    if needs:
        raise ValueError(
            f"sites {', '.join(needs)} need omnilens attention points (hook modules and a routed eager attention "
            "function), which a remote nnsight server does not have; run them with remote='local' or the local "
            "executor, or read module-boundary sites (hook_q/k/v, hook_q_normed/k_normed, hook_z) instead"
        )


def _ship_by_value() -> None:
    """Register omnilens so remote traces carry its source (a server has no omnilens installed)."""
    import nnsight

    nnsight.register("omnilens")
