"""omnilens: one named hook graph over Qwen3, Qwen2-VL and Qwen3-Omni, and the methods that run on it.

The folders are the layers (see CONTRIBUTING.md): ``core`` <- ``inputs`` <- ``adapters`` <- ``executors``
<- ``lens`` <- ``methods`` <- ``studies`` <- ``app``. Users import the short public paths
(``omnilens.patching``, ``omnilens.probing``, ``omnilens.graph``, ...); they name the same module objects as
the layered paths (``omnilens.methods.patching``, ``omnilens.core.graph``, ...).
"""

import importlib
import importlib.abc
import importlib.util
import sys
from types import ModuleType

from omnilens.core.cache import ActivationCache
from omnilens.core.errors import HookError, UnsupportedModelError
from omnilens.core.graph import HookGraph, HookSpec
from omnilens.core.versions import __version__, versions
from omnilens.executors.base import Read, RunResult, Write
from omnilens.lens import Lens, load

PUBLIC_PATHS = {
    **{m: f"omnilens.core.{m}" for m in ("cache", "errors", "graph", "hookpoints", "io", "packed", "views")},
    **{m: f"omnilens.methods.{m}" for m in ("activations", "concepts", "heads", "interventions", "patching",
                                            "probing", "vision_embeddings")},
    "generation": "omnilens.lens.generation",
    "cli": "omnilens.app.cli",
}
"""Short public module path (``omnilens.<key>``) -> the module's place in the layered layout."""

SUBMODULES = (*PUBLIC_PATHS, "inputs", "testing", "viz", "zoo")
"""Submodules reachable as attributes (``omnilens.zoo.load(...)``), imported on first use."""


class _PublicPathFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports ``omnilens.<short>[.sub]`` as the very module object at its layered path (one module, not two)."""

    def find_spec(self, fullname, path=None, target=None):
        head = fullname.removeprefix("omnilens.").partition(".")[0]
        if not fullname.startswith("omnilens.") or head not in PUBLIC_PATHS:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec):
        head, _, rest = spec.name.removeprefix("omnilens.").partition(".")
        return importlib.import_module(PUBLIC_PATHS[head] + (f".{rest}" if rest else ""))

    def exec_module(self, module):
        """Already executed under its layered name."""


sys.meta_path.insert(0, _PublicPathFinder())


def __getattr__(name: str) -> ModuleType:
    if name in SUBMODULES:
        return importlib.import_module(f"omnilens.{name}")
    raise AttributeError(f"module 'omnilens' has no attribute {name!r}")


__all__ = [
    "ActivationCache", "HookError", "HookGraph", "HookSpec", "Lens", "Read", "RunResult",
    "UnsupportedModelError", "Write", "load", "versions", "__version__", *SUBMODULES,
]
