"""The entry point: :class:`Lens` (a model, its adapter's graph, executors) and :func:`load`; generation."""

from omnilens.lens.lens import Lens, load

__all__ = ["Lens", "load"]
