"""Route: which destination a parsed escalation goes to, and whether it may go at all.

Pure decisions on a `ParsedMail` and the loaded `Config`: the sender check
(allowed_senders), the first matching route rule, priority normalisation, and
the provider's required fields. The result is a `Decision`; nothing here
touches the database or the network.
"""

from __future__ import annotations

import fnmatch
import re

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


def invalid_value(kind: str, value: str) -> str | None:
    """Why a present value is unusable for its field type (in Spanish, for the agent), or None."""
    if kind == "email" and not _ADDRESS.fullmatch(value.strip().strip("<>")):
        return f"«{value}» no es una dirección de correo"
    if kind == "priority" and normalize_priority(value) is None:
        return f"«{value}» no es una prioridad válida: {', '.join(PRIORITIES)}"
    return None


def _missing_fields(mail: ParsedMail, provider: Provider, config: Config) -> list[MissingField]:
    """Required fields that are absent or empty, then given values that are invalid."""
    specs = config.settings.fields
    missing = [
        MissingField(name, specs[name].label)
        for name in provider.required
        if not mail.fields.get(name, "").strip()
    ]
    for name, value in mail.fields.items():
        spec = specs.get(name)
        problem = invalid_value(spec.type, value) if spec and value.strip() else None
        if spec is not None and problem is not None:
            missing.append(MissingField(name, spec.label, problem))
    return missing


def decide(mail: ParsedMail, config: Config) -> Decision:
    """Loop protection first, then the sender check, then the route and its required fields."""
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
    missing = _missing_fields(mail, provider, config)
    if missing:
        names = ", ".join(m.label for m in missing)
        return Decision(
            "needs_info", f"missing or invalid: {names}", route, provider, priority, missing
        )
    return Decision("route", f"route {route.name!r} matched", route, provider, priority)
