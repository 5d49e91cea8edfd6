"""The data plane while Serve scales a version, over real loopback sockets: a replica
counts the rows it holds, a stopping one refuses new batches and the gateway sends
them elsewhere, and replicas added later are found."""

from __future__ import annotations

import asyncio
import random
import threading

import numpy as np
import pytest

from scheduler import BatchResult, Tensors
from serving.dataplane.auth import ClusterSecret
from serving.dataplane.client import DirectBatchBackend
from serving.dataplane.codec import (
    ReplicaStoppingError,
    decode_result,
    encode_batch,
    frame,
    read_frame,
)
from serving.dataplane.load import RowsInFlight
from serving.dataplane.server import ReplicaDataServer
from tests.unit.serving.dataplane.test_server_order import TaggedGates, _batch, _connect

SECRET = ClusterSecret(b"s" * 32)


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_rows_in_flight_are_averaged_over_time_between_reads() -> None:
    clock = FakeClock()
    load = RowsInFlight(clock)
    load.add(8)
    clock.now += 1.0
    load.add(24)  # 8 rows for 1 s, then 32 rows for 3 s
    clock.now += 3.0
    assert load.mean() == (8 * 1 + 32 * 3) / 4
    load.add(-32)
    clock.now += 2.0  # 0 for 2 s (the read restarted the window)
    assert load.rows == 0
    assert load.mean() == 0.0
    assert load.mean() == 0.0  # no time passed: the value now


def test_the_replica_counts_the_rows_it_has_received_and_not_answered() -> None:
    model = TaggedGates(gated=(1.0,))
    server = ReplicaDataServer(model, SECRET)
    address = server.start("127.0.0.1")

    async def main() -> None:
        conns = await _connect(address, 2)
        conns[0][1].write(frame(encode_batch(_batch(1.0, rows=3))))  # held: running
        assert await asyncio.to_thread(model.started[1.0].wait, 5)
        # Forwards run on the loop that reads: a batch sent now is read (and counted)
        # once the running one ends.
        conns[1][1].write(frame(encode_batch(_batch(2.0, rows=5))))
        await asyncio.sleep(0.1)
        assert server.load.rows == 3
        model.gates[1.0].set()
        for reader, writer in conns:
            decode_result(await asyncio.wait_for(read_frame(reader), 5))
            writer.close()

    try:
        asyncio.run(main())
        assert server.load.rows == 0
        assert server.load.mean() > 0
    finally:
        model.gates[1.0].set()
        server.stop(grace_s=2)


class Model:
    """y = x + 1; a batch tagged 1.0 (x[0, 0]) also answers 16 MB, which stays in the
    replica's send buffer while its caller does not read it: the replica's stop then
    waits for it (up to its grace), and meanwhile takes no new batch."""

    def __init__(self) -> None:
        self.order: list[float] = []

    def __call__(self, inputs: Tensors) -> BatchResult:
        tag = float(inputs["x"][0, 0])
        self.order.append(tag)
        outputs = {"y": inputs["x"] + 1}
        if tag == 1.0:
            outputs["big"] = np.ones((4, 1_000_000), np.float32)
        return BatchResult(outputs, device_ns=7, device="cpu", device_share=1)


async def _stop_with_an_answer_unsent(
    server: ReplicaDataServer, model: Model, address: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, asyncio.Future[None]]:
    """Start ``server.stop`` while a 16 MB answer waits in its send buffer; returns that
    answer's connection (read it to let the stop finish) and the stop."""
    [(reader, writer)] = await _connect(address, 1)
    writer.write(frame(encode_batch(_batch(1.0))))
    for _ in range(500):
        if 1.0 in model.order:
            break
        await asyncio.sleep(0.01)
    stop = asyncio.ensure_future(asyncio.to_thread(server.stop, 5.0))
    for _ in range(500):
        if server._stopping:
            break
        await asyncio.sleep(0.01)
    assert server._stopping
    return reader, writer, stop


