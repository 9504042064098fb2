"""Parsing and checking the values that options and request parameters carry.

The one set of validators: every command-line option, every ``Config``
field and every numeric query parameter goes through these, so ``nan``,
``inf``, a negative number or a digit ``int()`` would refuse get the same
answer everywhere. Each raises ``ValueError`` with a message that reads after
the option's or parameter's name ("must be ..., got ...").
"""

from __future__ import annotations

import ipaddress
import math
import re
import urllib.parse

# The longest time any option or parameter may give, about 31 years: beyond
# it, socket and thread timeouts overflow (``OverflowError: timestamp out of
# range``) instead of waiting, so ``1e20`` is refused like ``inf``.
MAX_SECONDS = 1e9


def is_decimal(text: str) -> bool:
    """ASCII digits only: ``str.isdigit`` also accepts '²' and other digits int() refuses."""
    return text.isascii() and text.isdigit()


def finite_number(text: str) -> float:
    """A finite number; NaN and the infinities are refused."""
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"must be a finite number, got {text!r}")
    return value


def _positive(text: str, what: str) -> float:
    try:
        value = finite_number(text)
    except ValueError:
        value = math.nan
    if not value > 0:
        raise ValueError(f"must be a positive {what}, got {text!r}")
    return value


def seconds(text: str) -> float:
    """A positive, finite number of seconds, at most ``MAX_SECONDS``."""
    value = _positive(text, "number of seconds")
    if value > MAX_SECONDS:
        raise ValueError(
            f"must be a positive number of seconds up to {MAX_SECONDS:g}, got {text!r}"
        )
    return value


def positive_number(text: str) -> float:
    """A positive, finite number (a rate, a factor)."""
    return _positive(text, "number")


def whole_number(text: str, minimum: int = 0) -> int:
    """A decimal integer of at least ``minimum`` (no sign, no '²', no '1e3')."""
    if not is_decimal(text) or int(text) < minimum:
        raise ValueError(f"must be a whole number >= {minimum}, got {text!r}")
    return int(text)


def count(text: str) -> int:
    """A whole number of at least 1."""
    return whole_number(text, 1)


def check_positive(name: str, value: float, what: str = "number") -> None:
    """ValueError naming ``name`` unless ``value`` is a positive, finite number."""
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be a positive {what}, got {value!r}")


def check_seconds(name: str, value: float) -> None:
    """ValueError naming ``name`` unless ``value`` is a positive number of seconds, bounded."""
    check_positive(name, value, "number of seconds")
    if value > MAX_SECONDS:
        raise ValueError(
            f"{name} must be a positive number of seconds up to {MAX_SECONDS:g}, got {value!r}"
        )


def check_count(name: str, value: int, minimum: int = 1) -> None:
    """ValueError naming ``name`` unless ``value`` is an integer of at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be a whole number >= {minimum}, got {value!r}")


_NODE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,252}")


def node_name(text: str) -> str:
    """A node's name as incidents show it: a host name or Kubernetes pod name.

    Empty stands for the host name (the default).
    """
    if text and not _NODE_NAME.fullmatch(text):
        raise ValueError(
            f"{text[:80]!r} is not a node name: letters, digits and _.:- "
            "(a host or pod name), at most 253 characters"
        )
    return text


def host_and_port(value: str, port_zero: bool = False) -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[::1]:PORT`` for IPv6) and check the port.

    Port 0 (any free port) only with ``port_zero``: one may listen there, but
    not connect to it.
    """
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{value!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not is_decimal(port_text):
        raise ValueError(f"{value!r} has no numeric port")
    port = int(port_text)
    if not (0 if port_zero else 1) <= port <= 65535:
        raise ValueError(f"port {port} of {value!r} is out of range")
    return host, port


def listen_address(value: str) -> str:
    """A ``HOST:PORT`` to listen on, port 0 included; returned as given."""
    host_and_port(value, port_zero=True)
    return value


def http_url(value: str) -> str:
    """An ``http://`` or ``https://`` URL with a host and a valid port, without a trailing slash."""
    if not value.startswith(("http://", "https://")):
        raise ValueError(f"{value!r} is not an http:// or https:// URL")
    try:
        parts = urllib.parse.urlsplit(value)
        # ``.port`` raises for 'abc' or 99999; a bracket left open fails the split.
        parts.port  # noqa: B018
    except ValueError as exc:
        raise ValueError(f"{value!r} is not a valid URL: {exc}") from None
    if not parts.hostname:
        raise ValueError(f"{value!r} names no host")
    return value.rstrip("/")


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts local connections (``localhost`` counts)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a hostname: it may well resolve to a public address
