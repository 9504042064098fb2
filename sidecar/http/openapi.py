"""The OpenAPI description of every HTTP route, served at ``GET /openapi.json``.

Kept by hand, next to nothing else, and kept true by a test that walks the
app's routes: a route missing here, or an entry here with no route, fails it.
"""

from __future__ import annotations

import copy
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from sidecar.node.diagnosis import Evidence
from sidecar.node.incidents import INCIDENT_ID, IncidentKind, Scope
from sidecar.schema import WorkerState

Operation = dict[str, Any]


def _path(name: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "description": description,
        "schema": {"type": "string"},
    }


def _query(name: str, description: str, kind: str = "string", **constraints: Any) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "description": description,
        "schema": {"type": kind, **constraints},
    }


WORKER = _path("worker", "the worker's key: its global rank, or pid-<pid> without one")
NAME = _path("name", "handler name")
# The maximum is --max-call-timeout's default; schema() puts in the configured one.
TIMEOUT = _query(
    "timeout",
    "deadline in seconds (default 30, up to the configured maximum)",
    "number",
    exclusiveMinimum=0,
    maximum=300,
)
SINCE = _query("since", "only events after this id", "integer", minimum=0)
LIMIT = _query("limit", "at most this many", "integer", minimum=1)
# What every route may answer besides its own statuses: a bad parameter (400),
# no token (401), no such worker or dump (404), a method it lacks (405), a body
# over the limit (413), each as a JSON object with one string, "error".
ERROR = {
    "description": "refused: the reason is in 'error'",
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "properties": {"error": {"type": "string"}},
                "required": ["error"],
            }
        }
    },
}
RAW_BODY = {
    "required": False,
    "content": {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}},
}
JSON_OK = {"200": {"description": "OK", "content": {"application/json": {}}}}
TEXT_OK = {"200": {"description": "OK", "content": {"text/plain": {}}}}
HTML_OK = {"200": {"description": "OK", "content": {"text/html": {}}}}
RELAYED = {
    "default": {"description": "the worker's own status, content type and body, unchanged"},
    "404": {"description": "no such worker, or the worker has no such handler"},
    "413": {"description": "request body over the limit"},
    "503": {"description": "worker not connected"},
    "504": {"description": "no reply within the deadline"},
}


def _op(summary: str, responses: dict[str, Any], *params: dict[str, Any]) -> Operation:
    operation: Operation = {"summary": summary, "responses": {**responses, "4XX": ERROR}}
    if params:
        operation["parameters"] = list(params)
    return operation


def _relay(summary: str, *params: dict[str, Any]) -> Operation:
    operation = _op(summary, RELAYED, *params)
    operation["requestBody"] = RAW_BODY
    return operation


_INT = {"type": "integer"}
_RANKS = {"type": "array", "items": _INT}
_TIME = {"type": "number"}


def _object(required: dict[str, Any], **optional: Any) -> dict[str, Any]:
    return {
        "type": "object",
        "required": list(required),
        "properties": {**required, **optional},
    }


# What PUT /api/v1/incidents/{id} takes: an incident as GET answers it.
INCIDENT_SCHEMA = _object(
    {
        "id": {"type": "string", "pattern": INCIDENT_ID.pattern.join("^$")},
        "kind": {"enum": [k.value for k in IncidentKind]},
        "scope": {"enum": [s.value for s in Scope]},
        "opened_at": _TIME,
        "summary": {"type": "string"},
        "culprits": {
            "type": "array",
            "items": _object(
                {
                    "rank": _INT,
                    "node": {"type": "string"},
                    "reason": {"type": "string"},
                    "evidence": {"enum": [e.value for e in Evidence]},
                }
            ),
        },
    },
    followers=_RANKS,
    node={"type": "string"},
    waits={
        "type": "array",
        "items": _object(
            {
                "group": {"type": "string"},
                "desc": {"type": "string"},
                "seq": _INT,
                "waiting": _RANKS,
                "missing": _RANKS,
            }
        ),
    },
    ranks={
        "type": "array",
        "items": _object(
            {
                "rank": _INT,
                "node": {"type": "string"},
                "state": {"enum": [s.value for s in WorkerState]},
                "collectives": {
                    "type": "object",
                    "additionalProperties": _object({"enqueued": _INT}),
                },
            },
            exit={"type": ["object", "null"]},
            heartbeat_stopped={"type": ["string", "null"]},
            ended_at={"type": ["number", "null"]},
        ),
    },
    groups={"type": "array", "items": {"type": "object"}},
    dumps={"type": "array", "items": {"type": "string"}},
    nodes={"type": "array", "items": {"type": "object"}},
    collectives={"type": "object"},
)

