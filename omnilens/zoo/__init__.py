"""Tiny Qwen3 models trained by omnilens on synthetic tasks with a known mechanism, shipped in the package.

``induction``: 2 layers, attention-only (MLPs zeroed), trained on repeated random segments and in-context
bigram walks; a previous-token head in layer 0 feeds two induction heads in layer 1 (Olsson et al. 2022).
``mood``: 4 layers, templated sentences whose mood is set by cue words (see :mod:`omnilens.zoo.mood`). The training scripts live in ``training/`` at the repository
root; ``zoo.json`` next to each model's weights records the seed, the command and the measured figures.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

WEIGHTS = Path(__file__).resolve().parent / "weights"


def names() -> list[str]:
    """Names of the shipped zoo models."""
    return sorted(p.name for p in WEIGHTS.iterdir() if (p / "config.json").is_file()) if WEIGHTS.is_dir() else []


def path(name: str) -> Path:
    """The folder holding zoo model ``name`` (config, safetensors, tokenizer, ``zoo.json``)."""
    available = names()
    if name not in available:
        raise ValueError(f"unknown zoo model {name!r}; available: {', '.join(available) or '(none shipped)'}")
    return WEIGHTS / name


def card(name: str) -> dict[str, Any]:
    """The training facts recorded for ``name`` (seed, command, losses / accuracies)."""
    return json.loads((path(name) / "zoo.json").read_text())


def load(name: str, **load_kwargs: Any):
    """A :class:`~omnilens.Lens` over zoo model ``name`` with its tokenizer (``omnilens.load`` of its folder)."""
    from omnilens.lens import load as load_lens

    return load_lens(path(name), **load_kwargs)


__all__ = ["WEIGHTS", "card", "load", "names", "path"]
