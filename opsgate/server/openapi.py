"""The OpenAPI 3.1 document for /api/v1, served at /api/v1/openapi.json."""

from __future__ import annotations

from typing import Any

from opsgate.models import Proposal

_ERROR = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["type", "message"],
            "properties": {
                "type": {
                    "type": "string",
                    "enum": [
                        "unauthenticated",
                        "invalid_input",
                        "refused",
                        "not_found",
                        "conflict",
                        "server_config",
                        "store",
                        "error",
                    ],
                },
                "message": {"type": "string"},
                "field": {"type": "string"},
                "codes": {"type": "array", "items": {"type": "string"}},
            },
        }
    },
}


def _errors(*statuses: int) -> dict[str, Any]:
    described = {
        400: "Malformed input; `field` names what is wrong. Nothing was stored.",
        401: "Missing, invalid, expired or revoked credentials. Nothing was read or stored.",
        403: "Refused by policy or a hard rule; `codes` are the deny codes.",
        404: "No such action (or not visible to this principal).",
        409: "The action is not in a state that allows this.",
    }
    return {
        str(s): {
            "description": described[s],
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        }
        for s in statuses
    }


def _ok(description: str, schema: dict[str, Any] | None = None) -> dict[str, Any]:
    return {
        "description": description,
        "content": {"application/json": {"schema": schema or {"type": "object"}}},
    }


def _text_body(name: str, required: bool) -> dict[str, Any]:
    return {
        "required": required,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {name: {"type": "string", "maxLength": 2000}},
                    "required": [name] if required else [],
                }
            }
        },
    }


# Who resets is the authenticated principal: any other field (`reset_by`, `actor`) is a 400.
_NAME = {"type": "string", "minLength": 1, "maxLength": 128, "pattern": "^[^\\s\\x00-\\x1f\\x7f]+$"}
_TRUST_RESET = {
    "type": "object",
    "properties": {
        "proposer": _NAME,
        "action_type": _NAME,
        "reason": {"type": "string", "minLength": 1, "maxLength": 2000},
    },
    "required": ["proposer", "action_type", "reason"],
    "additionalProperties": False,
}

_ID = [{"name": "action_id", "in": "path", "required": True, "schema": {"type": "string"}}]


