"""Every tutorial runs as a script (fresh interpreter, output folder as argv[1]), exits 0, prints what it
promises and writes the files it promises.

Each tutorial is a subprocess (a new interpreter: ~3-5 s of imports alone), hence ``slow``. Intra-op threads are
pinned to 1, as in ``conftest.py``: on a busy machine tiny forwards are much slower with spinning workers.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from omnilens import zoo
from omnilens.concepts import load_readout
from omnilens.patching import PatchingResult
from omnilens.vision_embeddings import load_vision_embeddings

TUTORIALS = Path(__file__).resolve().parents[1] / "tutorials"
TIMEOUT_S = 180


def run(name: str, out: Path) -> str:
    """Run ``tutorials/<name>`` with ``out`` as its output folder; returns its stdout (fails on a non-zero exit)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, str(TUTORIALS / name), str(out)], capture_output=True, text=True,
                          env=env, cwd=out.parent, timeout=TIMEOUT_S)
    assert proc.returncode == 0, \
        f"{name} exited {proc.returncode}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}"
    return proc.stdout


def zoo_config(name: str) -> dict:
    return json.loads((zoo.path(name) / "config.json").read_text())


def html_files(out: Path) -> set[str]:
    names = {p.name for p in out.glob("*.html")}
    for p in out.glob("*.html"):
        assert p.stat().st_size > 1000 and "plotly" in p.read_text()[:200_000].lower(), p
    return names


@pytest.mark.slow
def test_01_quickstart(tmp_path):
    stdout = run("01_quickstart.py", tmp_path / "out")
    assert "HookError:" in stdout and "generated:" in stdout


@pytest.mark.slow
def test_02_patching_heatmaps(tmp_path):
    out = tmp_path / "out"
    stdout = run("02_patching_heatmaps.py", out)
    assert html_files(out) == {"resid_exact.html", "resid_atp.html", "heads_exact.html", "heads_atp.html",
                               "induction_head_pattern.html"}
    heads = PatchingResult.load(out / "heads_exact.safetensors")
    cfg = zoo_config("induction")
    assert heads.axes == ("layer", "head") and heads.method == "exact"
    assert heads.shape == (cfg["num_hidden_layers"], cfg["num_attention_heads"])
    assert "top components (exact):" in stdout and "induction head L1.H" in stdout


@pytest.mark.slow
def test_03_probes_and_steering(tmp_path):
    out = tmp_path / "out"
    stdout = run("03_probes_and_steering.py", out)
    assert html_files(out) == {"probe_sweep.html", "head_probes.html"}
    dirs = load_file(str(out / "head_directions.safetensors"))
    d_model = zoo_config("mood")["hidden_size"]
    assert len(dirs) == 3 and all(v.shape == (d_model,) and abs(float(v.norm()) - 1) < 1e-5 for v in dirs.values())
    assert stdout.count("steered: ") == 4 and "label flipped to happy in" in stdout


@pytest.mark.slow
def test_04_qwen2_vl_vision(tmp_path):
    out = tmp_path / "out"
    stdout = run("04_qwen2_vl_vision.py", out)
    emb, manifest = load_vision_embeddings(out / "vision_embeddings")
    assert manifest["labels"] == ["red", "red", "green", "green", "blue", "blue", "yellow", "yellow"]
    assert set(emb) == {"vision.blocks.0.hook_resid_post", "vision.blocks.1.hook_resid_post", "vision.hook_merger"}
    assert all(v.shape[0] == 8 for v in emb.values())
    assert "swapped :" in stdout and "= image 0's span" in stdout


@pytest.mark.slow
def test_05_qwen3_omni(tmp_path):
    out = tmp_path / "out"
    stdout = run("05_qwen3_omni.py", out)
    wav = load_file(str(out / "omni_waveforms.safetensors"))
    assert wav["base"].dim() == 3 and not torch.equal(wav["base"], wav["steered"])
    assert (out / "generation_meta.json").is_file()
    assert "changed: True" in stdout and "talker.code_predictor" in stdout


@pytest.mark.slow
def test_06_concept_vectors(tmp_path):
    out = tmp_path / "out"
    stdout = run("06_concept_vectors.py", out)
    folder = out / "concepts"
    assert {p.name for p in folder.iterdir()} == {"readout.safetensors", "readout.json", "quality.json", "quality.html"}
    readout = load_readout(folder)
    assert readout.concepts == ["angry", "happy", "sad"] and readout.layers == [0, 1, 2, 3]
    assert "preflight:" in stdout and "triage:" in stdout and "readout picks the mood of" in stdout
