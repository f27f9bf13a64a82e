"""omnilens's version and the dependency versions it is tested with.

``TESTED`` is the one place the tested ranges live (``pyproject.toml`` declares the same bounds; a test
checks they agree). :func:`check` warns once per process, naming each package outside its range.
"""

from __future__ import annotations

import importlib.metadata
import warnings

from packaging.specifiers import SpecifierSet
from packaging.version import Version

__version__ = "0.1.0"

TESTED: dict[str, str] = {
    "torch": ">=2.4",
    "transformers": ">=5.23,<5.25",
    "nnsight": ">=0.8.1,<0.9",
    "transformer-lens": ">=3.9,<4",
    "sae-lens": ">=6.54,<7",
}
"""Package -> the version range the suite runs green on (lowest and newest tried)."""


class VersionWarning(UserWarning):
    """An installed dependency is outside the range omnilens is tested with."""


_warned = False


def versions() -> dict[str, dict[str, str | bool | None]]:
    """Installed version, tested range and whether it is inside, per dependency (``None`` = not installed)."""
    out: dict[str, dict[str, str | bool | None]] = {"omnilens": {"installed": __version__, "tested": None,
                                                                  "ok": True}}
    for name, spec in TESTED.items():
        try:
            installed = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            installed = None
        ok = installed is not None and SpecifierSet(spec).contains(Version(installed).base_version,
                                                                   prereleases=True)
        out[name] = {"installed": installed, "tested": spec, "ok": ok}
    return out


def check() -> list[str]:
    """Warn once per process (:class:`VersionWarning`) if a dependency is outside its tested range; returns
    the problems found (empty when all are inside)."""
    global _warned
    problems = [f"{name} {v['installed'] or '(not installed)'} (tested {v['tested']})"
                for name, v in versions().items() if not v["ok"]]
    if problems and not _warned:
        _warned = True
        warnings.warn("omnilens is not tested with " + ", ".join(problems)
                      + "; results may differ. omnilens.versions() shows what is installed.",
                      VersionWarning, stacklevel=3)
    return problems
