"""``gpugate serve`` (the real command, in a process of its own) on a database whose
schema it must not use: it says why and what to do, exits 1, and changes nothing.
Refusals happen before Ray starts, so these runs take seconds."""

from __future__ import annotations

import os
import socket
import subprocess
import sys

import pytest
import sqlalchemy as sa

from serving.state import schema_status, upgrade_schema
from tests.integration.serving.state.schema import Blank

UNKNOWN = "ffffffffffff"  # what a newer gpugate's revision looks like to this one


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def serve(blank: Blank) -> subprocess.CompletedProcess[str]:
    where = ["--database-url", blank.url] if blank.url else []
    ports = [f"--{what}-port" for what in ("http", "grpc", "metrics")]
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "serving.cli",
            "serve",
            "--state-dir",
            str(blank.state_dir),
            *where,
            *(arg for port in ports for arg in (port, str(free_port()))),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={**os.environ, "RAY_ADDRESS": ""},
    )


@pytest.mark.parametrize(
    "blank", ["embedded", pytest.param("postgres", marks=pytest.mark.postgres)], indirect=True
)
def test_serve_refuses_a_schema_from_a_newer_gpugate(blank: Blank) -> None:
    engine = blank.engine()
    upgrade_schema(engine)
    with engine.begin() as conn:
        conn.execute(sa.text("UPDATE alembic_version SET version_num = :v"), {"v": UNKNOWN})
    run = serve(blank)
    assert run.returncode == 1, run.stdout + run.stderr
    assert f"database schema is at revision {UNKNOWN}, which this gpugate does not know" in (
        run.stderr
    )
    assert "Traceback" not in run.stderr
    assert schema_status(blank.engine()).current == UNKNOWN
