"""Decoding a worker's ``metrics`` frame body, as docs/protocol.md specifies it.

The payload is JSON: ``full``, new family and series definitions, changed
values by series id, and the count of label sets the worker dropped. These
functions check its shape and every definition on its own (names, types,
label names, bucket bounds) by the same rules the worker applies, so the two
ends cannot disagree; the store checks what needs its state (ids already
defined, families a series refers to). Any violation is a
``MetricsPayloadError`` and the frame changes nothing.
"""

from __future__ import annotations

import json
import math
from itertools import pairwise
from typing import Any, NamedTuple

from worker_hooks.protocol import (
    PAYLOAD_VERSION,
    validate_labelnames,
    validate_metric_name,
    validate_text,
)

KINDS = ("counter", "gauge", "histogram")


class MetricsPayloadError(ValueError):
    """A ``metrics`` frame body that does not follow the payload format."""


class FamilyDefinition(NamedTuple):
    fid: int
    name: str
    kind: str
    documentation: str
    labelnames: tuple[str, ...]
    bounds: tuple[float, ...]


class SeriesDefinition(NamedTuple):
    sid: int
    fid: int
    labelvalues: tuple[str, ...]


def is_int(value: object) -> bool:
    return type(value) is int


def is_number(value: object) -> bool:
    return type(value) is float or type(value) is int


def decode(body: bytes) -> dict[str, Any]:
    """The payload object, its fields checked; definitions and values are checked apart."""
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise MetricsPayloadError(f"metrics payload is not JSON: {exc}") from None
    if not isinstance(payload, dict):
        raise MetricsPayloadError("metrics payload must be a JSON object")
    if payload.get("v") != PAYLOAD_VERSION:
        raise MetricsPayloadError(f"metrics payload version {payload.get('v')!r} is not supported")
    for field, kind in (
        ("full", bool),
        ("families", list),
        ("series", list),
        ("values", list),
        ("dropped", int),
    ):
        if not isinstance(payload.get(field), kind):
            raise MetricsPayloadError(f"metrics payload field {field!r} must be a {kind.__name__}")
    if isinstance(payload["dropped"], bool) or payload["dropped"] < 0:
        raise MetricsPayloadError("metrics payload field 'dropped' must be a count")
    return payload


def _labelnames(name: str, kind: str, raw: object) -> tuple[str, ...]:
    if not isinstance(raw, list):
        raise MetricsPayloadError(f"label names of {name!r} must be a list")
    # The worker's own rules, so that the two ends cannot disagree.
    reserved = frozenset({"le"}) if kind == "histogram" else frozenset()
    try:
        return validate_labelnames(raw, reserved)
    except ValueError as exc:
        raise MetricsPayloadError(f"family {name!r}: {exc}") from None


def _bounds(name: str, kind: str, raw: object) -> tuple[float, ...]:
    if kind != "histogram":
        if raw is not None:
            raise MetricsPayloadError(f"{kind} {name!r} cannot have buckets")
        return ()
    if (
        not isinstance(raw, list)
        or len(raw) < 2
        or not all(is_number(b) and not math.isnan(b) for b in raw)
        or any(a >= b for a, b in pairwise(raw))
        or raw[-1] != math.inf
    ):
        raise MetricsPayloadError(
            f"histogram {name!r} needs increasing bucket bounds ending with +Inf, got {raw!r}"
        )
    return tuple(float(b) for b in raw)


def family_definition(item: object) -> FamilyDefinition:
    """``[fid, name, type, help, [labelname, ...], [bound, ...] | null]``, checked."""
    if not (isinstance(item, list) and len(item) == 6):
        raise MetricsPayloadError(f"a family definition must be a list of 6, got {item!r}")
    fid, name, kind, documentation, labelnames, bounds = item
    if not is_int(fid) or fid < 0:
        raise MetricsPayloadError(f"family id {fid!r} is invalid")
    try:
        # The worker's own validator: one set of naming rules on both ends.
        name = validate_metric_name(name, builtin=True)
    except ValueError as exc:
        raise MetricsPayloadError(f"family name {name!r} is invalid: {exc}") from None
    if kind not in KINDS:
        raise MetricsPayloadError(f"family {name!r} has unknown type {kind!r}")
    if kind == "counter" and name.endswith("_total"):
        raise MetricsPayloadError(f"counter {name!r} must be named without '_total'")
    if not isinstance(documentation, str):
        raise MetricsPayloadError(f"family {name!r} has no string documentation")
    _check_text(documentation, f"documentation of {name!r}")
    return FamilyDefinition(
        fid,
        name,
        kind,
        documentation,
        _labelnames(name, kind, labelnames),
        _bounds(name, kind, bounds),
    )


def series_definition(item: object) -> SeriesDefinition:
    """``[sid, fid, [labelvalue, ...]]``, checked."""
    if not (isinstance(item, list) and len(item) == 3):
        raise MetricsPayloadError(f"a series definition must be a list of 3, got {item!r}")
    sid, fid, values = item
    if not is_int(sid) or sid < 0:
        raise MetricsPayloadError(f"series id {sid!r} is invalid")
    if not is_int(fid):
        raise MetricsPayloadError(f"series {sid} refers to unknown family {fid!r}")
    if not isinstance(values, list) or not all(isinstance(v, str) for v in values):
        raise MetricsPayloadError(f"series {sid} needs string label values, got {values!r}")
    for value in values:
        _check_text(value, f"label value of series {sid}")
    return SeriesDefinition(sid, fid, tuple(values))


def _check_text(value: str, what: str) -> None:
    """The worker's own text rule, as a payload error."""
    try:
        validate_text(value, what)
    except ValueError as exc:
        raise MetricsPayloadError(str(exc)) from None


def histogram_value(name: str, buckets: int, value: object) -> tuple[Any, ...]:
    """Cumulative bucket counts (non-negative, non-decreasing integers), then the sum."""
    if isinstance(value, list) and len(value) == buckets + 1:
        *counts, total = value
        previous = 0
        for count in counts:
            if not is_int(count) or count < previous:
                break
            previous = count
        else:
            if is_number(total):
                return (*counts, float(total))
    raise MetricsPayloadError(
        f"value of histogram {name!r} must be {buckets} cumulative counts and a sum, got {value!r}"
    )
