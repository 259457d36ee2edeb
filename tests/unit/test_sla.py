"""SLA calendar arithmetic with explicit clocks: nights, weekends, holidays, time zones."""

from __future__ import annotations

from collections.abc import Callable
from datetime import UTC, date, datetime, time
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest

from mailrouter.config import Calendar, ConfigError, load_config
from mailrouter.core.render import local_time
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


# --- a country's public holidays from the `holidays` library (issue 19, item 8) -----------


def colombia(write_config: Callable[..., Path], dates: list[str] | None = None) -> Calendar:
    holidays = {"country": "CO", "dates": dates or []}
    hours = {"enabled": True, "holidays": holidays}
    return load_config(write_config({"business_hours": hours})).calendar()


@pytest.mark.parametrize(
    ("day", "working"),
    [
        (date(2026, 1, 6), True),  # Epiphany's date, a Tuesday: the holiday moved...
        (date(2026, 1, 12), False),  # ...to the next Monday (Ley Emiliani)
        (date(2026, 3, 19), True),  # Saint Joseph, a Thursday, moved...
        (date(2026, 3, 23), False),  # ...to Monday the 23rd
        (date(2026, 11, 16), False),  # Independence of Cartagena, observed on Monday
        (date(2026, 12, 8), False),  # Immaculate Conception is not moved
        (date(2027, 1, 11), False),  # next year's Epiphany Monday: years come as asked
        (date(2026, 12, 24), False),  # a date of our own, given beside the country
        (date(2026, 12, 23), True),
    ],
)
def test_colombian_holidays_come_out_right(
    write_config: Callable[..., Path], day: date, working: bool
) -> None:
    assert colombia(write_config, ["2026-12-24"]).is_working_day(day) is working


def test_a_due_time_skips_the_moved_monday(write_config: Callable[..., Path]) -> None:
    calendar = colombia(write_config)
    start = local(BOGOTA, 2026, 11, 13, 16, 0)  # Friday 16:00: 2 h, then Tuesday the 17th
    assert due_after(start, 4, calendar) == local(BOGOTA, 2026, 11, 17, 10, 0)


def test_an_unknown_country_is_refused_with_its_line(write_config: Callable[..., Path]) -> None:
    path = write_config({"business_hours": {"holidays": {"country": "XX"}}})
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert any(
        "business_hours.holidays" in str(p)
        and "no public holidays known for country 'XX'" in str(p)
        for p in caught.value.problems
    ), caught.value.problems


def test_times_in_mails_are_written_in_the_team_s_language(
    write_config: Callable[..., Path],
) -> None:
    moment = datetime(2026, 11, 17, 19, 5, tzinfo=UTC)
    colombian = load_config(write_config())
    assert local_time(moment, colombian).replace("\u202f", " ") == (
        "martes, 17 de noviembre de 2026, 2:05 p. m."
    )
    english = load_config(write_config({"locale": "en_US", "timezone": "America/New_York"}))
    assert local_time(moment, english).replace("\u202f", " ") == (
        "Tuesday, November 17, 2026, 2:05 PM"
    )
    with pytest.raises(ConfigError, match="unknown locale 'xx_YY'"):
        load_config(write_config({"locale": "xx_YY"}))
