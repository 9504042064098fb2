"""The worker-to-sidecar wire format, one definition that both ends import: the frames, the
metrics payload that ``metrics`` frames carry (``MetricsPayload``) and the metric naming rules,
which the worker applies when a metric is defined and the sidecar again to every payload it
receives. Standard library only and free of side effects (it imports no other part of
``worker_hooks``, registers no handler and builds no registry), so the sidecar imports it
without becoming a worker. docs/protocol.md is the specification in prose.
"""

from __future__ import annotations

import json
import math
import re
import struct
from collections.abc import Iterable, Mapping
from typing import Any, Final, Literal, TypeAlias, TypedDict, TypeGuard

PROTOCOL_VERSION = 1

# -- frames -------------------------------------------------------------------------
#
# A frame is an 8-byte prefix (header length, body length; both unsigned 32-bit
# big-endian), a UTF-8 JSON object header with at least a ``type`` string, and
# then the body as raw bytes, so binary payloads travel without base64.

PREFIX = struct.Struct(">II")
PREFIX_SIZE = PREFIX.size

DEFAULT_MAX_FRAME = 64 * 1024 * 1024
# A header is a small JSON object; anything bigger is a broken or hostile peer.
MAX_HEADER = 1024 * 1024
# Worker-supplied text of a ``bye`` (exception type and message) the sidecar keeps:
# the worker cuts it to this length itself, so the bye always fits a header.
MAX_EXIT_TEXT = 4096

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


class FrameTooLarge(ValueError):
    """A frame over the peer's limit (``encode_checked``), which the peer would refuse."""


class ProtocolError(Exception):
    """A frame that breaks the protocol; the connection that sent it is closed."""

    def __init__(self, message: str, reason: str = "malformed") -> None:
        super().__init__(message)
        self.reason = reason


def encode(header: Header, body: bytes = b"") -> bytes:
    """Serialise one frame."""
    raw = _ENCODER.encode(header).encode()
    return PREFIX.pack(len(raw), len(body)) + raw + body


def encode_checked(header: Header, body: bytes = b"", max_frame: int = DEFAULT_MAX_FRAME) -> bytes:
    """Serialise one frame that the other end will accept, or raise ValueError/TypeError.

    Stricter than ``encode``: a header that is not strict JSON (NaN, a value
    JSON cannot hold), not UTF-8 (a lone surrogate, as UnicodeEncodeError),
    over MAX_HEADER, or a frame over ``max_frame`` (FrameTooLarge) is refused here, before
    anything is sent, rather than by the peer, which would close the connection.
    """
    raw = _STRICT_ENCODER.encode(header).encode()
    if len(raw) > MAX_HEADER:
        raise FrameTooLarge(f"frame header of {len(raw)} bytes exceeds the {MAX_HEADER} byte limit")
    if len(raw) + len(body) > max_frame:
        raise FrameTooLarge(
            f"frame of {len(raw) + len(body)} bytes exceeds the {max_frame} byte limit"
        )
    return PREFIX.pack(len(raw), len(body)) + raw + body


def exit_text(value: str) -> str:
    """``value`` as a ``bye`` may carry it: at most MAX_EXIT_TEXT characters, valid UTF-8.

    Lone surrogates are escaped (backslashreplace), so the text survives as
    far as it can be shown instead of making the whole bye unsendable.
    """
    escaped = value[:MAX_EXIT_TEXT].encode("utf-8", "backslashreplace").decode("utf-8")
    return escaped[:MAX_EXIT_TEXT]


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


def cut_frame(
    data: bytes | bytearray, offset: int, max_frame: int = DEFAULT_MAX_FRAME
) -> tuple[Header, bytes, int] | None:
    """The whole frame at ``offset`` of ``data``: its header, body and where it ends.

    None while the frame is not whole yet. Its lengths are checked as soon as
    its prefix is there, so an oversize frame is refused before it is kept
    (ProtocolError), and its header once the frame is whole. Both ends cut
    their streams with this.
    """
    start = offset + PREFIX_SIZE
    if len(data) < start:
        return None
    header_len, body_len = parse_prefix(bytes(data[offset:start]), max_frame)
    end = start + header_len + body_len
    if len(data) < end:
        return None
    header = parse_header(bytes(data[start : start + header_len]))
    return header, bytes(data[start + header_len : end]), end


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} is out of range")
    return value


