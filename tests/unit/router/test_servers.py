"""How FrontDoors picks its gRPC door (``server.grpc_server``); nothing is started."""

from __future__ import annotations

import logging

import pytest

from router import servers
from router.servers import FrontDoors
from router.service import InferenceService, RouterSettings
from router.types import Tenant
from tests.fakes import StaticModelTable


class _NoTenants:
    async def authenticate(self, api_key: str) -> Tenant | None:
        return None


def _doors(grpc_server: str) -> FrontDoors:
    service = InferenceService(StaticModelTable([]), _NoTenants(), RouterSettings())
    return FrontDoors(service, "127.0.0.1", 1 << 20, grpc_server=grpc_server)


def test_auto_serves_grpc_on_grpcio_when_the_native_door_cannot_load(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    monkeypatch.setattr(servers, "native_available", lambda: "router._grpcdoor is not built")
    with caplog.at_level(logging.INFO, logger="router.servers"):
        doors = _doors("auto")
    assert doors.grpc_server == "grpcio"
    assert "gRPC port on grpcio: router._grpcdoor is not built" in caplog.text


def test_grpcio_when_asked_even_where_the_native_door_loads(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(servers, "native_available", lambda: None)
    assert _doors("grpcio").grpc_server == "grpcio"


@pytest.mark.parametrize("name", ["grpclib", "", "Native", "grpc"])
def test_unknown_grpc_servers_are_refused(name: str) -> None:
    with pytest.raises(ValueError, match=f"unknown gRPC server {name!r}"):
        _doors(name)
