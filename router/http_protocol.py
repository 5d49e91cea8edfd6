"""The HTTP door's connection limits, which uvicorn does not enforce on its own.

uvicorn's httptools protocol arms no timer before a request's head is complete (its
keep-alive timer runs only between requests), caps neither the head's size (llhttp
accumulates a header value of any length) nor the number of open connections
(``limit_concurrency`` answers 503 to *requests* once the connections, idle and
half-sent ones included, reach it: slow clients would starve everyone else).
:class:`GuardedHttpToolsProtocol` adds, per connection:

* a head timer: a connection must deliver a complete request head within
  ``header_timeout_s`` of connecting, or of its first byte after the previous
  response; otherwise it is closed (408 if it had started one);
* a head-size cap: request line plus headers over ``max_header_bytes`` are answered 431
  and the connection closed, counted as the bytes arrive, before llhttp buffers them;
* a body rate: once ``header_timeout_s`` has passed since the head, a body that has
  averaged under ``min_body_bytes_per_s`` is cut off (the connection closed), checked
  every :data:`BODY_CHECK_S`; while the gateway itself has paused reading (its buffer
  full) the clock is the gateway's, not the client's;
* a connection cap: at ``max_connections`` open connections, a new one makes room by
  closing the connection that has waited longest without a request in progress (idle
  keep-alive or head still arriving), as nginx reclaims idle connections. A connection
  is displaced only after ``EVICTION_GRACE_S`` of waiting: the connections accepted in
  one burst must not displace each other before any of them could send its head. With
  no such connection the newcomer is answered 503 and closed. Slow or idle connections
  thus bound the file descriptors used, and a client whose head arrives promptly is
  not displaced by them.

With TLS, :class:`GuardedServer` gives the handshake ``header_timeout_s`` as well
(asyncio's default is 60 s, before the protocol above even exists).

Body limits (JSON size, decompression) live with the app, in :mod:`router.http_server`.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import socket
from collections import OrderedDict
from dataclasses import dataclass
from typing import ClassVar

import orjson
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger(__name__)

# Long enough for a client on loopback or a LAN to send its head after connecting; short
# enough that fast churn by slow connections (each displacing the oldest) cannot keep
# every waiting connection younger than it, which would refuse newcomers instead.
EVICTION_GRACE_S = 0.1
# After a 431 the connection reads and drops what the client still sends, this long at
# most, before closing: closing with unread data sends a reset, which can destroy the
# answer in the client's buffers before it is read (nginx's lingering close). Not after a
# 408 or a 503: a slow client has little in flight, and those refusals must free their
# file descriptor at once.
LINGER_S = 1.0
BODY_CHECK_S = 1.0  # how often a body still arriving is checked against the rate

_REASONS = {
    408: b"Request Timeout",
    431: b"Request Header Fields Too Large",
    503: b"Service Unavailable",
}


@dataclass(frozen=True)
class HttpDoorLimits:
    """Limits of the HTTP door (``server.http`` in the config documents each)."""

    header_timeout_s: float = 10.0
    keep_alive_timeout_s: float = 30.0
    min_body_bytes_per_s: int = 64 * 1024
    max_header_bytes: int = 64 * 1024
    max_connections: int = 4096
    max_json_bytes: int = 8 * 2**20
    max_json_containers: int = 2**20
    max_inflate_ratio: float = 200.0


@dataclass
class DoorCounters:
    """What the guard refused, per server (read by tests and logs)."""

    header_timeouts: int = 0
    slow_bodies: int = 0
    oversized_heads: int = 0
    evicted: int = 0
    refused: int = 0


def connection_budget(configured: int) -> int:
    """``configured``, lowered to leave a quarter of the process's file limit to
    everything else (gRPC, the database, the model table's sockets); a cap the
    process cannot honour would turn into accept() failures instead of answers."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return configured
    budget = max(1, soft * 3 // 4)
    if configured > budget:
        log.warning(
            "server.http.max_connections %d does not fit the file limit %d (RLIMIT_NOFILE); "
            "using %d",
            configured,
            soft,
            budget,
        )
    return min(configured, budget)


class GuardedServer(uvicorn.Server):
    """uvicorn's server on the sockets given, with the TLS handshake bounded by the head
    timeout: asyncio allows 60 s by default, and a connection still in its handshake is
    not yet a protocol instance, so neither the head timer nor the connection cap sees
    it. (uvicorn's ``startup`` has no hook for the handshake timeout; this is its
    sockets branch with that one argument added.)"""

    handshake_timeout_s: float = 10.0

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        assert sockets is not None, "GuardedServer serves sockets bound by its owner"
        config = self.config

        def create_protocol(_loop: asyncio.AbstractEventLoop | None = None) -> asyncio.Protocol:
            return config.http_protocol_class(  # type: ignore[call-arg]
                config=config,
                server_state=self.server_state,
                app_state=self.lifespan.state,
                _loop=_loop,
            )

        loop = asyncio.get_running_loop()
        self.servers = [
            await loop.create_server(
                create_protocol,
                sock=sock,
                ssl=config.ssl,
                backlog=config.backlog,
                ssl_handshake_timeout=self.handshake_timeout_s if config.ssl else None,
            )
            for sock in sockets
        ]
        self.started = True


def guarded_protocol(limits: HttpDoorLimits) -> type[GuardedHttpToolsProtocol]:
    """A protocol class for one server: the limits, and the connections it may reclaim."""
    return type(
        "GuardedHttpToolsProtocol",
        (GuardedHttpToolsProtocol,),
        {
            "limits": limits,
            "max_connections": connection_budget(limits.max_connections),
            "waiting": OrderedDict(),
            "counters": DoorCounters(),
        },
    )


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a head timer, a head-size cap and a connection
    cap; use :func:`guarded_protocol` for a class with its limits set."""

    limits: ClassVar[HttpDoorLimits]
    max_connections: ClassVar[int]
    # Connections without a request in progress, longest-waiting first: those a newcomer
    # may displace. Per server class, as uvicorn's own connection set is per server.
    waiting: ClassVar[OrderedDict[GuardedHttpToolsProtocol, None]]
    counters: ClassVar[DoorCounters]

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.timeout_keep_alive = self.limits.keep_alive_timeout_s  # type: ignore[assignment]
        self._head_timer: asyncio.TimerHandle | None = None
        self._in_head = True  # the next bytes belong to a request head
        self._head_bytes = 0
        self._head_started = False
        self._waiting_since = 0.0
        self._lingering = False
        self._linger_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._body_bytes = 0
        self._body_clock = 0.0  # seconds the client has had to send the body
        self._body_checked_at = 0.0

    # -- connection -------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        at_cap = len(self.connections) >= self.max_connections
        super().connection_made(transport)
        if at_cap and not self._make_room():
            self.counters.refused += 1
            self._refuse(503, "too many connections; retry shortly")
            return
        self._wait()
        self._arm_head_timer()

    def _make_room(self) -> bool:
        """Close the longest-waiting connection without a request in progress."""
        victim = next(iter(self.waiting), None)
        if victim is None or self.loop.time() - victim._waiting_since < EVICTION_GRACE_S:
            return False
        self.counters.evicted += 1
        victim._forget()
        victim.transport.close()
        return True

    def connection_lost(self, exc: Exception | None) -> None:
        self._forget()
        self._stop_body_timer()
        if self._linger_timer is not None:
            self._linger_timer.cancel()
        super().connection_lost(exc)

    def _forget(self) -> None:
        self.waiting.pop(self, None)
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _wait(self) -> None:
        self._waiting_since = self.loop.time()
        self.waiting[self] = None

    # -- the request head -------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        # Fed in pieces that never take the head past its cap, so llhttp never holds
        # more than max_header_bytes of it (a piece may end one request and begin the
        # next: that head may then run over by at most one piece).
        if self._lingering:
            return
        limit = self.limits.max_header_bytes
        while data and not self.transport.is_closing():
            if not self._in_head:
                self._body_bytes += len(data)
                super().data_received(data)
                return
            room = limit - self._head_bytes
            if room <= 0:
                self.counters.oversized_heads += 1
                self._refuse(
                    431, f"request line and headers over the {limit}-byte limit", linger=True
                )
                return
            piece, data = data[:room], data[room:]
            self._head_bytes += len(piece)
            self._head_started = True
            super().data_received(piece)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        # A keep-alive connection's head timer starts with the first byte of the head;
        # the idle time before it is the keep-alive timer's.
        self._arm_head_timer()

    def on_headers_complete(self) -> None:
        self._forget()
        self._in_head = False
        self._head_bytes = 0
        self._head_started = False
        self._body_bytes = 0
        self._body_clock = -self.limits.header_timeout_s  # the grace
        self._body_checked_at = self.loop.time()
        self._body_timer = self.loop.call_later(BODY_CHECK_S, self._check_body_rate)
        super().on_headers_complete()

    def on_message_complete(self) -> None:
        self._stop_body_timer()
        super().on_message_complete()
        self._in_head = True

    # -- the request body -------------------------------------------------------------

    def _stop_body_timer(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None

    def _check_body_rate(self) -> None:
        self._body_timer = None
        if self.transport.is_closing() or self._in_head:
            return
        now = self.loop.time()
        if not self.flow.read_paused:  # paused: the gateway is behind, not the client
            self._body_clock += now - self._body_checked_at
        self._body_checked_at = now
        if self._body_clock > 0 and self._body_bytes < self._body_clock * (
            self.limits.min_body_bytes_per_s
        ):
            self.counters.slow_bodies += 1
            log.info(
                "closed a connection whose body arrived at under %d bytes/s",
                self.limits.min_body_bytes_per_s,
            )
            self.transport.close()  # the app sees the client gone (http.disconnect)
            return
        self._body_timer = self.loop.call_later(BODY_CHECK_S, self._check_body_rate)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self.timeout_keep_alive_task is not None:  # idle now, keep-alive timer armed
            self._wait()

    def _arm_head_timer(self) -> None:
        if self._head_timer is None and not self.transport.is_closing():
            self._head_timer = self.loop.call_later(
                self.limits.header_timeout_s, self._head_timed_out
            )

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        self.counters.header_timeouts += 1
        if self._head_started:
            self._refuse(408, f"request head not received within {self.limits.header_timeout_s} s")
        else:  # never spoke: nothing to answer (a preconnect, or a slow-loris)
            self._forget()
            self.transport.close()

    def _refuse(self, status: int, message: str, linger: bool = False) -> None:
        """Answer outside any request cycle and close; the client may still be sending."""
        self._forget()
        if self.cycle is not None and not self.cycle.response_complete:
            # A pipelined head behind a request still answering: let that answer finish,
            # then close (uvicorn closes after a response that is not keep-alive); what
            # arrives meanwhile is dropped.
            self.cycle.keep_alive = False
            self._lingering = True
            return
        body = orjson.dumps({"error": message})
        head = b"HTTP/1.1 %d %s\r\n" % (status, _REASONS[status])
        head += b"content-type: application/json\r\ncontent-length: %d\r\n" % len(body)
        if status == 503:
            head += b"retry-after: 1\r\n"
        self.transport.write(head + b"connection: close\r\n\r\n" + body)
        if not linger or not self.transport.can_write_eof():  # TLS: no half-close
            self.transport.close()
            return
        self.transport.write_eof()
        self._lingering = True
        self._linger_timer = self.loop.call_later(LINGER_S, self.transport.close)
