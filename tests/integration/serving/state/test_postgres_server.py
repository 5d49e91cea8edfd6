"""The tests' own PostgreSQL (tests/postgres.py): a throwaway server runs as a user that
PostgreSQL accepts, and when none can be started the skip says what was tried."""

from __future__ import annotations

import os
import sys

import pytest
import sqlalchemy as sa

from tests import postgres


@pytest.mark.postgres
def test_a_throwaway_server_runs_as_a_user_postgresql_accepts(
    postgres_server: postgres.Server,
) -> None:
    if postgres_server.proc is None:
        pytest.skip(f"the server is not a throwaway one ({postgres_server.how})")
    owner = os.stat(f"/proc/{postgres_server.proc.pid}").st_uid
    assert owner == os.geteuid() or (os.geteuid() == 0 and owner != 0)
    engine = sa.create_engine(postgres_server.url, poolclass=sa.NullPool)
    try:
        with engine.connect() as conn:
            folder = conn.exec_driver_sql("SHOW data_directory").scalar_one()
    finally:
        engine.dispose()
    assert postgres_server.folder is not None
    assert folder.startswith(str(postgres_server.folder))


def test_no_server_at_all_names_every_attempt(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(postgres, "bin_dirs", lambda: [])
    monkeypatch.setitem(sys.modules, "pgserver", None)  # importing it raises ImportError
    with pytest.raises(postgres.Unavailable) as unavailable:
        postgres.start_throwaway()
    assert str(unavailable.value) == (
        "no PostgreSQL server could be started: no initdb/postgres on PATH, in "
        "/usr/lib/postgresql/*/bin or pg_config; the PyPI package pgserver is not installed"
    )
