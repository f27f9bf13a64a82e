"""`Lens`: a model, its adapter's hook graph and an executor, with TransformerLens-style entry points."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Any

import torch
from jaxtyping import Float
from torch import nn

from omnilens.adapters import adapter_for
from omnilens.core.cache import ActivationCache
from omnilens.executors.base import HookFn, PosSelector, Read, RunResult, Write, as_writes
from omnilens.executors.local import LocalExecutor
from omnilens.core.graph import HookGraph
from omnilens.core.versions import check as check_versions
from omnilens.lens.generation import generate

Names = str | Iterable[str] | Callable[[str], bool] | None
Hooks = Sequence[tuple[str, HookFn] | tuple[str, HookFn, Sequence[int] | None] | Write]


class Lens:
    """A Hugging Face model seen through omnilens's named hook graph.

    Build one with :func:`omnilens.load`. ``lens.graph`` lists the sites; ``run_with_cache``,
    ``run_with_hooks`` and ``hooks`` read and write them; ``executor`` selects how (``"local"``
    PyTorch hooks by default, ``"nnsight"`` for nnsight traces, local or remote).
    """

    def __init__(self, model: nn.Module, tokenizer: Any = None, processor: Any = None, executor: str = "local"):
        self.model = model
        self.adapter = adapter_for(model)
        self.tokenizer = tokenizer if tokenizer is not None else getattr(processor, "tokenizer", None)
        self.processor = processor
        self._executors: dict[str, Any] = {"local": LocalExecutor(self.adapter)}
        self.default_executor = executor

    @property
    def graph(self) -> HookGraph:
        """The model's hook graph (built by its adapter)."""
        return self.adapter.graph

    @property
    def config(self):
        """The wrapped model's Hugging Face config."""
        return self.model.config

    def __repr__(self) -> str:
        return f"Lens({type(self.model).__name__}, {len(self.graph)} sites)"

    # executors ----------------------------------------------------------------------------------
    def executor(self, name: str | None = None, **options: Any):
        """The executor called ``name`` (``"local"`` or ``"nnsight"``), created on first use."""
        name = name or self.default_executor
        if options or name not in self._executors:
            if name == "nnsight":
                from omnilens.executors.nnsight import NNsightExecutor

                ex = NNsightExecutor(self.adapter, tokenizer=self.tokenizer, **options)
            elif name == "local":
                ex = LocalExecutor(self.adapter)
            else:
                raise ValueError(f"unknown executor {name!r}; expected 'local' or 'nnsight'")
            if options:
                return ex
            self._executors[name] = ex
        return self._executors[name]

    # inputs ------------------------------------------------------------------------------------
    def to_inputs(self, inputs: Any) -> dict[str, Any]:
        """Forward kwargs from a string, a list of strings, token ids ``[batch pos]`` / ``[pos]``, or a dict.

        Strings are tokenized with the lens's tokenizer (padding on). The adapter validates the result
        before any forward runs.
        """
        if isinstance(inputs, str) or (isinstance(inputs, list) and inputs and isinstance(inputs[0], str)):
            if self.tokenizer is None:
                raise ValueError("text inputs need a tokenizer: pass tokenizer= to omnilens.load")
            enc = self.tokenizer(inputs, return_tensors="pt", padding=True)
            kw = {k: enc[k] for k in ("input_ids", "attention_mask") if k in enc}
        elif isinstance(inputs, torch.Tensor):
            if inputs.dtype not in (torch.long, torch.int, torch.int32):
                raise TypeError(f"token ids must be an integer tensor, got dtype {inputs.dtype}")
            kw = {"input_ids": inputs if inputs.dim() == 2 else inputs.unsqueeze(0)}
        elif isinstance(inputs, dict) or hasattr(inputs, "keys"):
            kw = dict(inputs)
        else:
            raise TypeError(f"cannot make model inputs from {type(inputs).__name__}; "
                            "pass a string, a list of strings, token ids or a dict of forward kwargs")
        device = _model_device(self.model)
        kw = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
        return self.adapter.prepare_inputs(kw)

    def to_tokens(self, text: str | list[str]) -> torch.Tensor:
        """Token ids ``[batch pos]`` for ``text``."""
        return self.to_inputs(text)["input_ids"]

    def to_str_tokens(self, tokens: str | torch.Tensor) -> list[str]:
        """Token strings of one sequence (a string, or ids ``[pos]`` / ``[1 pos]``)."""
        ids = self.to_tokens(tokens)[0] if isinstance(tokens, str) else tokens.reshape(-1)
        return [self.tokenizer.decode([int(t)]) for t in ids]

    # running -----------------------------------------------------------------------------------
    def run(self, inputs: Any, reads: Sequence[Read] = (), writes: Sequence[Write] = (), *,
            executor: str | None = None, method: str = "forward", grad: bool = False, **kwargs: Any) -> RunResult:
        """Run ``model.<method>`` on ``inputs`` with ``reads`` and ``writes`` (the executor protocol)."""
        kw = self.to_inputs(inputs)
        ctx = nullcontext() if grad else torch.no_grad()
        with ctx:
            res = self.executor(executor).run(kw, reads, writes, method=method, **kwargs)
        res.meta.update(self.adapter.run_meta(kw))
        return res

    def run_with_cache(
        self, inputs: Any, names: Names = None, *, pos: PosSelector = None, to: str | torch.device | None = "cpu",
        hooks: Hooks = (), executor: str | None = None, grad: bool = False, **kwargs: Any,
    ) -> tuple[Float[torch.Tensor, "batch pos vocab"] | Any, ActivationCache]:
        """Forward ``inputs`` and cache the sites selected by ``names``.

        Args:
            names: glob(s), exact names or a predicate; ``None`` caches every non-opt-in site.
            pos: positions kept along each site's ``pos`` axis (int, slice, list).
            to: device the cached tensors are moved to (``None`` keeps them where they are).
            hooks: ``(name, fn)`` writes applied in the same run (see :meth:`run_with_hooks`).
            grad: keep autograd enabled and the cached values attached to the graph.

        Returns:
            ``(logits [batch pos vocab], cache)``; models without logits return their full output.
        """
        reads = [Read(n, pos=pos, to=to, grad=grad) for n in self.graph.names(names)]
        writes = self._writes(hooks)
        res = self.run(inputs, reads, writes, executor=executor, grad=grad, **kwargs)
        return _logits(res.output), ActivationCache(res.values, self.graph, res.meta)

    def generate(self, inputs: Any, *, reads: Any = None, writes: Any = (), return_audio: bool | None = None,
                 executor: str | None = None, **kwargs: Any):
        """Generate from ``inputs`` with ``reads`` (names/globs cached at every visit) and ``writes``
        (:class:`Write` or ``(name, fn[, steps])``); returns a :class:`~omnilens.lens.generation.Generation`
        (``ids``, ``waveform``, ``cache`` with one entry per visit). See :mod:`omnilens.lens.generation`."""

        return generate(self, inputs, reads=reads, writes=writes, return_audio=return_audio, executor=executor,
                        **kwargs)

    def run_with_hooks(self, inputs: Any, hooks: Hooks, *, executor: str | None = None, **kwargs: Any) -> Any:
        """Forward ``inputs`` with ``hooks``: pairs ``(name_or_glob, fn)``, ``fn(activation, site) -> tensor | None``
        (also triples ``(name_or_glob, fn, steps)`` or :class:`Write` objects, to write chosen visits only).

        ``activation`` is shaped by ``site.axes``; returning a tensor of the same shape replaces it
        (written back through the site's view, e.g. one head of ``hook_z`` edits exactly that slice of
        the o_proj input). Returns the logits ``[batch pos vocab]`` (or the full output).
        """
        writes = self._writes(hooks)
        return _logits(self.run(inputs, (), writes, executor=executor, **kwargs).output)

    @contextmanager
    def hooks(self, hooks: Hooks = (), cache: Names | bool = False, pos: PosSelector = None) -> Iterator[ActivationCache]:
        """Keep ``hooks`` (and optionally cache ``cache`` sites) on the model for any forward or generate
        inside the block; everything is removed on exit. Yields the cache, filled as the model runs."""
        reads = [] if cache is False else [Read(n, pos=pos) for n in self.graph.names(None if cache is True else cache)]
        writes = self._writes(hooks)
        executor = self._executors["local"]
        with executor.attach(reads, writes) as values:
            yield ActivationCache(values, self.graph)

    def _writes(self, hooks: Hooks) -> list[Write]:
        return as_writes(self.graph, hooks)


