"""Shared integration fixtures: one real local Ray + Serve for the whole session (a
cold start costs ~10 s), and fresh state databases on SQLite and PostgreSQL.

Each PostgreSQL test gets its own schema (dropped afterwards) on the server of
tests/conftest.py's ``postgres_server`` (GPUGATE_TEST_POSTGRES_URL, else a throwaway
one), so runs are independent and never touch tables other tests use.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from serving.state.db import open_engine
from tests.postgres import Schema

OpenEngine = Callable[[], sa.Engine]


@pytest.fixture(scope="session")
def ray_serve() -> Iterator[None]:
    os.environ.pop("RAY_ADDRESS", None)
    from ray import serve

    from serving.cluster import runtime as cluster

    started = cluster.connect()
    serve.start(proxy_location="Disabled")
    try:
        yield
    finally:
        cluster.shutdown(started)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def open_db(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[OpenEngine]:
    """A factory of engines on one fresh database; each call is like another process."""
    engines: list[sa.Engine] = []
    url = None
    if request.param == "postgres":
        schema: Schema = request.getfixturevalue("postgres_schema")
        url = schema.url

    def open_one() -> sa.Engine:
        engine = open_engine(url, tmp_path / "state")
        engines.append(engine)
        return engine

    try:
        yield open_one
    finally:
        for engine in engines:
            engine.dispose()


@pytest.fixture
def engine(open_db: OpenEngine) -> sa.Engine:
    return open_db()
