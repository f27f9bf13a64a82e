"""Model adapters and the registry that picks one from a model's class."""

from __future__ import annotations

from torch import nn

from omnilens.adapters.base import Adapter
from omnilens.adapters.qwen2_vl import Qwen2VLAdapter
from omnilens.adapters.qwen3 import Qwen3Adapter
from omnilens.adapters.qwen3_omni import Qwen3OmniAdapter
from omnilens.core.errors import UnsupportedModelError

ADAPTERS: list[type[Adapter]] = [Qwen3Adapter, Qwen3OmniAdapter, Qwen2VLAdapter]


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    """Add an adapter class to the registry (usable as a decorator)."""
    ADAPTERS.append(cls)
    return cls


def supported_architectures() -> list[str]:
    """HF class names omnilens can map."""
    return [arch for cls in ADAPTERS for arch in cls.architectures]


def adapter_for(model: nn.Module) -> Adapter:
    """Instantiate the adapter serving ``model``'s class, or raise listing the supported ones."""
    name = type(model).__name__
    for cls in ADAPTERS:
        if name in cls.architectures:
            return cls(model)
    raise UnsupportedModelError(
        f"no omnilens adapter for {name}; supported architectures: {', '.join(supported_architectures())}"
    )
