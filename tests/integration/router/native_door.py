"""Whether the native gRPC door (router._grpcdoor, `make native`) can run here."""

from __future__ import annotations

import os

import pytest

from router import native_server


def require_native_door() -> None:
    """Skip without the built door; fail instead where GPUGATE_REQUIRE_NATIVE=1 (CI)."""
    reason = native_server.available()
    if reason is None:
        return
    if os.environ.get("GPUGATE_REQUIRE_NATIVE") == "1":
        pytest.fail(reason)
    pytest.skip(reason)