def _logits(output: Any) -> Any:
    logits = getattr(output, "logits", None)
    return logits if logits is not None else output


def _model_device(model: nn.Module) -> torch.device:
    try:
        return next(model.parameters()).device
    except StopIteration:
        return torch.device("cpu")


def load(
    model_or_path: nn.Module | str | os.PathLike, *, tokenizer: Any = None, processor: Any = None,
    executor: str = "local", dtype: torch.dtype | str | None = None, device: str | torch.device | None = None,
    attn_implementation: str | None = None, **from_pretrained_kwargs: Any,
) -> Lens:
    """A :class:`Lens` over an in-memory HF model, or a hub id / local folder loaded with ``from_pretrained``.

    The adapter is chosen from the model's class; unsupported architectures raise
    :class:`~omnilens.core.errors.UnsupportedModelError` listing the supported ones. For a path, the
    tokenizer (and processor, when the folder has one) are loaded from it too unless given.
    """
    if isinstance(model_or_path, nn.Module):
        model = model_or_path
        if dtype is not None or device is not None:
            model.to(device=device, dtype=dtype)
    else:
        model, tokenizer, processor = _from_pretrained(
            str(model_or_path), tokenizer, processor, dtype=dtype, device=device,
            attn_implementation=attn_implementation, **from_pretrained_kwargs,
        )
    check_versions()
    model.eval()
    return Lens(model, tokenizer=tokenizer, processor=processor, executor=executor)


