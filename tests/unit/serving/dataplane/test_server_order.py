"""The replica's data server over real sockets: one batch at a time, a lane batch goes
before the ordinary ones waiting (never before the one running), and batches from
several gateways share the replica by their tenants' weights."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Iterator

import numpy as np
import pytest

from scheduler import BatchResult, Share, Tensors
from serving.dataplane import server as dataplane_server
from serving.dataplane.auth import ClusterSecret
from serving.dataplane.client import DirectBatchBackend, open_connection
from serving.dataplane.codec import ReplicaError, decode_result, encode_batch, frame, read_frame
from serving.dataplane.server import ReplicaDataServer

SECRET = ClusterSecret(b"s" * 32)


class TaggedGates:
    """y = x + 1; a batch whose tag (x[0, 0]) has a gate waits for it (a long forward
    running); ``big`` adds a 16 MB output. Records the order batches ran in and how
    many ran at once."""

    def __init__(self, gated: tuple[float, ...], big: bool = False) -> None:
        self.gates = {tag: threading.Event() for tag in gated}
        self.started = {tag: threading.Event() for tag in gated}
        self.order: list[float] = []
        self.big = big
        self.concurrent = 0
        self.max_concurrent = 0
        self._lock = threading.Lock()

    def __call__(self, inputs: Tensors) -> BatchResult:
        with self._lock:
            self.concurrent += 1
            self.max_concurrent = max(self.max_concurrent, self.concurrent)
        try:
            tag = float(inputs["x"][0, 0])
            self.order.append(tag)
            if tag in self.gates:
                self.started[tag].set()
                assert self.gates[tag].wait(10)
            outputs = {"y": inputs["x"] + 1}
            if self.big:
                outputs["big"] = np.ones((4, 1_000_000), np.float32)
            return BatchResult(outputs, device_ns=7, device="cpu", device_share=1)
        finally:
            with self._lock:
                self.concurrent -= 1


@contextlib.contextmanager
def _serving(model: TaggedGates) -> Iterator[tuple[ReplicaDataServer, str]]:
    server = ReplicaDataServer(model, SECRET)
    address = server.start("127.0.0.1")
    try:
        yield server, address
    finally:
        for gate in model.gates.values():
            gate.set()
        server.stop(grace_s=2)


@pytest.fixture()
def served() -> Iterator[tuple[TaggedGates, str]]:
    """A server whose batch tagged 1.0 holds the forward until released."""
    model = TaggedGates(gated=(1.0,))
    with _serving(model) as (_, address):
        yield model, address


def _batch(tag: float, rows: int = 2) -> Tensors:
    return {"x": np.full((rows, 3), tag, np.float32)}


async def _connect(address: str, n: int) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    return [await open_connection(address, SECRET) for _ in range(n)]


async def _send_all(
    address: str, batches: list[tuple[float, bool]], model: TaggedGates
) -> dict[float, BatchResult]:
    conns = await _connect(address, len(batches))
    first_tag, first_urgent = batches[0]
    conns[0][1].write(frame(encode_batch(_batch(first_tag), first_urgent)))
    assert await asyncio.to_thread(model.started[first_tag].wait, 5)  # it is running
    for (tag, urgent), (_, writer) in zip(batches[1:], conns[1:], strict=True):
        writer.write(frame(encode_batch(_batch(tag), urgent)))
        await writer.drain()
        await asyncio.sleep(0.05)  # arrival order = list order
    model.gates[first_tag].set()
    answers: dict[float, BatchResult] = {}
    for (tag, _), (reader, writer) in zip(batches, conns, strict=True):
        answers[tag] = decode_result(await asyncio.wait_for(read_frame(reader), 5))
        writer.close()
    return answers


def test_a_lane_batch_runs_before_ordinary_ones_that_arrived_first(
    served: tuple[TaggedGates, str],
) -> None:
    model, address = served
    batches = [(1.0, False), (2.0, False), (3.0, False), (4.0, True), (5.0, False)]
    answers = asyncio.run(_send_all(address, batches, model))
    assert model.order == [1.0, 4.0, 2.0, 3.0, 5.0]
    assert model.max_concurrent == 1  # one forward at a time, billed once
    for tag, _ in batches:  # each connection got its own batch's answer
        np.testing.assert_array_equal(answers[tag].outputs["y"], _batch(tag)["x"] + 1)
        assert answers[tag].device_ns == 7


def test_ordinary_batches_run_in_arrival_order(served: tuple[TaggedGates, str]) -> None:
    model, address = served
    asyncio.run(_send_all(address, [(1.0, False), (2.0, False), (3.0, False)], model))
    assert model.order == [1.0, 2.0, 3.0]


def test_frames_split_across_writes_and_an_undecodable_one_leave_the_server_serving(
    served: tuple[TaggedGates, str],
) -> None:
    _, address = served  # nothing here is tagged 1.0: no forward is held

    async def main() -> None:
        reader, writer = await open_connection(address, SECRET)
        data = frame(encode_batch(_batch(9.0, rows=300)))
        for i in range(0, len(data), 777):  # dribbled in small pieces
            writer.write(data[i : i + 777])
            await writer.drain()
            await asyncio.sleep(0.001)
        result = decode_result(await asyncio.wait_for(read_frame(reader), 5))
        np.testing.assert_array_equal(result.outputs["y"], _batch(9.0, rows=300)["x"] + 1)
        writer.write(frame(b"\xff\xff not a protobuf"))
        with pytest.raises(ReplicaError, match="DecodeError"):
            decode_result(await asyncio.wait_for(read_frame(reader), 5))
        writer.close()

        async def discover() -> str:
            return address

        backend = DirectBatchBackend(discover, SECRET)
        again = await backend.run_batch(_batch(3.0), urgent=True)
        np.testing.assert_array_equal(again.outputs["y"], _batch(3.0)["x"] + 1)
        await backend.close()

    asyncio.run(main())


@pytest.mark.parametrize("loop", ["default", "asyncio"])
def test_a_lane_batch_that_arrives_during_a_forward_beats_one_already_waiting(
    loop: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # B1 runs while B2 already waits in the queue; the lane batch L arrives during B1.
    # The pick after B1 must see L, though it was read only after B1 ended. "default"
    # is uvloop when installed; on asyncio's own loop the reads of a poll run after a
    # handle queued before it, which is what the pick's second hop is for.
    if loop == "asyncio":
        monkeypatch.setattr(dataplane_server, "_new_loop", asyncio.new_event_loop)
    model = TaggedGates(gated=(0.0, 1.0))

    async def main(address: str) -> None:
        conns = await _connect(address, 4)
        conns[0][1].write(frame(encode_batch(_batch(0.0))))
        assert await asyncio.to_thread(model.started[0.0].wait, 5)
        conns[1][1].write(frame(encode_batch(_batch(1.0))))
        conns[2][1].write(frame(encode_batch(_batch(2.0))))
        await asyncio.sleep(0.1)
        model.gates[0.0].set()  # B1 and B2 are read together; B1 runs, B2 waits
        assert await asyncio.to_thread(model.started[1.0].wait, 5)
        conns[3][1].write(frame(encode_batch(_batch(3.0), urgent=True)))
        await asyncio.sleep(0.1)
        model.gates[1.0].set()
        for tag, (reader, writer) in zip((0.0, 1.0, 2.0, 3.0), conns, strict=True):
            result = decode_result(await asyncio.wait_for(read_frame(reader), 5))
            np.testing.assert_array_equal(result.outputs["y"], _batch(tag)["x"] + 1)
            writer.close()

    with _serving(model) as (_, address):
        asyncio.run(main(address))
    assert model.order == [0.0, 1.0, 3.0, 2.0]


def test_stop_lets_a_running_batch_send_its_whole_answer() -> None:
    model = TaggedGates(gated=(0.0,), big=True)

    async def main(server: ReplicaDataServer, address: str) -> BatchResult:
        [(reader, writer)] = await _connect(address, 1)
        writer.write(frame(encode_batch(_batch(0.0))))
        assert await asyncio.to_thread(model.started[0.0].wait, 5)
        stopping = asyncio.ensure_future(asyncio.to_thread(server.stop, 5.0))
        await asyncio.sleep(0.1)  # stop() is waiting for the running batch
        model.gates[0.0].set()
        result = decode_result(await asyncio.wait_for(read_frame(reader), 10))
        await stopping
        writer.close()
        return result

    with _serving(model) as (server, address):
        result = asyncio.run(main(server, address))
    assert result.outputs["big"].shape == (4, 1_000_000)
    assert float(result.outputs["big"].sum()) == 4_000_000.0


def test_the_backend_reports_how_long_a_batch_waited_behind_the_one_ahead(
    served: tuple[TaggedGates, str],
) -> None:
    """Statistics count a batch's wait at the replica as queueing: the second batch sent
    while the first holds the forward waits until the first's answer; the first, sent
    to an idle replica, waits for nothing."""
    model, address = served

    async def discover() -> str:
        return address

    async def main() -> tuple[BatchResult, BatchResult, BatchResult]:
        backend = DirectBatchBackend(discover, SECRET)
        first = asyncio.ensure_future(backend.run_batch(_batch(1.0)))
        assert await asyncio.to_thread(model.started[1.0].wait, 5)  # holds the forward
        second = asyncio.ensure_future(backend.run_batch(_batch(2.0)))
        await asyncio.sleep(0.3)
        model.gates[1.0].set()
        results = await first, await second
        alone = await backend.run_batch(_batch(3.0))  # the replica is idle again
        await backend.close()
        return results[0], results[1], alone

    first, second, alone = asyncio.run(main())
    assert first.wait_ns == 0 and alone.wait_ns == 0
    assert 0.25 <= second.wait_ns / 1e9 < 5
    np.testing.assert_array_equal(second.outputs["y"], _batch(2.0)["x"] + 1)


def test_gateways_on_two_addresses_share_the_replica_by_their_tenants_weights() -> None:
    """Two gateways, each with one backlogged tenant (weights 1:3) and two batches in
    flight, reach the replica at two addresses (loopback and another): one order covers
    both, and the replica serves their rows 1:3, not in arrival order (1:1)."""
    rows, forward_s = 16, 0.002
    served = {"light": 0, "heavy": 0}

    def model(inputs: Tensors) -> BatchResult:
        time.sleep(forward_s)  # the device, busy
        return BatchResult({"y": inputs["x"] + 1}, device_ns=7, device="cpu", device_share=1)

    server = ReplicaDataServer(model, SECRET)
    near, far = server.start("127.0.0.1"), server.start("127.0.0.2")
    assert server.start("127.0.0.1") == near and server.addresses == [near, far]

    async def gateway(address: str, tenant: str, weight: float, until: float) -> None:
        async def discover() -> str:
            return address

        backend = DirectBatchBackend(discover, SECRET)
        share = (Share(tenant, rows, weight, 2),)

        async def slot() -> None:
            while time.monotonic() < until:
                result = await backend.run_batch(_batch(weight, rows), shares=share)
                np.testing.assert_array_equal(result.outputs["y"], _batch(weight, rows)["x"] + 1)
                served[tenant] += rows

        await asyncio.gather(slot(), slot())
        await backend.close()

    async def main() -> None:
        until = time.monotonic() + 3.0
        await asyncio.gather(gateway(near, "light", 1.0, until), gateway(far, "heavy", 3.0, until))

    try:
        asyncio.run(main())
    finally:
        server.stop(grace_s=2)
    print(f"rows served light:heavy = 1:{served['heavy'] / served['light']:.2f} {served}")
    assert served["light"] > 40 * rows
    assert served["heavy"] / served["light"] == pytest.approx(3.0, rel=0.1)
