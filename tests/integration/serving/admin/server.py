"""The admin API of a gateway without Ray: the real app over a real state database,
served by uvicorn on a real socket (:class:`AdminServer`) and mounted at ``/admin``, as
the gateway serves it."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import safetensors.torch
import sqlalchemy as sa
import torch
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Mount

from serving.admin import build_admin_app
from serving.config import CostsConfig, GatewayConfig
from serving.costs import Pricing
from serving.demo import DigitsMLP
from serving.tenancy import UserStore, ensure_admin

SIGNATURE = {"input": ["pixels:FP32:64"], "output": ["logits:FP32:10"]}
DIGITS_CLASS = {"model_class": "serving.demo:DigitsMLP", "model_kwargs": '{"hidden": 16}'}


def gateway_app(engine: sa.Engine, state_dir: Path, config: GatewayConfig) -> Starlette:
    """The admin API as the gateway serves it: mounted at /admin, and a path that no
    route takes answered in the same ``{"error": ...}`` form."""
    admin = build_admin_app(engine, state_dir, config, Pricing(CostsConfig()))

    async def not_found(request: Request, exc: Exception) -> Response:
        return JSONResponse({"error": f"no route {request.url.path}"}, status_code=404)

    return Starlette(routes=[Mount("/admin", app=admin)], exception_handlers={404: not_found})


def admin_token(engine: sa.Engine, state_dir: Path) -> str:
    """The bootstrap admin's token, as `gpugate serve` makes it."""
    token = ensure_admin(UserStore(engine), state_dir)
    assert token is not None
    return token


@contextlib.contextmanager
def client(app: Starlette, token: str | None = None) -> Iterator[httpx.Client]:
    """An HTTP client of ``app`` served on a socket, with ``token`` as its bearer token."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    with (
        AdminServer(app) as server,
        httpx.Client(base_url=server.url + "/admin", headers=headers, timeout=120) as c,
    ):
        yield c


def digits_weights(path: Path, seed: int = 0) -> Path:
    """A small digits model's safetensors (loads as serving.demo:DigitsMLP(hidden=16))."""
    torch.manual_seed(seed)
    state = {k: v.contiguous() for k, v in DigitsMLP(16).state_dict().items()}
    safetensors.torch.save_file(state, path)
    return path


class AdminServer:
    """uvicorn serving ``app`` on 127.0.0.1 in a thread of its own, as the gateway's HTTP
    port does (httptools, keep-alive); ``url`` is what the CLI takes as ``--url``."""

    def __init__(self, app: Starlette) -> None:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(128)
        self.url = f"http://127.0.0.1:{self._sock.getsockname()[1]}"
        self._server = uvicorn.Server(
            uvicorn.Config(app, log_level="warning", access_log=False, lifespan="off")
        )
        self._thread = threading.Thread(
            target=lambda: asyncio.run(self._server.serve(sockets=[self._sock])), daemon=True
        )

    def __enter__(self) -> AdminServer:
        self._thread.start()
        while not self._server.started:
            assert self._thread.is_alive(), "uvicorn did not start"
            threading.Event().wait(0.01)
        return self

    def __exit__(self, *exc: object) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self._sock.close()
