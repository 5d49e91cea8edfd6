"""The one mapping from errors to answers: each error's HTTP status on the admin API and
the ``gpugate`` command's exit code for it.

:data:`ANSWERS` is looked up along the raised error's class hierarchy, most specific
class first, so ``NoRollout`` (404) wins over its base ``RolloutError`` (409), which wins
over ``RegistryError`` (400). Every error leaves the API as ``{"error": "..."}``; an
error outside the table is a fault of the gateway (500, logged), never of the input.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pydantic
import sqlalchemy as sa
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect
from starlette.routing import Match

from serving.costs import ReportError
from serving.registry import (
    ApprovalError,
    ArtifactTooLarge,
    GuardrailRefused,
    RegistryError,
    StageError,
    UploadMismatch,
    VersionExistsError,
    VersionNotFoundError,
)
from serving.rollout import NoRollout, RolloutError
from serving.state import AuditKeyError, SchemaError
from serving.tenancy import (
    Forbidden,
    KeyStateError,
    LastAdminError,
    TenantError,
    TenantExistsError,
    TenantNotFoundError,
    UserError,
    UserExistsError,
    UserNotFoundError,
)

log = logging.getLogger(__name__)

EXIT_OK = 0
EXIT_FAILED = 1  # the action was refused or failed (any error answer, or no answer)
EXIT_USAGE = 2  # the command line itself is wrong (argparse's own code)


class AdminError(Exception):
    """Base of the errors the admin API raises itself, before any domain code runs."""


class Unauthenticated(AdminError):
    """No token, a malformed ``Authorization`` header, or a token of no user."""


class DirectoryUnavailable(AdminError):
    """The users table cannot be read now, so no token can be checked."""


@dataclass(frozen=True)
class Answer:
    """How an error is answered: HTTP status, exit code, a fixed message where the
    error's own text is not for the caller (it may name hosts or SQL), and the level at
    which it is logged (by default: errors for 5xx, warnings for fixed messages, else
    not at all)."""

    status: int
    exit_code: int = EXIT_FAILED
    message: str | None = None
    log_level: int | None = None


ANSWERS: dict[type[Exception], Answer] = {
    # 400: bad input. Plain ValueError is how domain code refuses a bad name or value.
    RequestValidationError: Answer(400),
    ValueError: Answer(400),
    RegistryError: Answer(400),
    UploadMismatch: Answer(400),
    TenantError: Answer(400),
    UserError: Answer(400),
    ReportError: Answer(400),
    # The client went away while sending: nobody reads the answer, and nothing is wrong here.
    ClientDisconnect: Answer(
        400, message="the client disconnected before its request was read", log_level=logging.INFO
    ),
    # 401, 403: who calls, and whether their role may.
    Unauthenticated: Answer(401),
    Forbidden: Answer(403),
    # 404: the named thing does not exist.
    VersionNotFoundError: Answer(404),
    TenantNotFoundError: Answer(404),
    UserNotFoundError: Answer(404),
    NoRollout: Answer(404),
    # 409: it exists already, or its state or a policy forbids the action.
    VersionExistsError: Answer(409),
    TenantExistsError: Answer(409),
    KeyStateError: Answer(409),
    UserExistsError: Answer(409),
    LastAdminError: Answer(409),
    ApprovalError: Answer(409),
    StageError: Answer(409),
    GuardrailRefused: Answer(409),
    RolloutError: Answer(409),
    # 413: too much to take.
    ArtifactTooLarge: Answer(413),
    # 503: try again later.
    DirectoryUnavailable: Answer(503),
    # The gateway's audit key is missing, exposed or not the chain's: nothing is audited.
    AuditKeyError: Answer(503, log_level=logging.ERROR),
    SchemaError: Answer(503),  # an older or newer schema: `gpugate db upgrade`, or a newer gpugate
    sa.exc.OperationalError: Answer(503, message="the state database is unavailable; try again"),
    # A model of the gateway's own data that does not validate is its fault: what a caller
    # sends is validated by FastAPI (RequestValidationError, above).
    pydantic.ValidationError: Answer(500, message="internal error of the gateway; see its log"),
}


def answer_for(exc: BaseException) -> Answer | None:
    """The table's answer for ``exc`` (its most specific listed class), or None."""
    for cls in type(exc).__mro__:
        found = ANSWERS.get(cls)
        if found is not None:
            return found
    return None


def exit_code_for(exc: BaseException) -> int | None:
    """The exit code of a command that ended with ``exc``, or None if it is unexpected."""
    found = answer_for(exc)
    return None if found is None else found.exit_code


class ErrorBody(BaseModel):
    """Every error answer of the admin API."""

    error: str


# Documented on every operation; "default" also keeps FastAPI from describing a 422.
ERROR_RESPONSES: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorBody, "description": text}
    for status, text in (
        (400, "Bad input; the message names the field"),
        (401, "No token, or not a user's token"),
        (403, "The user's role may not do this action"),
        ("default", "Any other error: not found, conflict, too large, unavailable"),
    )
}


def validation_message(errors: Sequence[Any]) -> str:
    """FastAPI's validation errors as one line naming each field, e.g.
    ``body.steps: Value error, steps must increase``."""
    parts = []
    for err in errors[:5]:
        if err.get("type") == "json_invalid":
            parts.append(f"body: malformed JSON ({err.get('ctx', {}).get('error', '')})")
            continue
        where = ".".join(str(p) for p in err.get("loc", ()))
        parts.append(f"{where}: {err.get('msg', 'invalid')}" if where else str(err.get("msg")))
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return "invalid request: " + "; ".join(parts) + more


def _response(status: int, message: str) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else None
    return JSONResponse({"error": message}, status_code=status, headers=headers)


async def _answer(request: Request, exc: Exception) -> JSONResponse:
    found = answer_for(exc)
    if found is None:  # registered for a class of the table, so never here
        raise exc
    if isinstance(exc, RequestValidationError):
        return _response(found.status, validation_message(exc.errors()))
    if found.log_level is not None:
        log.log(found.log_level, "admin %s %s: %s", request.method, request.url.path, exc)
    elif found.status >= 500:
        log.error("admin %s %s failed", request.method, request.url.path, exc_info=exc)
    elif found.message is not None:
        log.warning("admin %s %s: %s", request.method, request.url.path, exc)
    return _response(found.status, found.message or str(exc))


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, HTTPException)
    if exc.status_code == 404:
        return _response(404, f"no admin route {request.url.path}")
    if exc.status_code == 405:
        answer = _response(405, f"method {request.method} not allowed")
        answer.headers["Allow"] = ", ".join(_allowed(request))
        return answer
    return _response(exc.status_code, str(exc.detail))


def _allowed(request: Request) -> list[str]:
    """Every method of the path, over all its routes (Starlette names only the first's)."""
    methods: set[str] = set()
    for candidate in request.app.router.routes:
        found, _ = candidate.matches(request.scope)
        if found is not Match.NONE:
            methods |= getattr(candidate, "methods", None) or set()
    return sorted(methods)


async def _internal(request: Request, exc: Exception) -> JSONResponse:
    # Starlette logs the traceback after this answer is sent.
    return _response(500, "internal error of the gateway; see its log")


def install_error_answers(app: FastAPI) -> None:
    """Answer every error of ``app`` as ``{"error": ...}`` with the table's status."""
    for cls in ANSWERS:
        app.add_exception_handler(cls, _answer)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _internal)