def openapi_document(version: str) -> dict[str, Any]:
    proposal = Proposal.model_json_schema(ref_template="#/components/schemas/{model}")
    nested = proposal.pop("$defs", {})
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "opsgate API",
            "version": version,
            "description": (
                "Every state change goes through the same gate as the CLI. Authenticate "
                "with `Authorization: Bearer TOKEN` (an opsgate API token)."
            ),
        },
        "servers": [{"url": "/api/v1"}],
        "security": [{"bearer": []}],
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Error": _ERROR, "Proposal": proposal, **nested},
        },
        "paths": {
            "/whoami": {
                "get": {
                    "operationId": "whoami",
                    "summary": "The authenticated principal: id, kind, groups, method.",
                    "responses": {"200": _ok("The principal"), **_errors(401)},
                }
            },
            "/actions": {
                "post": {
                    "operationId": "propose",
                    "summary": "Propose an action: checked against policy, queued for approval.",
                    "requestBody": {
                        "required": True,
                        "content": {
                            "application/json": {
                                "schema": {"$ref": "#/components/schemas/Proposal"}
                            }
                        },
                    },
                    "responses": {
                        "201": _ok("Stored: pending_approval or blocked (see decision)"),
                        "200": _ok("An earlier action with the same idempotency key"),
                        **_errors(400, 401, 409),
                    },
                }
            },
            "/queue": {
                "get": {
                    "operationId": "queue",
                    "summary": "Actions waiting for approval, oldest first.",
                    "responses": {
                        "200": _ok("Actions", {"type": "array", "items": {"type": "object"}}),
                        **_errors(401),
                    },
                }
            },
            "/actions/{action_id}": {
                "get": {
                    "operationId": "show",
                    "summary": "Everything known about one action.",
                    "parameters": _ID,
                    "responses": {"200": _ok("Details"), **_errors(401, 404)},
                }
            },
            "/actions/{action_id}/approve": {
                "post": {
                    "operationId": "approve",
                    "parameters": _ID,
                    "requestBody": _text_body("comment", False),
                    "responses": {
                        "200": _ok("Approval recorded"),
                        **_errors(400, 401, 403, 404, 409),
                    },
                }
            },
            "/actions/{action_id}/reject": {
                "post": {
                    "operationId": "reject",
                    "parameters": _ID,
                    "requestBody": _text_body("reason", True),
                    "responses": {"200": _ok("Rejected"), **_errors(400, 401, 403, 404, 409)},
                }
            },
            "/actions/{action_id}/run": {
                "post": {
                    "operationId": "run",
                    "summary": "Run an approved action on the server (authz `run`); follow it "
                    "with GET /actions/{action_id}.",
                    "parameters": _ID,
                    "responses": {"202": _ok("Claimed"), **_errors(401, 403, 404, 409)},
                }
            },
            "/actions/{action_id}/rollback": {
                "post": {
                    "operationId": "rollback",
                    "summary": "Roll back an executing, verifying or succeeded action "
                    "(authz `rollback`).",
                    "parameters": _ID,
                    "requestBody": _text_body("reason", True),
                    "responses": {"202": _ok("Requested"), **_errors(400, 401, 403, 404, 409)},
                }
            },
            "/my-actions": {
                "get": {
                    "operationId": "myActions",
                    "summary": "Actions the caller proposed, oldest first.",
                    "parameters": [
                        {"name": "state", "in": "query", "schema": {"type": "string"}},
                        {
                            "name": "limit",
                            "in": "query",
                            "schema": {"type": "integer", "minimum": 1, "maximum": 5000},
                        },
                    ],
                    "responses": {"200": _ok("Actions"), **_errors(400, 401)},
                }
            },
            "/catalog": {
                "get": {
                    "operationId": "catalog",
                    "summary": "The action types, parameters as JSON schema.",
                    "responses": {"200": _ok("The catalog"), **_errors(401)},
                }
            },
            "/policy": {
                "get": {
                    "operationId": "policy",
                    "summary": "The revision of the bundle decisions are made with.",
                    "responses": {"200": _ok("Revision and engine"), **_errors(401)},
                }
            },
            **_read_paths(),
            "/trust/reset": {
                "post": {
                    "operationId": "trustReset",
                    "summary": "`opsgate trust reset`: lift `trust_revoked` for one proposer "
                    "and action type (authz `trust_reset`; the caller is who resets, never "
                    "the proposer itself).",
                    "requestBody": {
                        "required": True,
                        "content": {"application/json": {"schema": _TRUST_RESET}},
                    },
                    "responses": {
                        "201": _ok("The reset, recorded with its `trust.reset` audit event"),
                        **_errors(400, 401, 403),
                    },
                }
            },
            "/actions/{action_id}/cancel": {
                "post": {
                    "operationId": "cancel",
                    "parameters": _ID,
                    "requestBody": _text_body("reason", False),
                    "responses": {"200": _ok("Cancelled"), **_errors(400, 401, 403, 404, 409)},
                }
            },
        },
    }


def _query(*names: str) -> list[dict[str, Any]]:
    return [{"name": n, "in": "query", "schema": {"type": "string"}} for n in names]


def _read_paths() -> dict[str, Any]:
    """Reads across actions: authz `report` (governance and approver roles, never agents)."""
    report_text = {
        "type": "object",
        "properties": {"format": {"type": "string"}, "text": {"type": "string"}},
    }
    return {
        "/reports/{kind}": {
            "get": {
                "operationId": "report",
                "summary": "`opsgate report KIND`, rendered (format: table, json, csv, "
                "markdown, html); authz `report`.",
                "parameters": [
                    {"name": "kind", "in": "path", "required": True, "schema": {"type": "string"}},
                    *_query("since", "until", "by", "where", "min_runs", "table", "format"),
                ],
                "responses": {"200": _ok("The report", report_text), **_errors(400, 401, 403)},
            }
        },
        "/audit/verify": {
            "post": {
                "operationId": "auditVerify",
                "summary": "`opsgate audit verify`, optionally against a public key (PEM) and "
                "a checkpoint kept outside the database; authz `report`.",
                "responses": {"200": _ok("The verification"), **_errors(400, 401, 403)},
            }
        },
        "/audit/decisions": {
            "get": {
                "operationId": "auditDecisions",
                "summary": "`opsgate audit decisions` as a JSON array; authz `report`.",
                "parameters": _query("format", "since", "until"),
                "responses": {"200": _ok("Decisions", {"type": "array"}), **_errors(400, 401, 403)},
            }
        },
        "/workers": {
            "get": {
                "operationId": "workers",
                "summary": "`opsgate workers`; authz `report`.",
                "parameters": _query("all"),
                "responses": {"200": _ok("Workers and the lease"), **_errors(400, 401, 403)},
            }
        },
        "/resolve": {
            "get": {
                "operationId": "resolve",
                "summary": "The one action the caller may read whose id starts with `prefix`.",
                "parameters": _query("prefix"),
                "responses": {"200": _ok("The full id"), **_errors(400, 401, 404)},
            }
        },
    }
