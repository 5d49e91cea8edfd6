"""Tenant admission in the real InferenceService and batchers, with in-process backends:
priority levels are grants, the in-flight caps are exact, and what a call holds is
given back on every way out (success, error, cancel, deadline)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence

import numpy as np
import pytest

from router import PayloadTooLarge, PermissionDenied, ResourceExhausted
from router.service import InferenceService, RouterSettings, ServedModel
from router.tensors import InferParams, InputTensor
from router.types import ModelSignature, Tenant, TensorSpec
from scheduler import BatchPolicy, BatchResult, ModelBatcher, Share, Tensors
from tests.fakes import StaticModelTable

SIG = ModelSignature((TensorSpec("x", "FP32", (4,)),), (TensorSpec("y", "FP32", (4,)),), 64)
ROW_BYTES = 16


class Backend:
    """y = x, after ``gate`` opens; ``fail`` makes every batch raise."""

    def __init__(self) -> None:
        self.gate = asyncio.Event()
        self.fail = False

    async def run_batch(
        self, inputs: Tensors, *, urgent: bool = False, shares: Sequence[Share] = ()
    ) -> BatchResult:
        await self.gate.wait()
        if self.fail:
            raise RuntimeError("replica exploded")
        return BatchResult({"y": inputs["x"].copy()}, 1000, "cpu", 1.0)


TENANTS = {
    "k-small": Tenant("small", 1.0, frozenset({"*"}), max_requests_in_flight=3),
    "k-bytes": Tenant("bytes", 1.0, frozenset({"*"}), max_bytes_in_flight=4 * ROW_BYTES),
    "k-urgent": Tenant("urgent", 1.0, frozenset({"*"}), frozenset({1, 2})),
    "k-plain": Tenant("plain", 1.0, frozenset({"*"})),
}


class Directory:
    async def authenticate(self, api_key: str) -> Tenant | None:
        return TENANTS.get(api_key)


def rows(n: int) -> list[InputTensor]:
    return [InputTensor("x", "FP32", (n, 4), raw=np.ones((n, 4), np.float32).tobytes())]


class Harness:
    def __init__(self, **settings: int) -> None:
        self.backend = Backend()
        batcher = ModelBatcher("m", "1", self.backend, BatchPolicy(max_batch_size=64))
        batcher.start()
        self.batcher = batcher
        self.service = InferenceService(
            StaticModelTable([ServedModel("m", "1", SIG, batcher)]),
            Directory(),
            RouterSettings(**settings),  # type: ignore[arg-type]
        )

    async def infer(self, key: str, n: int = 1, **params: float) -> Tensors:
        with self.service.admitted() as call:
            await self.service.authenticate(call, f"Bearer {key}")
            _, out = await self.service.infer(call, "m", None, rows(n), InferParams(**params))
            return out

    def refusals(self, tenant: str, reason: str) -> float:
        value = self.service.metrics.registry.get_sample_value(
            "gpugate_admission_refusals_total", {"tenant": tenant, "reason": reason}
        )
        return value or 0.0

    async def settle(self) -> None:
        for _ in range(5):
            await asyncio.sleep(0)


def run(scenario: Callable[[Harness], object], **settings: int) -> None:
    async def main() -> None:
        h = Harness(**settings)
        try:
            await scenario(h)  # type: ignore[misc]
        finally:
            h.backend.gate.set()
            await h.batcher.close(drain=True)

    asyncio.run(main())


def test_an_ungranted_priority_level_is_refused_and_names_the_level() -> None:
    async def scenario(h: Harness) -> None:
        h.backend.gate.set()
        with pytest.raises(PermissionDenied, match="may not use priority level 1") as refused:
            await h.infer("k-plain", priority=1)
        assert "granted levels: 2" in refused.value.message
        with pytest.raises(PermissionDenied, match="priority level 3"):
            await h.infer("k-plain", priority=3)
        assert h.refusals("plain", "priority") == 2
        # The default level needs no grant; a granted level works.
        assert (await h.infer("k-plain", priority=2))["y"].shape == (1, 4)
        assert (await h.infer("k-urgent", priority=1))["y"].shape == (1, 4)
        assert h.service.tenant_load("plain").requests == 0

    run(scenario)


def test_the_request_cap_is_exact_and_answers_with_a_retry_delay() -> None:
    async def scenario(h: Harness) -> None:
        held = [asyncio.ensure_future(h.infer("k-small")) for _ in range(3)]
        await h.settle()
        assert h.service.tenant_load("small").requests == 3
        with pytest.raises(ResourceExhausted, match="3 requests in flight") as refused:
            await h.infer("k-small")
        assert refused.value.http_headers() == {"Retry-After": "1"}
        assert dict(refused.value.grpc_trailers()) == {
            "retry-after": "1",
            "grpc-retry-pushback-ms": "1000",
        }
        assert h.refusals("small", "requests_in_flight") == 1
        # Another tenant is not held back by this one's cap.
        other = asyncio.ensure_future(h.infer("k-plain"))
        await h.settle()
        assert h.service.tenant_load("plain").requests == 1
        h.backend.gate.set()
        await asyncio.gather(*held, other)
        assert h.service.tenant_load("small").requests == 0
        assert (await h.infer("k-small"))["y"].shape == (1, 4)

    run(scenario)


def test_the_server_default_cap_applies_to_a_tenant_without_its_own() -> None:
    async def scenario(h: Harness) -> None:
        held = [asyncio.ensure_future(h.infer("k-plain")) for _ in range(2)]
        await h.settle()
        with pytest.raises(ResourceExhausted):
            await h.infer("k-plain")
        h.backend.gate.set()
        await asyncio.gather(*held)

    run(scenario, tenant_max_requests_in_flight=2)


def test_the_byte_cap_counts_declared_input_bytes() -> None:
    async def scenario(h: Harness) -> None:
        first = asyncio.ensure_future(h.infer("k-bytes", 3))
        await h.settle()
        assert h.service.tenant_load("bytes").bytes == 3 * ROW_BYTES
        with pytest.raises(ResourceExhausted, match="48 input bytes in flight"):
            await h.infer("k-bytes", 2)
        assert h.refusals("bytes", "bytes_in_flight") == 1
        second = asyncio.ensure_future(h.infer("k-bytes", 1))  # exactly at the cap
        await h.settle()
        assert h.service.tenant_load("bytes").bytes == 4 * ROW_BYTES
        # Larger than the whole cap: never admissible, so not a 429 to retry.
        with pytest.raises(PayloadTooLarge, match="exceed tenant 'bytes'"):
            await h.infer("k-bytes", 5)
        h.backend.gate.set()
        await asyncio.gather(first, second)
        assert h.service.tenant_load("bytes").bytes == 0

    run(scenario)


def test_what_a_call_holds_is_released_on_error_cancel_and_deadline() -> None:
    async def scenario(h: Harness) -> None:
        # Deadline: the batch never runs in time.
        with pytest.raises(Exception, match="deadline"):
            await h.infer("k-small", 2, timeout_s=0.05)
        assert h.service.tenant_load("small").requests == 0
        # Cancel: the caller goes away while queued.
        task = asyncio.ensure_future(h.infer("k-small"))
        await h.settle()
        assert h.service.tenant_load("small").requests == 1
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert h.service.tenant_load("small") == h.service.tenant_load("nobody")
        # Invalid input: refused after admission.
        with pytest.raises(Exception, match="batch size 65"):
            await h.infer("k-small", 65)
        # The model fails.
        h.backend.fail = True
        h.backend.gate.set()
        with pytest.raises(Exception, match="replica exploded"):
            await h.infer("k-small")
        h.backend.fail = False
        assert h.service.tenant_load("small").requests == 0
        assert h.service.tenant_load("small").bytes == 0
        # The cap is whole again: three at once still pass.
        h.backend.gate.clear()
        held = [asyncio.ensure_future(h.infer("k-small")) for _ in range(3)]
        await h.settle()
        assert h.service.tenant_load("small").requests == 3
        h.backend.gate.set()
        await asyncio.gather(*held)
        assert dict(h.service._loads.loads) == {}  # no entry is kept for an idle tenant

    run(scenario)


def test_tenant_loads_are_exported_at_scrape_time() -> None:
    async def scenario(h: Harness) -> None:
        held = [asyncio.ensure_future(h.infer("k-bytes", 2)) for _ in range(2)]
        await h.settle()
        sample = h.service.metrics.registry.get_sample_value
        assert sample("gpugate_tenant_requests_in_flight", {"tenant": "bytes"}) == 2
        assert sample("gpugate_tenant_bytes_in_flight", {"tenant": "bytes"}) == 4 * ROW_BYTES
        h.backend.gate.set()
        await asyncio.gather(*held)
        assert sample("gpugate_tenant_requests_in_flight", {"tenant": "bytes"}) is None

    run(scenario)
