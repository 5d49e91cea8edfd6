"""The state tests' databases: ``blank`` is one with no schema yet, in the three ways a
gateway can be pointed at one."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.serving.state.schema import Blank
from tests.postgres import Schema


@pytest.fixture(
    params=["embedded", "sqlite-url", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def blank(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Blank]:
    state_dir = tmp_path / "state"
    if request.param == "embedded":
        url = admin_url = None
    elif request.param == "sqlite-url":
        state_dir.mkdir()
        url, admin_url = f"sqlite+pysqlite:///{state_dir / 'explicit.db'}", None
    else:
        schema: Schema = request.getfixturevalue("postgres_schema")
        url, admin_url = schema.url, schema.admin_url
    db = Blank(url, state_dir, request.param, admin_url)
    try:
        yield db
    finally:
        db.dispose()
