"""A gateway or control replica on another host than the embedded SQLite state refuses
to start, rather than serve from a copy of its own."""

from __future__ import annotations

import socket

import pytest

from serving.cluster import check_state_host


def test_another_host_refuses_the_embedded_state() -> None:
    with pytest.raises(RuntimeError, match="GPUGATE_DATABASE_URL") as refused:
        check_state_host(None, "head-0")
    assert "'head-0'" in str(refused.value) and repr(socket.gethostname()) in str(refused.value)


def test_the_same_host_or_a_shared_database_starts() -> None:
    check_state_host(None, socket.gethostname())
    check_state_host("postgresql://db/gpugate", "head-0")
    check_state_host(None, None)  # built before the host was recorded