PATHS: dict[str, dict[str, Operation]] = {
    "/": {
        "get": _op("the web page: workers, actions, events and dumps (no token needed)", HTML_OK)
    },
    "/static/{name}": {
        "get": _op("a file of the web page (no token needed)", TEXT_OK, _path("name", "file name"))
    },
    "/healthz": {"get": _op("liveness: the process answers", TEXT_OK)},
    "/readyz": {"get": _op("readiness: the worker socket accepts connections", TEXT_OK)},
    "/metrics": {"get": _op("Prometheus exposition of every worker's series", TEXT_OK)},
    "/openapi.json": {"get": _op("this document", JSON_OK)},
    "/api/v1/workers": {"get": _op("every worker of the node, live or recently ended", JSON_OK)},
    "/api/v1/workers/{worker}": {"get": _op("one worker", JSON_OK, WORKER)},
    "/api/v1/workers/{worker}/handlers": {
        "get": _op("the handler names the worker answers", JSON_OK, WORKER)
    },
    "/api/v1/workers/{worker}/handlers/{name}": {
        "post": _relay(
            "call a handler on one worker; query string and body are passed through",
            WORKER,
            NAME,
            TIMEOUT,
        )
    },
    "/api/v1/handlers/{name}": {
        "post": _op(
            "call a handler on many workers at once; JSON per rank and a summary "
            "(408: no reply in time, 503: not connected)",
            JSON_OK,
            NAME,
            _query(
                "ranks",
                "ranks to call, like 0,2-5 (default: every worker)",
                pattern=r"^\s*\d{1,9}(-\d{1,9})?\s*(,\s*\d{1,9}(-\d{1,9})?\s*)*$",
            ),
            TIMEOUT,
        )
    },
    "/api/v1/events": {
        "get": _op(
            "recorded events, newest first",
            JSON_OK,
            SINCE,
            LIMIT,
        )
    },
    "/api/v1/events/stream": {
        "get": _op(
            "events as Server-Sent Events",
            {"200": {"description": "OK", "content": {"text/event-stream": {}}}},
            _query("since", "replay events after this id first", "integer", minimum=0),
        )
    },
    "/api/v1/dumps": {"get": _op("captured dump files, newest first", JSON_OK)},
    "/api/v1/dumps/{id}": {
        "get": _op(
            "one dump file, with the content type it was captured with",
            {"200": {"description": "the file"}, "404": {"description": "no such dump"}},
            _path("id", "dump id, as listed"),
        )
    },
    "/api/v1/incidents": {
        "get": _op("incidents with their verdicts (culprits, stack groups), newest first", JSON_OK)
    },
    "/api/v1/incidents/{id}": {
        "get": _op("one incident", JSON_OK, _path("id", "the incident's id")),
        "put": {
            **_op(
                "keep a job incident's verdict, as the sidecar that reached it sends it",
                {
                    **JSON_OK,
                    "409": {"description": "the body's id is not the path's"},
                    "413": {"description": "request body over the limit"},
                },
                _path("id", "the incident's id, as in the body"),
            ),
            "requestBody": {
                "required": True,
                "content": {"application/json": {"schema": INCIDENT_SCHEMA}},
            },
        },
    },
    "/api/v1/diagnose": {
        "post": _op(
            "capture this node now and answer its verdict: a manual incident, or this "
            "node's part of another sidecar's job incident",
            JSON_OK,
            _query(
                "incident",
                "capture under this job incident's id",
                pattern=INCIDENT_ID.pattern.join("^$"),
            ),
            _query("kind", "the incident's kind", enum=["stall", "failure", "manual", "straggler"]),
            _query("origin", "the asking sidecar; a sidecar asked by itself answers at once"),
        )
    },
    "/api/v1/job/diagnose": {
        "post": _op("capture every node of the job now, and answer the job's verdict", JSON_OK)
    },
    "/api/v1/job/workers": {
        "get": _op(
            "every worker of the job (the sidecars named by --target and --dns), by global "
            "rank, each with its node; and every node, reachable or not",
            JSON_OK,
        )
    },
    "/api/v1/job/events": {
        "get": _op(
            "the newest events of every node of the job, newest first",
            JSON_OK,
            LIMIT,
        )
    },
    "/api/v1/job/workers/{worker}/handlers/{name}": {
        "post": _relay(
            "call a handler on the worker of that global rank, on whichever node runs it",
            WORKER,
            NAME,
            TIMEOUT,
        )
    },
    "/workers/{worker}/": {
        "get": _op("torch WorkerServer compatible index page", HTML_OK, WORKER),
    },
    "/workers/{worker}/handler/": {
        "get": _op("torch WorkerServer compatible handler list", JSON_OK, WORKER),
    },
    "/workers/{worker}/handler/{name}": {
        "post": _relay("torch WorkerServer compatible handler call", WORKER, NAME, TIMEOUT),
    },
}


def schema(max_call_timeout: float = 300.0) -> dict[str, Any]:
    paths = copy.deepcopy(PATHS)
    # ?timeout= is bounded by --max-call-timeout, so the document says the configured one.
    for operations in paths.values():
        for operation in operations.values():
            for parameter in operation.get("parameters", []):
                if parameter["name"] == "timeout":
                    parameter["schema"]["maximum"] = max_call_timeout
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "rankside",
            "description": "Per-node observability and control for distributed training jobs.",
            "version": "1",
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}, {}],
        "paths": paths,
    }


async def openapi_json(request: Request) -> Response:
    sidecar = getattr(request.app.state, "sidecar", None)
    if sidecar is None:
        return JSONResponse(schema())
    return JSONResponse(schema(sidecar.config.max_call_timeout))


routes = [Route("/openapi.json", openapi_json)]
