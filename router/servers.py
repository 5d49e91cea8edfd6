"""Starting and stopping the router's HTTP and gRPC front doors on one event loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
from collections.abc import Callable, Mapping
from typing import Any

import grpc
import uvicorn
from starlette.types import ASGIApp

from router.grpc_server import build_grpc_server
from router.http_protocol import GuardedServer, HttpDoorLimits, guarded_protocol
from router.http_server import TenantViewSource, UsageSource, build_http_app
from router.native_server import NativeServer
from router.native_server import available as native_available
from router.service import InferenceService
from router.tls import TlsFiles, TlsMaterial

log = logging.getLogger(__name__)


def _bind(host: str, port: int, reuse_port: bool = False) -> socket.socket:
    """Bind the HTTP socket ourselves: uvicorn exits the process on a bind error.
    ``reuse_port`` shares the port with other sockets that set SO_REUSEPORT too (the
    kernel spreads new connections over them).

    The protocol is named: asyncio's own loop turns Nagle off (TCP_NODELAY) only on
    sockets whose ``proto`` is IPPROTO_TCP, and accepted sockets copy the listener's.
    With proto 0, every answer uvicorn writes in two parts (head, then body) waited
    for the client's delayed ACK (tens of ms per POST). uvloop sets it anyway.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise RuntimeError(f"cannot bind HTTP port {host}:{port}: {exc}") from exc
    sock.listen(2048)
    sock.setblocking(False)
    return sock


