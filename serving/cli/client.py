"""How a ``gpugate`` command reaches the gateway: its admin API over HTTP, as the user
whose token the command holds. The gateway checks the role, the approvals and the
policy; the command only asks and prints the answer.

The gateway is ``--url`` (default ``$GPUGATE_URL``, else http://127.0.0.1:8000). The
token is ``--token``, else ``$GPUGATE_TOKEN``, else the state folder's ``admin.token``
when this machine can read it (the bootstrap admin of a gateway started here).

This module loads no server code: a command that only talks HTTP starts quickly.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

import httpx

DEFAULT_URL = "http://127.0.0.1:8000"
DEFAULT_STATE_DIR = ".gpugate"
# serving.tenancy.ADMIN_TOKEN_FILE and serving.admin.EXIT_FAILED; tests hold them equal.
ADMIN_TOKEN_FILE = "admin.token"
EXIT_FAILED = 1
EXIT_USAGE = 2  # argparse's own code for a usage error
TIMEOUT_S = 60.0
_CHUNK = 1 << 20

Command = Callable[[argparse.Namespace], int]


class CommandError(Exception):
    """A command that could not do its action: printed as ``gpugate: error: ...``, exit 1."""


class UsageError(CommandError):
    """Options that do not go together: exit 2, like argparse's own usage errors."""


class Refused(CommandError):
    """The gateway answered with an error status; the message is its ``error``."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class Unreachable(CommandError):
    """No answer from the gateway: refused connection, timeout, broken transfer."""


def state_dir_of(arg: str | None) -> Path:
    """The state folder: ``arg``, else ``$GPUGATE_STATE_DIR``, else ``./.gpugate``."""
    chosen = arg or os.environ.get("GPUGATE_STATE_DIR") or DEFAULT_STATE_DIR
    return Path(chosen).expanduser().resolve()


def add_client_options(p: argparse.ArgumentParser) -> None:
    """The options of every command that talks to the gateway."""
    p.add_argument(
        "--url",
        default=os.environ.get("GPUGATE_URL", DEFAULT_URL),
        help=f"the gateway's HTTP address (default $GPUGATE_URL, else {DEFAULT_URL})",
    )
    p.add_argument(
        "--token",
        help="user token to act with (default $GPUGATE_TOKEN, else STATE_DIR/admin.token "
        "if readable)",
    )
    p.add_argument(
        "--state-dir",
        help="where to look for admin.token when no token is given (default "
        f"$GPUGATE_STATE_DIR, else ./{DEFAULT_STATE_DIR})",
    )


def add_json_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print the result as JSON")


def _token(args: argparse.Namespace) -> str:
    token: str | None = args.token or os.environ.get("GPUGATE_TOKEN")
    if token:
        return token
    path = state_dir_of(args.state_dir) / ADMIN_TOKEN_FILE
    try:
        token = path.read_text().strip()
    except OSError:
        token = None
    if not token:
        raise CommandError(f"no token: pass --token or set GPUGATE_TOKEN (no readable {path})")
    return token


def positive_number(text: str) -> float:
    """An argparse type: a number above 0 (a rate, a burst, an amount)."""
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r}: a positive number")
    return value


def path_of(*parts: str) -> str:
    """An admin API path from its segments, each quoted (names are never split)."""
    return "".join("/" + quote(p, safe="") for p in parts)


class AdminClient:
    """Calls to one gateway's admin API; every call returns the answer's JSON or raises
    :class:`Refused` or :class:`Unreachable`. ``prefix`` "" reaches the data plane's
    routes instead, with a tenant's API key as the token."""

    def __init__(self, url: str, token: str, prefix: str = "/admin") -> None:
        self.url = url.rstrip("/")
        self._http = httpx.Client(
            base_url=self.url + prefix,
            headers={"Authorization": f"Bearer {token}"},
            timeout=TIMEOUT_S,
        )

    @classmethod
    def of(cls, args: argparse.Namespace) -> AdminClient:
        return cls(args.url, _token(args))

    def get(self, path: str, params: Mapping[str, Any] | None = None) -> Any:
        return self._call("GET", path, params=params)

    def post(self, path: str, body: Any = None) -> Any:
        return self._call("POST", path, json=body)

    def patch(self, path: str, body: Any = None) -> Any:
        return self._call("PATCH", path, json=body)

    def put(self, path: str, body: Any = None) -> Any:
        return self._call("PUT", path, json=body)

    def delete(self, path: str) -> Any:
        return self._call("DELETE", path)

    def upload(
        self, path: str, params: Mapping[str, Any], artifact: Path, *, read_timeout_s: float
    ) -> Any:
        """POST ``artifact``'s bytes as the body, streamed from the file."""
        with artifact.open("rb") as f:
            return self._call(
                "POST",
                path,
                params=params,
                content=_chunks(f),
                headers={
                    "Content-Type": "application/octet-stream",
                    "Content-Length": str(artifact.stat().st_size),
                },
                timeout=httpx.Timeout(TIMEOUT_S, read=read_timeout_s),
            )

    def _call(self, method: str, path: str, **options: Any) -> Any:
        try:
            answer = self._http.request(method, path, **options)
        except httpx.ConnectError as exc:
            raise Unreachable(
                f"cannot reach the gateway at {self.url} ({exc}); is `gpugate serve` running "
                "there? (--url, $GPUGATE_URL)"
            ) from None
        except httpx.TimeoutException:
            raise Unreachable(f"the gateway at {self.url} did not answer in time") from None
        except httpx.HTTPError as exc:
            raise Unreachable(f"no answer from the gateway at {self.url}: {exc}") from None
        if answer.status_code >= 400:
            raise Refused(answer.status_code, _error_of(answer))
        try:
            return answer.json()
        except ValueError:
            raise Unreachable(
                f"{self.url} answered {answer.status_code} without JSON: is it a gpugate gateway?"
            ) from None


def _chunks(f: IO[bytes]) -> Iterator[bytes]:
    while chunk := f.read(_CHUNK):
        yield chunk


def _error_of(answer: httpx.Response) -> str:
    try:
        body = answer.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("error"), str):
        return str(body["error"])
    return f"HTTP {answer.status_code} from {answer.url}: {answer.text[:200]}"


def emit(args: argparse.Namespace, data: Any, text: Callable[[Any], str]) -> None:
    """Print ``data`` as JSON with ``--json``, else ``text(data)``."""
    print(json.dumps(data) if args.json else text(data))
