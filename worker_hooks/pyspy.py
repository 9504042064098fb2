"""Finding the py-spy binary: the worker's ``pyspy_dump`` handler runs it on its own process,
the sidecar on a worker that cannot answer, and both look in the same places; standard
library only and free of side effects, so the sidecar imports it without becoming a worker.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

PYSPY_ENV = "RANKSIDE_PYSPY"


def find_pyspy() -> str | None:
    """py-spy from ``RANKSIDE_PYSPY``, the PATH, or beside this interpreter (a venv's bin)."""
    explicit = os.environ.get(PYSPY_ENV)
    if explicit:
        return explicit if os.access(explicit, os.X_OK) else None
    found = shutil.which("py-spy")
    if found:
        return found
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if os.access(beside, os.X_OK) else None
