"""Atomic file writing: a temporary file in the target's folder, then ``os.replace``, so readers never
see a partial file; the temporary file is removed when writing fails (or is interrupted)."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike, write: Callable[[str], None]) -> Path:
    """Write ``path`` through ``write(tmp_path)`` then rename; returns ``path``.

    The file gets the permissions a plain ``open(path, "w")`` would give it (0666 less the umask).
    """
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""
    return atomic_write(path, lambda tmp: Path(tmp).write_bytes(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write ``text`` to ``path`` atomically."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def atomic_write_json(path: str | os.PathLike, obj: Any, *, sort_keys: bool = False,
                      default: Callable[[Any], Any] | None = None) -> Path:
    """Write ``obj`` as JSON (``indent=1``) to ``path`` atomically."""
    return atomic_write_text(path, json.dumps(obj, indent=1, sort_keys=sort_keys, default=default))


def atomic_save_safetensors(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                            metadata: Mapping[str, str] | None = None) -> Path:
    """Write ``tensors`` (name -> tensor) and optional string ``metadata`` to a safetensors file atomically."""
    return atomic_write(path, lambda tmp: save_file(dict(tensors), tmp,
                                                    metadata=None if metadata is None else dict(metadata)))
