"""Programs from the system that some tests drive: promtool, prometheus.

`make system-deps` installs them (the Debian package prometheus). Without
them a test skips on a developer's machine, but fails in CI (CI=true), where
.ci/run has installed them and a skip would hide a broken check.
"""

from __future__ import annotations

import os
import shutil

import pytest


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


def require_tool(name: str, install_hint: str = "make system-deps") -> str:
    """The path of ``name``; skips (fails under CI) when it is not installed."""
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed: run `{install_hint}`"
        if in_ci():
            pytest.fail(message + " (CI=true: this check may not be skipped)")
        pytest.skip(message)
    return path


def require_module(name: str, install_hint: str = "make") -> None:
    """Skip (fail under CI) when the Python module ``name`` cannot be imported."""
    import importlib.util

    if importlib.util.find_spec(name) is None:
        message = f"the Python module {name} is not installed: run `{install_hint}`"
        if in_ci():
            pytest.fail(message + " (CI=true: this check may not be skipped)")
        pytest.skip(message)