class FrontDoors:
    """The HTTP (uvicorn) and gRPC servers of one InferenceService.

    ``grpc_server`` picks the gRPC door: ``native`` (gRPC C++, :mod:`router.native_server`),
    ``grpcio`` (grpc.aio) or ``auto`` (native when its extension loads, else grpcio).
    Port 0 picks a free port; ``http_port``/``grpc_port`` tell which after start.
    ``tls`` puts both ports on TLS (mutual TLS when it names a client CA), reloading the
    files when they change; ``max_concurrent_streams`` (per connection) and
    ``max_concurrent_calls`` (per server) bound the gRPC port. ``reuse_port`` shares
    both ports with other gateways on the host that ask the same (SO_REUSEPORT: the
    kernel spreads new connections over them); without it a taken port fails the start.
    ``usage`` and ``tenant_view`` answer a tenant's ``GET /usage`` and ``GET /tenant``.
    """

    GRPCIO_CHECK_S = 1.0  # how often the grpcio door's port is checked for being open

    def __init__(
        self,
        service: InferenceService,
        host: str,
        max_message_bytes: int,
        apps: Mapping[str, ASGIApp] | None = None,
        usage: UsageSource | None = None,
        grpc_server: str = "auto",
        *,
        tls: TlsFiles | None = None,
        max_concurrent_streams: int = 1024,
        max_concurrent_calls: int = 4096,
        http_limits: HttpDoorLimits | None = None,
        reuse_port: bool = False,
        tenant_view: TenantViewSource | None = None,
    ) -> None:
        self.service = service
        self.reuse_port = reuse_port
        self.http_limits = http_limits or HttpDoorLimits()
        # Loaded now: a certificate that does not load stops the start, naming the files.
        self.tls = TlsMaterial(tls) if tls is not None else None
        self._tls_watch: asyncio.Task[None] | None = None
        self._max_streams = max_concurrent_streams
        self._max_calls = max_concurrent_calls
        self._apps = dict(apps or {})
        self._usage = usage
        self._tenant_view = tenant_view
        self.host = host
        self.http_port = 0
        self.grpc_port = 0
        self._max_bytes = max_message_bytes
        self._grpc: grpc.aio.Server | None = None
        self._grpc_keeper: asyncio.Task[None] | None = None
        self.grpc_restarts = 0  # times the grpcio door's server ended on its own
        self._door: NativeServer | None = None
        if grpc_server == "auto":
            why_not = native_available()
            grpc_server = "native" if why_not is None else "grpcio"
            if why_not is not None:
                log.info("gRPC port on grpcio: %s", why_not)
        self.grpc_server = grpc_server  # the implementation serving the gRPC port
        if grpc_server == "native":
            self._door = NativeServer(
                service,
                max_message_bytes,
                max_concurrent_streams=max_concurrent_streams,
                max_concurrent_calls=max_concurrent_calls,
                tls=self.tls,
            )
        elif grpc_server != "grpcio":
            raise ValueError(f"unknown gRPC server {grpc_server!r}")
        self._http: GuardedServer | None = None
        self._http_task: asyncio.Task[None] | None = None

    async def start(self, http_port: int, grpc_port: int) -> None:
        if self.tls is not None:
            self._tls_watch = asyncio.get_running_loop().create_task(
                self.tls.watch(), name="router-tls-watch"
            )
        if self._door is not None:
            self.grpc_port = await self._door.start(
                self.host, grpc_port, reuse_port=self.reuse_port
            )
        else:
            self._grpc = self._bind_grpcio(grpc_port)
        sock = _bind(self.host, http_port, self.reuse_port)
        self.http_port = sock.getsockname()[1]
        if self._grpc is not None:
            await self._grpc.start()
            self._grpc_keeper = asyncio.get_running_loop().create_task(
                self._keep_grpcio_serving(), name="router-grpc-keeper"
            )
        self._http = GuardedServer(
            uvicorn.Config(
                build_http_app(
                    self.service, self._apps, self._usage, self.http_limits, self._tenant_view
                ),
                log_level="warning",
                access_log=False,
                lifespan="off",
                # httptools with the head timer, head-size and connection caps uvicorn
                # lacks (router.http_protocol); it sets the keep-alive timeout too.
                http=guarded_protocol(self.http_limits),
                ws="none",
                ssl_context_factory=self._http_tls(),
            )
        )
        self._http.handshake_timeout_s = self.http_limits.header_timeout_s
        self._http_task = asyncio.get_running_loop().create_task(
            self._http.serve(sockets=[sock]), name="router-http"
        )
        while not self._http.started:
            if self._http_task.done():
                raise RuntimeError(f"HTTP server failed to start: {self._http_task.exception()}")
            await asyncio.sleep(0.01)

    def _http_tls(self) -> Callable[[uvicorn.Config, Any], ssl.SSLContext] | None:
        tls = self.tls
        if tls is None:
            return None
        return lambda config, default: tls.http_context

    def _bind_grpcio(self, port: int) -> grpc.aio.Server:
        server = build_grpc_server(
            self.service, self._max_bytes, self._max_streams, self._max_calls, self.reuse_port
        )
        address = f"{self.host}:{port}"
        try:
            if self.tls is not None:
                self.grpc_port = server.add_secure_port(address, self.tls.grpcio_credentials())
            else:
                self.grpc_port = server.add_insecure_port(address)
        except RuntimeError as exc:
            raise RuntimeError(f"cannot bind gRPC port {self.host}:{port}: {exc}") from exc
        return server

    async def _keep_grpcio_serving(self) -> None:
        """Start the grpcio door again, on the same port, when its server stops listening
        on its own. grpc.aio's server loop ends, closing the port, on a call whose method
        name (HTTP/2 ``:path``) is not UTF-8, and the server never reports that it ended
        (``wait_for_termination`` does not return); one such request from anyone would
        otherwise leave the gRPC port closed until the gateway restarts. So the port is
        probed with a TCP connect every ``GRPCIO_CHECK_S``. The calls in progress on a
        server that ended are lost with it."""
        while True:
            await asyncio.sleep(self.GRPCIO_CHECK_S)
            if await self._grpcio_listening():
                continue
            log.error(
                "the grpcio door stopped listening on its own; starting it again on port %d",
                self.grpc_port,
            )
            assert self._grpc is not None
            with contextlib.suppress(Exception):  # it already failed on its own
                await self._grpc.stop(0)
            self._grpc = self._bind_grpcio(self.grpc_port)
            await self._grpc.start()
            self.grpc_restarts += 1  # once serving again: a reader may call at once

    async def _grpcio_listening(self) -> bool:
        # Only a refused connection means the port is closed; a slow one is a busy server.
        host = {"0.0.0.0": "127.0.0.1", "::": "::1", "[::]": "::1"}.get(self.host, self.host)
        try:
            _, writer = await asyncio.wait_for(
                asyncio.open_connection(host.strip("[]"), self.grpc_port), timeout=5
            )
        except ConnectionRefusedError:
            return False
        except (OSError, TimeoutError):
            return True
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()
        return True

    @property
    def healthy(self) -> bool:
        """Both doors serve: the HTTP server runs, and so does whichever gRPC door."""
        http = self._http_task is not None and not self._http_task.done()
        grpcio = self._grpc_keeper is None or not self._grpc_keeper.done()
        return http and grpcio

    async def stop(self, grace_s: float = 1.0) -> None:
        """Close both servers; call after the service has drained."""
        if self._tls_watch is not None:
            self._tls_watch.cancel()
            await asyncio.wait([self._tls_watch])
        if self._grpc_keeper is not None:
            self._grpc_keeper.cancel()
            await asyncio.wait([self._grpc_keeper])
        if self._grpc is not None:
            await self._grpc.stop(grace=grace_s)
        if self._door is not None:
            await self._door.stop(grace_s)
        if self.tls is not None:
            self.tls.close()
        if self._http is not None and self._http_task is not None:
            self._http.should_exit = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._http_task, timeout=grace_s + 5)
