"""Captured dumps on disk: one file per worker per incident, under caps.

File names carry the time, the incident, the worker and what was captured, so
a directory listing reads as a timeline even without the sidecar.
"""

from __future__ import annotations

import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("rankside.sidecar")

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")
# <time>-<incident>-<worker>-<what>.<ext>, all from _UNSAFE-cleaned parts.
_NAME = re.compile(
    r"^(?P<time>\d{8}T\d{6}\.\d{3}Z)-(?P<incident>[A-Za-z0-9_.]+)-"
    r"(?P<worker>[A-Za-z0-9_.]+)-(?P<what>[A-Za-z0-9_.]+)\.(?P<ext>txt|json|bin)"
)
_EXTENSIONS = {"application/json": "json", "application/octet-stream": "bin"}


def _clean(part: str) -> str:
    return _UNSAFE.sub("_", part).replace("-", "_")[:64] or "_"


@dataclass(frozen=True)
class Dump:
    """One file in the dump directory."""

    id: str
    incident: str
    worker: str
    what: str
    time: float
    size: int
    content_type: str

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "incident": self.incident,
            "worker": self.worker,
            "what": self.what,
            "time": self.time,
            "size": self.size,
            "content_type": self.content_type,
        }


FILE_MODE = 0o600


class DumpStore:
    """Writes dumps to ``directory`` and keeps it within ``max_files`` and ``max_bytes``."""

    def __init__(self, directory: str, max_files: int = 1000, max_bytes: int = 512 << 20) -> None:
        self.directory = Path(directory)
        self.max_files = max_files
        self.max_bytes = max_bytes
        # Dumps hold stacks, locals' reprs and profiles of the workers: as
        # private as the worker socket (0600), so 0700 and 0600. A directory
        # that already exists keeps the mode its owner gave it.
        self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)

    def save(
        self, incident: str, worker: str, what: str, content: bytes, content_type: str
    ) -> Dump:
        """Write one dump; raises OSError (disk full, say) for the caller to record."""
        now = time.time()
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z"
        ext = _EXTENSIONS.get(content_type.split(";")[0].strip(), "txt")
        name = f"{stamp}-{_clean(incident)}-{_clean(worker)}-{_clean(what)}.{ext}"
        path = self.directory / name
        tmp = path.with_suffix(".partial")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
            with os.fdopen(fd, "wb") as fp:
                fp.write(content)
            os.replace(tmp, path)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        self.enforce_caps()
        return self.describe(path) or Dump(name, incident, worker, what, now, len(content), "")

    def all(self) -> list[Dump]:
        """Every dump, newest first."""
        dumps = [d for d in map(self.describe, self._files()) if d is not None]
        return sorted(dumps, key=lambda d: d.id, reverse=True)

    def path_of(self, dump_id: str) -> Path | None:
        """The file of dump ``dump_id``; None for anything that is not one of ours."""
        if not _NAME.fullmatch(dump_id):
            return None
        path = self.directory / dump_id
        return path if path.is_file() else None

    def enforce_caps(self) -> None:
        """Remove the oldest dumps until both caps hold."""
        files = sorted(self._files(), key=lambda p: p.name)
        sizes = {p: _size(p) for p in files}
        total = sum(sizes.values())
        while files and (len(files) > self.max_files or total > self.max_bytes):
            oldest = files.pop(0)
            total -= sizes[oldest]
            oldest.unlink(missing_ok=True)

    def _files(self) -> list[Path]:
        try:
            return [p for p in self.directory.iterdir() if _NAME.fullmatch(p.name)]
        except FileNotFoundError:
            return []

    def describe(self, path: Path) -> Dump | None:
        match = _NAME.fullmatch(path.name)
        if match is None:
            return None
        try:
            stat = path.stat()
        except FileNotFoundError:
            return None
        content_type = {"json": "application/json", "bin": "application/octet-stream"}.get(
            match["ext"], "text/plain; charset=utf-8"
        )
        return Dump(
            id=path.name,
            incident=match["incident"],
            worker=match["worker"],
            what=match["what"],
            time=stat.st_mtime,
            size=stat.st_size,
            content_type=content_type,
        )


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0
