"""A one-rank gloo job whose flight recorder fills up while it trains.

With BAD_RECENT=1 the program registers its own ``fr_recent``, which answers
what the handler never would, for the sidecar's validation to refuse.
"""

import os
import socket
import time

import torch
import torch.distributed as dist

import worker_hooks
from worker_hooks import Request, Response


def bad_recent(request: Request) -> Response:
    return Response('{"groups": [1, 2]}', content_type="application/json")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@worker_hooks.worker_main()
def main() -> None:
    if os.environ.get("BAD_RECENT") == "1":
        worker_hooks.register_handler("fr_recent", bad_recent)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=0, world_size=1)
    tensor = torch.ones(8)
    while True:
        dist.all_reduce(tensor)
        worker_hooks.step()
        time.sleep(0.05)


if __name__ == "__main__":
    main()
