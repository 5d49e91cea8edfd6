"""The CLI's fixtures: a state folder and its SQLite database, as `gpugate serve` keeps them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa

from serving.state import open_engine


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return tmp_path / "state"


@pytest.fixture
def engine(state: Path) -> Iterator[sa.Engine]:
    engine = open_engine(None, state)
    try:
        yield engine
    finally:
        engine.dispose()