def test_a_stopping_replica_answers_new_batches_with_a_refusal() -> None:
    model = Model()
    server = ReplicaDataServer(model, SECRET)
    address = server.start("127.0.0.1")

    async def main() -> None:
        [(reader, writer)] = await _connect(address, 1)  # a gateway's pooled connection
        held_reader, held_writer, stop = await _stop_with_an_answer_unsent(server, model, address)
        writer.write(frame(encode_batch(_batch(2.0))))
        refusal = await asyncio.wait_for(read_frame(reader), 5)
        with pytest.raises(ReplicaStoppingError):
            decode_result(refusal)
        # What it had received still answers, whole.
        result = decode_result(await asyncio.wait_for(read_frame(held_reader), 10))
        assert result.outputs["big"].shape == (4, 1_000_000)
        await stop
        for w in (writer, held_writer):
            w.close()

    try:
        asyncio.run(main())
        assert model.order == [1.0]  # the refused batch never ran
    finally:
        server.stop(grace_s=1)


def test_the_gateway_sends_a_refused_batch_to_another_replica() -> None:
    stopping_model, other = Model(), Model()
    stopping = ReplicaDataServer(stopping_model, SECRET)
    survivor = ReplicaDataServer(other, SECRET)
    a, b = stopping.start("127.0.0.1"), survivor.start("127.0.0.1")
    serving = [a]  # what Serve routes discovery calls to

    async def discover() -> str:
        return random.choice(serving)

    async def main() -> None:
        backend = DirectBatchBackend(discover, SECRET)
        await asyncio.gather(*(backend.run_batch(_batch(5.0)) for _ in range(2)))
        assert backend.addresses == [a]  # it knows only the replica about to stop
        # Serve stops it (scale-down) and routes discovery to the other one only.
        held_reader, held_writer, stop = await _stop_with_an_answer_unsent(
            stopping, stopping_model, a
        )
        serving[:] = [b]
        # Sent on a pooled connection: refused unrun, then run on the survivor.
        moved = await backend.run_batch(_batch(2.0))
        np.testing.assert_array_equal(moved.outputs["y"], _batch(2.0)["x"] + 1)
        assert 2.0 in other.order and 2.0 not in stopping_model.order
        assert backend.addresses == [b]
        await asyncio.wait_for(read_frame(held_reader), 10)
        await stop  # its connections are closed now
        held_writer.close()
        results = await asyncio.gather(*(backend.run_batch(_batch(3.0)) for _ in range(8)))
        assert len(results) == 8
        assert backend.answered == {b: 9}
        await backend.close()

    try:
        asyncio.run(main())
    finally:
        stopping.stop(grace_s=1)
        survivor.stop(grace_s=1)


def test_replicas_added_later_are_found_and_get_batches() -> None:
    models = [TaggedGates(gated=()) for _ in range(3)]
    servers = [ReplicaDataServer(m, SECRET) for m in models]
    addresses = [s.start("127.0.0.1") for s in servers]
    serving = addresses[:1]
    lock = threading.Lock()

    async def discover() -> str:
        with lock:
            return random.choice(serving)

    async def main() -> dict[str, int]:
        backend = DirectBatchBackend(discover, SECRET, expected_replicas=3)
        loop = asyncio.get_running_loop()
        for _ in range(20):  # only one replica for a while: discovery backs off
            await backend.run_batch(_batch(1.0))
            await asyncio.sleep(0.05)
        assert backend.addresses == addresses[:1]
        with lock:
            serving[:] = addresses  # Serve added two
        until = loop.time() + 6
        while len(backend.addresses) < 3 and loop.time() < until:
            await asyncio.gather(*(backend.run_batch(_batch(2.0)) for _ in range(4)))
            await asyncio.sleep(0.02)
        await asyncio.gather(*(backend.run_batch(_batch(3.0)) for _ in range(12)))
        answered = backend.answered
        await backend.close()
        return answered

    try:
        answered = asyncio.run(main())
    finally:
        for s in servers:
            s.stop(grace_s=1)
    assert set(answered) == set(addresses)
    assert all(n > 0 for n in answered.values()), answered
