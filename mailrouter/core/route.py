"""Route: which destination a parsed escalation goes to, and whether it may go at all.

Pure decisions on a `ParsedMail` and the loaded `Config`: the sender check
(allowed_senders), the first matching route rule, priority normalisation, and
the provider's required fields. The result is a `Decision`; nothing here
touches the database or the network.
"""

from __future__ import annotations

import fnmatch
import functools
import re
from datetime import date, timedelta

from mailrouter.config import PRIORITIES, Condition, Config, Provider, Route, pattern_search
from mailrouter.core.parse import normalize
from mailrouter.model import Decision, MissingField, ParsedMail

_PRIORITY_WORDS = {
    "baja": "BAJA",
    "low": "BAJA",
    "media": "MEDIA",
    "medio": "MEDIA",
    "medium": "MEDIA",
    "normal": "MEDIA",
    "alta": "ALTA",
    "alto": "ALTA",
    "high": "ALTA",
    "urgente": "URGENTE",
    "urgent": "URGENTE",
    "critica": "URGENTE",
    "critical": "URGENTE",
}
_PRIORITY_EMOJI = {"🟢": "BAJA", "🟡": "MEDIA", "🟠": "ALTA", "🔴": "URGENTE"}


def normalize_priority(value: str | None) -> str | None:
    """BAJA/MEDIA/ALTA/URGENTE from any spelling, or None when not recognisable."""
    if not value:
        return None
    for emoji, priority in _PRIORITY_EMOJI.items():
        if emoji in value:
            return priority
    for word in normalize(value).split():
        if word in _PRIORITY_WORDS:
            return _PRIORITY_WORDS[word]
    return None


def sender_allowed(address: str, patterns: list[str]) -> bool:
    address = address.lower()
    return bool(address) and any(fnmatch.fnmatchcase(address, p.lower()) for p in patterns)


def condition_matches(condition: Condition, mail: ParsedMail) -> bool:
    if condition.subject is not None:
        return pattern_search(condition.subject, mail.subject) is not None
    if condition.sender is not None:
        return fnmatch.fnmatchcase(mail.from_address, condition.sender.lower())
    value = mail.fields.get(condition.field or "", "")
    if condition.matches is not None:
        return pattern_search(condition.matches, value) is not None
    return normalize(value) in {normalize(v) for v in condition.equals_list}


def choose_route(mail: ParsedMail, routes: list[Route]) -> Route:
    """The first route whose condition holds; the last route is the default."""
    for route in routes:
        if route.when is None or condition_matches(route.when, mail):
            return route
    return routes[-1]


_ADDRESS = re.compile(r"[^@\s<>(),;:]+@[^@\s<>(),;:]+\.[^@\s<>(),;:]+")


def checked_value(kind: str, value: str, country: str, today: date) -> tuple[str, str | None]:
    """A present value as the router keeps it (phone numbers in E.164, dates as ISO), and
    why it is unusable for its field type (in Spanish, for the agent), or None."""
    value = value.strip()
    if kind == "email":
        address = value.strip("<>")
        return address, None if _ADDRESS.fullmatch(
            address
        ) else f"«{value}» no es una dirección de correo"
    if kind == "priority":
        priority = normalize_priority(value)
        if priority is None:
            return value, f"«{value}» no es una prioridad válida: {', '.join(PRIORITIES)}"
        return priority, None
    if kind == "phone":
        return _phone(value, country)
    if kind == "date":
        day = parse_day(value, today)
        if day is None:
            return value, f"«{value}» no es una fecha (día/mes/año, p. ej. {today:%d/%m/%Y})"
        return day.isoformat(), None
    return value, None


def _phone(value: str, country: str) -> tuple[str, str | None]:
    import phonenumbers

    problem = f"«{value}» no es un teléfono válido (con indicativo si no es de {country})"
    if len(value) > 40:
        return value, problem
    try:
        number = phonenumbers.parse(value, country)
    except phonenumbers.NumberParseException:
        return value, problem
    if not phonenumbers.is_valid_number(number):
        return value, problem
    return phonenumbers.format_number(number, phonenumbers.PhoneNumberFormat.E164), None


