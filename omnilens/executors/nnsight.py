"""The nnsight executor: the same reads and writes as an nnsight trace, run locally or on an NDIF backend.

Each hooked module gets its own worker (an empty ``tracer.invoke()`` seeing the whole batch), so the
workers need not agree on the order modules run in; inside a worker the module's input is served
before its output. Values pass through the site's view exactly as in the local executor.

Visits: under ``generate`` every module is served on every call (one per step). In a plain forward, a
module is served once, except the attention points (sites that ``require`` them): the packed vision and
audio towers call the attention function once per image or window, so those points are served on every
call, visit ``i`` being image/window ``i``, as in the local executor. Serving every visit keeps the
worker waiting for a call that never comes until the run ends (a greenlet unwound per module),
which single-visit modules are spared.

``remote``:

- ``False``: a plain ``nnsight.NNsight`` wrapper, run in-process.
- ``"local"``: a ``TransformersModel`` wrapper run through nnsight's ``LocalSimulationBackend``, which
  serialises the trace as a remote request would, deserialises it with non-installed modules hidden
  and runs it in-process: the proof that the trace is shippable. omnilens is registered to travel by
  value. Attention-internal sites work here only because the simulation runs against the local,
  instrumented model.
- ``True``: the same wrapper sent to the NDIF host nnsight is configured for (``NDIF_HOST``,
  ``NDIF_API_KEY``); the model must be a hub checkpoint the server serves. Sites that ``require``
  instrumentation (attention points: ``hook_rot_q``, ``hook_rot_k``, ``hook_pattern``; Omni's
  ``hook_deepstack`` point) cannot run there: the server's model has none of our temporary hook points
  or routed functions, so they raise before anything is sent.

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
from omnilens.executors.base import Read, RunResult, SiteTask, Write, serve_site, site_tasks
from omnilens.core.graph import HookSpec
from omnilens.core.views import CallContext

REMOTE_MODES = (False, "local", True)


@dataclass(frozen=True)
class ModuleTask:
    """The sites of one module, served by one worker: ``inputs`` (first argument) then ``outputs``."""

    envoy: Any
    inputs: tuple[SiteTask, ...]
    outputs: tuple[SiteTask, ...]
    guard_reads: bool = False  # the run writes: reads sharing memory with the live tensor are cloned
    every_visit: bool = False  # serve every call of the module (visit i -> step i), not only the first


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

        Every visit of a site is served (``values[name][i]`` is visit ``i``, ``Write.steps`` picks visits):
        under ``generate`` one per step; in a forward, attention points once per image or window, other
        sites once.
        """
        sites = site_tasks(self.adapter.graph, reads, writes)
        specs = [site.spec for site in sites]
        if self.remote is True:
            _check_remote_sites(specs)
        by_module: dict[str, dict[str, list[SiteTask]]] = defaultdict(lambda: {"input": [], "output": []})
        for site in sites:
            by_module[site.spec.module][site.spec.port].append(site)
        trace_options: dict[str, Any] = {}
        if self.backend is not None:
            trace_options["backend"] = self.backend
        elif self.remote:
            trace_options["remote"] = self.remote
        if self.remote:
            _ship_by_value()
        with self.adapter.instrument(specs):
            envoy = self.envoy
            tasks = [ModuleTask(_envoy_at(envoy, path), tuple(ports["input"]), tuple(ports["output"]), bool(writes),
                                method != "forward" or _many_visits(ports["input"] + ports["output"]))
                     for path, ports in by_module.items()]
            output, values = _trace(envoy, tasks, inputs, kwargs, method, trace_options)
        return RunResult(output, {name: list(vals) for name, vals in values.items()})


def _many_visits(sites: Sequence[SiteTask]) -> bool:
    """Whether a forward may call the module of ``sites`` more than once: attention points, which the packed
    towers' attention calls once per image or window."""
    return any("attention_points" in site.spec.requires for site in sites)


def _trace(envoy, tasks: list[ModuleTask], inputs: dict[str, Any], call_kwargs: dict[str, Any], method: str,
           trace_options: dict[str, Any]) -> tuple[Any, dict[str, list[torch.Tensor]]]:
    """Run the trace: one invoke carries the inputs and saves the result, one worker per hooked module."""
    import nnsight

    with envoy.trace(fn=method, **trace_options) as tracer:
        values = nnsight.save(dict())
        with tracer.invoke(**inputs, **call_kwargs):
            output = nnsight.save(tracer.result)
        for task in tasks:
            with tracer.invoke():
                serve_module(task, values, tracer)
    return output, values


def serve_module(task: ModuleTask, values: dict[str, list[torch.Tensor]], tracer: Any) -> None:
    """Serve the sites of one module inside a trace worker: the first visit, or every visit
    (``task.every_visit``, through ``tracer.iter``).

    A module the run does not call (or calls fewer times) yields fewer values, as with the local executor.
    """
    from nnsight.intervention.interleaver import OutOfOrderError

    try:
        if not task.every_visit:
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
    """Refuse sites that ``require`` instrumentation (temporary hook points, routed functions): a remote
    server runs its own copy of the model, which has none."""
    needs = [f"{s.name} (requires {', '.join(sorted(s.requires))})" for s in specs if s.requires]
    if needs:
        raise ValueError(
            f"sites {'; '.join(needs)} need omnilens instrumentation (temporary hook modules and routed functions) "
            "that a remote nnsight server's model does not have; run them with remote='local' or the local "
            "executor, or read module-boundary sites instead (e.g. hook_q/k/v, hook_q_normed/k_normed, hook_z "
            "for attention internals)"
        )


def _ship_by_value() -> None:
    """Register omnilens so remote traces carry its source (a server has no omnilens installed)."""
    import nnsight

    nnsight.register("omnilens")
