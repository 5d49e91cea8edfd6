"""Slow-header and idle HTTP clients, run as a process of their own by
test_http_limits.py so that their sockets count against this process's file limit,
not the gateway's.

    python -m tests.integration.router.slow_clients HOST PORT SLOW IDLE SECONDS

Keeps SLOW connections that send a request head one byte every 0.25 s, and IDLE
connections that send one request and then stay silent, reopening each as the server
closes it, for SECONDS. Prints ``open`` once the first wave is connected, then one
JSON line: per connection, how long it lived and how its server answered.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from typing import Any

DRIP_S = 0.25


async def _slow(
    host: str, port: int, deadline: float, out: list[Any], opened: asyncio.Event
) -> None:
    """Each entry: [seconds from the connect to the server's close (or to the end, still
    open), closed by the server?, the first bytes of its answer]."""
    while time.monotonic() < deadline:
        started = time.monotonic()  # before the connect: a lifetime is never understated
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(host, port), max(0.01, deadline - started)
            )
        except (OSError, TimeoutError):  # a SYN dropped from a full backlog retries for minutes
            opened.set()
            out.append([time.monotonic() - started, True, "no connection"])
            continue
        opened.set()
        writer.write(b"POST /v2/models/affine/infer HTTP/1.1\r\nHost: gateway\r\nX-Slow: ")
        answer = b""
        closed = False
        while time.monotonic() < deadline:
            try:
                data = await asyncio.wait_for(reader.read(256), DRIP_S)
            except TimeoutError:
                try:
                    writer.write(b"a")
                    await writer.drain()
                except OSError:
                    closed, answer = True, b"reset"
                    break
                continue
            except OSError:  # e.g. the kernel's reset of a connection its accept queue dropped
                closed, answer = True, b"reset"
                break
            if not data:
                closed = True
                break
            answer += data
        out.append([time.monotonic() - started, closed, answer[:12].decode()])
        writer.close()


def _content_length(head: bytes) -> int:
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            return int(value)
    return 0


async def _idle(
    host: str, port: int, deadline: float, out: list[Any], opened: asyncio.Event
) -> None:
    """Each entry: [seconds from the request to the server's close (or to the end), closed
    by the server?, anything unexpected]."""
    while time.monotonic() < deadline:
        try:
            async with asyncio.timeout(max(0.01, deadline - time.monotonic())):
                reader, writer = await asyncio.open_connection(host, port)
                opened.set()
                asked = time.monotonic()  # before the answer: a lifetime is never understated
                writer.write(b"GET /v2/health/live HTTP/1.1\r\nHost: gateway\r\n\r\n")
                head = await reader.readuntil(b"\r\n\r\n")
        except TimeoutError:  # the end came first
            opened.set()
            continue
        except asyncio.IncompleteReadError:
            # Closed before an answer: the request came over a second after the connect
            # (this process is niced): the head timer's close, not an error.
            opened.set()
            out.append([time.monotonic() - asked, True, "closed before the answer"])
            continue
        except OSError as exc:
            opened.set()
            out.append([0.0, True, f"failed: {exc!r}"])
            continue
        if not head.startswith(b"HTTP/1.1 200"):
            out.append([0.0, True, head[:12].decode()])
            continue
        try:
            await reader.readexactly(_content_length(head))  # the answer's body
            data = await asyncio.wait_for(reader.read(256), max(0.0, deadline - asked))
            closed, extra = True, data[:12].decode()
        except TimeoutError:
            closed, extra = False, ""
        except asyncio.IncompleteReadError:
            closed, extra = True, "closed within the body"
        except OSError as exc:
            closed, extra = True, f"error: {exc!r}"
        out.append([time.monotonic() - asked, closed, extra])
        writer.close()


async def main(host: str, port: int, slow: int, idle: int, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    slow_out: list[Any] = []
    idle_out: list[Any] = []
    events = [asyncio.Event() for _ in range(slow + idle)]
    tasks = [
        asyncio.create_task(_slow(host, port, deadline, slow_out, events[i])) for i in range(slow)
    ] + [
        asyncio.create_task(_idle(host, port, deadline, idle_out, events[slow + i]))
        for i in range(idle)
    ]
    await asyncio.gather(*(e.wait() for e in events))
    print("open", flush=True)
    errors = [repr(r) for r in await asyncio.gather(*tasks, return_exceptions=True) if r]
    print(json.dumps({"slow": slow_out, "idle": idle_out, "errors": errors[:5]}), flush=True)


if __name__ == "__main__":
    # The attackers stand for other machines: on a shared test host they should not win
    # CPU time from the server they attack.
    os.nice(19)
    h, p, s, i, secs = sys.argv[1:6]
    asyncio.run(main(h, int(p), int(s), int(i), float(secs)))
