"""The escalation team (team.escalation): an owner for every escalated case, reassignment
and labels by mail, the owner in the reminders and the digests. On the in-memory book."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import pytest

from mailrouter.config import (
    Config,
    ConfigError,
    EscalationTeam,
    Route,
    label_name,
    load_config,
)
from mailrouter.core.digests import build_digests
from mailrouter.core.handle import Handler
from mailrouter.core.team import choose_owner, in_turn, least_open
from mailrouter.core.threads import parse_commands
from mailrouter.model import CaseData
from mailrouter.testing.book import MemoryCaseBook
from tests.unit.test_handle import (
    LAURA,
    LEAD,
    NOW,
    agent_reply,
    arrive,
    body_of,
    details,
    hibot_escalation,
    only,
    parsed,
    shipped,
    vendor_reply,
)

ANA = "ana.torres@example.com"
PEDRO = "pedro.ruiz@example.com"
SOFIA = "sofia.mejia@example.com"
TODAY = NOW.date()  # 2026-11-16 (in Bogotá too at 14:05)


def team_config(routes_labels: dict[str, list[str]] | None = None, **escalation: Any) -> Config:
    """The shipped config with LEAD as lead and an escalation team of Ana, Pedro and Sofía
    (Pedro's short name "pedro"), assigning by round robin unless `escalation` says."""
    team = {
        "members": [
            {"address": ANA, "name": "Ana Torres"},
            {"address": PEDRO, "name": "Pedro Ruiz", "short": "pedro"},
            SOFIA,
        ],
        "assign": "round_robin",
        **escalation,
    }
    config = shipped()
    settings = config.settings
    routes = [
        Route.model_validate(
            {**route.model_dump(), "labels": (routes_labels or {}).get(route.name, [])}
        )
        for route in settings.routes
    ]
    new_team = settings.team.model_copy(
        update={"leads": [LEAD], "escalation": EscalationTeam.model_validate(team)}
    )
    changed = {"team": new_team, "routes": routes}
    return replace(config, settings=settings.model_copy(update=changed))


def team_handler(**escalation: Any) -> Handler:
    return Handler(team_config(**escalation))


def escalate(handler: Handler, book: MemoryCaseBook, client: str, **kw: Any) -> CaseData:
    user = "user-" + "".join(client.lower().split())
    result = arrive(handler, book, hibot_escalation(client, user, **kw))
    assert result.outcome == "routed", result
    assert result.case_id is not None
    return book.cases[result.case_id]


# --- choosing an owner (pure) ------------------------------------------------------------


def test_turns_go_round_the_members_in_order() -> None:
    assert [in_turn(["a", "b", "c"], turn) for turn in range(5)] == ["a", "b", "c", "a", "b"]


def test_least_open_takes_the_fewest_and_breaks_ties_by_turn() -> None:
    counts = {"a": 3, "b": 1, "c": 1}
    assert least_open(["a", "b", "c"], counts, 0) == "b"
    assert least_open(["a", "b", "c"], counts, 1) == "b"
    assert least_open(["a", "b", "c"], counts, 2) == "c"
    assert least_open(["a", "b", "c"], {}, 2) == "c"


def test_a_member_away_is_skipped_until_the_day_after() -> None:
    config = team_config(members=[ANA, {"address": PEDRO, "away_until": "2026-11-17"}])
    owners = {choose_owner(config, TODAY, turn, None).owner for turn in range(4)}
    assert owners == {ANA}
    assert choose_owner(config, date(2026, 11, 18), 1, None).owner == PEDRO


def test_every_member_away_falls_back_on_the_lead_or_nobody() -> None:
    away = [{"address": ANA, "away_until": "2026-12-01"}]
    assert choose_owner(team_config(members=away), TODAY, 0, None).owner == LEAD
    nobody = choose_owner(team_config(members=away, fallback="none"), TODAY, 0, None)
    assert nobody.owner is None and "away" in nobody.how


# --- a new case gets its owner ------------------------------------------------------------


def test_round_robin_gives_each_member_a_case_in_turn() -> None:
    handler, book = team_handler(), MemoryCaseBook()
    owners = [escalate(handler, book, f"Cliente {n}").owner for n in range(4)]
    assert owners == [ANA, PEDRO, SOFIA, ANA]
    assert details(book, 1, "assigned") == [f"{ANA} (round robin)"]


def test_least_open_gives_the_case_to_the_member_with_fewest_in_progress() -> None:
    handler, book = team_handler(assign="least_open"), MemoryCaseBook()
    first = escalate(handler, book, "Uno")
    assert first.owner == ANA
    book.cases[99] = replace(first, id=99, owner=PEDRO)
    assert escalate(handler, book, "Dos").owner == SOFIA  # Ana 1, Pedro 1, Sofía 0
    book.cases[98] = replace(first, id=98, owner=SOFIA)
    assert escalate(handler, book, "Tres").owner == ANA  # Ana 1, Pedro 1, Sofía 2: by turn


def test_the_owner_gets_an_assignment_and_the_acknowledgement_names_the_owner() -> None:
    handler, book = team_handler(), MemoryCaseBook()
    escalate(handler, book, "Acme")
    assignment = only(book, "assignment")
    assert assignment.recipients == [ANA]
    text = body_of(assignment)
    assert "ESC-000001" in text and "Acme" in text and "HIBOT" in text
    ack = body_of(only(book, "acknowledgement"))
    assert "Responsable:   Ana Torres <ana.torres@example.com>" in ack


def test_an_agent_who_is_the_owner_gets_no_assignment_mail() -> None:
    handler = Handler(team_config(members=[LAURA]))
    book = MemoryCaseBook()
    assert escalate(handler, book, "Acme").owner == LAURA
    assert book.outbox("assignment") == []


def test_no_team_means_no_owner_and_no_extra_mail(handler: Handler, book: MemoryCaseBook) -> None:
    case = escalate(handler, book, "Acme")
    assert case.owner is None and book.outbox("assignment") == [] and book.turns == 0


def test_a_case_waiting_for_fields_gets_its_owner_once_complete() -> None:
    handler, book = team_handler(), MemoryCaseBook()
    raw = hibot_escalation("Acme", "user-1").replace(b"Prioridad: MEDIA\n", b"")
    incomplete = raw.replace(b"Usuario que tiene el problema: user-1\n", b"")
    assert arrive(handler, book, incomplete).outcome == "needs_info"
    assert book.cases[1].owner is None
    assert arrive(handler, book, agent_reply(only(book, "needs_info"), "Usuario: user-1")).outcome
    assert book.cases[1].status == "open" and book.cases[1].owner == ANA


def test_the_owner_is_copied_on_the_vendors_replies() -> None:
    handler, book = team_handler(), MemoryCaseBook()
    escalate(handler, book, "Acme")
    arrive(handler, book, vendor_reply(only(book, "forward"), "Lo revisamos."))
    assert only(book, "relay_to_agent").recipients == [LAURA, ANA]


def test_the_overdue_reminder_goes_to_the_owner_first_then_the_lead() -> None:
    handler, book = team_handler(), MemoryCaseBook()
    case = escalate(handler, book, "Acme")
    assert case.follow_up_due is not None
    assert handler.remind(book, case, case.follow_up_due + timedelta(minutes=1)) == 1
    assert only(book, "reminder").recipients == [ANA, LAURA]
    assert handler.remind(book, case, case.follow_up_due + timedelta(days=3)) == 1
    assert only(book, "reminder_lead").recipients == [LEAD]


# --- reassignment by mail -----------------------------------------------------------------


def test_the_owner_hands_the_case_over_by_short_name_and_both_are_told() -> None:
    handler, book = team_handler(), MemoryCaseBook()
    escalate(handler, book, "Acme")
    ack = only(book, "acknowledgement")
    arrive(handler, book, agent_reply(ack, "#asignar pedro", sender=f"Ana <{ANA}>"))
    assert book.cases[1].owner == PEDRO
    (told,) = [m for m in book.outbox("assignment") if "Cambio de responsable" in m.subject]
    assert told.recipients == [PEDRO, ANA]
    assert "por decisión de Ana Torres" in " ".join(body_of(told).split())
    assert details(book, 1, "reassigned") == [f"{ANA} -> {PEDRO} by {ANA}"]
    assert "ahora el responsable es Pedro Ruiz" in body_of(only(book, "commands_done"))


def test_a_member_takes_a_case_and_a_stranger_to_it_may_not_reassign() -> None:
    handler, book = team_handler(), MemoryCaseBook()
    escalate(handler, book, "Acme")
    ack = only(book, "acknowledgement")
    arrive(handler, book, agent_reply(ack, f"#asignar {SOFIA}", sender=f"Pedro <{PEDRO}>"))
    assert book.cases[1].owner == ANA
    refused = body_of(only(book, "commands_refused"))
    assert f"#asignar {SOFIA}" in refused
    arrive(handler, book, agent_reply(ack, "#tomar", sender=f"Pedro <{PEDRO}>"))
    assert book.cases[1].owner == PEDRO


def test_the_agent_or_a_lead_may_reassign_but_not_to_someone_off_the_team() -> None:
    handler, book = team_handler(), MemoryCaseBook()
    escalate(handler, book, "Acme")
    ack = only(book, "acknowledgement")
    arrive(handler, book, agent_reply(ack, "#asignar extraño@otro.example"))
    assert book.cases[1].owner == ANA
    assert "no es del equipo de escalamiento" in body_of(book.outbox("commands_done")[-1])
    arrive(handler, book, agent_reply(ack, f"#asignar {LEAD}", sender=f"Líder <{LEAD}>"))
    assert book.cases[1].owner == LEAD


# --- labels -------------------------------------------------------------------------------


def test_labels_come_from_the_route_the_commands_and_the_cases_state() -> None:
    handler = Handler(team_config(routes_labels={"proveedor-hibot": ["inbound", "Cliente VIP"]}))
    book = MemoryCaseBook()
    case = escalate(handler, book, "Acme", priority="URGENTE")
    assert case.labels == ["inbound", "cliente-vip"]
    ack = only(book, "acknowledgement")
    assert parsed(ack)["X-Mailrouter-Labels"] == "inbound, cliente-vip, urgente"
    assert "Etiquetas:     inbound, cliente-vip, urgente" in body_of(ack)
    assert parsed(only(book, "forward"))["X-Mailrouter-Labels"] is None  # not to the vendor
    reply = "#etiqueta facturación\n#quitar-etiqueta inbound\n#etiqueta urgente"
    arrive(handler, book, agent_reply(ack, reply))
    assert case.labels == ["cliente-vip", "facturación"]
    done = body_of(only(book, "commands_done"))
    assert "urgente es automática" in done and "facturación agregada" in done


@pytest.mark.parametrize(
    ("line", "who"),
    [
        ("#asignar pedro", "pedro"),
        ("#asignar: Pedro Ruiz <pedro.ruiz@example.com>", "pedro.ruiz@example.com"),
        ("  #ASIGNAR ana.torres@example.com, gracias", "ana.torres@example.com"),
        ("#asignar", ""),
    ],
)
def test_asignar_takes_the_address_on_its_line_or_its_first_word(line: str, who: str) -> None:
    assert parse_commands(f"Hola\n{line}\nSaludos").assign == who


def test_a_mail_of_many_label_lines_applies_only_the_first_ones() -> None:
    handler, book = team_handler(), MemoryCaseBook()
    case = escalate(handler, book, "Acme")
    lines = "\n".join(f"#etiqueta e{n}" for n in range(500))
    arrive(handler, book, agent_reply(only(book, "acknowledgement"), lines))
    assert len(case.labels) == 20 and len(details(book, case.id, "labelled")) == 20
    assert "460 más no se aplicaron" in body_of(only(book, "commands_done"))


def test_a_label_is_one_word_of_letters_digits_and_dashes() -> None:
    assert label_name("  Cliente VIP ") == "cliente-vip"
    assert label_name("año-2026") == "año-2026"
    for bad in ("", "-x", "a/b", "x" * 41, "<b>"):
        assert label_name(bad) is None


# --- digests ------------------------------------------------------------------------------


def test_each_owner_gets_a_digest_and_the_leads_groups_by_owner() -> None:
    config = team_config()
    handler, book = Handler(config), MemoryCaseBook()
    for name in ("Uno", "Dos", "Tres", "Cuatro"):
        escalate(handler, book, name)
    late = book.cases[2]  # Pedro's
    assert late.follow_up_due is not None
    now = late.follow_up_due + timedelta(minutes=5)
    for case in book.cases.values():
        if case.id != 2:
            case.follow_up_due = now + timedelta(days=2)
    digests = {d.recipient: d for d in build_digests(book.cases.values(), config, now)}
    assert [line.tag for g in digests[ANA].groups for line in g.lines] == [
        "ESC-000001",
        "ESC-000004",
    ]
    assert digests[LAURA].open == 4
    lead = digests[LEAD]
    assert lead.by_owner
    assert [(g.name, g.total, g.overdue) for g in lead.groups] == [
        ("Pedro Ruiz", 1, 1),
        ("Ana Torres", 2, 0),
        (SOFIA, 1, 0),
    ]
    assert [(o.name, o.open, o.overdue) for o in lead.owners] == [
        ("Pedro Ruiz", 1, 1),
        ("Ana Torres", 2, 0),
        (SOFIA, 1, 0),
    ]


def test_a_lead_who_owns_cases_gets_one_digest_the_teams() -> None:
    away = [{"address": ANA, "away_until": "2026-12-31"}]
    config = team_config(members=away)
    handler, book = Handler(config), MemoryCaseBook()
    assert escalate(handler, book, "Uno").owner == LEAD  # every member away
    to_lead = [d for d in build_digests(book.cases.values(), config, NOW) if d.recipient == LEAD]
    assert [(d.for_lead, d.open) for d in to_lead] == [(True, 1)]


# --- configuration ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("team", "error"),
    [
        ({"assign": "round_robin"}, "needs at least one member"),
        ({"members": [ANA, ANA.upper()]}, "listed twice"),
        ({"members": [{"address": ANA, "short": "x"}, {"address": PEDRO, "short": "x"}]}, "twice"),
        ({"members": ["not-an-address"]}, "not an email address"),
        ({"assign": "sideways", "members": [ANA]}, "assign"),
    ],
)
def test_a_broken_team_is_refused(team: dict[str, Any], error: str) -> None:
    with pytest.raises(ValueError, match=error):
        EscalationTeam.model_validate(team)


def test_a_team_that_falls_back_on_a_lead_needs_a_lead(write_config: Callable[..., Path]) -> None:
    team = {"leads": [], "escalation": {"members": [ANA], "assign": "round_robin"}}
    path = write_config({"team": team})
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    (problem,) = [str(p) for p in caught.value.problems]
    assert problem.startswith(f"{path}:") and "team.leads is empty" in problem


def test_a_route_label_that_is_not_one_is_refused(write_config: Callable[..., Path]) -> None:
    routes = shipped().settings.routes
    data = [r.model_dump(exclude_defaults=True) for r in routes]
    data[0]["labels"] = ["dos palabras/mal"]
    with pytest.raises(ConfigError) as caught:
        load_config(write_config({"routes": data}))
    (problem,) = [str(p) for p in caught.value.problems]
    assert "routes[0].labels: 'dos palabras/mal' is not a label" in problem
