"""SQLite runs with synchronous NORMAL by default (commits survive a process crash) and
FULL on request (a power cut too); with FULL the cost ledger commits through its writer
thread, so no fsync ever runs on the event loop."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa

from serving.config import CostsConfig
from serving.costs import Ledger, LedgerWriter, Pricing
from serving.state import open_engine
from serving.state.db import SQLITE_SYNCHRONOUS_ENV


def _synchronous(engine: sa.Engine) -> int:
    with engine.connect() as conn:
        return int(conn.exec_driver_sql("PRAGMA synchronous").scalar() or 0)


@pytest.mark.parametrize(
    ("setting", "pragma", "inline"), [(None, 1, True), ("normal", 1, True), ("full", 2, False)]
)
def test_normal_by_default_full_on_request_and_the_ledger_follows(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    setting: str | None,
    pragma: int,
    inline: bool,
) -> None:
    if setting is None:
        monkeypatch.delenv(SQLITE_SYNCHRONOUS_ENV, raising=False)
    else:
        monkeypatch.setenv(SQLITE_SYNCHRONOUS_ENV, setting)
    engine = open_engine(None, tmp_path / "state")
    try:
        assert _synchronous(engine) == pragma
        writer = LedgerWriter(Ledger(engine, Pricing(CostsConfig())))
        assert writer._inline is inline
        writer.close()
    finally:
        engine.dispose()


def test_an_unknown_setting_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(SQLITE_SYNCHRONOUS_ENV, "off")
    with pytest.raises(ValueError, match="must be full or normal"):
        open_engine(None, tmp_path / "state").dispose()
