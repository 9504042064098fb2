"""rankside worker hooks, what every training process imports: ``worker_main()``, ``step()``,
``register_handler()`` and the handler types, with ``metrics``, ``builtin_handlers`` and
``torch_bridge`` beside them. Standard library only; torch is used when it is present and never
imported just to check. Every name here is loaded on first use (PEP 562), so importing one
submodule, as the sidecar imports ``protocol``, runs that module alone; and everything is inert
until ``worker_main()`` finds ``RANKSIDE_SOCKET`` in the environment.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
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

# The submodule that defines each public name that is not a submodule itself.
_DEFINED_IN = {
    "HandlerError": "handlers",
    "Request": "handlers",
    "Response": "handlers",
    "register_handler": "handlers",
    "current_connection": "entry",
    "worker_main": "entry",
    "step": "progress",
}


def _load(name: str) -> object:
    """The public name or submodule ``name``, imported on its first use."""
    if name in _DEFINED_IN:
        _load_public_names()
        return globals()[name]
    if name.startswith("__"):
        # Tools probe for dunders (__path__, __wrapped__); those are never submodules.
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    # A submodule: that one alone, as ``from . import handlers`` inside this
    # package and ``from worker_hooks import protocol`` in the sidecar ask
    # for it here before they import it, and ``import worker_hooks;
    # worker_hooks.metrics`` worked when this package imported everything.
    try:
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as exc:
        if exc.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from None


def _load_public_names() -> None:
    """Import every public name into this module's globals, and stop being lazy.

    The public names come from modules that import one another anyway
    (``worker_main`` needs nearly all of them), so one costs what all cost.
    CPython specialises an attribute lookup on a module only while the module
    has no ``__getattr__``, so it goes once the names are globals: from then
    on ``worker_hooks.step()`` costs what it did when this package imported
    everything eagerly.
    """
    namespace = globals()
    for name in __all__:
        module = _DEFINED_IN.get(name)
        if module is None:
            namespace[name] = importlib.import_module(f".{name}", __name__)
        else:
            namespace[name] = getattr(importlib.import_module(f".{module}", __name__), name)
    namespace.pop("__getattr__", None)


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


if not TYPE_CHECKING:
    # Out of mypy's sight, so that a misspelt name stays a type error for
    # users instead of becoming Any; the names themselves are imported above.
    __getattr__ = _load
