"""The health servicer's service names and statuses, and the standard gRPC methods'
table against their .proto descriptors; no sockets (tests/integration/router/
test_health.py drives both doors)."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any

import pytest
from grpc_health.v1 import health_pb2

from router.grpc_services import (
    REFLECTION_SERVICE,
    SERVICE_NAMES,
    Cardinality,
    reflection_pool,
    standard_rpcs,
)
from router.health import HEALTH_SERVICE, INFERENCE_SERVICE, HealthServicer
from router.model_table import LiveModelTable
from router.service import InferenceService, RouterSettings, ServedModel
from router.types import ModelSignature, Tenant, TensorSpec
from scheduler import BatchPolicy, BatchResult, ModelBatcher, Share, Tensors

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_UNKNOWN = health_pb2.HealthCheckResponse.SERVICE_UNKNOWN
SIG = ModelSignature((TensorSpec("x", "FP32", (3,)),), (TensorSpec("y", "FP32", (3,)),), 8)


class _NoTenants:
    async def authenticate(self, api_key: str) -> Tenant | None:
        return None


class _Echo:
    async def run_batch(
        self, inputs: Tensors, *, urgent: bool = False, shares: Sequence[Share] = ()
    ) -> BatchResult:
        return BatchResult({"y": inputs["x"]}, 1, "cpu", 1.0)


def _served(name: str, version: str) -> ServedModel:
    # Never started: health reads the table only.
    return ServedModel(
        name, version, SIG, ModelBatcher(name, version, _Echo(), BatchPolicy(max_batch_size=8))
    )


class _Abort(Exception):
    pass


class _Context:
    async def abort(self, code: Any, details: str) -> None:
        raise _Abort(code, details)


def _service() -> tuple[InferenceService, LiveModelTable]:
    table = LiveModelTable()
    table.swap([_served("m", "2")], [_served("m", "1")])
    return InferenceService(table, _NoTenants(), RouterSettings()), table


def test_names_and_statuses() -> None:
    service, _ = _service()
    health = HealthServicer(service)
    assert health.status("") == SERVING
    assert health.status(INFERENCE_SERVICE) == SERVING
    assert health.status("m") == SERVING
    assert health.status("m/2") == SERVING
    assert health.status("m/1") == NOT_SERVING  # staging
    for unknown in ("x", "x/1", "m/3", "m/", "/2", "m/2/extra", "grpc.health.v1.Health"):
        assert health.status(unknown) is None, unknown
    assert health.statuses() == {
        "": SERVING,
        INFERENCE_SERVICE: SERVING,
        "m": SERVING,
        "m/2": SERVING,
        "m/1": NOT_SERVING,
    }
    asyncio.run(service.drain(0.1))
    assert set(health.statuses().values()) == {NOT_SERVING}
    assert health.status("x") is None


def test_check_refuses_an_unknown_name_not_found() -> None:
    service, _ = _service()
    health = HealthServicer(service)
    request = health_pb2.HealthCheckRequest(service="x")
    with pytest.raises(_Abort) as refused:
        asyncio.run(health.Check(request, _Context()))
    assert refused.value.args[0].name == "NOT_FOUND"


def test_watch_sends_the_status_then_only_its_changes() -> None:
    service, table = _service()
    health = HealthServicer(service, poll_s=0.001)

    async def watch() -> list[int]:
        seen: list[int] = []
        stream = health.Watch(health_pb2.HealthCheckRequest(service="n"), _Context())
        seen.append((await anext(stream)).status)
        table.swap([_served("m", "2"), _served("n", "1")])
        seen.append((await anext(stream)).status)
        await service.drain(0.1)
        seen.append((await anext(stream)).status)
        await stream.aclose()
        return seen

    assert asyncio.run(watch()) == [SERVICE_UNKNOWN, SERVING, NOT_SERVING]


def test_each_standard_method_matches_its_descriptor() -> None:
    service, _ = _service()
    pool = reflection_pool()
    kinds = {
        (False, False): Cardinality.UNARY,
        (False, True): Cardinality.RESPONSE_STREAM,
        (True, True): Cardinality.BIDI_STREAM,
    }
    served = set()
    for rpc in standard_rpcs(service):
        method = pool.FindServiceByName(rpc.service).methods_by_name[rpc.name]
        assert kinds[(method.client_streaming, method.server_streaming)] is rpc.cardinality
        assert method.input_type.full_name == rpc.request_type.DESCRIPTOR.full_name
        assert method.output_type.full_name == rpc.response_type.DESCRIPTOR.full_name
        assert rpc.path == f"/{rpc.service}/{rpc.name}"
        served.add((rpc.service, rpc.name))
    # Every method of both services, and reflection lists every service on the port.
    assert served == {
        (name, m.name)
        for name in (HEALTH_SERVICE, REFLECTION_SERVICE)
        for m in pool.FindServiceByName(name).methods
    }
    assert set(SERVICE_NAMES) == {INFERENCE_SERVICE, HEALTH_SERVICE, REFLECTION_SERVICE}
    assert pool.FindFileContainingSymbol(f"{INFERENCE_SERVICE}.ModelInfer").name == (
        "gpugate_proto/grpc_service.proto"
    )
    with pytest.raises(KeyError):
        pool.FindFileContainingSymbol(f"{INFERENCE_SERVICE}.Nothing")
