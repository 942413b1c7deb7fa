"""The OpenAPI 3.1 document, generated from the msgspec types the handlers decode with.

The schemas come from `msgspec.json.schema_components`, so the document and the
validation cannot disagree about fields, enums or bounds. Built once, at import.
"""

from __future__ import annotations

from typing import Any

import msgspec

from service import dataset
from service.schemas import (
    Assignment,
    AssignmentHistory,
    AuditedDecision,
    BatchRequest,
    BatchResponse,
    ChallengerRequest,
    Comparison,
    Decision,
    DecisionRequest,
    ErasedDecision,
    ModelsOverview,
    Monitoring,
    Outcome,
    OutcomeRequest,
    Problem,
    SearchPage,
    encoder,
)

REF = "#/components/schemas/{name}"
PROBLEM_MEDIA_TYPE = "application/problem+json"

_, _components = msgspec.json.schema_components(
    [
        DecisionRequest,
        BatchRequest,
        Decision,
        SearchPage,
        AuditedDecision,
        ErasedDecision,
        BatchResponse,
        Problem,
        ModelsOverview,
        Monitoring,
        Outcome,
        OutcomeRequest,
        Assignment,
        ChallengerRequest,
        Comparison,
        AssignmentHistory,
    ],
    ref_template=REF,
)
_EXAMPLE = msgspec.to_builtins(dataset.load().applicants[1])


def _ref(name: str) -> dict[str, str]:
    return {"$ref": REF.format(name=name)}


def _json(schema: dict[str, Any], description: str, example: Any = None) -> dict[str, Any]:
    content: dict[str, Any] = {"schema": schema}
    if example is not None:
        content["example"] = example
    return {"description": description, "content": {"application/json": content}}


def _problems(*statuses: int) -> dict[str, Any]:
    reasons = {
        400: "The body is not JSON, not UTF-8, or empty; or a header or query parameter is malformed.",
        401: "Missing or wrong API key (when API_KEYS is set).",
        403: (
            "A known key outside its role (audit keys only read, admin keys only administer), no admin key for"
            " /admin/* or erasure, or no audit key for the applicant's inputs."
        ),
        404: "No such decision or model version.",
        409: "A request with the same Idempotency-Key is still in flight; or another outcome is already recorded.",
        413: "The body is too large.",
        415: "Content-Type is not JSON.",
        422: "The body is not a valid request (errors[].path names the field), or the model version was refused.",
        503: "The system of record is unavailable, or the service is shutting down; see Retry-After.",
    }
    return {
        str(status): {"description": reasons[status], "content": {PROBLEM_MEDIA_TYPE: {"schema": _ref("Problem")}}}
        for status in statuses
    }


_BEARER: list[dict[str, list[str]]] = [{"bearer": []}, {}]  # API keys are optional: only when API_KEYS is set
_ADMIN: list[dict[str, list[str]]] = [{"admin": []}]
# Reads take an API key or an audit key.
_READ: list[dict[str, list[str]]] = [{"bearer": []}, {"audit": []}, {}]
_DECISION_ID = {"name": "decision_id", "in": "path", "required": True, "schema": {"type": "string", "format": "uuid"}}
_SEARCH = [
    {
        "name": "since",
        "in": "query",
        "required": False,
        "description": "ISO 8601 time (UTC without an offset). Default: until - 24 h (with a reference: 10 years).",
        "schema": {"type": "string", "format": "date-time"},
    },
    {
        "name": "until",
        "in": "query",
        "required": False,
        "description": (
            "ISO 8601 time, exclusive. Default: now. Without a reference the search stops two"
            " DATABASE_REQUEST_TIMEOUTs before now, so that no decision still committing is skipped;"
            " the page gives the window searched."
        ),
        "schema": {"type": "string", "format": "date-time"},
    },
    {
        "name": "decision",
        "in": "query",
        "required": False,
        "schema": {"type": "string", "enum": ["approve", "decline", "refer"]},
    },
    {
        "name": "reference",
        "in": "query",
        "required": False,
        "description": "The lender's reference, exactly as sent.",
        "schema": {"type": "string", "minLength": 1, "maxLength": 64, "pattern": "^[\\x20-\\x7e]+$"},
    },
    {
        "name": "limit",
        "in": "query",
        "required": False,
        "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
    },
    {
        "name": "cursor",
        "in": "query",
        "required": False,
        "description": "The `next` of the previous page, unchanged; sent alone (with limit): it carries the search.",
        "schema": {"type": "string"},
    },
]
_WINDOW = [
    {
        "name": name,
        "in": "query",
        "required": False,
        "description": f"ISO 8601 time; {what}. A time without an offset is UTC.",
        "schema": {"type": "string", "format": "date-time"},
    }
    for name, what in (("since", "default: until - 24 h"), ("until", "default: now"))
]
_VERSION = {"name": "version", "in": "path", "required": True, "schema": {"type": "string"}}
_IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": "Repeat with the same key and body: the original answer (200), nothing stored anew.",
    "schema": {"type": "string", "minLength": 1, "maxLength": 255},
}
_REQUEST_ID = {
    "name": "X-Request-ID",
    "in": "header",
    "required": False,
    "description": (
        "Echoed back, and in every log line of the request. Up to 128 of A-Z a-z 0-9 . _ : -;"
        " anything else (or nothing) is replaced by a new id rather than refused."
    ),
    "schema": {"type": "string"},
}

