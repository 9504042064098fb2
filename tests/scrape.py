"""Reading a scrape as Prometheus would: promtool and prometheus_client's parsers.

The sidecar must never serve text that a Prometheus parser rejects, whatever
its workers send: one bad line and Prometheus drops the whole node. The fuzz
and hostile-input tests keep what they scraped and check it here.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterable

from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families as parse_text
from prometheus_client.samples import Sample
from system_tools import require_tool

OPENMETRICS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;"
    "version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)


def promtool_check(text: str, lint: bool = True) -> None:
    """``promtool check metrics``: exit 1 is a parse error, 3 a lint finding.

    With ``lint`` off only the parse must succeed, for names a test picks to
    provoke a clash, or a fuzzer generates (any such name draws naming advice).
    """
    promtool = require_tool("promtool")
    result = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert result.returncode in ((0,) if lint else (0, 3)), result.stdout + result.stderr


def samples_of(text: str, openmetrics: bool = False) -> list[Sample]:
    """Every sample of a scrape, read to the end by prometheus_client; raises on bad text."""
    parse = parse_openmetrics if openmetrics else parse_text
    return [sample for family in parse(text) for sample in family.samples]


def check_scrapes(texts: Iterable[str], lint: bool = False) -> int:
    """Parse each distinct text with prometheus_client and promtool; how many there were."""
    distinct = dict.fromkeys(texts)
    for text in distinct:
        samples_of(text)
        promtool_check(text, lint)
    return len(distinct)
