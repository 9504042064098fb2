"""Who this worker is, read once from the torchrun environment."""

from __future__ import annotations

import os
import socket
from dataclasses import asdict, dataclass
from typing import Any


def _env_int(name: str) -> int | None:
    value = os.environ.get(name)
    if value is None or value == "":
        return None
    try:
        return int(value)
    except ValueError:
        return None


@dataclass(frozen=True)
class Identity:
    """The worker's place in the job, as torchrun describes it."""

    rank: int | None
    local_rank: int | None
    world_size: int | None
    local_world_size: int | None
    group_rank: int | None
    role: str
    restart_count: int
    run_id: str
    pid: int
    hostname: str

    @classmethod
    def from_environ(cls) -> Identity:
        return cls(
            rank=_env_int("RANK"),
            local_rank=_env_int("LOCAL_RANK"),
            world_size=_env_int("WORLD_SIZE"),
            local_world_size=_env_int("LOCAL_WORLD_SIZE"),
            group_rank=_env_int("GROUP_RANK"),
            role=os.environ.get("ROLE_NAME", "default"),
            restart_count=_env_int("TORCHELASTIC_RESTART_COUNT") or 0,
            run_id=os.environ.get("TORCHELASTIC_RUN_ID", ""),
            pid=os.getpid(),
            hostname=socket.gethostname(),
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)
