"""Reading an HTTP request body within its limits, and parsing its JSON.

The body is inflated as it arrives (``Content-Encoding: gzip|deflate``), a bounded step
at a time, and refused as soon as its decompressed size passes the limit or its
expansion passes ``max_inflate_ratio``, so a small compressed body never becomes a large
allocation. JSON is parsed by orjson with the cyclic garbage collector paused: orjson
holds the GIL for the whole document (a worker thread would stall the event loop just
as long), and a document of millions of empty arrays otherwise triggers collections
that rescan everything allocated so far (8 MiB of ``[],``: 0.8 s with the collector, 0.15 s
without). Containers (arrays and objects) are counted before parsing and capped,
which bounds the memory a document can expand to.
"""

from __future__ import annotations

import asyncio
import gc
import zlib
from typing import Any

import orjson
from starlette.requests import Request

from router._exceptions import InvalidArgument, PayloadTooLarge

# Output of one inflate step: about a millisecond of work between two looks at the loop.
INFLATE_STEP = 1 << 20
# Bodies that inflate to at most this much are never refused for their ratio (a small
# tensor of zeros compresses a thousandfold).
RATIO_FLOOR = 1 << 20


def parse_length(value: str, invalid: int) -> int:
    """A non-negative decimal header value; ``invalid`` for anything else (e.g. '²')."""
    if not value.isascii() or not value.isdigit() or len(value) > 18:
        return invalid
    return int(value)


class _Inflater:
    """Incremental gzip/deflate decoding with a size cap and an expansion-ratio cap."""

    def __init__(self, encoding: str, limit: int, max_ratio: float) -> None:
        wbits = 16 + zlib.MAX_WBITS if encoding == "gzip" else zlib.MAX_WBITS
        self._z = zlib.decompressobj(wbits)
        self._encoding = encoding
        self._limit = limit
        self._max_ratio = max_ratio
        self._parts: list[bytes] = []
        self._size = 0
        self._consumed = 0

    async def feed(self, data: bytes) -> None:
        pending = data
        full = False  # the last step filled its output: zlib may hold more without input
        while pending or full:
            if self._z.eof:
                if not pending:
                    return
                # Data after the end (say a second gzip member) would be dropped silently.
                raise InvalidArgument(
                    f"body is not valid {self._encoding}: data after the end of the stream"
                )
            step = min(INFLATE_STEP, self._limit - self._size + 1)
            try:
                out = self._z.decompress(pending, step)
            except zlib.error as exc:
                raise InvalidArgument(f"body is not valid {self._encoding}: {exc}") from None
            tail = self._z.unconsumed_tail or self._z.unused_data
            self._consumed += len(pending) - len(tail)
            pending = tail
            full = len(out) == step
            self._size += len(out)
            self._parts.append(out)
            self._check()
            if full:
                await asyncio.sleep(0)  # let other requests run between large steps

    def _check(self) -> None:
        if self._size > self._limit:
            raise PayloadTooLarge(f"decompressed body is over the {self._limit}-byte limit")
        if self._size > RATIO_FLOOR and self._size > self._max_ratio * self._consumed:
            raise PayloadTooLarge(
                f"decompressed body is over {self._max_ratio:g} times its compressed size "
                f"({self._consumed} bytes inflated to {self._size} so far)"
            )

    def finish(self) -> bytes:
        # Without the end of the stream its checksum was never verified.
        if not self._z.eof:
            raise InvalidArgument(f"body is not valid {self._encoding}: truncated stream")
        return b"".join(self._parts)


async def read_body(request: Request, limit: int, max_inflate_ratio: float) -> bytes:
    """The body, decoded, of at most ``limit`` bytes on the wire and after decoding.

    Refused before reading when Content-Length or Content-Encoding already rule it out.
    """
    declared = request.headers.get("content-length")
    if declared is not None and parse_length(declared, limit + 1) > limit:
        raise PayloadTooLarge(f"body of {declared} bytes is over the {limit}-byte limit")
    encoding = request.headers.get("content-encoding", "identity").lower()
    inflater = None
    if encoding in ("gzip", "deflate"):
        inflater = _Inflater(encoding, limit, max_inflate_ratio)
    elif encoding != "identity":
        raise InvalidArgument(f"unsupported Content-Encoding {encoding!r}")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"body is over the {limit}-byte limit")
        if inflater is not None:
            await inflater.feed(chunk)
        else:
            chunks.append(chunk)
    return inflater.finish() if inflater is not None else b"".join(chunks)


def parse_json(raw: bytes, max_containers: int) -> Any:
    """orjson's parse, refused first when the document has more than ``max_containers``
    arrays and objects (bracket characters inside strings count too: an upper bound)."""
    containers = raw.count(b"[") + raw.count(b"{")
    if containers > max_containers:
        raise PayloadTooLarge(
            f"JSON has {containers} arrays and objects, over the limit of {max_containers}; "
            "send tensor data flat, or as binary data (Inference-Header-Content-Length)"
        )
    enabled = gc.isenabled()
    gc.disable()
    try:
        return orjson.loads(raw)
    finally:
        if enabled:
            gc.enable()
