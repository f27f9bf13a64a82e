"""The shared vocabulary of the hook graph: hook-function type, selectors and axis names.

Every layer names axes with these constants, so "a position axis" or "a head axis" means the same set
everywhere (interventions, patching sweeps, heatmaps).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from omnilens.core.graph import HookSpec

PosSelector = int | slice | Sequence[int] | torch.Tensor | None
HookFn = Callable[[torch.Tensor, "HookSpec"], "torch.Tensor | None"]

POS_AXES = ("pos", "query", "patch", "frame")
"""Axes along a sequence: token positions, attention queries, packed vision patches, audio frames."""
HEAD_AXES = ("head", "kv_head")
"""Axes over attention heads (query heads, key/value heads)."""
SELECTOR_AXES = {"pos": POS_AXES, "head": ("head",), "kv_head": ("kv_head",), "expert": ("expert",),
                 "batch": ("batch",)}
"""Which site axes each selector keyword (``pos=``, ``head=``, ...) may pick along."""
