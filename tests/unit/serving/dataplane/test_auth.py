"""The data plane's handshake over real sockets: a replica runs batches only for a
gateway that proves the cluster secret, and a gateway sends batches only to a replica
that proves it back."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pickle
import socket
import stat
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from scheduler import BackendUnavailableError, BatchResult, Tensors
from serving.dataplane import server as dataplane_server
from serving.dataplane.auth import (
    ANSWER_SIZE,
    HELLO_SIZE,
    MAGIC,
    NONCE,
    PROOF_SIZE,
    ClusterSecret,
    HandshakeError,
    ensure_secret_file,
    read_secret_file,
)
from serving.dataplane.client import DirectBatchBackend, open_connection
from serving.dataplane.codec import decode_result, encode_batch, frame, read_frame
from serving.dataplane.server import ReplicaDataServer

SECRET = ClusterSecret(b"k" * 32)
OTHER = ClusterSecret(b"x" * 32)
BATCH: Tensors = {"x": np.ones((2, 3), np.float32)}


class Model:
    """y = x + 1; while ``hold`` is cleared, a forward waits for it."""

    def __init__(self) -> None:
        self.hold = threading.Event()
        self.hold.set()
        self.running = threading.Event()

    def __call__(self, inputs: Tensors) -> BatchResult:
        self.running.set()
        assert self.hold.wait(10)
        return BatchResult({"y": inputs["x"] + 1}, device_ns=5, device="cpu", device_share=1)


@contextlib.contextmanager
def serving(**options: float) -> Iterator[tuple[ReplicaDataServer, Model]]:
    model = Model()
    server = ReplicaDataServer(model, SECRET, **options)  # type: ignore[arg-type]
    server.start("127.0.0.1")
    try:
        yield server, model
    finally:
        model.hold.set()
        server.stop(grace_s=1)


def _raw(address: str) -> socket.socket:
    host, _, port = address.rpartition(":")
    sock = socket.create_connection((host, int(port)), timeout=5)
    return sock


def _read_exactly(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def _closed_by_peer(sock: socket.socket, within_s: float = 5.0) -> bool:
    """True once the replica closed (or reset) the connection."""
    sock.settimeout(within_s)
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


def _answer(secret: ClusterSecret, address: str, hello: bytes) -> bytes:
    assert hello[: len(MAGIC)] == MAGIC and len(hello) == HELLO_SIZE
    mine = os.urandom(NONCE)
    return mine + secret.gateway_proof(address, hello[len(MAGIC) :], mine)


def _settle(server: ReplicaDataServer, refused: int) -> None:
    deadline = time.monotonic() + 5
    while server.refused < refused and time.monotonic() < deadline:
        time.sleep(0.01)


def test_the_gateway_with_the_secret_runs_batches_and_reuses_its_connection() -> None:
    with serving() as (server, _):

        async def discover() -> str:
            return server.address

        async def main() -> list[BatchResult]:
            backend = DirectBatchBackend(discover, SECRET)
            results = [await backend.run_batch(BATCH) for _ in range(3)]
            await backend.close()
            return results

        results = asyncio.run(main())
        for result in results:
            np.testing.assert_array_equal(result.outputs["y"], BATCH["x"] + 1)
        assert server.batches == 3
        assert server.admitted == 1 and server.refused == 0  # one handshake, then reuse


def test_a_batch_sent_without_the_handshake_never_runs() -> None:
    with serving() as (server, _):
        sock = _raw(server.address)
        assert _read_exactly(sock, HELLO_SIZE)[: len(MAGIC)] == MAGIC
        sock.sendall(frame(encode_batch(BATCH)))  # straight to business, as before
        assert _closed_by_peer(sock)
        sock.close()
        _settle(server, 1)
        assert server.batches == 0 and server.refused == 1 and server.admitted == 0


def test_garbage_and_a_wrong_secret_are_refused_before_any_batch() -> None:
    with serving() as (server, _):
        garbage = _raw(server.address)
        garbage.sendall(os.urandom(ANSWER_SIZE))
        assert _closed_by_peer(garbage)
        garbage.close()

        wrong = _raw(server.address)
        hello = _read_exactly(wrong, HELLO_SIZE)
        wrong.sendall(_answer(OTHER, server.address, hello) + frame(encode_batch(BATCH)))
        assert _closed_by_peer(wrong)
        wrong.close()

        async def with_wrong_secret() -> None:
            await open_connection(server.address, OTHER)

        with pytest.raises(HandshakeError, match="same cluster secret"):
            asyncio.run(with_wrong_secret())
        _settle(server, 3)
        assert server.batches == 0 and server.refused == 3 and server.admitted == 0


def test_a_proof_made_for_another_replica_is_refused() -> None:
    with serving() as (first, _), serving() as (second, _):
        sock = _raw(second.address)
        hello = _read_exactly(sock, HELLO_SIZE)
        # Right secret, right nonces, but bound to the other replica's address.
        sock.sendall(_answer(SECRET, first.address, hello))
        assert _closed_by_peer(sock)
        sock.close()
        _settle(second, 1)
        assert second.refused == 1 and second.admitted == 0


def test_a_slow_handshake_is_closed_at_the_deadline() -> None:
    with serving(handshake_timeout_s=0.3) as (server, _):
        sock = _raw(server.address)
        hello = _read_exactly(sock, HELLO_SIZE)
        answer = _answer(SECRET, server.address, hello)
        started = time.monotonic()
        sock.sendall(answer[:10])  # a trickle that never completes
        assert _closed_by_peer(sock, within_s=5)
        held = time.monotonic() - started
        sock.close()
        _settle(server, 1)
        assert 0.2 < held < 2.0, held
        assert server.refused == 1 and server.batches == 0

        silent = _raw(server.address)  # connects and says nothing at all
        assert _closed_by_peer(silent, within_s=5)
        silent.close()
        _settle(server, 2)
        assert server.refused == 2


def test_handshakes_in_progress_are_capped_and_the_gateway_gets_in_after_them() -> None:
    with serving(handshake_timeout_s=0.5, max_handshakes=2) as (server, _):
        squatters = [_raw(server.address) for _ in range(2)]
        for sock in squatters:
            assert len(_read_exactly(sock, HELLO_SIZE)) == HELLO_SIZE
        third = _raw(server.address)
        assert _closed_by_peer(third, within_s=0.3)  # at once, not at the deadline
        third.close()
        for sock in squatters:
            assert _closed_by_peer(sock)
            sock.close()

        async def main() -> BatchResult:
            reader, writer = await open_connection(server.address, SECRET)
            writer.write(frame(encode_batch(BATCH)))
            result = decode_result(await asyncio.wait_for(read_frame(reader), 5))
            writer.close()
            return result

        np.testing.assert_array_equal(asyncio.run(main()).outputs["y"], BATCH["x"] + 1)
        assert server.refused == 3 and server.admitted == 1 and server.batches == 1


@pytest.mark.parametrize("loop", ["default", "asyncio"])
def test_an_answer_sent_in_time_counts_though_a_forward_held_the_loop_past_the_deadline(
    loop: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The deadline must not refuse an answer that reached the socket in time while a
    # forward ran inline on the replica's loop (both loops read before running timers).
    if loop == "asyncio":
        monkeypatch.setattr(dataplane_server, "_new_loop", asyncio.new_event_loop)
    with serving(handshake_timeout_s=0.3) as (server, model):

        async def main() -> tuple[bytes, BatchResult]:
            busy_reader, busy_writer = await open_connection(server.address, SECRET)
            late = await asyncio.to_thread(_raw, server.address)
            hello = await asyncio.to_thread(_read_exactly, late, HELLO_SIZE)
            model.hold.clear()
            model.running.clear()
            busy_writer.write(frame(encode_batch(BATCH)))
            assert await asyncio.to_thread(model.running.wait, 5)  # the loop is held
            late.sendall(_answer(SECRET, server.address, hello))
            await asyncio.sleep(0.8)  # well past the deadline, the forward still running
            model.hold.set()
            result = decode_result(await asyncio.wait_for(read_frame(busy_reader), 5))
            late.settimeout(5)
            proof = await asyncio.to_thread(_read_exactly, late, PROOF_SIZE)
            late.close()
            busy_writer.close()
            return proof, result

        proof, result = asyncio.run(main())
        np.testing.assert_array_equal(result.outputs["y"], BATCH["x"] + 1)
        assert len(proof) == PROOF_SIZE
        assert server.refused == 0 and server.admitted == 2


def test_the_gateway_sends_nothing_to_a_port_that_cannot_prove_the_secret() -> None:
    """A stand-in on a replica's old address (say, after it died) gets the gateway's
    handshake answer and nothing more: no tenant's batch."""
    received = bytearray()

    async def main() -> None:
        async def impostor(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(MAGIC + os.urandom(NONCE))
            received.extend(await reader.readexactly(ANSWER_SIZE))
            writer.write(os.urandom(PROOF_SIZE))  # it cannot compute the real proof
            with contextlib.suppress(Exception):
                received.extend(await asyncio.wait_for(reader.read(65536), 1))
            writer.close()

        server = await asyncio.start_server(impostor, "127.0.0.1", 0)
        address = f"127.0.0.1:{server.sockets[0].getsockname()[1]}"

        async def discover() -> str:
            return address

        backend = DirectBatchBackend(discover, SECRET)
        with pytest.raises(BackendUnavailableError):
            await backend.run_batch(BATCH)
        await backend.close()
        server.close()
        await server.wait_closed()

    asyncio.run(main())
    assert len(received) == ANSWER_SIZE  # the handshake answer only, no frame


def test_the_secret_file_is_made_private_and_a_readable_one_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "state" / "cluster.secret"
    made = ensure_secret_file(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert len(path.read_text().strip()) == 64
    again = ensure_secret_file(path)  # the same secret on the next start
    assert made.gateway_proof("a:1", b"n", b"m") == again.gateway_proof("a:1", b"n", b"m")
    path.chmod(0o644)
    with pytest.raises(ValueError, match="readable by others"):
        read_secret_file(path)
    short = tmp_path / "short"
    short.write_text("too short")
    short.chmod(0o600)
    with pytest.raises(ValueError, match="at least 32 bytes"):
        read_secret_file(short)


def test_the_secret_never_shows_in_a_repr_and_survives_pickling() -> None:
    secret = ClusterSecret(b"0123456789abcdef0123456789abcdef-secret")
    assert "secret" not in repr(secret).replace("ClusterSecret", "")
    assert "0123" not in repr(secret) and "0123" not in str(secret)
    copy = pickle.loads(pickle.dumps(secret))
    assert copy.replica_proof("a:1", b"n", b"m") == secret.replica_proof("a:1", b"n", b"m")
