"""Notifications to chat and webhooks: what a case event posts to each configured target
(`notify:` in config.yaml). Pure: builds the posts; the outbox keeps them and
`deliver.webhooks` posts them, retried like mails.

Slack gets an incoming-webhook message (`text` for notifications and clients without
blocks, and Block Kit `blocks`); Teams a Workflows/incoming-webhook message carrying an
Adaptive Card; `webhook` a plain JSON document for whatever reads it.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from mailrouter.config import Config, NotifyEvent, NotifyTarget
from mailrouter.core.digests import reply_link, reply_subject
from mailrouter.core.render import local_time
from mailrouter.core.threads import bare_subject
from mailrouter.model import CaseRecord, OutgoingMail, case_tag

# The outbox row's kind: its recipient is the target's name, its bytes the post's body.
NOTIFY_KIND = "notify"

HEADLINES: dict[NotifyEvent, str] = {
    "urgent": "Caso URGENTE",
    "overdue": "Seguimiento vencido",
    "undeliverable": "No se pudo entregar al proveedor",
    "vendor_reply": "Respondió el proveedor",
}
ICONS: dict[NotifyEvent, str] = {
    "urgent": "🔴",
    "overdue": "⏰",
    "undeliverable": "⚠️",
    "vendor_reply": "💬",
}


@dataclass(frozen=True)
class Notice:
    """One event about one case, as every kind of target is told it."""

    event: NotifyEvent
    case: str  # the tag, ESC-000123
    client: str
    priority: str
    provider: str  # the destination's name
    agent: str
    subject: str
    status: str
    due: str | None  # ISO 8601, UTC
    due_text: str  # in the team's zone and language
    at: str  # when it happened, ISO 8601
    link: str  # mailto: a reply into the case's thread
    detail: str = ""


def notice(
    config: Config, event: NotifyEvent, case: CaseRecord, now: datetime, detail: str = ""
) -> Notice:
    prefix = config.settings.case_tag_prefix
    tag = case_tag(prefix, case.id)
    provider = config.providers.get(case.provider)
    subject = bare_subject(case.subject, prefix, case.vendor_ticket) or "(sin asunto)"
    due = case.follow_up_due
    return Notice(
        event=event,
        case=tag,
        client=case.client,
        priority=case.priority,
        provider=provider.name if provider else case.provider,
        agent=case.agent_address,
        subject=subject,
        status=case.status,
        due=due.isoformat() if due else None,
        due_text=local_time(due, config) if due else "",
        at=now.isoformat(),
        link=reply_link(
            config.settings.intake.address,
            reply_subject(tag, case.subject, prefix, case.vendor_ticket),
        ),
        detail=detail[:500],
    )


def post_body(target: NotifyTarget, told: Notice) -> dict[str, Any]:
    """What `target` is sent about `told`, in the shape its kind expects."""
    if target.kind == "slack":
        return _slack(told)
    if target.kind == "teams":
        return _teams(told)
    return {"event": told.event, **{k: v for k, v in asdict(told).items() if k != "event"}}


def _summary(told: Notice) -> str:
    return (
        f"{ICONS[told.event]} {HEADLINES[told.event]}: {told.case} · {told.priority} · "
        f"{told.client or 'sin cliente'} → {told.provider}"
    )


def _facts(told: Notice) -> list[tuple[str, str]]:
    facts = [
        ("Caso", told.case),
        ("Cliente", told.client or "—"),
        ("Prioridad", told.priority),
        ("Proveedor", told.provider),
        ("Agente", told.agent),
        ("Seguimiento", told.due_text or "—"),
    ]
    if told.detail:
        facts.append(("Detalle", told.detail))
    return facts


def _slack(told: Notice) -> dict[str, Any]:
    # mrkdwn needs &, < and > escaped in text we did not write.
    def safe(text: str) -> str:
        return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")

    fields = [
        {"type": "mrkdwn", "text": f"*{name}*\n{safe(value)}"} for name, value in _facts(told)
    ]
    return {
        "text": safe(_summary(told)),
        "blocks": [
            {"type": "section", "text": {"type": "mrkdwn", "text": f"*{safe(_summary(told))}*"}},
            {"type": "section", "text": {"type": "mrkdwn", "text": safe(told.subject)}},
            # Slack allows at most 10 fields in a section.
            {"type": "section", "fields": fields[:10]},
            {
                "type": "context",
                "elements": [{"type": "mrkdwn", "text": f"<{told.link}|Responder en el caso>"}],
            },
        ],
    }


def _teams(told: Notice) -> dict[str, Any]:
    card = {
        "$schema": "http://adaptivecards.io/schemas/adaptive-card.json",
        "type": "AdaptiveCard",
        "version": "1.4",
        "body": [
            {
                "type": "TextBlock",
                "text": _summary(told),
                "weight": "Bolder",
                "wrap": True,
                "color": "Attention" if told.event in ("urgent", "undeliverable") else "Default",
            },
            {"type": "TextBlock", "text": told.subject, "wrap": True},
            {
                "type": "FactSet",
                "facts": [{"title": name, "value": value} for name, value in _facts(told)],
            },
        ],
        "actions": [{"type": "Action.OpenUrl", "title": "Responder en el caso", "url": told.link}],
    }
    return {
        "type": "message",
        "summary": _summary(told),
        "attachments": [
            {"contentType": "application/vnd.microsoft.card.adaptive", "content": card}
        ],
    }


def notifications(
    config: Config, event: NotifyEvent, case: CaseRecord, now: datetime, detail: str = ""
) -> list[OutgoingMail]:
    """The posts `event` on `case` makes: one outbox row per target that wants the event."""
    targets = [t for t in config.settings.notify if event in t.events]
    if not targets:
        return []
    told = notice(config, event, case, now, detail)
    return [
        OutgoingMail(
            kind=NOTIFY_KIND,
            message_id=f"{event}.{told.case}.{uuid.uuid4().hex}@mailrouter",
            sender="",
            recipients=[target.name],
            subject=f"{event} {told.case}",
            data=json.dumps(post_body(target, told), ensure_ascii=False).encode("utf-8"),
        )
        for target in targets
    ]
