"""Mirrored requests through the real InferenceService, table and batchers, with
in-process backends: the client never waits for the candidate, the copy is billed to
the shadow owner, compared, bounded, and cancelled on drain."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import numpy as np
import pytest

from router.canary import SHADOW_TENANT, Split
from router.model_table import LiveModelTable
from router.service import Call, InferenceService, RouterSettings, ServedModel
from router.tensors import InferParams, InputTensor
from router.types import ModelSignature, Tenant, TensorSpec
from scheduler import BatchPolicy, BatchRecord, BatchResult, ModelBatcher, Share, Tensors

SIG = ModelSignature((TensorSpec("x", "FP32", (3,)),), (TensorSpec("y", "FP32", (3,)),), 8)


class Backend:
    """y = x, except the candidate shifts the class of rows whose x[0] > 100."""

    def __init__(self, differs: bool, gate: asyncio.Event | None = None) -> None:
        self.differs = differs
        self.gate = gate
        self.rows = 0

    async def run_batch(
        self, inputs: Tensors, *, urgent: bool = False, shares: Sequence[Share] = ()
    ) -> BatchResult:
        if self.gate is not None:
            await self.gate.wait()
        x = inputs["x"]
        self.rows += len(x)
        y = x.copy()
        if self.differs:
            marked = x[:, 0] > 100
            y[marked] = np.roll(x[marked], 1, axis=1)
        return BatchResult({"y": y}, 1000, "cpu", 1.0)


class Directory:
    async def authenticate(self, api_key: str) -> Tenant | None:
        return Tenant("alice", 1.0, frozenset({"*"})) if api_key == "k" else None


def served(version: str, backend: Backend, records: list[BatchRecord]) -> ServedModel:
    batcher = ModelBatcher(
        "m",
        version,
        backend,
        BatchPolicy(max_batch_size=8, max_queue_delay_s=0.0),
        observer=records.append,
    )
    batcher.start()
    return ServedModel("m", version, SIG, batcher)


def request(marked: bool) -> list[InputTensor]:
    row = [101.0 if marked else 1.0, 5.0, 2.0]  # class 1 normally, shifted when marked
    return [InputTensor("x", "FP32", (1, 3), values=row)]


async def infer(service: InferenceService, marked: bool) -> tuple[str, Tensors]:
    call = Call()
    await service.authenticate(call, "Bearer k")
    got, out = await service.infer(call, "m", None, request(marked), InferParams(timeout_s=5))
    return got.version, out


def test_mirrored_requests_are_compared_billed_to_shadow_and_never_awaited() -> None:
    async def scenario() -> None:
        records: list[BatchRecord] = []
        gate = asyncio.Event()
        prod = served("1", Backend(False), records)
        cand_backend = Backend(True, gate)
        cand = served("2", cand_backend, records)
        table = LiveModelTable()
        table.swap([prod], [cand])
        table.set_splits({"m": Split("2", 0.0, mirror=1.0)})
        service = InferenceService(table, Directory(), RouterSettings(max_shadow_in_flight=16))
        service.windows.watched = frozenset({"m"})
        # The candidate is held: clients are answered anyway, by production.
        answers = [await asyncio.wait_for(infer(service, i % 4 == 0), 2) for i in range(20)]
        assert all(v == "1" for v, _ in answers)
        stats = service.windows.shadow("m", "2")
        assert stats.dropped == 4  # 16 in flight at most: the rest are not sent
        gate.set()
        for _ in range(100):
            if stats.requests == 16:
                break
            await asyncio.sleep(0.01)
        assert (stats.requests, stats.compared, stats.errors) == (16, 16, 0)
        # The candidate's statistics count each copy it ran as a request it served, so
        # its request and batch counts agree.
        cs = cand.batcher.stats
        assert (cs.success.count, cs.queue.count, cs.inference_count) == (16, 16, 16)
        assert cs.fail.count == 0
        marked_sent = sum(1 for i in range(16) if i % 4 == 0)
        assert stats.rows_agreed == 16 - marked_sent and stats.agreement == 0.75
        # The candidate's batches are billed to the shadow owner only.
        owners = {t for r in records if r.version == "2" for t, _ in r.tenants}
        assert owners == {SHADOW_TENANT}
        assert {t for r in records if r.version == "1" for t, _ in r.tenants} == {"alice"}
        # Shadow outcomes stay out of the candidate's live window.
        _, live_cand, _ = service.windows.current("m", ("1", "2"))
        assert live_cand.requests == 0

        # Drain: queued shadow work is cancelled, not run.
        gate.clear()
        await infer(service, False)
        await asyncio.sleep(0.01)
        before = cand_backend.rows
        await service.cancel_shadows()
        gate.set()
        await asyncio.sleep(0.05)
        assert not service._shadows and cand_backend.rows - before <= 1
        await prod.batcher.close(drain=True)
        await cand.batcher.close(drain=True)

    asyncio.run(scenario())


def test_a_request_too_big_for_the_candidate_is_dropped_not_failed() -> None:
    async def scenario() -> None:
        records: list[BatchRecord] = []
        prod = served("1", Backend(False), records)
        small = ModelSignature(SIG.inputs, SIG.outputs, 1)
        cand = ServedModel("m", "2", small, served("2", Backend(False), records).batcher)
        table = LiveModelTable()
        table.swap([prod], [cand])
        table.set_splits({"m": Split("2", 0.0, mirror=1.0)})
        service = InferenceService(table, Directory(), RouterSettings())
        call = Call()
        await service.authenticate(call, "Bearer k")
        two = [InputTensor("x", "FP32", (2, 3), values=[1.0] * 6)]
        got, out = await service.infer(call, "m", None, two, InferParams())
        assert got.version == "1" and out["y"].shape == (2, 3)
        assert service.windows.shadow("m", "2").dropped == 1
        await prod.batcher.close(drain=True)
        await cand.batcher.close(drain=True)

    asyncio.run(scenario())


@pytest.mark.parametrize("weight", [0.0, 1.0])
def test_no_mirror_of_what_the_candidate_serves_itself(weight: float) -> None:
    async def scenario() -> None:
        records: list[BatchRecord] = []
        prod = served("1", Backend(False), records)
        cand = served("2", Backend(False), records)
        table = LiveModelTable()
        table.swap([prod], [cand])
        table.set_splits({"m": Split("2", weight, mirror=1.0)})
        service = InferenceService(table, Directory(), RouterSettings())
        versions = [(await infer(service, False))[0] for _ in range(10)]
        await asyncio.sleep(0.05)
        shadow = service.windows.shadow("m", "2")
        if weight == 1.0:
            assert versions == ["2"] * 10 and shadow.requests == 0
        else:
            assert versions == ["1"] * 10 and shadow.requests == 10
        await prod.batcher.close(drain=True)
        await cand.batcher.close(drain=True)

    asyncio.run(scenario())


def test_a_mirrored_copy_keeps_its_bytes_on_the_tenants_budget_until_it_ends() -> None:
    async def scenario() -> None:
        records: list[BatchRecord] = []
        gate = asyncio.Event()
        prod = served("1", Backend(False), records)
        cand = served("2", Backend(True, gate), records)
        table = LiveModelTable()
        table.swap([prod], [cand])
        table.set_splits({"m": Split("2", 0.0, mirror=1.0)})
        service = InferenceService(table, Directory(), RouterSettings())
        for _ in range(3):
            with service.admitted() as call:  # releases what the call holds, as doors do
                await service.authenticate(call, "Bearer k")
                await service.infer(call, "m", None, request(False), InferParams(timeout_s=5))
        # Answered, but the copies (held by the candidate's gate) still hold the arrays.
        load = service.tenant_load("alice")
        assert (load.requests, load.bytes) == (0, 3 * 12)
        gate.set()
        for _ in range(100):
            if service.windows.shadow("m", "2").requests == 3:
                break
            await asyncio.sleep(0.01)
        load = service.tenant_load("alice")
        assert (load.requests, load.bytes) == (0, 0)
        await prod.batcher.close(drain=True)
        await cand.batcher.close(drain=True)

    asyncio.run(scenario())
