"""The replica's data server over real sockets: one batch at a time, and a lane batch
goes before the ordinary ones waiting (never before the one running)."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator

import numpy as np
import pytest

from scheduler import BatchResult, Tensors
from serving.dataplane import (
    DirectBatchBackend,
    ReplicaDataServer,
    ReplicaError,
    decode_result,
    encode_batch,
    frame,
    read_frame,
)


class GatedModel:
    """y = x + 1; the first batch blocks until ``release`` (a long forward running)."""

    def __init__(self) -> None:
        self.release = threading.Event()
        self.running = threading.Event()
        self.order: list[float] = []  # x[0, 0] of each batch, in the order they ran
        self.concurrent = 0
        self.max_concurrent = 0
        self._lock = threading.Lock()

    def __call__(self, inputs: Tensors) -> BatchResult:
        with self._lock:
            self.concurrent += 1
            self.max_concurrent = max(self.max_concurrent, self.concurrent)
        try:
            self.order.append(float(inputs["x"][0, 0]))
            if len(self.order) == 1:
                self.running.set()
                assert self.release.wait(10)
            return BatchResult({"y": inputs["x"] + 1}, device_ns=7, device="cpu", device_share=1)
        finally:
            with self._lock:
                self.concurrent -= 1


@pytest.fixture()
def served() -> Iterator[tuple[GatedModel, str]]:
    model = GatedModel()
    server = ReplicaDataServer(model)
    address = server.start("127.0.0.1")
    try:
        yield model, address
    finally:
        model.release.set()
        server.stop(grace_s=2)


def _batch(tag: float, rows: int = 2) -> Tensors:
    return {"x": np.full((rows, 3), tag, np.float32)}


async def _send_all(
    address: str, batches: list[tuple[float, bool]], model: GatedModel
) -> dict[float, BatchResult]:
    host, _, port = address.rpartition(":")
    conns = [await asyncio.open_connection(host, int(port)) for _ in batches]
    first_tag, first_urgent = batches[0]
    conns[0][1].write(frame(encode_batch(_batch(first_tag), first_urgent)))
    assert await asyncio.to_thread(model.running.wait, 5)  # the first one is running
    for (tag, urgent), (_, writer) in zip(batches[1:], conns[1:], strict=True):
        writer.write(frame(encode_batch(_batch(tag), urgent)))
        await writer.drain()
        await asyncio.sleep(0.05)  # arrival order = list order
    model.release.set()
    answers: dict[float, BatchResult] = {}
    for (tag, _), (reader, writer) in zip(batches, conns, strict=True):
        answers[tag] = decode_result(await asyncio.wait_for(read_frame(reader), 5))
        writer.close()
    return answers


def test_a_lane_batch_runs_before_ordinary_ones_that_arrived_first(
    served: tuple[GatedModel, str],
) -> None:
    model, address = served
    batches = [(1.0, False), (2.0, False), (3.0, False), (4.0, True), (5.0, False)]
    answers = asyncio.run(_send_all(address, batches, model))
    assert model.order == [1.0, 4.0, 2.0, 3.0, 5.0]
    assert model.max_concurrent == 1  # one forward at a time, billed once
    for tag, _ in batches:  # each connection got its own batch's answer
        np.testing.assert_array_equal(answers[tag].outputs["y"], _batch(tag)["x"] + 1)
        assert answers[tag].device_ns == 7


def test_ordinary_batches_run_in_arrival_order(served: tuple[GatedModel, str]) -> None:
    model, address = served
    asyncio.run(_send_all(address, [(1.0, False), (2.0, False), (3.0, False)], model))
    assert model.order == [1.0, 2.0, 3.0]


def test_frames_split_across_writes_and_an_undecodable_one_leave_the_server_serving(
    served: tuple[GatedModel, str],
) -> None:
    model, address = served
    model.release.set()
    host, _, port = address.rpartition(":")

    async def main() -> None:
        reader, writer = await asyncio.open_connection(host, int(port))
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

        backend = DirectBatchBackend(discover)
        again = await backend.run_batch(_batch(3.0), urgent=True)
        np.testing.assert_array_equal(again.outputs["y"], _batch(3.0)["x"] + 1)
        await backend.close()

    asyncio.run(main())
