"""Raw HTTP/2 frame fuzzing of a gRPC port.

Each case opens one TCP connection and sends a seeded random script of frames:
well-formed gRPC calls (HEADERS + DATA) mixed with HEADERS, DATA, RST_STREAM,
WINDOW_UPDATE, GOAWAY, PING, SETTINGS, PRIORITY, CONTINUATION, PUSH_PROMISE and
unknown frames in random orders, on new, open, closed, even and reserved stream ids,
many streams at once, gRPC messages whose length prefix lies, and frames that are
truncated, oversized (past the 16 KiB default frame size, or a length field that lies)
or given random flags. Half of the cases send only well-formed frames instead: many
calls, reset, paused and closed on at random moments, which is what drives calls
through every step of a server's call lifetime. A case then ends in one of four ways:
it reads the server's answers until quiet, closes, resets the connection (RST), or
half-closes and reads.

Case ``i`` of seed ``s`` is built from ``random.Random(f"{s}:{i}")`` alone, so any
case can be replayed (``--first-case i --cases 1``); cases run concurrently on
``--workers`` connections, so the server-side interleaving is not replayed.

The connection preface and the header blocks come from the ``h2`` stack (h2's
connection for the preface and SETTINGS, its HPACK encoder, one per connection as the
server keeps one decoder per connection); the frames are written by hand, because h2
refuses to produce the malformed ones.

As a script: ``python -m tests.fuzz.h2_frames --target 127.0.0.1:8001 --cases 20000``
runs against a server that is already up and checks at the end (and every
``--probe-every`` cases) that it still answers a good ModelInfer call correctly.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import random
import socket
import struct
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grpc
import numpy as np
from gpugate_proto import grpc_service_pb2 as pb
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.errors import ErrorCodes
from h2.settings import SettingCodes
from hpack import Encoder

SERVICE = "/inference.GRPCInferenceService/"
AUTHORIZATION = ("authorization", "Bearer key-alice")  # tests.integration.router's tenant
DEFAULT_FRAME_SIZE = 16_384

# Frame types and flags (RFC 9113, section 6).
DATA, HEADERS, PRIORITY, RST_STREAM, SETTINGS, PUSH_PROMISE = 0, 1, 2, 3, 4, 5
PING, GOAWAY, WINDOW_UPDATE, CONTINUATION = 6, 7, 8, 9
END_STREAM, ACK, END_HEADERS, PADDED, PRIORITY_FLAG = 0x1, 0x1, 0x4, 0x8, 0x20

X1 = np.array([[1.0, 2.0, 3.0, 4.0]], dtype=np.float32)
K1 = np.array([[5]], dtype=np.int64)
GOOD_Y = [7.0, 9.0, 11.0, 13.0]  # affine version 2: 2 * x + k


def infer_request(model: str, rows: int = 1) -> pb.ModelInferRequest:
    """A well-formed affine-signature request (x FP32 [rows, 4], k INT64 [rows, 1])."""
    request = pb.ModelInferRequest(model_name=model)
    request.inputs.add(name="x", datatype="FP32", shape=[rows, 4])
    request.inputs.add(name="k", datatype="INT64", shape=[rows, 1])
    request.raw_input_contents.extend(
        [np.repeat(X1, rows, axis=0).tobytes(), np.repeat(K1, rows, axis=0).tobytes()]
    )
    return request


# Messages a call may carry: valid ones for each method, and ones that do not decode.
_MESSAGES: list[tuple[str, bytes]] = [
    ("ModelInfer", infer_request("affine").SerializeToString()),
    ("ModelInfer", infer_request("affine", rows=3).SerializeToString()),
    ("ModelInfer", infer_request("slow").SerializeToString()),
    ("ModelInfer", infer_request("broken").SerializeToString()),
    ("ModelInfer", infer_request("misfit", rows=6).SerializeToString()),
    ("ModelInfer", infer_request("nope").SerializeToString()),
    ("ModelInfer", b"\xff\xff\xff\xff"),
    ("ServerLive", b""),
    ("ServerReady", b""),
    ("ModelReady", pb.ModelReadyRequest(name="affine").SerializeToString()),
    ("ModelMetadata", pb.ModelMetadataRequest(name="affine").SerializeToString()),
    ("ModelMetadata", b"\x0a\x09affi"),
    ("ModelStatistics", pb.ModelStatisticsRequest(name="affine").SerializeToString()),
    ("RepositoryIndex", b""),
    ("ModelStreamInfer", b""),  # not served: UNIMPLEMENTED
]
_TIMEOUTS = ["1n", "1u", "1m", "5m", "100m", "1S", "99999999H", "0m", "", "m", "-1S", "12", "1x"]
_ERROR_CODES = [int(code) for code in ErrorCodes] + [0xFF, 0xFFFFFFFF]
_SETTING_IDS = [int(code) for code in SettingCodes] + [0, 0x7, 0xFF, 0xFFFF]


def frame(kind: int, flags: int, stream: int, payload: bytes, length: int | None = None) -> bytes:
    """One frame; ``length`` overrides the header's length field (a lying frame)."""
    size = len(payload) if length is None else length
    return (
        struct.pack(">I", size & 0xFFFFFF)[1:]
        + bytes([kind, flags])
        + struct.pack(">I", stream & 0xFFFFFFFF)
        + payload
    )


