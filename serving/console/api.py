"""The console's way to the admin API: an in-process call of the admin ASGI app as the
signed-in user, so every page and action passes the same routes, role checks,
validation and audit as the CLI's requests do."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlencode

from starlette.types import ASGIApp, Message

from serving.admin import SIGNED_IN
from serving.tenancy import Principal

# A list value is sent as the parameter repeated (the API's filters take several values).
Params = Mapping[str, str | int | float | bool | list[str] | None]


class Refused(Exception):
    """The admin API answered an error: its status and its ``error`` text."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class AdminApi:
    """Calls ``admin`` (the app mounted at ``/admin``) in-process."""

    def __init__(self, admin: ASGIApp) -> None:
        self._admin = admin

    async def get(self, principal: Principal, path: str, params: Params | None = None) -> Any:
        return await self.call(principal, "GET", path, params)

    async def post(
        self, principal: Principal, path: str, body: Any = None, params: Params | None = None
    ) -> Any:
        return await self.call(principal, "POST", path, params, body)

    async def call(
        self,
        principal: Principal,
        method: str,
        path: str,
        params: Params | None = None,
        body: Any = None,
    ) -> Any:
        """The JSON answer of ``method path`` (under ``/admin``) as ``principal``; raises
        :class:`Refused` with the API's status and message on an error answer."""
        query = urlencode(
            [
                (k, _text(one))
                for k, v in (params or {}).items()
                for one in (v if isinstance(v, list) else [v])
                if one is not None and one != ""
            ]
        )
        payload = b"" if body is None else json.dumps(body).encode()
        headers = [(b"host", b"console.internal")]
        if body is not None:
            headers += [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(payload)).encode()),
            ]
        scope: dict[str, Any] = {
            "type": "http",
            "asgi": {"version": "3.0"},
            "http_version": "1.1",
            "method": method,
            "scheme": "http",
            "path": path,
            "raw_path": path.encode(),
            "root_path": "",
            "query_string": query.encode(),
            "headers": headers,
            "client": ("127.0.0.1", 0),
            "server": ("console.internal", 80),
            SIGNED_IN: principal,
        }
        sent = False

        async def receive() -> Message:
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": payload, "more_body": False}

        status = 500
        chunks: list[bytes] = []

        async def send(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            elif message["type"] == "http.response.body":
                chunks.append(message.get("body", b""))

        await self._admin(scope, receive, send)
        raw = b"".join(chunks)
        answer = json.loads(raw) if raw else None
        if status >= 400:
            message = answer.get("error") if isinstance(answer, dict) else None
            raise Refused(status, str(message or f"the admin API answered {status}"))
        return answer


def _text(value: str | int | float | bool) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)
