"""The console's fixture: the admin API and console of a gateway on a real socket, on each
state database (SQLite file, PostgreSQL)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.conftest import OpenEngine
from tests.integration.serving.admin.server import AdminServer
from tests.integration.serving.console.harness import Console


@pytest.fixture
def console(open_db: OpenEngine, tmp_path: Path) -> Iterator[tuple[Console, AdminServer]]:
    c = Console(open_db(), tmp_path / "state")
    with AdminServer(c.app) as server:
        yield c, server
