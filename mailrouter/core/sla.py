"""SLA: when a case's follow-up is due, and how overdue it is. Pure: datetimes in, out.

Owns the calendar arithmetic: a window of N hours counted either on the clock
or in business hours (working days and hours of a time zone, minus holidays).
All arithmetic is done in UTC, with local days and hours converted through
the zone, so daylight-saving changes never shift a window.
"""

from __future__ import annotations

from datetime import UTC, datetime, time, timedelta

from mailrouter.config import Calendar


def due_after(start: datetime, hours: float, calendar: Calendar) -> datetime:
    """The moment `hours` of the calendar's time have passed after `start` (aware, UTC)."""
    start = start.astimezone(UTC)
    if not calendar.business_hours:
        return start + timedelta(hours=hours)
    remaining = timedelta(hours=hours)
    cursor = start
    day = start.astimezone(calendar.zone).date()
    for _ in range(3660):  # ten years of days: a calendar with no working day is refused
        if calendar.is_working_day(day):
            opens, closes = calendar._at(day, calendar.start), calendar._at(day, calendar.end)
            cursor = max(cursor, opens)
            if cursor < closes:
                if cursor + remaining <= closes:
                    return cursor + remaining
                remaining -= closes - cursor
        day += timedelta(days=1)
        cursor = max(cursor, calendar._at(day, time(0, 0)))
    raise ValueError("the business calendar has no working hours")


def windows_overdue(due: datetime | None, now: datetime, hours: float, calendar: Calendar) -> int:
    """0 while not due; 1 once past due; 2 once a second whole window has also passed."""
    if due is None or now <= due:
        return 0
    return 2 if now > due_after(due, hours, calendar) else 1
