"""The ``omnilens`` console script. ``omnilens patch`` with no arguments, run as the console script of a
fresh wheel install (weights shipped as package data), runs the main job on the embedded induction model,
writes its heatmaps and results, and prints the induction heads on top."""

from __future__ import annotations

import json
import os
import shutil
import re
import subprocess
import sys
from pathlib import Path

import pytest

from omnilens.cli import main
from omnilens.patching import PatchingResult

REPO = Path(__file__).resolve().parent.parent


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    code = "import sys; from omnilens.cli import main; sys.exit(main())"
    return subprocess.run([sys.executable, "-c", code, *args], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)


def _install(tmp_path: Path) -> Path:
    """Build a wheel from a copy of the sources and ``pip install --target`` it; returns the target."""
    src = tmp_path / "src"
    shutil.copytree(REPO / "omnilens", src / "omnilens", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "wheel", str(src), "--no-deps", "--no-build-isolation", "-w", str(tmp_path / "dist")],
                   check=True, capture_output=True, timeout=300)
    wheel = next((tmp_path / "dist").glob("omnilens-*.whl"))
    target = tmp_path / "site"
    subprocess.run([*pip, "install", str(wheel), "--no-deps", "--target", str(target)], check=True,
                   capture_output=True, timeout=300)
    return target


@pytest.mark.slow
def test_patch_main_job_on_a_fresh_install(tmp_path):
    target = _install(tmp_path)
    work = tmp_path / "work"
    work.mkdir()
    env = {**os.environ, "PYTHONPATH": str(target), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([str(target / "bin" / "omnilens"), "patch"], cwd=work, env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    warned = re.findall(r"^.*\w+Warning: .*$", proc.stderr, re.M)
    assert not warned, "the main job printed Python warnings:\n" + "\n".join(warned)
    out = work / "omnilens_out"
    for stem in ("exact_resid", "atp_resid", "exact_heads", "atp_heads"):
        assert (out / f"{stem}.html").stat().st_size > 10_000
        res = PatchingResult.load(out / f"{stem}.safetensors")
        shipped = Path(res.provenance["name_or_path"]).resolve()  # the installed copy of the weights
        assert shipped == (target / "omnilens" / "zoo" / "weights" / "induction").resolve()
    assert (out / "dla_heads.html").is_file()
    summary = json.loads((out / "summary.json").read_text())
    top_exact = summary["results"]["exact_heads"][0]["component"]
    top_atp = summary["results"]["atp_heads"][0]["component"]
    assert top_exact == top_atp and top_exact.startswith("L1.H")
    assert f"    {top_exact}" in proc.stdout  # printed with its score
    assert summary["clean"] - summary["corrupted"] > 3.0
    assert "wrote" in proc.stdout and "omnilens_out" in proc.stdout


def test_unknown_model_lists_the_zoo(tmp_path, capsys):
    assert main(["patch", "--model", "no-such-model", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'no-such-model'" in err and "zoo models: induction, mood" in err
    assert not any(tmp_path.iterdir())  # nothing written


def test_unknown_model_subprocess_exit_status(tmp_path):
    proc = _run(["patch", "--model", "nope"], tmp_path)
    assert proc.returncode == 2
    assert "zoo models: induction, mood" in proc.stderr
    assert not (tmp_path / "omnilens_out").exists()


def test_unknown_sweep(tmp_path, capsys):
    assert main(["patch", "--sweep", "resid,bogus", "--out", str(tmp_path)]) == 2
    assert "unknown sweep(s) ['bogus']" in capsys.readouterr().err


def test_patch_options(tmp_path, capsys):
    """A zoo model by folder path, one sweep, one method, another metric, a chosen output folder."""
    from omnilens import zoo

    out = tmp_path / "res"
    code = main(["patch", "--model", str(zoo.path("induction")), "--sweep", "heads", "--method", "exact",
                 "--metric", "log_prob", "--out", str(out), "--batch", "4", "--no-progress"])
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == ["exact_heads.html", "exact_heads.safetensors", "summary.json"]
    res = PatchingResult.load(out / "exact_heads.safetensors")
    assert res.metric == "log_prob" and res.axes == ("layer", "head") and res.shape == (2, 4)
    assert "exact heads" in capsys.readouterr().out


def test_zoo_command(capsys):
    assert main(["zoo"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[0] for line in lines] == ["induction", "mood"]


def test_noising_ranks_by_distance_from_clean(tmp_path):
    """When noising, 1 = clean: the components listed first are those that move the metric furthest from 1."""
    out = tmp_path / "noise"
    assert main(["patch", "--sweep", "heads", "--method", "exact", "--direction", "noise", "--top", "8",
                 "--out", str(out), "--batch", "4", "--no-progress"]) == 0
    listed = json.loads((out / "summary.json").read_text())["results"]["exact_heads"]
    res = PatchingResult.load(out / "exact_heads.safetensors")
    assert res.direction == "noise" and len(listed) == 8
    distance = [abs(1 - row["score"]) for row in listed]
    assert distance == sorted(distance, reverse=True)
    assert distance[0] == pytest.approx(float((1 - res.values).abs().max()), rel=1e-6)  # float32 values


def test_plotlyjs_directory_writes_one_shared_bundle(tmp_path, capsys):
    """``--plotlyjs directory``: the heatmaps (patching and DLA) reference one plotly.min.js in the folder."""
    out = tmp_path / "shared"
    assert main(["patch", "--sweep", "heads", "--method", "exact", "--plotlyjs", "directory", "--out", str(out),
                 "--batch", "4", "--no-progress"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["dla_heads.html", "exact_heads.html", "exact_heads.safetensors",
                                                     "plotly.min.js", "summary.json"]
    assert (out / "plotly.min.js").stat().st_size > 1_000_000
    for name in ("exact_heads.html", "dla_heads.html"):
        html = (out / name).read_text()
        assert 'src="plotly.min.js"' in html and len(html) < 100_000
    assert capsys.readouterr().out.count("plotly.min.js") == 1  # listed once among the written files
