"""The serving readout format: ``readout.safetensors`` + ``readout.json``.

``readout.safetensors`` holds ``layer_<L>.vectors``, fp16 ``[n_concepts, hidden]`` (rows in
``concepts`` order), one per layer; ``readout.json`` is ``{"concepts": [...], "layers": [...],
"hidden_size": H, "dtype": "float16"}``. Both are written atomically.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from omnilens.methods.concepts.vectors import ConceptVectors
from omnilens.core.io import atomic_save_safetensors, atomic_write_json

TENSORS, MANIFEST = "readout.safetensors", "readout.json"
DTYPES = {"float16": torch.float16}


def save_readout(vectors: ConceptVectors, out_dir: str | os.PathLike) -> Path:
    """Write ``vectors`` (cast to fp16) to ``out_dir``; returns the folder."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {f"layer_{lay}.vectors": vectors.vectors[lay].detach().to("cpu", torch.float16).contiguous()
               for lay in vectors.layers}
    manifest = {"concepts": list(vectors.concepts), "layers": [int(x) for x in vectors.layers],
                "hidden_size": vectors.hidden_size, "dtype": "float16"}
    atomic_save_safetensors(out / TENSORS, tensors)
    atomic_write_json(out / MANIFEST, manifest)
    return out


def load_readout(out_dir: str | os.PathLike) -> ConceptVectors:
    """Read a readout folder, checking the manifest against the tensors (clear errors on mismatch)."""
    out = Path(out_dir)
    mpath, tpath = out / MANIFEST, out / TENSORS
    for p in (mpath, tpath):
        if not p.exists():
            raise FileNotFoundError(f"{p} does not exist: a readout folder holds {MANIFEST} and {TENSORS}")
    m = json.loads(mpath.read_text())
    missing = [k for k in ("concepts", "layers", "hidden_size", "dtype") if k not in m]
    if missing:
        raise ValueError(f"{mpath}: missing keys {missing}")
    if m["dtype"] not in DTYPES:
        raise ValueError(f"{mpath}: dtype {m['dtype']!r} is not supported; expected one of {list(DTYPES)}")
    tensors = load_file(tpath)
    want = {f"layer_{lay}.vectors" for lay in m["layers"]}
    if set(tensors) != want:
        raise ValueError(f"{out}: manifest layers {m['layers']} need tensors {sorted(want)}, "
                         f"but {TENSORS} holds {sorted(tensors)}")
    shape = (len(m["concepts"]), m["hidden_size"])
    for lay in m["layers"]:
        t = tensors[f"layer_{lay}.vectors"]
        if tuple(t.shape) != shape:
            raise ValueError(f"{out}: layer_{lay}.vectors has shape {tuple(t.shape)}, but the manifest says "
                             f"[n_concepts, hidden_size] = {list(shape)}")
        if t.dtype != DTYPES[m["dtype"]]:
            raise ValueError(f"{out}: layer_{lay}.vectors is {t.dtype}, but the manifest says {m['dtype']}")
    return ConceptVectors(list(m["concepts"]), list(m["layers"]),
                          {lay: tensors[f"layer_{lay}.vectors"] for lay in m["layers"]})
