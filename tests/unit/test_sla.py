"""SLA calendar arithmetic with explicit clocks: nights, weekends, holidays, time zones."""

from __future__ import annotations

from datetime import UTC, date, datetime, time
from zoneinfo import ZoneInfo

import pytest

from mailrouter.config import Calendar
from mailrouter.core.sla import due_after, windows_overdue

BOGOTA = ZoneInfo("America/Bogota")  # UTC-5, no daylight saving
NEW_YORK = ZoneInfo("America/New_York")  # daylight saving ends 2026-11-01


def local(zone: ZoneInfo, year: int, month: int, day: int, hour: int, minute: int) -> datetime:
    return datetime(year, month, day, hour, minute, tzinfo=zone)


def business(zone: ZoneInfo = BOGOTA, **extra: object) -> Calendar:
    return Calendar(zone=zone, business_hours=True, start=time(8), end=time(18), **extra)  # type: ignore[arg-type]


def test_clock_hours_ignore_calendars() -> None:
    start = local(BOGOTA, 2026, 11, 20, 17, 0)  # a Friday
    assert due_after(start, 24, Calendar(zone=BOGOTA)) == local(BOGOTA, 2026, 11, 21, 17, 0)


def test_within_one_working_day() -> None:
    start = local(BOGOTA, 2026, 11, 16, 9, 0)  # Monday
    assert due_after(start, 4, business()) == local(BOGOTA, 2026, 11, 16, 13, 0)


def test_over_the_night() -> None:
    start = local(BOGOTA, 2026, 11, 16, 16, 0)  # Monday 16:00: 2 h today, 2 h tomorrow
    assert due_after(start, 4, business()) == local(BOGOTA, 2026, 11, 17, 10, 0)


def test_opened_at_night_starts_next_morning() -> None:
    start = local(BOGOTA, 2026, 11, 16, 22, 30)
    assert due_after(start, 4, business()) == local(BOGOTA, 2026, 11, 17, 12, 0)


def test_over_the_weekend() -> None:
    # Friday 15:00: 3 h on Friday, 10 h Monday, 10 h Tuesday, the last hour on Wednesday.
    start = local(BOGOTA, 2026, 11, 20, 15, 0)
    assert due_after(start, 24, business()) == local(BOGOTA, 2026, 11, 25, 9, 0)


def test_over_a_holiday() -> None:
    start = local(BOGOTA, 2026, 12, 7, 14, 0)  # Monday; Tuesday 8 December is a holiday
    calendar = business(holidays=frozenset({date(2026, 12, 8)}))
    assert due_after(start, 8, calendar) == local(BOGOTA, 2026, 12, 9, 12, 0)


def test_saturday_as_working_day() -> None:
    start = local(BOGOTA, 2026, 11, 20, 17, 0)
    calendar = business(days=frozenset({0, 1, 2, 3, 4, 5}))
    assert due_after(start, 2, calendar) == local(BOGOTA, 2026, 11, 21, 9, 0)


def test_across_daylight_saving_change() -> None:
    # Friday 30 Oct 2026, 16:00 EDT; clocks go back on Sunday 1 Nov. 4 business hours:
    # 2 h on Friday, 2 h on Monday from 08:00 EST.
    start = local(NEW_YORK, 2026, 10, 30, 16, 0)
    due = due_after(start, 4, business(NEW_YORK))
    assert due == local(NEW_YORK, 2026, 11, 2, 10, 0)
    assert (
        due.utcoffset() is not None
        and due.astimezone(NEW_YORK).utcoffset().total_seconds() == -5 * 3600  # type: ignore[union-attr]
    )


def test_result_is_utc() -> None:
    due = due_after(local(BOGOTA, 2026, 11, 16, 9, 0), 1, business())
    assert due.tzinfo == UTC and due == datetime(2026, 11, 16, 15, 0, tzinfo=UTC)


def test_calendar_without_working_hours_is_refused() -> None:
    with pytest.raises(ValueError):
        due_after(local(BOGOTA, 2026, 11, 16, 9, 0), 1, business(days=frozenset()))


def test_windows_overdue() -> None:
    calendar = business()
    due = local(BOGOTA, 2026, 11, 16, 12, 0)
    assert windows_overdue(None, due, 4, calendar) == 0
    assert windows_overdue(due, local(BOGOTA, 2026, 11, 16, 11, 0), 4, calendar) == 0
    assert windows_overdue(due, local(BOGOTA, 2026, 11, 16, 15, 0), 4, calendar) == 1
    assert windows_overdue(due, local(BOGOTA, 2026, 11, 16, 16, 1), 4, calendar) == 2