def grpc_message(body: bytes, declared: int | None = None, compressed: bool = False) -> bytes:
    """A gRPC length-prefixed message; ``declared`` lies about its length."""
    size = len(body) if declared is None else declared
    return bytes([1 if compressed else 0]) + struct.pack(">I", size & 0xFFFFFFFF) + body


@dataclass
class Script:
    """What one case sends: bytes, and pauses (floats, seconds) between them."""

    steps: list[bytes | float] = field(default_factory=list)
    ending: str = "read"
    quiet_s: float = 0.02  # a reading ending stops after this long without data
    frames: collections.Counter[str] = field(default_factory=collections.Counter)


class _Builder:
    def __init__(self, rng: random.Random, authority: str) -> None:
        self.rng = rng
        self.authority = authority
        self.strict = False  # well-formed frames only (a "calls" case)
        self.hpack = Encoder()
        self.next_stream = 1
        self.opened: list[int] = []
        self.script = Script()

    # -- pieces ---------------------------------------------------------------

    def stream_id(self, new: bool = False) -> int:
        rng = self.rng
        if new or not self.opened or rng.random() < 0.3:
            if self.strict or rng.random() < 0.9 or not self.opened:
                stream = self.next_stream
                self.next_stream += 2
                self.opened.append(stream)
                return stream
            # Connection-level, even (server-initiated), the largest, the reserved bit
            # set, and one below the newest (a stream id going backwards).
            return rng.choice([0, 2, 4, 0x7FFFFFFF, 0x80000001, max(max(self.opened) - 2, 0)])
        return rng.choice(self.opened)

    def headers(self, method: str | bytes) -> list[tuple[str, str | bytes]]:
        rng = self.rng
        block: list[tuple[str, str | bytes]] = [
            (":method", "POST"),
            (":scheme", "http"),
            (":path", method),
            (":authority", self.authority),
            ("content-type", "application/grpc"),
            ("te", "trailers"),
        ]
        if rng.random() < 0.9:
            block.append(AUTHORIZATION)
        if rng.random() < 0.5:
            block.append(("grpc-timeout", rng.choice(_TIMEOUTS)))
        if not self.strict and rng.random() < 0.15:  # break a rule of HTTP/2 or gRPC headers
            at = rng.randrange(len(block))
            match rng.randrange(6):
                case 0:
                    del block[at]
                case 1:
                    block.insert(rng.randrange(len(block) + 1), block[at])  # duplicate
                case 2:
                    block.append(("X-Upper-Case", "v"))
                case 3:
                    block.append((":unknown", "v"))
                case 4:
                    block.insert(0, ("grpc-encoding", rng.choice(["gzip", "snappy", "identity"])))
                case _:
                    block[at] = (block[at][0], "")
        if rng.random() < 0.2:
            block.append(("trace-bin", "AAEC"))
        if not self.strict and rng.random() < 0.05:
            block.append(("x-big", "v" * rng.choice([100, 8_000, 20_000])))
        return block

    def header_frames(self, stream: int, method: str | bytes, end_stream: bool) -> bytes:
        rng = self.rng
        headers = self.headers(method)
        # Huffman coding in pure Python costs milliseconds on the long values.
        huffman = rng.random() < 0.7 and sum(len(v) for _, v in headers) < 1000
        block = self.hpack.encode(headers, huffman=huffman)
        flags = END_STREAM if end_stream else 0
        prefix = b""
        if rng.random() < 0.1:
            # Depending on itself is a stream error; on stream 0 or an older one is not.
            dependencies = [0, 0x80000000] if self.strict else [0, stream, 1, 0x80000003]
            flags |= PRIORITY_FLAG
            prefix = struct.pack(">IB", rng.choice(dependencies), rng.randrange(256))
        # gRPC's core (1.51) ends the connection on a padded HEADERS frame.
        if not self.strict and rng.random() < 0.1:
            pad = rng.randrange(256)
            flags |= PADDED
            prefix = bytes([pad]) + prefix
            short = rng.random() < 0.2  # less padding than declared
            suffix = b"\0" * (rng.randrange(pad + 1) if short else pad)
        else:
            suffix = b""
        if rng.random() < 0.15 and len(block) > 1:  # split over CONTINUATION frames
            cut = rng.randrange(1, len(block))
            out = frame(HEADERS, flags, stream, prefix + block[:cut] + suffix)
            self.script.frames["CONTINUATION"] += 1
            if not self.strict and rng.random() < 0.1:  # a frame in between: connection error
                out += frame(PING, 0, 0, b"\0" * 8)
            return out + frame(CONTINUATION, END_HEADERS, stream, block[cut:])
        return frame(HEADERS, flags | END_HEADERS, stream, prefix + block + suffix)

    def message_payload(self, body: bytes) -> bytes:
        rng = self.rng
        roll = rng.random()
        if roll < (0.97 if self.strict else 0.8):
            return grpc_message(body)
        if roll < 0.85:
            return grpc_message(body, compressed=True)  # no grpc-encoding was agreed
        if roll < 0.9:
            return grpc_message(body, declared=len(body) + rng.randint(1, 64))  # short
        if roll < 0.93:
            return grpc_message(body, declared=0xFFFFFFFF)
        if roll < 0.96:
            return grpc_message(body, declared=max(len(body) - 1, 0))  # data after it
        return grpc_message(body) * 2  # two messages on a unary call

    def data_frames(self, stream: int, payload: bytes, end_stream: bool) -> bytes:
        rng = self.rng
        if rng.random() < 0.2 and len(payload) > 1:  # the message over several frames
            cut = rng.randrange(1, len(payload))
            self.script.frames["DATA"] += 1
            return frame(DATA, 0, stream, payload[:cut]) + frame(
                DATA, END_STREAM if end_stream else 0, stream, payload[cut:]
            )
        flags = END_STREAM if end_stream else 0
        if rng.random() < 0.1:
            pad = rng.randrange(256)
            return frame(DATA, flags | PADDED, stream, bytes([pad]) + payload + b"\0" * pad)
        return frame(DATA, flags, stream, payload)

    # -- actions ----------------------------------------------------------------

    def call(self, odd_name: bool = False) -> bytes:
        """A well-formed unary call, its DATA sometimes left open or reset after;
        ``odd_name``: its method name (``:path``) is not UTF-8, or not ASCII."""
        rng = self.rng
        method, body = rng.choice(_MESSAGES)
        stream = self.stream_id(new=True)
        path = SERVICE + method if rng.random() < 0.97 else "/other.Service/" + method
        name: str | bytes = path
        if odd_name or (not self.strict and rng.random() < 0.02):
            name = path.encode()[:-2] + rng.choice([b"\xff", b"\xc3\xa9", b"\x7f\x80"])
            self.script.frames["odd method name"] += 1
        out = self.header_frames(stream, name, end_stream=False)
        out += self.data_frames(stream, self.message_payload(body), rng.random() < 0.9)
        self.script.frames["HEADERS"] += 1
        self.script.frames["DATA"] += 1
        if rng.random() < 0.15:
            out += frame(RST_STREAM, 0, stream, struct.pack(">I", int(ErrorCodes.CANCEL)))
            self.script.frames["RST_STREAM"] += 1
        return out

    def burst(self, odd_name: bool = False) -> bytes:
        """Many streams at once; ``odd_name``: one of them with an odd method name."""
        size = self.rng.randint(10, 120)
        odd_at = self.rng.randrange(size) if odd_name else -1
        return b"".join(self.call(odd_name=i == odd_at) for i in range(size))

    def one_frame(self) -> tuple[str, bytes]:
        rng = self.rng
        kind = rng.choices(
            [
                "HEADERS",
                "DATA",
                "RST_STREAM",
                "WINDOW_UPDATE",
                "GOAWAY",
                "PING",
                "SETTINGS",
                "PRIORITY",
                "CONTINUATION",
                "PUSH_PROMISE",
                "UNKNOWN",
            ],
            weights=[4, 5, 4, 4, 1, 1, 2, 1, 1, 0.5, 0.5],
        )[0]
        stream = self.stream_id()
        if kind == "HEADERS":
            method = SERVICE + rng.choice(_MESSAGES)[0]
            return kind, self.header_frames(stream, method, end_stream=rng.random() < 0.3)
        if kind == "DATA":
            body = rng.choice(
                [
                    rng.choice(_MESSAGES)[1],
                    rng.randbytes(rng.randint(0, 64)),
                    b"",
                    b"\0" * rng.choice([DEFAULT_FRAME_SIZE - 5, DEFAULT_FRAME_SIZE, 70_000]),
                ]
            )
            payload = self.message_payload(body) if rng.random() < 0.7 else body
            return kind, self.data_frames(stream, payload, rng.random() < 0.5)
        if kind == "RST_STREAM":
            return kind, frame(RST_STREAM, 0, stream, struct.pack(">I", rng.choice(_ERROR_CODES)))
        if kind == "WINDOW_UPDATE":
            target = 0 if rng.random() < 0.4 else stream
            increment = rng.choice([0, 1, 1000, 65_535, 0x7FFFFFFF, 0xFFFFFFFF])
            return kind, frame(WINDOW_UPDATE, 0, target, struct.pack(">I", increment))
        if kind == "GOAWAY":
            last = rng.choice([0, stream, 0x7FFFFFFF])
            debug = rng.randbytes(rng.randint(0, 16))
            code = rng.choice(_ERROR_CODES)
            return kind, frame(GOAWAY, 0, 0, struct.pack(">II", last, code) + debug)
        if kind == "PING":
            return kind, frame(PING, rng.choice([0, ACK]), 0, rng.randbytes(8))
        if kind == "SETTINGS":
            if rng.random() < 0.3:
                return kind, frame(SETTINGS, ACK, 0, b"")
            values = [0, 1, 100, 16_384, 16_777_215, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF]
            payload = b"".join(
                struct.pack(">HI", rng.choice(_SETTING_IDS), rng.choice(values))
                for _ in range(rng.randint(0, 4))
            )
            return kind, frame(SETTINGS, 0, 0, payload)
        if kind == "PRIORITY":
            dependency = rng.choice([0, stream, stream | 0x80000000])
            return kind, frame(PRIORITY, 0, stream, struct.pack(">IB", dependency, 16))
        if kind == "CONTINUATION":
            block = self.hpack.encode([("x-more", "v")])
            return kind, frame(CONTINUATION, rng.choice([0, END_HEADERS]), stream, block)
        if kind == "PUSH_PROMISE":  # only servers may send it
            return kind, frame(PUSH_PROMISE, END_HEADERS, stream, struct.pack(">I", 2))
        return kind, frame(rng.randrange(10, 256), rng.randrange(256), stream, rng.randbytes(8))

    def damage(self, data: bytes) -> bytes:
        """Truncate a frame, make it oversized, or lie in its header."""
        rng = self.rng
        match rng.randrange(6):
            case 0:
                return data[: rng.randrange(len(data))]
            case 1:  # a length field past the default maximum frame size
                size = rng.choice([DEFAULT_FRAME_SIZE + 1, 0xFFFFFF, 1 << 20])
                return struct.pack(">I", size)[1:] + data[3:]
            case 2:  # a length field that lies by a little
                size = max(0, len(data) - 9 + rng.choice([-3, -1, 1, 7]))
                return struct.pack(">I", size)[1:] + data[3:]
            case 3:
                return data[:4] + bytes([rng.randrange(256)]) + data[5:]  # flags
            case 4:  # the stream id, reserved bit included
                return data[:5] + struct.pack(">I", rng.randrange(1 << 32)) + data[9:]
            case _:
                out = bytearray(data)
                for _ in range(rng.randint(1, 4)):
                    out[rng.randrange(len(out))] = rng.randrange(256)
                return bytes(out)

    def benign(self) -> tuple[str, bytes]:
        """A well-formed frame that leaves the connection up: it resets one of the
        case's calls, pauses, or adjusts flow control and settings."""
        rng = self.rng
        roll = rng.random()
        if roll < 0.45 and self.opened:
            code = rng.choice([int(ErrorCodes.CANCEL), int(ErrorCodes.NO_ERROR), 0xFF])
            stream = rng.choice(self.opened)
            return "RST_STREAM", frame(RST_STREAM, 0, stream, struct.pack(">I", code))
        if roll < 0.7:
            target = 0 if rng.random() < 0.5 or not self.opened else rng.choice(self.opened)
            increment = struct.pack(">I", rng.choice([1, 1000, 65_535, 1 << 20]))
            return "WINDOW_UPDATE", frame(WINDOW_UPDATE, 0, target, increment)
        if roll < 0.85:
            return "PING", frame(PING, 0, 0, rng.randbytes(8))
        if roll < 0.95:
            window = int(SettingCodes.INITIAL_WINDOW_SIZE)
            size = rng.choice([0, 1, 100, 65_535, 1 << 24])
            return "SETTINGS", frame(SETTINGS, 0, 0, struct.pack(">HI", window, size))
        # A call that never completes: HEADERS alone, or its message without END_STREAM.
        stream = self.stream_id(new=True)
        method, body = rng.choice(_MESSAGES)
        out = self.header_frames(stream, SERVICE + method, end_stream=False)
        if rng.random() < 0.5:
            out += self.data_frames(stream, grpc_message(body), end_stream=False)
        return "HEADERS", out

    def build_calls(self) -> None:
        """Many well-formed calls, reset, paused and closed on at random moments: what
        moves calls through the door's lifetime (taken, cancelled, finished, freed)."""
        rng = self.rng
        script = self.script
        self.strict = True
        steps = rng.randint(1, 30)
        # A door must refuse a call with an odd name alone, not the calls read with it.
        odd_at = rng.randrange(steps) if rng.random() < 0.04 else -1
        for step in range(steps):
            roll = rng.random()
            if step == odd_at:
                script.steps.append(self.burst(odd_name=True))
            elif roll < 0.45:
                script.steps.append(self.call())
            elif roll < 0.52:
                script.steps.append(self.burst())
            elif roll < 0.65:
                script.steps.append(rng.choice([0.0, 0.001, 0.003, 0.01, 0.02]))
            else:
                kind, data = self.benign()
                script.frames[kind] += 1
                script.steps.append(data)
        script.ending = rng.choices(["read", "close", "reset", "half-close"], [3, 2, 3, 2])[0]
        script.quiet_s = 0.05  # long enough for answers to come back from the service

    def build(self) -> Script:
        rng = self.rng
        script = self.script
        connection = H2Connection(H2Configuration(client_side=True))
        connection.initiate_connection()
        start = connection.data_to_send()
        if rng.random() < 0.5:
            script.steps.append(start)
            self.build_calls()
            return script
        if rng.random() < 0.03:  # a broken preface
            start = self.damage(start)
        script.steps.append(start)
        for _ in range(rng.randint(1, 24)):
            roll = rng.random()
            if roll < 0.3:
                data = self.call()
            elif roll < 0.34:
                data = self.burst()
            elif roll < 0.4:
                script.steps.append(rng.choice([0.0, 0.001, 0.003]))
                continue
            else:
                kind, data = self.one_frame()
                script.frames[kind] += 1
            if rng.random() < 0.08:
                script.frames["damaged"] += 1
                data = self.damage(data)
                if rng.random() < 0.5:  # a truncated frame often ends the connection
                    script.steps.append(data)
                    break
            script.steps.append(data)
        script.ending = rng.choices(["read", "close", "reset", "half-close"], [4, 2, 2, 2])[0]
        return script


