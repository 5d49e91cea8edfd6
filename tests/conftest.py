"""Fixtures for every test tree: PostgreSQL (tests/postgres.py) when a test asks for it.

``postgres_server`` is GPUGATE_TEST_POSTGRES_URL's server, or a throwaway one started
for the session and stopped at its end; ``postgres_schema`` gives a test a fresh
schema on it. When no server can be started at all, the tests that asked are skipped
with the reason; a URL that was given but does not answer is a failure instead.
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests import postgres


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[postgres.Server]:
    if os.environ.get(postgres.SKIP_ENV) == "1":
        pytest.skip(f"{postgres.SKIP_ENV}=1")
    try:
        server = postgres.server()
    except postgres.Unavailable as exc:
        pytest.skip(str(exc))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_schema(postgres_server: postgres.Server) -> Iterator[postgres.Schema]:
    """A fresh schema for this test (dropped afterwards); ``.url`` is what a gateway takes
    as ``--database-url``."""
    with postgres.fresh_schema(postgres_server.url) as schema:
        yield schema