DOCUMENT: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {
        "title": "Credit-scoring service",
        "version": "1.0.0",
        "description": "Scores credit applicants, records every decision, and answers lookups.",
    },
    "paths": {
        "/decisions": {
            "post": {
                "operationId": "createDecision",
                "summary": "Score an applicant and record the decision.",
                "security": _BEARER,
                "parameters": [_IDEMPOTENCY_KEY, _REQUEST_ID],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": _ref("DecisionRequest"),
                            "example": {**_EXAMPLE, "reference": "APP-2026-000123"},
                        }
                    },
                },
                "responses": {
                    "201": _json(_ref("Decision"), "Scored and committed."),
                    "200": _json(_ref("Decision"), "A repeat of an Idempotency-Key: the original decision."),
                    **_problems(400, 401, 403, 409, 413, 415, 422, 503),
                },
            },
            "get": {
                "operationId": "searchDecisions",
                "summary": "Decisions by reference, or in a time window (optionally of one decision), newest first.",
                "security": _READ,
                "parameters": [*_SEARCH, _REQUEST_ID],
                "responses": {
                    "200": _json(_ref("SearchPage"), "A page; `next` continues the search, null on the last page."),
                    **_problems(400, 401, 403, 503),
                },
            },
        },
        "/decisions/batch": {
            "post": {
                "operationId": "createDecisions",
                "summary": "Score 1 to 1000 applicants; all are committed, or none.",
                "security": _BEARER,
                "parameters": [_IDEMPOTENCY_KEY, _REQUEST_ID],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {"schema": _ref("BatchRequest"), "example": {"applicants": [_EXAMPLE]}}
                    },
                },
                "responses": {
                    "201": _json(_ref("BatchResponse"), "Scored and committed, in order."),
                    "200": _json(_ref("BatchResponse"), "A repeat of an Idempotency-Key: the original batch."),
                    **_problems(400, 401, 403, 409, 413, 415, 422, 503),
                },
            }
        },
        "/decisions/{decision_id}": {
            "get": {
                "operationId": "getDecision",
                "summary": "A recorded decision; with include=applicant (audit keys only) the inputs it was made from.",
                "security": _READ,
                "parameters": [
                    _DECISION_ID,
                    {
                        "name": "include",
                        "in": "query",
                        "required": False,
                        "description": "`applicant`: add the applicant's fields as scored, the erasure, the key id.",
                        "schema": {"type": "string", "enum": ["applicant"]},
                    },
                    _REQUEST_ID,
                ],
                "responses": {
                    "200": _json(
                        {"anyOf": [_ref("Decision"), _ref("AuditedDecision")]},
                        "The decision (AuditedDecision with include=applicant).",
                    ),
                    **_problems(400, 401, 403, 404, 503),
                },
            }
        },
        "/decisions/{decision_id}/applicant": {
            "delete": {
                "operationId": "eraseApplicant",
                "summary": "Erase the applicant's inputs and the reference (an erasure request); the decision stays.",
                "security": _ADMIN,
                "parameters": [_DECISION_ID, _REQUEST_ID],
                "responses": {
                    "200": _json(_ref("ErasedDecision"), "Erased now, or when it first was: who and when."),
                    **_problems(401, 403, 404, 503),  # 401: no known key while API_KEYS is set (checked before routing)
                },
            }
        },
        "/decisions/{decision_id}/outcome": {
            "put": {
                "operationId": "recordOutcome",
                "summary": "Record whether the borrower defaulted, and when that was observed.",
                "security": _BEARER,
                "parameters": [
                    {
                        "name": "decision_id",
                        "in": "path",
                        "required": True,
                        "schema": {"type": "string", "format": "uuid"},
                    },
                    _REQUEST_ID,
                ],
                "requestBody": {
                    "required": True,
                    "content": {
                        "application/json": {
                            "schema": _ref("OutcomeRequest"),
                            "example": {"defaulted": False, "observed_at": "2027-11-29T00:00:00Z"},
                        }
                    },
                },
                "responses": {
                    "201": _json(_ref("Outcome"), "Recorded."),
                    "200": _json(_ref("Outcome"), "The same outcome was already recorded."),
                    **_problems(400, 401, 403, 404, 409, 413, 415, 422, 503),
                },
            }
        },
        "/monitoring": {
            "get": {
                "operationId": "monitoring",
                "summary": "A model version over a window: rates, population stability (PSI) and back-testing.",
                "security": _BEARER,
                "parameters": [
                    *_WINDOW,
                    {
                        "name": "model_version",
                        "in": "query",
                        "required": False,
                        "description": "Default: the champion.",
                        "schema": {"type": "string"},
                    },
                ],
                "responses": {"200": _json(_ref("Monitoring"), "The figures."), **_problems(400, 401, 403, 404, 503)},
            }
        },
        "/admin/models": {
            "get": {
                "operationId": "listModels",
                "summary": "Every version in the registry, the assignment, and what each worker serves.",
                "security": _ADMIN,
                "responses": {
                    "200": _json(_ref("ModelsOverview"), "The registry and the assignment."),
                    **_problems(403, 503),
                },
            }
        },
        "/admin/models/{version}/promote": {
            "post": {
                "operationId": "promoteModel",
                "summary": "Make a version champion (a rollback promotes the version before). Reaches every worker.",
                "security": _ADMIN,
                "parameters": [_VERSION, _REQUEST_ID],
                "responses": {
                    "200": _json(_ref("Assignment"), "The new assignment."),
                    **_problems(403, 404, 422, 503),
                },
            }
        },
        "/admin/challenger": {
            "put": {
                "operationId": "setChallenger",
                "summary": "Shadow the champion with a version on a share of decisions, or stop (version null).",
                "security": _ADMIN,
                "parameters": [_REQUEST_ID],
                "requestBody": {
                    "required": True,
                    "content": {"application/json": {"schema": _ref("ChallengerRequest")}},
                },
                "responses": {
                    "200": _json(_ref("Assignment"), "The new assignment."),
                    **_problems(400, 403, 404, 413, 415, 422, 503),
                },
            }
        },
        "/admin/challenger/comparison": {
            "get": {
                "operationId": "compareChallenger",
                "summary": "Champion against challenger on the decisions both scored in a window.",
                "security": _ADMIN,
                "parameters": [
                    *_WINDOW,
                    {"name": "champion", "in": "query", "required": False, "schema": {"type": "string"}},
                    {"name": "challenger", "in": "query", "required": False, "schema": {"type": "string"}},
                ],
                "responses": {"200": _json(_ref("Comparison"), "The comparison."), **_problems(400, 403, 404, 503)},
            }
        },
        "/admin/assignments": {
            "get": {
                "operationId": "assignmentHistory",
                "summary": "Every change of the assignment, newest first: from, to, by which admin key, when.",
                "security": _ADMIN,
                "parameters": [
                    {
                        "name": "limit",
                        "in": "query",
                        "required": False,
                        "schema": {"type": "integer", "minimum": 1, "maximum": 1000, "default": 100},
                    }
                ],
                "responses": {
                    "200": _json(_ref("AssignmentHistory"), "The history."),
                    **_problems(400, 403, 503),
                },
            }
        },
        "/model": {
            "get": {
                "operationId": "getModel",
                "summary": "The model in service: version, features, cut-off, risk bands, metrics.",
                "responses": {"200": _json({"type": "object"}, "The model's metadata.")},
            }
        },
        "/health/live": {
            "get": {
                "operationId": "live",
                "summary": "The process and its event loop answer.",
                "responses": {
                    "200": _json(
                        {"type": "object", "properties": {"status": {"const": "ok"}}, "required": ["status"]}, "Alive."
                    )
                },
            }
        },
        "/health/ready": {
            "get": {
                "operationId": "ready",
                "summary": "The model is loaded and the system of record answers.",
                "responses": {
                    "200": _json({"type": "object"}, "Ready; each dependency's check."),
                    "503": {
                        "description": "Not ready (a dependency is down, or shutdown has begun).",
                        "content": {PROBLEM_MEDIA_TYPE: {"schema": _ref("Problem")}},
                    },
                },
            }
        },
        "/metrics": {
            "get": {
                "operationId": "metrics",
                "summary": "Prometheus metrics.",
                "responses": {"200": {"description": "Prometheus text format.", "content": {"text/plain": {}}}},
            }
        },
        "/openapi.json": {
            "get": {
                "operationId": "openapi",
                "summary": "This document.",
                "responses": {"200": _json({"type": "object"}, "OpenAPI 3.1.")},
            }
        },
    },
    "components": {
        "schemas": _components,
        "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer", "description": "One of API_KEYS."},
            "audit": {"type": "http", "scheme": "bearer", "description": "One of AUDIT_API_KEYS (reads only)."},
            "admin": {"type": "http", "scheme": "bearer", "description": "One of ADMIN_API_KEYS."},
        },
    },
}

DOCUMENT_JSON: bytes = encoder.encode(DOCUMENT)
