"""omnilens: one named hook graph over Qwen3, Qwen2-VL and Qwen3-Omni, and the methods that run on it."""

from omnilens.cache import ActivationCache
from omnilens.errors import HookError, UnsupportedModelError
from omnilens.executors.base import Read, RunResult, Write
from omnilens.graph import HookGraph, HookSpec
from omnilens.lens import Lens, load

__version__ = "0.1.0"

__all__ = [
    "ActivationCache", "HookError", "HookGraph", "HookSpec", "Lens", "Read", "RunResult",
    "UnsupportedModelError", "Write", "load", "__version__",
]
