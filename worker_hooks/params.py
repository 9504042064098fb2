"""Validating a handler's query parameters, with 400s that name the parameter.

Every built-in handler reads its parameters through :class:`Params`, so an
unknown name, a malformed value or a value out of range is refused the same
way everywhere instead of being guessed at.
"""

from __future__ import annotations

import math
from collections.abc import Collection

from .handlers import HandlerError, Request

_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off"})


class Params:
    """The parameters of one request, checked against the names a handler accepts."""

    def __init__(self, request: Request, accepted: Collection[str] = ()) -> None:
        self._request = request
        unknown = sorted({key for key, _ in request.params} - set(accepted))
        if unknown:
            allowed = ", ".join(sorted(accepted)) or "none"
            raise HandlerError(f"unknown parameter '{unknown[0]}' (accepted: {allowed})")

    def raw(self, name: str) -> str | None:
        return self._request.get_param(name)

    def string(self, name: str, default: str) -> str:
        value = self.raw(name)
        return default if value is None else value

    def boolean(self, name: str, default: bool = False) -> bool:
        """``1/true/yes/on`` or ``0/false/no/off`` (any case); an empty value is ``default``."""
        value = self.raw(name)
        if value is None or value == "":
            return default
        folded = value.strip().lower()
        if folded in _TRUE:
            return True
        if folded in _FALSE:
            return False
        raise HandlerError(f"parameter '{name}' must be true or false, got {value!r}")

    def number(self, name: str, low: float, high: float, default: float | None = None) -> float:
        """A number in ``(low, high]``; required when there is no ``default``."""
        value = self.raw(name)
        if value is None:
            if default is None:
                raise HandlerError(f"parameter '{name}' is required")
            return default
        try:
            number = float(value)
        except ValueError:
            number = math.nan
        if not low < number <= high:
            raise HandlerError(
                f"parameter '{name}' must be a number in ({low:g}, {high:g}], got {value!r}"
            )
        return number

    def integer(self, name: str, default: int, low: int, high: int) -> int:
        """An integer in ``[low, high]``."""
        value = self.raw(name)
        if value is None:
            return default
        try:
            number = int(value)
        except ValueError:
            number = low - 1
        if not low <= number <= high:
            raise HandlerError(
                f"parameter '{name}' must be an integer in [{low}, {high}], got {value!r}"
            )
        return number

    def choice(self, name: str, default: str, choices: Collection[str]) -> str:
        value = self.raw(name)
        if value is None:
            return default
        if value not in choices:
            raise HandlerError(
                f"parameter '{name}' must be one of {', '.join(sorted(choices))}, got {value!r}"
            )
        return value