# Integers a header may carry: 64-bit, as any peer in another language would
# have them. A bigger one breaks arithmetic later (float(10**400) overflows).
INT_LIMIT = 1 << 63


def _bounded_int(text: str) -> int:
    value = int(text)
    if not -INT_LIMIT <= value < INT_LIMIT:
        raise ValueError(f"integer {text[:24]}{'...' if len(text) > 24 else ''} is out of range")
    return value


def _not_json(name: str) -> Any:
    # Python's json module reads NaN and Infinity unless told not to; they are
    # not JSON, and a NaN in a worker's state would break every JSON answer.
    raise ValueError(f"{name} is not a JSON value")


# Built once: json.dumps and json.loads with options build a new encoder or
# decoder on every call, and every frame passes through these.
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)
_STRICT_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
_DECODER = json.JSONDecoder(parse_float=_finite, parse_int=_bounded_int, parse_constant=_not_json)


def parse_header(raw: bytes) -> Header:
    """Decode and validate a header: UTF-8 JSON object, known type, typed fields."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ProtocolError(f"frame header is not valid UTF-8: {exc}") from None
    try:
        header = _DECODER.decode(text)
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


# -- metric naming rules --------------------------------------------------------------
#
# prometheus_client's classic rules (the ones it applies with
# PROMETHEUS_LEGACY_NAME_VALIDATION), because the text format 0.0.4 that
# Prometheus scrapes cannot carry other names unquoted. The worker applies them
# when a metric is defined, so a mistake fails where it is made; the sidecar
# applies them again to every payload, since a peer may be any program.

# Always applied with fullmatch: "$" also matches before a trailing newline, so
# with match() a name such as "loss\n" got through and broke the scrape.
METRIC_NAME_RE = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
LABEL_NAME_RE = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
# Added by the sidecar to every series, so a worker may not set them.
SIDECAR_LABELS = frozenset({"rank", "local_rank", "role"})
# The prefix of the series rankside itself defines; user metrics may not use it.
RESERVED_PREFIX = "rankside_"

MetricType: TypeAlias = Literal["counter", "gauge", "histogram"]
METRIC_TYPES: tuple[MetricType, ...] = ("counter", "gauge", "histogram")

# Label names a type keeps for its own samples, as prometheus_client reserves them.
RESERVED_LABELNAMES: Mapping[str, frozenset[str]] = {
    "counter": frozenset(),
    "gauge": frozenset(),
    "histogram": frozenset({"le"}),
}

# Sample-name suffixes each type produces, as prometheus_client's registry
# counts them when it looks for clashing names.
SAMPLE_SUFFIXES: Mapping[str, tuple[str, ...]] = {
    "counter": ("_total", "_created"),
    "gauge": (),
    "histogram": ("_bucket", "_sum", "_count", "_created"),
}

# The families every worker defines itself: the only names under
# RESERVED_PREFIX a worker may send.
WORKER_BUILTIN_FAMILIES = frozenset({
    "rankside_worker_step_duration_seconds",
    "rankside_worker_cpu_seconds",
    "rankside_worker_resident_memory_bytes",
    "rankside_worker_cuda_memory_allocated_bytes",
    "rankside_worker_cuda_memory_reserved_bytes",
    "rankside_worker_cuda_memory_peak_bytes",
})  # fmt: skip


def validate_text(value: str, what: str) -> str:
    """``value`` if it can be sent and exposed as UTF-8; ValueError naming it if not.

    A lone surrogate (such as ``"\\udc80"`` from a file name decoded with
    surrogateescape) survives JSON but cannot be encoded into the scrape, so
    it is refused where it is set rather than breaking /metrics later.
    """
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} {value!r} is not valid UTF-8 text (lone surrogate)") from None
    return value


def validate_metric_name(name: object, builtin: bool = False) -> str:
    """``name`` if it may name a family; ValueError if not.

    Only a ``builtin`` family may be under RESERVED_PREFIX, and only with one
    of the WORKER_BUILTIN_FAMILIES names.
    """
    if not isinstance(name, str) or not name:
        raise ValueError(f"Metric name must be a non-empty string, got {name!r}")
    if not METRIC_NAME_RE.fullmatch(name):
        raise ValueError(f"Invalid metric name {name!r}: must match {METRIC_NAME_RE.pattern}")
    if name.startswith(RESERVED_PREFIX) and not (builtin and name in WORKER_BUILTIN_FAMILIES):
        raise ValueError(f"Invalid metric name {name!r}: prefix {RESERVED_PREFIX!r} is reserved")
    return name


def validate_labelnames(
    labelnames: Iterable[str], reserved: frozenset[str] = frozenset()
) -> tuple[str, ...]:
    """Check label names as prometheus_client does, plus the sidecar's own; ValueError if bad.

    ``reserved`` holds the names the family's type keeps (RESERVED_LABELNAMES).
    """
    if isinstance(labelnames, str):
        # A lone string would be split into one-letter label names.
        raise ValueError(f"labelnames must be a sequence of names, not the string {labelnames!r}")
    names = tuple(labelnames)
    for label in names:
        if not isinstance(label, str) or not LABEL_NAME_RE.fullmatch(label):
            raise ValueError(f"Invalid label metric name: {label!r}")
        if label.startswith("__"):
            raise ValueError(f"Reserved label metric name: {label!r}")
        if label in reserved or label in SIDECAR_LABELS:
            raise ValueError(f"Reserved label metric name: {label!r}")
    if len(set(names)) != len(names):
        raise ValueError(f"Duplicate label names in {list(names)!r}")
    return names


def sample_names(name: str, kind: str) -> tuple[str, ...]:
    """The names of the samples a family of type ``kind`` called ``name`` exposes."""
    return (name, *(name + suffix for suffix in SAMPLE_SUFFIXES[kind]))


# -- the metrics payload: the body of a ``metrics`` frame -----------------------------

PAYLOAD_VERSION: Final = 1

FamilyDefinition: TypeAlias = tuple[int, str, MetricType, str, list[str], list[float] | None]
"""``[fid, name, type, help, [labelname, ...], [bucket bound, ...] or null]``."""

SeriesDefinition: TypeAlias = tuple[int, int, list[str]]
"""``[sid, fid, [labelvalue, ...]]``, the label values in the order of the family's names."""