def build_case(seed: int, index: int, authority: str) -> Script:
    """Case ``index`` of ``seed``: the same bytes every time."""
    return _Builder(random.Random(f"{seed}:{index}"), authority).build()


def _read_until_quiet(sock: socket.socket, quiet_s: float, limit_s: float = 1.0) -> int:
    received = 0
    deadline = time.monotonic() + limit_s
    sock.settimeout(quiet_s)
    while time.monotonic() < deadline:
        try:
            chunk = sock.recv(65_536)
        except TimeoutError:
            break
        if not chunk:
            break
        received += len(chunk)
    return received


def _connect(host: str, port: int, patience_s: float = 5.0) -> socket.socket:
    # A refused connection is retried for a while: a door that restarts its server
    # (grpcio's, on some requests) is closed for up to a second.
    deadline = time.monotonic() + patience_s
    while True:
        try:
            return socket.create_connection((host, port), timeout=5)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


def run_case(host: str, port: int, script: Script) -> str:
    """Send one case; returns how it ended (``closed by server`` when the server closed
    the connection first)."""
    with _connect(host, port) as sock:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            for step in script.steps:
                if isinstance(step, float):
                    time.sleep(step)
                else:
                    sock.sendall(step)
            if script.ending == "read":
                _read_until_quiet(sock, script.quiet_s)
            elif script.ending == "half-close":
                sock.shutdown(socket.SHUT_WR)
                _read_until_quiet(sock, script.quiet_s)
            elif script.ending == "reset":
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        except TimeoutError:  # the server stopped reading without closing
            return "send stalled"
        except OSError:  # reset, broken pipe, or not connected any more
            return "closed by server"
        return script.ending


