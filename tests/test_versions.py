"""Declared dependency ranges: one table, the same in pyproject.toml, the installed set inside it, and a
clear warning (once) outside it."""

import re
import tomllib
import warnings
from pathlib import Path

import pytest

import omnilens
from omnilens.core import versions as V

PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def test_tested_ranges_match_pyproject_and_have_upper_bounds():
    deps = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    declared = {re.split(r"[<>=!~ ]", d, maxsplit=1)[0]: d[len(re.split(r"[<>=!~ ]", d, maxsplit=1)[0]):]
                for d in deps}
    for name, spec in V.TESTED.items():
        assert declared[name] == spec, f"{name}: pyproject {declared[name]!r}, versions.TESTED {spec!r}"
        if name != "torch":
            assert "<" in spec, f"{name} has no upper bound"


def test_installed_versions_are_inside_the_tested_ranges():
    report = omnilens.versions()
    assert report["omnilens"]["installed"] == omnilens.__version__
    outside = {k: v for k, v in report.items() if not v["ok"]}
    assert not outside, outside
    assert V.check() == []


def test_outside_a_range_warns_once_naming_package_installed_and_range(monkeypatch):
    monkeypatch.setattr(V, "_warned", False)
    monkeypatch.setitem(V.TESTED, "transformers", ">=99,<100")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        problems = V.check()
        V.check()
    assert len(problems) == 1 and problems[0].startswith("transformers ")
    msgs = [str(w.message) for w in caught if issubclass(w.category, V.VersionWarning)]
    assert len(msgs) == 1, msgs
    assert "transformers" in msgs[0] and "tested >=99,<100" in msgs[0] and V.versions()["transformers"]["installed"] in msgs[0]


def test_load_checks_versions(monkeypatch):
    from omnilens.testing import tiny_qwen3

    monkeypatch.setattr(V, "_warned", False)
    monkeypatch.setitem(V.TESTED, "nnsight", "<0.0.1")
    with pytest.warns(V.VersionWarning, match="nnsight"):
        omnilens.load(tiny_qwen3())


def test_a_missing_package_is_reported_not_installed(monkeypatch):
    monkeypatch.setitem(V.TESTED, "no-such-package-omnilens", ">=1")
    report = V.versions()["no-such-package-omnilens"]
    assert report == {"installed": None, "tested": ">=1", "ok": False}
