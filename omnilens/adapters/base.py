"""The adapter contract: the only code that knows Hugging Face module paths."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from torch import nn

from omnilens.core.graph import HookGraph, HookSpec
from omnilens.core.hookpoints import attention_points

if TYPE_CHECKING:
    from omnilens.core.packed import Segments


def _ids_only(output: Any) -> tuple[Any, Any]:
    return getattr(output, "sequences", output), None


@dataclass
class GenerationPlan:
    """How ``Lens.generate`` drives a model's ``generate``.

    ``kwargs``: keyword arguments for ``generate``; ``towers``: tower name -> module path whose forward
    calls are that tower's steps (``""`` path: the model itself); ``parents``: nested tower -> the tower
    inside whose step it runs; ``unpack``: ``output -> (ids [batch pos], waveform or None)``; ``meta``:
    extra facts recorded in the cache metadata.
    """

    kwargs: dict[str, Any]
    towers: dict[str, str]
    parents: dict[str, str] = field(default_factory=dict)
    unpack: Callable[[Any], tuple[Any, Any]] = _ids_only
    meta: dict[str, Any] = field(default_factory=dict)


class Adapter:
    """Maps one architecture family onto the hook graph.

    Subclasses set ``architectures`` (HF class names they serve) and implement :meth:`build_graph`.
    They may override :meth:`instrument` (temporary model changes some sites need) and
    :meth:`prepare_inputs` (turning user inputs into forward kwargs).
    """

    architectures: ClassVar[tuple[str, ...]] = ()

    def __init__(self, model: nn.Module):
        self.model = model
        self.graph = self.build_graph()

    def build_graph(self) -> HookGraph:
        """The model's :class:`HookGraph` (subclasses implement it; called once, in ``__init__``)."""
        raise NotImplementedError

    def module(self, path: str) -> nn.Module:
        """The module at dotted ``path`` (relative to the wrapped model)."""
        return self.model.get_submodule(path)

    def attention_modules(self, specs: Sequence[HookSpec]) -> list[nn.Module]:
        """Attention modules that must carry hook points for ``specs`` (default: every site's parent)."""
        mods = {}
        for spec in specs:
            if "attention_points" in spec.requires:
                parent = spec.module.rsplit(".", 1)[0]
                mods[parent] = self.module(parent)
        return list(mods.values())

    @contextmanager
    def instrument(self, specs: Sequence[HookSpec]) -> Iterator[None]:
        """Install what ``specs`` need for one run (attention points) and remove it on exit."""
        with ExitStack() as stack:
            attn = self.attention_modules(specs)
            if attn:
                stack.enter_context(attention_points(self.model, attn))
            yield

    def prepare_inputs(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Validate and complete forward kwargs before any forward runs (default: unchanged)."""
        return inputs

    def image_segments(self, inputs: dict[str, Any]) -> Segments | None:
        """The :class:`~omnilens.core.packed.Segments` of a run's packed images (default: none)."""
        return None

    def segments(self, inputs: dict[str, Any]) -> dict[str, list[tuple[int, int]]]:
        """``[start, end)`` per clip/image along packed encoder axes, keyed by axis name (default: each
        image's span along ``patch`` and ``merged``, from :meth:`image_segments`)."""
        seg = self.image_segments(inputs)
        return {} if seg is None else {axis: seg.spans(axis) for axis in ("patch", "merged")}

    def run_meta(self, inputs: dict[str, Any]) -> dict[str, Any]:
        """Facts about one run put into ``ActivationCache.meta``: ``"segments"`` when any, and ``"vision"``
        (:meth:`Segments.to_meta <omnilens.core.packed.Segments.to_meta>`: grids, offsets) for a run with images."""
        segments = self.segments(inputs)
        meta: dict[str, Any] = {"segments": segments} if segments else {}
        seg = self.image_segments(inputs)
        if seg is not None:
            meta["vision"] = seg.to_meta()
        return meta

    def generation_plan(self, inputs: dict[str, Any], *, return_audio: bool | None = None,
                        **kwargs: Any) -> GenerationPlan:
        """How to call ``generate`` (default: text generation, greedy unless ``do_sample`` is given)."""
        if return_audio:
            raise ValueError(f"return_audio=True: {type(self.model).__name__} produces no audio")
        kwargs.setdefault("do_sample", False)
        return GenerationPlan(kwargs=kwargs, towers={"": ""})
