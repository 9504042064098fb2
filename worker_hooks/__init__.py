"""rankside worker hooks: what every training process imports.

Standard library only; torch is used when it is present and never imported
just to check. Everything here is inert until ``worker_main()`` finds
``RANKSIDE_SOCKET`` in the environment.
"""

from .entry import current_connection, worker_main
from .handlers import Request, Response, register_handler
from .progress import step

__all__ = [
    "Request",
    "Response",
    "current_connection",
    "register_handler",
    "step",
    "worker_main",
]
