"""Whether the native gRPC door (``router._grpcdoor``) can run here, and which build.

The door is built by the package install when gRPC C++ is present (docs/grpc.md).
``make fuzz-native`` runs the door's tests against a sanitizer build kept apart from
the regular one: ``GPUGATE_TEST_GRPCDOOR_DIR`` names the directory that holds it.
"""

from __future__ import annotations

import importlib
import os
from pathlib import Path

import pytest

import router
from router import native_server

DOOR_DIR_VARIABLE = "GPUGATE_TEST_GRPCDOOR_DIR"


def use_door_from_environment() -> Path | None:
    """Load ``router._grpcdoor`` from ``$GPUGATE_TEST_GRPCDOOR_DIR`` when it is set, before
    anything imports the regular build; returns the file loaded, or None when unset."""
    directory = os.environ.get(DOOR_DIR_VARIABLE)
    if not directory:
        return None
    router.__path__.insert(0, directory)
    door = importlib.import_module("router._grpcdoor")
    loaded = Path(str(door.__file__)).resolve()
    # A door imported earlier from the regular build would make the run test the wrong one.
    assert loaded.parent == Path(directory).resolve(), (loaded, directory)
    return loaded


def require_native_door() -> None:
    """Skip without the built door; fail instead where GPUGATE_REQUIRE_NATIVE=1 (CI)."""
    reason = native_server.available()
    if reason is None:
        return
    if os.environ.get("GPUGATE_REQUIRE_NATIVE") == "1":
        pytest.fail(reason)
    pytest.skip(reason)
