"""Chat and webhook notifications: the configuration, the posts' shapes, and which events
queue them (on the in-memory book)."""

from __future__ import annotations

import json
from dataclasses import replace
from datetime import timedelta
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
import yaml

from mailrouter.config import ConfigError, NotifyTarget, load_config
from mailrouter.core.handle import Handler
from mailrouter.core.notify import NOTIFY_KIND
from mailrouter.testing.book import MemoryCaseBook
from tests.conftest import PROJECT
from tests.unit.test_handle import (
    LEAD,
    NOW,
    arrive,
    hibot_escalation,
    sample,
    shipped,
    vendor_reply,
)

SLACK = NotifyTarget(kind="slack", url="https://hooks.example.com/s", name="equipo")
TEAMS = NotifyTarget(
    kind="teams", url="https://teams.example.com/t", name="teams", events=["urgent"]
)
HOOK = NotifyTarget(kind="webhook", url="http://127.0.0.1:9/x", name="tablero")


def notifying(*targets: NotifyTarget) -> Handler:
    config = shipped()
    team = config.settings.team.model_copy(update={"leads": [LEAD]})
    settings = config.settings.model_copy(update={"notify": list(targets), "team": team})
    return Handler(replace(config, settings=settings))


def posts(book: MemoryCaseBook) -> list[tuple[str, dict[str, Any]]]:
    return [(m.recipients[0], json.loads(m.raw)) for m in book.outbox(NOTIFY_KIND)]


def test_an_urgent_case_posts_to_each_target_that_wants_urgent() -> None:
    book = MemoryCaseBook()
    handler = notifying(SLACK, TEAMS, HOOK)
    result = arrive(handler, book, hibot_escalation("Clínica Sol", "u1", "URGENTE"))
    assert result.outcome == "routed"
    sent = dict(posts(book))
    assert set(sent) == {"equipo", "teams", "tablero"}
    # Apart from the case's mails: a chat that is down holds up no forward.
    assert {m.case_id for m in book.outbox(NOTIFY_KIND)} == {None}
    assert "notified" in book.events_of(result.case_id or 0)

    slack = sent["equipo"]
    assert "URGENTE" in slack["text"] and "ESC-" in slack["text"]
    assert [block["type"] for block in slack["blocks"]] == [
        "section",
        "section",
        "section",
        "context",
    ]
    card = sent["teams"]["attachments"][0]
    assert card["contentType"] == "application/vnd.microsoft.card.adaptive"
    assert card["content"]["type"] == "AdaptiveCard"
    hook = sent["tablero"]
    assert hook["event"] == "urgent" and hook["priority"] == "URGENTE"
    assert hook["client"] == "Clínica Sol" and hook["provider"] == "HIBOT"
    assert hook["case"].startswith("ESC-") and hook["due"]
    link = urlsplit(hook["link"])
    assert link.scheme == "mailto" and unquote(link.path) == shipped().settings.intake.address
    assert f"[{hook['case']}]" in parse_qs(link.query)["subject"][0]


def test_a_case_that_is_not_urgent_posts_nothing_at_open() -> None:
    book = MemoryCaseBook()
    arrive(notifying(SLACK, HOOK), book, hibot_escalation("Clínica Sol", "u2", "MEDIA"))
    assert posts(book) == []


def test_a_vendor_reply_and_an_overdue_case_post_to_those_that_want_them() -> None:
    book = MemoryCaseBook()
    handler = notifying(SLACK, TEAMS)  # teams: urgent only
    result = arrive(handler, book, sample("01-hibot-basic.eml"))
    (forward,) = book.outbox("forward")
    arrive(handler, book, vendor_reply(forward, "Reiniciamos la sesión."), NOW + timedelta(hours=1))
    assert [(name, body["text"].split(":")[0]) for name, body in posts(book)] == [
        ("equipo", "💬 Respondió el proveedor")
    ]
    case = book.cases[result.case_id or 0]
    assert case.follow_up_due is not None
    handler.remind(book, case, case.follow_up_due + timedelta(days=30))
    handler.remind(book, case, case.follow_up_due + timedelta(days=31))  # once per period
    events = [body["text"].split(":")[0] for _, body in posts(book)]
    assert events == ["💬 Respondió el proveedor", "⏰ Seguimiento vencido"]


def test_slack_text_from_strangers_is_escaped() -> None:
    book = MemoryCaseBook()
    arrive(notifying(SLACK), book, hibot_escalation("<!channel> & co", "u3", "URGENTE"))
    ((_, slack),) = posts(book)
    assert "<!channel>" not in json.dumps(slack) and "&lt;!channel&gt; &amp; co" in slack["text"]


def _config_with(tmp_path: Any, notify: Any) -> Any:
    data = yaml.safe_load((PROJECT / "config.yaml").read_text(encoding="utf-8"))
    data |= {
        "providers_dir": str(PROJECT / "providers"),
        "templates_dir": str(PROJECT / "templates"),
        "notify": notify,
    }
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(data, allow_unicode=True), encoding="utf-8")
    return path


def test_targets_are_named_by_kind_unless_named(tmp_path: Any) -> None:
    config = load_config(
        _config_with(
            tmp_path,
            [
                {"kind": "slack", "url": "https://hooks.example.com/a"},
                {"kind": "webhook", "url": "https://x.example.com/b", "events": ["overdue"]},
            ],
        )
    )
    assert [t.name for t in config.settings.notify] == ["slack-1", "webhook-2"]
    assert config.settings.notify[0].events == [
        "urgent",
        "overdue",
        "undeliverable",
        "vendor_reply",
    ]


@pytest.mark.parametrize(
    ("notify", "said"),
    [
        ([{"kind": "discord", "url": "https://x.example.com"}], "notify[0].kind"),
        ([{"kind": "slack", "url": "ftp://x.example.com"}], "not an http(s):// URL"),
        ([{"kind": "slack", "url": "https://a", "events": ["sometimes"]}], "notify[0].events[0]"),
        (
            [
                {"kind": "slack", "url": "https://a", "name": "x"},
                {"kind": "teams", "url": "https://b", "name": "x"},
            ],
            "two targets named x",
        ),
    ],
)
def test_a_broken_notify_section_is_refused_with_line_and_field(
    tmp_path: Any, notify: Any, said: str
) -> None:
    with pytest.raises(ConfigError) as refused:
        load_config(_config_with(tmp_path, notify))
    assert said in str(refused.value) and "config.yaml:" in str(refused.value)
