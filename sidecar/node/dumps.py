"""Captured dumps on disk: one file per worker per incident, under caps.

File names carry the time, the incident, the worker and what was captured, so
a directory listing reads as a timeline even without the sidecar.

Flight-recorder dumps are the exception: torchfrtrace reads a directory of one
file per rank, named with a common prefix and the rank (``fr_trace_rank_3``),
so an incident's recorder files sit in a directory of their own,
``<dump dir>/<incident>/``, on which ``python -m
torch.distributed.flight_recorder.fr_trace`` runs unchanged. Their dump id is
``<incident>-fr_trace_rank_<rank>``; the caps count them with the rest.
"""

from __future__ import annotations

import contextlib
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
# The file name torchfrtrace infers its prefix from: a common prefix, then the rank.
RECORDER_PREFIX = "fr_trace_rank_"
RECORDER_WHAT = "fr_trace"
# <incident>-fr_trace_rank_<rank>: a recorder dump's id, in one path segment.
_RECORDER_ID = re.compile(rf"^(?P<incident>[A-Za-z0-9_.]+)-{RECORDER_PREFIX}(?P<rank>\d{{1,9}})")
_RECORDER_FILE = re.compile(rf"{RECORDER_PREFIX}\d{{1,9}}")


_CLEAN_PART = re.compile(r"[A-Za-z0-9_.]{1,64}")


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
        _write(path, content)
        self.enforce_caps()
        return self.describe(path) or Dump(name, incident, worker, what, now, len(content), "")

    def recorder_dir(self, incident: str) -> Path:
        """The directory of ``incident``'s flight-recorder files, the one torchfrtrace reads."""
        name = _clean(incident)
        # "." and ".." pass the cleaning but name no directory of ours.
        return self.directory / (name if name.strip(".") else "_")

    def save_recorder(self, incident: str, rank: int, content: bytes) -> Dump:
        """Write rank ``rank``'s flight-recorder dump of ``incident``; OSError as ``save``."""
        if rank < 0:
            raise ValueError(f"a recorder dump needs a global rank, not {rank}")
        directory = self.recorder_dir(incident)
        directory.mkdir(mode=0o700, exist_ok=True)
        path = directory / f"{RECORDER_PREFIX}{rank}"
        _write(path, content)
        self.enforce_caps()
        described = self.describe(path)
        if described is None:  # removed at once by the caps
            raise FileNotFoundError(f"{path} was removed by the dump caps as soon as written")
        return described

    def clear_recorder(self, incident: str) -> None:
        """Remove recorder files left under ``incident``'s name (an earlier run's same id).

        torchfrtrace reads every rank's file in the directory: one from another
        run would be analysed as this incident's.
        """
        for path in self._recorder_files(self.recorder_dir(incident)):
            path.unlink(missing_ok=True)

    def all(self) -> list[Dump]:
        """Every dump, newest first."""
        dumps = [d for d in map(self.describe, self._files()) if d is not None]
        # By time first: a recorder dump's id starts with its incident, not a time.
        return sorted(dumps, key=lambda d: (d.time, d.id), reverse=True)

    def path_of(self, dump_id: str) -> Path | None:
        """The file of dump ``dump_id``; None for anything that is not one of ours."""
        if _NAME.fullmatch(dump_id):
            path = self.directory / dump_id
        elif (recorder := _RECORDER_ID.fullmatch(dump_id)) and recorder["incident"].strip("."):
            path = self.directory / recorder["incident"] / f"{RECORDER_PREFIX}{recorder['rank']}"
        else:
            return None
        return path if path.is_file() and not path.is_symlink() else None

    def enforce_caps(self) -> None:
        """Remove the oldest dumps until both caps hold."""
        stats = {p: _stat(p) for p in self._files()}
        # Oldest first: by time, then by name, as the flat names sort by time.
        files = sorted(stats, key=lambda p: (stats[p][0], p.name))
        total = sum(size for _, size in stats.values())
        while files and (len(files) > self.max_files or total > self.max_bytes):
            oldest = files.pop(0)
            total -= stats[oldest][1]
            oldest.unlink(missing_ok=True)
            if _RECORDER_FILE.fullmatch(oldest.name):
                with contextlib.suppress(OSError):  # not empty yet, or gone
                    oldest.parent.rmdir()

    def _files(self) -> list[Path]:
        """Every dump file: the flat ones and the incidents' recorder files."""
        try:
            children = list(self.directory.iterdir())
        except FileNotFoundError:
            return []
        files = [p for p in children if _NAME.fullmatch(p.name)]
        for child in children:
            if (
                _CLEAN_PART.fullmatch(child.name)
                and child.name.strip(".")
                and child.is_dir()
                and not child.is_symlink()
            ):
                files.extend(self._recorder_files(child))
        return files

    @staticmethod
    def _recorder_files(directory: Path) -> list[Path]:
        try:
            return [p for p in directory.iterdir() if _RECORDER_FILE.fullmatch(p.name)]
        except (FileNotFoundError, NotADirectoryError):
            return []

    def describe(self, path: Path) -> Dump | None:
        if _RECORDER_FILE.fullmatch(path.name) and path.parent.parent == self.directory:
            return self._describe_recorder(path)
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

    def _describe_recorder(self, path: Path) -> Dump | None:
        try:
            stat = path.stat()
        except FileNotFoundError:
            return None
        return Dump(
            id=f"{path.parent.name}-{path.name}",
            incident=path.parent.name,
            worker=path.name[len(RECORDER_PREFIX) :],
            what=RECORDER_WHAT,
            time=stat.st_mtime,
            size=stat.st_size,
            content_type="application/octet-stream",
        )


def _write(path: Path, content: bytes) -> None:
    """Write ``path`` whole or not at all, mode 0600."""
    # Not "<name>.partial" beside the recorder files: a name that ends in a digit
    # would be taken by torchfrtrace for one more rank.
    tmp = path.with_name(f".{path.name}.partial")
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
        with os.fdopen(fd, "wb") as fp:
            fp.write(content)
        os.replace(tmp, path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def _stat(path: Path) -> tuple[float, int]:
    """(mtime, size); a file removed meanwhile counts as the oldest and empty."""
    try:
        stat = path.stat()
    except FileNotFoundError:
        return 0.0, 0
    return stat.st_mtime, stat.st_size