@dataclass
class Stats:
    cases: int = 0
    seed: int = 0
    seconds: float = 0.0
    bytes_sent: int = 0
    probes: int = 0
    frames: collections.Counter[str] = field(default_factory=collections.Counter)
    endings: collections.Counter[str] = field(default_factory=collections.Counter)

    def summary(self) -> str:
        frames = ", ".join(f"{k} {v}" for k, v in sorted(self.frames.items()))
        endings = ", ".join(f"{k} {v}" for k, v in sorted(self.endings.items()))
        return (
            f"{self.cases} cases, seed {self.seed}, {self.seconds:.1f} s, "
            f"{self.bytes_sent / 1e6:.1f} MB sent, {self.probes} good-call probes passed\n"
            f"  frames: {frames}\n  endings: {endings}"
        )


def run(
    host: str,
    port: int,
    *,
    seed: int,
    cases: int,
    first_case: int = 0,
    workers: int = 4,
    probe: Callable[[], None] | None = None,
    probe_every: int = 1000,
    progress: Callable[[Stats], None] | None = None,
) -> Stats:
    """Run cases ``first_case`` .. ``first_case + cases - 1`` on ``workers`` connections
    at a time; ``probe`` (a good call that raises when it fails) runs every
    ``probe_every`` cases and once at the end. Raises what a probe or a case raises."""
    stats = Stats(seed=seed)
    lock = threading.Lock()
    authority = f"{host}:{port}"
    started = time.monotonic()

    def one(index: int) -> None:
        script = build_case(seed, index, authority)
        ending = run_case(host, port, script)
        with lock:
            stats.cases += 1
            stats.bytes_sent += sum(len(s) for s in script.steps if isinstance(s, bytes))
            stats.frames.update(script.frames)
            stats.endings[ending] += 1

    indexes = range(first_case, first_case + cases)
    with concurrent.futures.ThreadPoolExecutor(workers) as pool:
        for at in range(0, cases, probe_every):
            list(pool.map(one, indexes[at : at + probe_every]))
            if probe is not None:
                probe()
                stats.probes += 1
            stats.seconds = time.monotonic() - started
            if progress is not None:
                progress(stats)
    stats.seconds = time.monotonic() - started
    return stats


