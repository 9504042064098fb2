"""rankside worker hooks: what every training process imports.

Standard library only; torch is used when it is present and never imported
just to check. Everything here is inert until ``worker_main()`` finds
``RANKSIDE_SOCKET`` in the environment.
"""

# Importing builtin_handlers registers the built-in handlers.
from . import builtin_handlers, torch_bridge
from .entry import current_connection, worker_main
from .handlers import HandlerError, Request, Response, register_handler
from .progress import step

__all__ = [
    "HandlerError",
    "Request",
    "Response",
    "builtin_handlers",
    "current_connection",
    "register_handler",
    "step",
    "torch_bridge",
    "worker_main",
]
