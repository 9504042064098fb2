"""One incident for the whole job: every node captures under one id, one verdict.

A hang stops every rank of every node, so a node's own ranks rarely hold the
answer: the rank the others wait for may run elsewhere. A sidecar with job
targets that opens an incident asks every other sidecar of the job to capture
too, under the same id (``JobScope.capture``); each answers its node's part,
with what it knows of each of its ranks (``Incident.views``). The verdict is
then reached over all of the job's ranks by the same pure functions as a
node's (``job_incident``), and sent back to every node (``JobScope.publish``),
so that any node's page or API shows it.

The asking itself needs an HTTP client, which this layer does not have: the
HTTP layer implements ``JobScope`` (sidecar/http/job_incidents.py) and the
sidecar is given it when built.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

from sidecar.node.diagnosis import RankView, positions
from sidecar.node.incidents import Incident, IncidentKind, Incidents, Scope, verdict_of
from sidecar.node.stacks import merge_groups


@dataclass(frozen=True)
class NodeCapture:
    """What one other sidecar answered to a capture: its incident JSON, or why not."""

    url: str
    answer: Any = None
    error: str | None = None


class JobScope(Protocol):
    """The other sidecars of the job, as the incidents of this one ask them."""

    # Sent with every capture: a sidecar that receives its own origin (it is
    # among its own targets, as with a headless Service) answers at once.
    origin: str

    async def capture(self, incident_id: str, kind: IncidentKind) -> list[NodeCapture]:
        """Ask every other sidecar to capture under ``incident_id``; one result each."""
        ...

    async def publish(self, incident: Incident) -> None:
        """Send the job's verdict to every other sidecar, to keep."""
        ...

    async def arrivals(self) -> list[NodeCapture]:
        """Every other sidecar's answer to ``GET /api/v1/stragglers?arrivals=true``."""
        ...


def job_incident(
    local: Incident, captures: Sequence[NodeCapture], local_url: str | None = None
) -> Incident:
    """The job's incident from this node's part and the other nodes' answers.

    A node that did not answer, or answered something that is not an
    incident, is listed as such in ``nodes`` and named in the summary: the
    verdict is only as wide as the ranks seen.
    """
    views: list[RankView] = list(local.views)
    seen = {v.rank for v in views}
    groups: list[Any] = list(local.groups)
    collectives = dict(local.collectives)
    nodes: list[dict[str, Any]] = [_node_entry(local_url, local, None)]
    for capture in captures:
        peer: Incident | None = None
        error = capture.error
        if error is None:
            try:
                peer = Incident.from_json(capture.answer)
            except (ValueError, TypeError) as exc:
                error = f"answered no incident: {exc}"
        nodes.append(_node_entry(capture.url, peer, error))
        if peer is None:
            continue
        # One node reached under two addresses is counted once.
        fresh = [v for v in peer.views if v.rank not in seen]
        seen.update(v.rank for v in fresh)
        views.extend(fresh)
        groups.extend(peer.groups)
        collectives.update({str(v.rank): positions(v.collectives) for v in fresh})
    merged = merge_groups(groups)
    verdict = verdict_of(local.kind, views, merged)
    down = [n for n in nodes if not n["ok"]]
    if down:
        missing = ", ".join(f"{n['url']} ({n['error']})" for n in down)
        verdict = type(verdict)(
            verdict.culprits,
            verdict.waits,
            f"{verdict.summary}; {len(down)} of {len(nodes)} nodes did not answer: {missing}",
            verdict.followers,
        )
    return Incident(
        id=local.id,
        kind=local.kind,
        scope=Scope.JOB,
        opened_at=local.opened_at,
        verdict=verdict,
        collectives=dict(sorted(collectives.items(), key=lambda kv: _rank_order(kv[0]))),
        node=local.node,
        views=sorted(views, key=lambda v: v.rank),
        groups=merged,
        dumps=local.dumps,
        nodes=nodes,
    )


def _node_entry(url: str | None, part: Incident | None, error: str | None) -> dict[str, Any]:
    return {
        "url": url,
        "node": part.node if part is not None else None,
        "ok": part is not None,
        "error": error,
        "ranks": sorted(v.rank for v in part.views) if part is not None else [],
        "dumps": part.dumps if part is not None else [],
    }


def _rank_order(key: str) -> tuple[int, str]:
    return (int(key), "") if key.isdecimal() else (1 << 62, key)


# Verdicts being sent to the other nodes (kept so the tasks are not collected).
_publishing: set[asyncio.Task[None]] = set()


async def investigate_job(
    incidents: Incidents,
    job: JobScope | None,
    incident_id: str,
    kind: IncidentKind,
    wanted: Callable[[], bool] = lambda: True,
) -> Incident | None:
    """Capture this node and every other node under ``incident_id``; keep the job's verdict.

    Without a job scope the incident covers the node. ``wanted`` is asked once
    the captures are in: an incident given up meanwhile (this node joined
    another node's incident of the same hang) is dropped, not published.
    """
    if job is None:
        return await incidents.investigate(incident_id, kind)
    local, captures = await asyncio.gather(
        incidents.investigate(incident_id, kind), job.capture(incident_id, kind)
    )
    if not wanted():
        incidents.drop(incident_id)
        return None
    incident = job_incident(local, captures)
    incidents.keep(incident)
    # Sent on in the background: a node that accepts and never answers must not
    # hold up the verdict here, nor the person who asked for it.
    task = asyncio.create_task(job.publish(incident), name=f"publish-{incident_id}")
    _publishing.add(task)
    task.add_done_callback(_publishing.discard)
    return incident
