"""The overview's window: whole UTC days ending with today, whatever the caller's zone."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta, timezone

import pytest

from serving.insights import MAX_DAYS, window
from serving.insights.adoption import iso_week


def test_the_window_is_whole_utc_days_ending_with_today() -> None:
    now = datetime(2026, 12, 6, 23, 59, 59, tzinfo=UTC)
    assert window(1, now) == (datetime(2026, 12, 6, tzinfo=UTC), datetime(2026, 12, 7, tzinfo=UTC))
    start, end = window(30, now)
    assert (start, end - start) == (datetime(2026, 11, 7, tzinfo=UTC), timedelta(days=30))
    # 01:00 at +02:00 is still the day before in UTC.
    east = datetime(2026, 12, 7, 1, 0, tzinfo=timezone(timedelta(hours=2)))
    assert window(1, east)[0] == datetime(2026, 12, 6, tzinfo=UTC)
    assert window(MAX_DAYS, now)[1] - window(MAX_DAYS, now)[0] == timedelta(days=366)


@pytest.mark.parametrize("days", [0, -1, MAX_DAYS + 1])
def test_days_outside_the_range_are_refused(days: int) -> None:
    with pytest.raises(ValueError, match=r"days must be in 1\.\.366"):
        window(days, datetime.now(UTC))


def test_iso_weeks_cross_the_year_as_iso_8601_says() -> None:
    assert iso_week(date(2026, 12, 31)) == "2026-W53"
    assert iso_week(date(2027, 1, 3)) == "2026-W53"
    assert iso_week(date(2027, 1, 4)) == "2027-W01"