_NUMERIC_DATE = re.compile(r"(\d{1,4})[/.-](\d{1,2})[/.-](\d{2,4})")
_WORDS_DATE = re.compile(r"(\d{1,2})(?:\s+de)?\s+([a-zñ.]{3,12})(?:\s+de(?:l)?)?\s+(\d{4})")
_RELATIVE = {"hoy": 0, "today": 0, "ayer": -1, "yesterday": -1, "anteayer": -2, "mañana": 1}


@functools.cache
def _month_numbers() -> dict[str, int]:
    """Spanish and English month names, whole and abbreviated (from the CLDR, by babel)."""
    from babel.dates import get_month_names

    names: dict[str, int] = {}
    for locale in ("es", "en"):
        for width in ("wide", "abbreviated"):
            for number, name in get_month_names(width, locale=locale).items():
                names[normalize(name).rstrip(".")] = number
    names["setiembre"] = 9
    return names


def parse_day(value: str, today: date) -> date | None:
    """A date as agents write it: 16/11/2026 (day first), 2026-11-16, 16 de noviembre de
    2026, 16 nov 2026, or hoy/ayer/mañana (in the team's time zone: `today`)."""
    text = " ".join(value.lower().split())[:60]
    if text in _RELATIVE:
        return today + timedelta(days=_RELATIVE[text])
    try:
        match = _NUMERIC_DATE.fullmatch(text)
        if match:
            first, second, third = (int(g) for g in match.groups())
            if len(match.group(1)) == 4:
                return date(first, second, third)
            return date(third + 2000 if third < 100 else third, second, first)
        match = _WORDS_DATE.fullmatch(text)
        if match:
            month = _month_numbers().get(normalize(match.group(2)).rstrip("."))
            if month is not None:
                return date(int(match.group(3)), month, int(match.group(1)))
    except ValueError:  # 31/02/2026
        return None
    return None


def checked_fields(
    mail: ParsedMail, provider: Provider, config: Config, today: date
) -> tuple[dict[str, str], list[MissingField]]:
    """The mail's fields as the router keeps them (typed values normalised), and the
    required fields that are absent or empty, then the given values that are invalid."""
    specs = config.settings.fields
    missing = [
        MissingField(name, specs[name].label)
        for name in provider.required
        if not mail.fields.get(name, "").strip()
    ]
    fields = dict(mail.fields)
    for name, value in mail.fields.items():
        spec = specs.get(name)
        if spec is None or spec.type == "text" or not value.strip():
            continue
        kept, problem = checked_value(spec.type, value, config.settings.country, today)
        if problem is not None:
            missing.append(MissingField(name, spec.label, problem))
        elif spec.type in ("phone", "date"):
            fields[name] = kept
    return fields, missing


def decide(mail: ParsedMail, config: Config, today: date | None = None) -> Decision:
    """Loop protection first, then the sender check, then the route and its required fields.
    `today` (in the team's time zone) is what "hoy" or "ayer" in a date field mean."""
    settings = config.settings
    if mail.machine_reason:
        return Decision("ignore", f"machine mail: {mail.machine_reason}")
    if not sender_allowed(mail.from_address, settings.allowed_senders):
        return Decision(
            "quarantine", f"sender {mail.from_address or '(none)'} is not in allowed_senders"
        )
    route = choose_route(mail, settings.routes)
    provider = config.providers[route.to]
    priority = normalize_priority(mail.fields.get("prioridad")) or settings.default_priority
    fields, missing = checked_fields(mail, provider, config, today or date.today())
    if missing:
        names = ", ".join(m.label for m in missing)
        return Decision(
            "needs_info", f"missing or invalid: {names}", route, provider, priority, missing, fields
        )
    return Decision("route", f"route {route.name!r} matched", route, provider, priority, [], fields)