def probe_good_call(target: str) -> Callable[[], None]:
    """A good ModelInfer on a fresh channel; raises unless its answer is exact."""

    def probe() -> None:
        with grpc.insecure_channel(target) as channel:
            infer = channel.unary_unary(
                SERVICE + "ModelInfer",
                request_serializer=pb.ModelInferRequest.SerializeToString,
                response_deserializer=pb.ModelInferResponse.FromString,
            )
            # Waiting for the channel to connect lets a door that restarts come back.
            response = infer(
                infer_request("affine"), metadata=(AUTHORIZATION,), timeout=30, wait_for_ready=True
            )
        y = np.frombuffer(response.raw_output_contents[0], dtype=np.float32)
        if y.tolist() != GOOD_Y:
            raise AssertionError(f"a good call got y = {y.tolist()}, not {GOOD_Y}")

    return probe


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--target", required=True, help="host:port of the gRPC server")
    parser.add_argument("--cases", type=int, default=20_000)
    parser.add_argument("--seed", type=int, default=20261206)
    parser.add_argument("--first-case", type=int, default=0)
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--probe-every", type=int, default=1000)
    args = parser.parse_args(argv)
    host, _, port = args.target.rpartition(":")
    stats = run(
        host,
        int(port),
        seed=args.seed,
        cases=args.cases,
        first_case=args.first_case,
        workers=args.workers,
        probe=probe_good_call(args.target),
        probe_every=args.probe_every,
        progress=lambda s: print(f"  {s.cases} cases, {s.seconds:.0f} s", file=sys.stderr),
    )
    print(stats.summary())
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
