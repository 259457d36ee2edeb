"""Checks: what `check-config` (and a start or a reload) verifies beyond the files' shape —
that every template compiles and renders a sample case with exactly the data the router
gives it, so a typo shows as `file:line` now, not when the first mail needs the template.

Each template's data is the case data every case template gets (`Renderer.case_context`)
plus what its mail adds, listed in `CASE_EXTRAS`; a new variable handed to a template in
`handle.py` goes there too (the shipped templates' test fails until it does).
"""

from __future__ import annotations

import traceback
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from jinja2 import TemplateError, TemplateNotFound, TemplateSyntaxError

from mailrouter.config import Config, Problem
from mailrouter.core.digests import build_digests
from mailrouter.core.render import Renderer, TemplateShapeError
from mailrouter.model import Attachment, CaseData, CaseInfo

SAMPLE_NOW = datetime(2026, 1, 5, 15, 0, tzinfo=UTC)
_SAMPLE_ATTACHMENT = Attachment("captura.png", "image/png", b"\x89PNG")
_TEXT = "Texto de ejemplo\ncon dos líneas"

_REMINDER = {"age": "2 d 1 h", "last_vendor_date": "2026-01-04 10:00", "last_vendor_text": _TEXT}

# What each case template gets besides the case data (see handle.py and render.py).
CASE_EXTRAS: dict[str, dict[str, Any]] = {
    "acknowledgement.j2": {},
    "needs_info.j2": {},
    "urgent_alert.j2": {},
    "duplicate.j2": {"raised": "MEDIA"},
    "relay_to_agent.j2": {"text": _TEXT},
    "vendor_ticket.j2": {"text": _TEXT},
    "relay_to_vendor.j2": {"text": _TEXT, "subject": "Re: [ESC-000123] Ticket #4567"},
    "undeliverable.j2": {"error": "550 5.1.1 User unknown"},
    "commands_refused.j2": {"refused": ["#resuelto"], "case_agent": "agente@example.com"},
    "commands_done.j2": {"done": ["#resuelto: el caso quedó cerrado"]},
    "reminder.j2": {
        "age": "2 días",
        "last_vendor_date": "2026-01-04 10:00",
        "last_vendor_text": _TEXT,
    },
    "reminder_lead.j2": {
        "age": "2 días",
        "last_vendor_date": "2026-01-04 10:00",
        "last_vendor_text": _TEXT,
    },
}

# Needed once the config names an escalation team (an install from before it has not got
# them: `mailrouter init` adds the missing files, never touching the others).
TEAM_EXTRAS: dict[str, dict[str, Any]] = {
    "assigned.j2": {},
    "reassigned.j2": {"previous": "Pedro Ruiz <pedro@example.com>", "by": "lider@example.com"},
}


def _standalone(config: Config) -> dict[str, dict[str, Any]]:
    """Templates that are not about one case, with the data they get."""
    intake = config.settings.intake.address
    agent = {"name": "Agente", "address": "agente@example.com"}
    overdue = CaseData(
        created_at=SAMPLE_NOW - timedelta(days=2),
        updated_at=SAMPLE_NOW,
        agent_address=agent["address"],
        agent_name=agent["name"],
        subject="Asunto",
        provider=min(config.providers, default=""),
        priority="ALTA",
        client="Cliente",
        follow_up_due=SAMPLE_NOW - timedelta(hours=1),
        vendor_ticket="4567",
        id=123,
    )
    digests = build_digests([overdue], config, SAMPLE_NOW)
    digest = max(digests, key=lambda d: d.for_lead)  # a lead's, when there are leads
    return {
        "too_large.j2": {
            "agent": agent,
            "original_subject": "Asunto",
            "size_mb": "30.0",
            "limit_mb": "25.0",
            "intake_address": intake,
        },
        "unauthenticated_alert.j2": {
            "sender": agent["address"],
            "reason": "dmarc does not pass",
            "original_subject": "Asunto",
            "message_id": "x@example.com",
            "intake_address": intake,
        },
        "replies_stopped.j2": {
            "address": agent["address"],
            "why": "10 automatic replies to it in the last hour",
            "case_tag": "ESC-000123",
            "intake_address": intake,
        },
        "digest.j2": {"digest": digest, "intake_address": intake, "now": "2026-01-05 08:00"},
        "digest.html.j2": {"digest": digest, "intake_address": intake, "now": "2026-01-05 08:00"},
    }


def template_problems(config: Config) -> list[Problem]:
    """Every template the router would use, compiled and rendered on a sample: the syntax
    errors, unknown variables and missing files, as `file:line: template: problem`."""
    renderer = Renderer(config)
    problems: list[Problem] = []
    extras = {**CASE_EXTRAS, **(TEAM_EXTRAS if config.settings.team.escalation.members else {})}
    for provider in sorted(config.providers.values(), key=lambda p: p.id):
        case_data = _case_data(renderer, config, provider.id)
        for name, extra in {**extras, provider.template: {}}.items():
            problem = _try(renderer, config, name, {**case_data, **extra})
            if problem is not None and problem not in problems:
                problems.append(problem)
    for name, data in _standalone(config).items():
        problem = _try(renderer, config, name, data)
        if problem is not None:
            problems.append(problem)
    return problems


def _case_data(renderer: Renderer, config: Config, provider_id: str) -> dict[str, Any]:
    provider = config.providers[provider_id]
    case = CaseInfo(
        "ESC-000123",
        "ALTA",
        "open",
        "2026-01-06 10:00 (-05)",
        "4567",
        owner="Ana Torres <ana@example.com>",
        labels="inbound, urgente",
    )
    fields = {name: f"ejemplo {name}" for name in config.settings.fields}
    data = renderer.case_context(
        case, provider, fields, "Agente", "agente@example.com", "Asunto original"
    )
    return {**data, "attachments": [_SAMPLE_ATTACHMENT], "missing": []}


def _try(renderer: Renderer, config: Config, name: str, data: dict[str, Any]) -> Problem | None:
    path = config.templates_dir / name
    render: Callable[[], object] = (
        (lambda: renderer.env.get_template(name).render(**data))
        if name.endswith(".html.j2")
        else (lambda: renderer.render(name, data))
    )
    try:
        render()
    except TemplateNotFound:
        return Problem(path, 1, "template", "no such template")
    except TemplateSyntaxError as exc:
        return Problem(Path(exc.filename or path), exc.lineno, "template", exc.message or str(exc))
    except TemplateShapeError as exc:
        return Problem(path, 1, "template", str(exc))
    except (TemplateError, TypeError, ValueError, AttributeError, LookupError) as exc:
        file, line = _where(exc, path)
        return Problem(file, line, "template", f"{type(exc).__name__}: {exc}")
    return None


def _where(exc: BaseException, path: Path) -> tuple[Path, int]:
    """The template file and line a render error came from: Jinja gives the frames of a
    template its file name and line (a macro's error is in the macro's file)."""
    for frame in reversed(traceback.extract_tb(exc.__traceback__)):
        if frame.filename.endswith(".j2") and frame.lineno is not None:
            return Path(frame.filename), frame.lineno
    return path, 1
