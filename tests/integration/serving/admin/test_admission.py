"""The admin API admits its caller before it reads anything of a request but its headers,
refuses query parameters a route does not declare, and answers a client that went away
mid-upload quietly; driven in-process through ASGI, so a body read is observable."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from fastapi import FastAPI
from starlette.types import Message

from serving.admin import build_admin_app
from serving.config import CostsConfig, GatewayConfig
from serving.costs import Pricing
from serving.state import audit
from serving.tenancy import UserStore
from tests.integration.serving.admin.server import admin_token

BAD_JSON = b"{bad"
BIG_BODY = b'{"name": "t", "pad": "' + b"x" * 70_000 + b'"}'
NEVER = object()  # receive() must not be reached


def call(
    app: FastAPI,
    method: str,
    path: str,
    *,
    token: str | None = None,
    query: str = "",
    headers: Sequence[tuple[str, str]] = (),
    body: Sequence[Message] | object = NEVER,
) -> tuple[int, Any]:
    """One request to ``app``; its body is ``body``'s messages, in order. Without
    ``body``, reading the body fails the test."""
    pending = [] if body is NEVER else list(body)  # type: ignore[call-overload]

    async def receive() -> Message:
        if body is NEVER:
            raise AssertionError(f"{method} {path}: the request body was read")
        return pending.pop(0) if pending else {"type": "http.disconnect"}

    sent: list[Message] = []

    async def send(message: Message) -> None:
        sent.append(message)

    all_headers = [*headers, *([("authorization", f"Bearer {token}")] if token else [])]
    scope = {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": method,
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "root_path": "",
        "query_string": query.encode(),
        "headers": [(k.encode(), v.encode()) for k, v in all_headers],
        "client": ("127.0.0.1", 50000),
        "server": ("127.0.0.1", 8000),
    }
    asyncio.run(app(scope, receive, send))
    start = next(m for m in sent if m["type"] == "http.response.start")
    answer = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    return start["status"], json.loads(answer)


def json_body(data: bytes) -> list[Message]:
    return [{"type": "http.request", "body": data, "more_body": False}]


JSON = (("content-type", "application/json"),)


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def app(engine: sa.Engine, state: Path) -> FastAPI:
    return build_admin_app(engine, state, GatewayConfig(), Pricing(CostsConfig()))


def test_no_token_is_refused_before_the_body(app: FastAPI) -> None:
    for data in (BAD_JSON, BIG_BODY):
        length = (("content-length", str(len(data))),)
        status, answer = call(app, "POST", "/tenants", headers=JSON + length)
        assert (status, answer) == (
            401,
            {"error": "missing token: send 'Authorization: Bearer <user token>'"},
        )
        status, answer = call(app, "POST", "/tenants", token="ggu_nope", headers=JSON + length)
        assert (status, answer) == (401, {"error": "unknown user token"})
    status, _ = call(app, "POST", "/models/digits/versions", query="sha256=0&format=x")
    assert status == 401


def test_a_role_without_the_action_is_refused_before_the_body(
    app: FastAPI, engine: sa.Engine
) -> None:
    finance = UserStore(engine).create("fiona", "finance", actor="admin")
    for data in (BAD_JSON, BIG_BODY):
        length = (("content-length", str(len(data))),)
        status, answer = call(app, "POST", "/tenants", token=finance, headers=JSON + length)
        assert status == 403
        assert answer["error"] == "user 'fiona' (role finance) may not tenants.create; needs admin"
    status, _ = call(app, "GET", "/users", token=finance, query="colour=red")
    assert status == 403  # the role first, then the query
    before = len(audit.read(engine))
    huge = (("content-length", str(2**40)),)
    status, _ = call(app, "POST", "/models/d/versions", token=finance, query="a=1", headers=huge)
    assert status == 403 and len(audit.read(engine)) == before  # no size refusal recorded


def test_an_admitted_caller_gets_the_body_checks(
    app: FastAPI, engine: sa.Engine, state: Path
) -> None:
    root = admin_token(engine, state)
    bad = json_body(BAD_JSON)
    status, answer = call(app, "POST", "/tenants", token=root, headers=JSON, body=bad)
    assert status == 400 and "malformed JSON" in answer["error"]
    big = json_body(BIG_BODY)
    status, answer = call(app, "POST", "/tenants", token=root, headers=JSON, body=big)
    assert status == 413 and "limit" in answer["error"]


@pytest.mark.parametrize(
    ("method", "path", "query"),
    [
        ("GET", "/users", "x=1"),
        ("GET", "/whoami", "verbose=true"),
        ("POST", "/tenants", "dry_run=1"),
        ("GET", "/models", "name=digits&colour=red"),
        ("GET", "/audit/verify", "since=2026-01-01T00:00:00Z"),
        ("GET", "/models/digits/rollout", "step=1"),
        ("POST", "/models/digits/versions", f"sha256={'0' * 64}&format=safetensors&colour=red"),
    ],
)
def test_undeclared_query_parameters_are_refused_on_every_route(
    app: FastAPI, engine: sa.Engine, state: Path, method: str, path: str, query: str
) -> None:
    root = admin_token(engine, state)
    status, answer = call(app, method, path, token=root, query=query)
    assert status == 400
    name = query.rsplit("&", 1)[-1].split("=")[0]
    assert answer == {"error": f"invalid request: query.{name}: Extra inputs are not permitted"}


def test_declared_query_parameters_still_pass(app: FastAPI, engine: sa.Engine, state: Path) -> None:
    root = admin_token(engine, state)
    assert call(app, "GET", "/models", token=root, query="name=digits") == (200, [])
    assert call(app, "GET", "/audit", token=root, query="model=digits")[0] == 200
    status, _ = call(app, "GET", "/costs", token=root, query="from=2026-11-01&group_by=tenant")
    assert status == 200


def test_a_client_gone_mid_upload_is_a_quiet_400(
    app: FastAPI, engine: sa.Engine, state: Path, caplog: pytest.LogCaptureFixture
) -> None:
    root = admin_token(engine, state)
    data = b"\x00" * 1000
    query = f"sha256={hashlib.sha256(data).hexdigest()}&format=safetensors"
    first_half: Message = {"type": "http.request", "body": data[:500], "more_body": True}
    caplog.set_level(logging.INFO)
    status, answer = call(
        app,
        "POST",
        "/models/digits/versions",
        token=root,
        query=query,
        headers=(("content-type", "application/octet-stream"), ("content-length", "1000")),
        body=[first_half],  # then http.disconnect
    )
    assert (status, answer) == (
        400,
        {"error": "the client disconnected before its request was read"},
    )
    mine = [r for r in caplog.records if r.name == "serving.admin.errors"]
    assert [r.levelno for r in mine] == [logging.INFO]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
    store = state / "artifacts" / "sha256"
    assert list(store.iterdir()) == []  # the partial upload's file is gone