SampleValue: TypeAlias = float | list[float]
"""A counter's or gauge's number, or a histogram's cumulative bucket counts and then its sum."""


class MetricsPayload(TypedDict):
    """The body of a ``metrics`` frame: this object as JSON, UTF-8.

    ``v``: PAYLOAD_VERSION; a sidecar refuses any other.

    ``full``: true when the payload carries every family, series and value of
    the worker; the sidecar then drops what it held for the worker. The first
    payload of each connection is full. Otherwise the payload carries only the
    families and series defined since the previous payload, and the values that
    changed.

    ``families``: new FamilyDefinitions. ``fid`` is a non-negative integer, not
    used before on the connection. ``name`` passes validate_metric_name (a
    name under RESERVED_PREFIX only from WORKER_BUILTIN_FAMILIES) and is not
    used before on the connection; a counter is named without ``_total``,
    which its sample adds. ``type`` is one of METRIC_TYPES. The label names pass
    validate_labelnames with the type's RESERVED_LABELNAMES. The bucket bounds
    are null but for a histogram, whose bounds are at least two, strictly
    increasing, not NaN, and end with +Inf.

    ``series``: new SeriesDefinitions. ``sid`` is a non-negative integer, not
    used before on the connection; ``fid`` names a family of this payload or an
    earlier one; one string per label name of the family; no label values twice
    in one family.

    ``values``: ``[sid, value, sid, value, ...]``, flat, for series of this
    payload or an earlier one. A counter's or gauge's value is a number
    (cumulative, for a counter); a histogram's is its cumulative bucket counts,
    one per bound, non-negative and non-decreasing integers, then its sum.

    ``dropped``: a non-negative integer, the label sets the worker has refused
    past its series limit since it started.

    Numbers are JSON numbers, or NaN, Infinity and -Infinity as Python's json
    module writes them: a histogram's last bound is Infinity and a gauge may
    hold any float. A payload that breaks a rule is refused whole (the
    connection is closed with reason ``bad_metrics``).
    """

    v: int
    full: bool
    families: list[FamilyDefinition]
    series: list[SeriesDefinition]
    values: list[int | SampleValue]
    dropped: int


