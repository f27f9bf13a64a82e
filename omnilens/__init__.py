"""omnilens: one named hook graph over Qwen3, Qwen2-VL and Qwen3-Omni, and the methods that run on it."""

import importlib
from types import ModuleType

from omnilens.cache import ActivationCache
from omnilens.errors import HookError, UnsupportedModelError
from omnilens.executors.base import Read, RunResult, Write
from omnilens.graph import HookGraph, HookSpec
from omnilens.lens import Lens, load

__version__ = "0.1.0"

# submodules reachable as attributes (``omnilens.zoo.load(...)``) without importing them up front
SUBMODULES = (
    "activations", "concepts", "generation", "heads", "inputs", "interventions", "io", "packed", "patching",
    "probing", "testing", "vision_embeddings", "viz", "zoo",
)


def __getattr__(name: str) -> ModuleType:
    if name in SUBMODULES:
        return importlib.import_module(f"omnilens.{name}")
    raise AttributeError(f"module 'omnilens' has no attribute {name!r}")


__all__ = [
    "ActivationCache", "HookError", "HookGraph", "HookSpec", "Lens", "Read", "RunResult",
    "UnsupportedModelError", "Write", "load", "__version__", *SUBMODULES,
]