def _from_pretrained(path: str, tokenizer, processor, *, dtype, device, attn_implementation, **kwargs):
    import transformers
    from transformers import AutoConfig

    from omnilens.adapters import supported_architectures
    from omnilens.core.errors import UnsupportedModelError

    config = AutoConfig.from_pretrained(path, **{k: v for k, v in kwargs.items() if k in ("revision", "trust_remote_code")})
    archs = list(getattr(config, "architectures", None) or [])
    supported = supported_architectures()
    arch = next((a for a in archs if a in supported), None)
    if arch is None:
        raise UnsupportedModelError(
            f"{path}: architectures {archs or '(none in config)'} have no omnilens adapter; "
            f"supported architectures: {', '.join(supported)}"
        )
    cls = getattr(transformers, arch)
    extra = {"dtype": dtype} if dtype is not None else {}
    if attn_implementation is not None:
        extra["attn_implementation"] = attn_implementation
    model = cls.from_pretrained(path, **extra, **kwargs)
    if device is not None:
        model.to(device)
    if tokenizer is None:
        tokenizer = _optional(lambda: transformers.AutoTokenizer.from_pretrained(path))
    if processor is None:
        processor = _optional(lambda: transformers.AutoProcessor.from_pretrained(path))
        if processor is tokenizer or isinstance(processor, transformers.PreTrainedTokenizerBase):
            processor = None  # a text-only folder: AutoProcessor falls back to a (second) tokenizer
    return model, tokenizer, processor


def _optional(make: Callable[[], Any]) -> Any:
    try:
        return make()
    except (OSError, ValueError, TypeError, KeyError, ImportError):
        return None