# A heartbeat's optional ``collectives``: per process group (by name), its
# description, global ranks and the flight recorder's last sequence numbers.
COLLECTIVE_POSITIONS = ("enqueued", "started", "completed")
MAX_COLLECTIVE_GROUPS = 64
MAX_GROUP_RANKS = 1024


def parse_collectives(value: object) -> dict[str, dict[str, Any]]:
    """Validate a heartbeat's ``collectives`` field; ProtocolError if malformed."""
    if not isinstance(value, dict) or len(value) > MAX_COLLECTIVE_GROUPS:
        raise ProtocolError(
            f"'collectives' must be an object of at most {MAX_COLLECTIVE_GROUPS} groups"
        )
    groups: dict[str, dict[str, Any]] = {}
    for name, group in value.items():
        if not isinstance(group, dict) or len(name) > 256:
            raise ProtocolError(f"'collectives' group {name[:64]!r} must be an object")
        desc = group.get("desc", "")
        ranks = group.get("ranks", [])
        if not isinstance(desc, str) or len(desc) > 256:
            raise ProtocolError(f"'collectives' group {name!r}: 'desc' must be a short string")
        if (
            not isinstance(ranks, list)
            or len(ranks) > MAX_GROUP_RANKS
            or not all(_is_int(r) and r >= 0 for r in ranks)
        ):
            raise ProtocolError(
                f"'collectives' group {name!r}: 'ranks' must be a list of at most "
                f"{MAX_GROUP_RANKS} ranks"
            )
        parsed: dict[str, Any] = {"desc": desc, "ranks": ranks}
        for field in COLLECTIVE_POSITIONS:
            position = group.get(field)
            if not _is_int(position) or position < -1:
                raise ProtocolError(
                    f"'collectives' group {name!r}: {field!r} must be an integer of -1 or more"
                )
            parsed[field] = position
        groups[name] = parsed
    return groups


# Arrivals per group in one heartbeat (the worker sends at most 256).
MAX_ARRIVALS = 1024


def parse_arrivals(value: object) -> dict[str, list[tuple[int, int]]]:
    """Validate a heartbeat's ``arrivals``: per group, ``[seq, time_created_ns]`` pairs."""
    if not isinstance(value, dict) or len(value) > MAX_COLLECTIVE_GROUPS:
        raise ProtocolError(
            f"'arrivals' must be an object of at most {MAX_COLLECTIVE_GROUPS} groups"
        )
    groups: dict[str, list[tuple[int, int]]] = {}
    for name, pairs in value.items():
        if len(name) > 256 or not isinstance(pairs, list) or len(pairs) > MAX_ARRIVALS:
            raise ProtocolError(
                f"'arrivals' group {name[:64]!r} must be a list of at most {MAX_ARRIVALS} pairs"
            )
        parsed: list[tuple[int, int]] = []
        for pair in pairs:
            if (
                not isinstance(pair, list)
                or len(pair) != 2
                or not all(_is_int(x) and x >= 0 for x in pair)
            ):
                raise ProtocolError(
                    f"'arrivals' group {name!r}: each arrival is [seq, time_created_ns], "
                    "two integers of 0 or more"
                )
            parsed.append((pair[0], pair[1]))
        groups[name] = parsed
    return groups


def _is_int(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool)
