"""Shared integration fixtures: one real local Ray + Serve for the whole session (a
cold start costs ~10 s), and fresh state databases on SQLite and PostgreSQL.

Each PostgreSQL test gets its own schema (dropped afterwards), so runs are
independent and never touch tables other tests use. PostgreSQL being unreachable
is a failure, not a skip, unless GPUGATE_SKIP_POSTGRES=1.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from serving.state.db import open_engine

POSTGRES_URL = os.environ.get(
    "GPUGATE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test"
)

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
    if request.param == "sqlite":
        url = None
    else:
        if os.environ.get("GPUGATE_SKIP_POSTGRES") == "1":
            pytest.skip("GPUGATE_SKIP_POSTGRES=1")
        schema = f"gg_test_{uuid.uuid4().hex[:12]}"
        admin = sa.create_engine(POSTGRES_URL)
        try:
            with admin.begin() as conn:  # unreachable -> OperationalError -> test fails
                conn.execute(sa.text(f'CREATE SCHEMA "{schema}"'))
        except Exception:
            admin.dispose()
            raise
        url = (
            sa.make_url(POSTGRES_URL)
            .update_query_dict({"options": f"-csearch_path={schema}"})
            .render_as_string(hide_password=False)
        )

    def open_one() -> sa.Engine:
        engine = open_engine(url, tmp_path / "state")
        engines.append(engine)
        return engine

    try:
        yield open_one
    finally:
        for engine in engines:
            engine.dispose()
        if url is not None:
            with admin.begin() as conn:
                conn.execute(sa.text(f'DROP SCHEMA "{schema}" CASCADE'))
            admin.dispose()


@pytest.fixture
def engine(open_db: OpenEngine) -> sa.Engine:
    return open_db()
