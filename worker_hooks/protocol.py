"""The worker-to-sidecar wire format, shared by both ends.

A frame is an 8-byte prefix (header length, body length; both unsigned 32-bit
big-endian), a UTF-8 JSON object header with at least a ``type`` string, and
then the body as raw bytes, so binary payloads travel without base64.

This module is standard library only: the sidecar imports it too, so the two
ends cannot drift apart. See docs/protocol.md for the message catalogue.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

PROTOCOL_VERSION = 1

PREFIX = struct.Struct(">II")
PREFIX_SIZE = PREFIX.size

DEFAULT_MAX_FRAME = 64 * 1024 * 1024
# A header is a small JSON object; anything bigger is a broken or hostile peer.
MAX_HEADER = 1024 * 1024

Header = dict[str, Any]

# Message types and the header fields each must carry, with their JSON types.
# Optional fields are checked where they are read.
_STR = (str,)
_INT = (int,)
_NUM = (int, float)
_LIST = (list,)
_DICT = (dict,)

REQUIRED_FIELDS: dict[str, dict[str, tuple[type, ...]]] = {
    "hello": {"version": _INT, "identity": _DICT, "handlers": _LIST},
    "welcome": {"version": _INT, "key": _STR},
    "heartbeat": {"step": _INT, "steps": _INT, "progress_time": _NUM},
    "bye": {"reason": _STR},
    "handlers": {"names": _LIST},
    "metrics": {},
    "call": {"id": _INT, "handler": _STR, "params": _LIST, "deadline": _NUM},
    "reply": {"id": _INT, "status": _INT, "content_type": _STR},
    "error": {"message": _STR},
}


class ProtocolError(Exception):
    """A frame that breaks the protocol; the connection that sent it is closed."""

    def __init__(self, message: str, reason: str = "malformed") -> None:
        super().__init__(message)
        self.reason = reason


def encode(header: Header, body: bytes = b"") -> bytes:
    """Serialise one frame."""
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    return PREFIX.pack(len(raw), len(body)) + raw + body


def parse_prefix(prefix: bytes, max_frame: int = DEFAULT_MAX_FRAME) -> tuple[int, int]:
    """Read and bound-check the two lengths before anything else is read."""
    header_len, body_len = PREFIX.unpack(prefix)
    if header_len == 0:
        raise ProtocolError("frame header is empty")
    if header_len > MAX_HEADER:
        raise ProtocolError(
            f"frame header of {header_len} bytes exceeds the {MAX_HEADER} byte limit", "oversize"
        )
    if header_len + body_len > max_frame:
        raise ProtocolError(
            f"frame of {header_len + body_len} bytes exceeds the {max_frame} byte limit",
            "oversize",
        )
    return header_len, body_len


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} is out of range")
    return value


# Integers a header may carry: 64-bit, as any peer in another language would
# have them. A bigger one breaks arithmetic later (float(10**400) overflows).
_INT_LIMIT = 1 << 63


def _bounded_int(text: str) -> int:
    value = int(text)
    if not -_INT_LIMIT <= value < _INT_LIMIT:
        raise ValueError(f"integer {text[:24]}{'...' if len(text) > 24 else ''} is out of range")
    return value


def _not_json(name: str) -> Any:
    # Python's json module reads NaN and Infinity unless told not to; they are
    # not JSON, and a NaN in a worker's state would break every JSON answer.
    raise ValueError(f"{name} is not a JSON value")


def parse_header(raw: bytes) -> Header:
    """Decode and validate a header: UTF-8 JSON object, known type, typed fields."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"frame header is not valid UTF-8: {exc}") from None
    try:
        header = json.loads(
            text, parse_float=_finite, parse_int=_bounded_int, parse_constant=_not_json
        )
    except ValueError as exc:
        raise ProtocolError(f"frame header is not valid JSON: {exc}") from None
    except RecursionError:
        # "[[[[..." a megabyte deep: the decoder gives up, so do we.
        raise ProtocolError("frame header is nested too deeply") from None
    if not isinstance(header, dict):
        raise ProtocolError("frame header must be a JSON object")
    kind = header.get("type")
    if not isinstance(kind, str):
        raise ProtocolError("frame header has no string field 'type'")
    fields = REQUIRED_FIELDS.get(kind)
    if fields is None:
        raise ProtocolError(f"unknown message type {kind!r}", "unknown_type")
    for name, types in fields.items():
        value = header.get(name)
        # bool is an int subclass in Python, never a valid number here.
        if not isinstance(value, types) or isinstance(value, bool):
            wanted = "/".join(t.__name__ for t in types)
            raise ProtocolError(f"{kind!r} frame field {name!r} must be of type {wanted}")
    return header


def params_to_pairs(params: object) -> list[tuple[str, str]]:
    """Validate a query-parameter multimap sent as a list of ``[key, value]`` pairs."""
    if not isinstance(params, list):
        raise ProtocolError("'params' must be a list of [key, value] pairs")
    pairs: list[tuple[str, str]] = []
    for item in params:
        if (
            not isinstance(item, list)
            or len(item) != 2
            or not isinstance(item[0], str)
            or not isinstance(item[1], str)
        ):
            raise ProtocolError("'params' must be a list of [key, value] string pairs")
        pairs.append((item[0], item[1]))
    return pairs
