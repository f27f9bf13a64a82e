"""Errors that name the site, what was expected and what was found."""

from __future__ import annotations


class HookError(RuntimeError):
    """A read or write at a named site failed.

    Attributes: ``site`` (hook name), ``expected`` and ``actual`` (descriptions).
    """

    def __init__(self, site: str, expected: str, actual: str, detail: str = ""):
        self.site, self.expected, self.actual = site, expected, actual
        msg = f"at site {site!r}: expected {expected}, got {actual}"
        super().__init__(f"{msg}. {detail}" if detail else msg)


class UnsupportedModelError(ValueError):
    """The model's architecture has no omnilens adapter."""
