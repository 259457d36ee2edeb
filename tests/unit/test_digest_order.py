"""The digest a lead reads first (`core/digests.py`), on a frozen clock and no database:
its order (overdue by priority, then the longest overdue; due later today in the team's
zone; the rest by due time), its counts, its flags, and the mailto links in its HTML."""

from __future__ import annotations

import email
import email.policy
import random
from datetime import UTC, datetime, timedelta
from html.parser import HTMLParser
from urllib.parse import parse_qs, unquote, urlsplit

from mailrouter.config import Config
from mailrouter.core.digests import Digest, DigestLine, build_digests, render_digest
from mailrouter.core.render import Renderer
from mailrouter.core.threads import tagged_case_id
from mailrouter.model import CaseData, case_tag
from tests.unit.test_handle import ANDRES, LAURA, LEAD, variant

# Monday 16 November 2026, 14:05 in Bogotá (UTC-5): "today" there ends at 05:00 UTC.
NOW = datetime(2026, 11, 16, 19, 5, tzinfo=UTC)
HOUR = timedelta(hours=1)


def config(**digest: object) -> Config:
    return variant(team={"leads": [LEAD]}, digest=digest)


def case(
    number: int,
    priority: str = "MEDIA",
    due: datetime | None = None,
    *,
    provider: str = "tech",
    status: str = "awaiting_vendor",
    agent: str = LAURA,
    created: datetime = NOW - 30 * HOUR,
    subject: str = "Caída del servicio",
    ticket: str | None = "T-1",
) -> CaseData:
    return CaseData(
        created_at=created,
        updated_at=created,
        agent_address=agent,
        subject=subject,
        status=status,
        provider=provider,
        priority=priority,
        client=f"Cliente {number}",
        follow_up_due=due,
        vendor_ticket=ticket,
        id=number,
    )


def tag(number: int) -> str:
    return case_tag(config().settings.case_tag_prefix, number)


def lead_digest(
    cases: list[CaseData], cfg: Config | None = None, last: dict[str, datetime] | None = None
) -> Digest:
    (digest,) = [d for d in build_digests(cases, cfg or config(), NOW, last) if d.for_lead]
    return digest


def lines(digest: Digest) -> list[DigestLine]:
    return [line for group in digest.groups for line in group.lines]


# In the digest's order; their numbers are not, so that no order by number passes for it.
URGENCY = [
    case(7, "URGENTE", NOW - 6 * HOUR),
    case(3, "URGENTE", NOW - 1 * HOUR),
    case(12, "ALTA", NOW - 2 * HOUR),
    case(1, "MEDIA", NOW - 30 * HOUR),
    case(9, "BAJA", NOW - 50 * HOUR),
    case(5, "BAJA", NOW - timedelta(minutes=1)),
    # Due later today in Bogotá, soonest first, whatever the priority; the last of them
    # falls on tomorrow's date in UTC (23:30 in Bogotá).
    case(11, "BAJA", NOW + HOUR),
    case(2, "URGENTE", NOW + 3 * HOUR),
    case(8, "MEDIA", NOW + 9 * HOUR + timedelta(minutes=25)),
    # Tomorrow in Bogotá (00:30), then later; last, the cases without a due time.
    case(4, "URGENTE", NOW + 10 * HOUR + timedelta(minutes=25)),
    case(10, "ALTA", NOW + 40 * HOUR),
    case(6, "URGENTE", None, status="needs_info"),
]


def tags(cases: list[CaseData]) -> list[str]:
    return [tag(c.id) for c in cases]


def test_order_overdue_by_priority_then_longest_overdue_then_due_today_then_the_rest() -> None:
    shuffled = URGENCY[:]
    random.Random(7).shuffle(shuffled)  # the order is the digest's, not the query's
    digest = lead_digest(shuffled)
    assert [(g.name, g.kind, [line.tag for line in g.lines]) for g in digest.groups] == [
        ("Vencidas", "overdue", tags(URGENCY[:6])),
        ("Vencen hoy", "today", tags(URGENCY[6:9])),
        ("Más adelante", "later", tags(URGENCY[9:])),
    ]
    flags = [(line.overdue, line.due_today) for line in lines(digest)]
    assert flags == [(True, False)] * 6 + [(False, True)] * 3 + [(False, False)] * 3
    (first, *_) = lines(digest)
    assert first.overdue_by == "6 h 0 min"  # how long overdue, on the line


def test_an_unknown_priority_comes_after_baja() -> None:
    digest = lead_digest([case(1, "OTRA", NOW - 9 * HOUR), case(2, "BAJA", NOW - HOUR)])
    assert [line.tag for line in lines(digest)] == [tag(2), tag(1)]


def test_summary_counts_and_new_since_the_recipients_last_digest() -> None:
    cases = [
        case(1, due=NOW - HOUR, created=NOW - 40 * HOUR),
        case(2, due=NOW + HOUR, created=NOW - 3 * HOUR, agent=ANDRES),
        case(3, due=NOW + 2 * HOUR, created=NOW - 2 * HOUR),
        case(4, due=NOW + 30 * HOUR, created=NOW - HOUR),
        case(5, status="needs_info", created=NOW - 50 * HOUR),
    ]
    last = {LEAD: NOW - 24 * HOUR, LAURA: NOW - timedelta(minutes=90)}
    digests = {d.recipient: d for d in build_digests(cases, config(), NOW, last)}
    lead = digests[LEAD]
    assert (lead.open, lead.overdue, lead.due_today, lead.new) == (5, 1, 2, 3)
    assert lead.since and "2026" in lead.since  # when the last one went, as the team reads it
    assert {line.tag for line in lines(lead) if line.new} == {tag(2), tag(3), tag(4)}
    laura = digests[LAURA]
    assert (laura.open, laura.overdue, laura.due_today, laura.new) == (4, 1, 1, 1)
    andres = digests[ANDRES]  # never had one: everything is new to him, no line marked
    assert (andres.open, andres.new, andres.since) == (1, 1, "")
    assert not any(line.new for line in lines(andres))
    assert "NUEVO" in _html(config(), lead) and "NUEVO" not in _html(config(), andres)


def test_new_is_counted_whatever_the_case_of_the_recipients_address() -> None:
    cfg = variant(team={"leads": [LEAD.upper()]})
    digest = lead_digest([case(1, created=NOW - 2 * HOUR)], cfg, {LEAD: NOW - HOUR})
    assert (digest.new, digest.open) == (0, 1)


def test_provider_counts_most_overdue_first() -> None:
    cases = [
        case(1, due=NOW - HOUR, provider="panda"),
        case(2, due=NOW + HOUR, provider="panda"),
        case(3, due=NOW - HOUR, provider="hibot"),
        case(4, due=NOW - 2 * HOUR, provider="hibot"),
        case(5, due=NOW + HOUR, provider="tech"),
        case(6, due=NOW + 2 * HOUR, provider="tech"),
        case(7, due=NOW + 3 * HOUR, provider="tech"),
    ]
    cfg = config()
    names = {p: cfg.providers[p].name for p in ("panda", "hibot", "tech")}
    digest = lead_digest(cases, cfg)
    assert [(p.name, p.open, p.overdue) for p in digest.providers] == [
        (names["hibot"], 2, 2),
        (names["panda"], 2, 1),
        (names["tech"], 3, 0),
    ]
    html = _html(cfg, digest)
    assert all(f">{name}</td>" in html for name in names.values())


def test_flags_undeliverable_and_no_vendor_ack_are_shown_on_their_line() -> None:
    cases = [
        case(1, "URGENTE", NOW - 2 * HOUR, status="undeliverable", ticket=None),
        case(2, "ALTA", NOW - HOUR, provider="hibot", status="open", ticket=None),
        case(3, "ALTA", NOW + HOUR, provider="hibot", status="open", ticket="4567"),
    ]
    digest = lead_digest(cases)
    flags = {line.tag: (line.undeliverable, line.no_vendor_ack) for line in lines(digest)}
    # HIBOT opens tickets and sent none in 30 h; an undeliverable case never reached anyone.
    assert flags == {tag(1): (True, False), tag(2): (False, True), tag(3): (False, False)}
    for text in (_html(config(), digest), _text(config(), digest)):
        first, second, third = (text.index(tag(n)) for n in (1, 2, 3))
        assert first < text.index("NO ENTREGADO") < second
        assert second < text.index("SIN ACUSE DEL PROVEEDOR") < third
        assert text.count("NO ENTREGADO") == 1 and text.count("SIN ACUSE DEL PROVEEDOR") == 1


def test_only_the_most_pressing_cases_are_lines_and_each_section_counts_the_rest() -> None:
    digest = lead_digest(URGENCY, config(max_cases=4))
    assert [(len(g.lines), g.total, g.more) for g in digest.groups] == [
        (4, 6, 2),
        (0, 3, 3),
        (0, 3, 3),
    ]
    assert [line.tag for line in lines(digest)] == tags(URGENCY[:4])
    text = _text(config(), digest)
    assert "y 2 casos más en esta sección" in text and text.count("y 3 casos más") == 2


class _Links(HTMLParser):
    """Every link of a page, with the text inside it."""

    def __init__(self) -> None:
        super().__init__()
        self.links: list[tuple[str, str]] = []
        self._open: str | None = None

    def handle_starttag(self, name: str, attrs: list[tuple[str, str | None]]) -> None:
        if name == "a":
            self._open = dict(attrs).get("href") or ""
            self.links.append((self._open, ""))

    def handle_data(self, data: str) -> None:
        if self._open is not None:
            href, text = self.links[-1]
            self.links[-1] = (href, text + data)

    def handle_endtag(self, name: str) -> None:
        if name == "a":
            self._open = None


def test_each_line_has_a_mailto_that_replies_into_its_case_thread() -> None:
    awkward = "RE: [ESC-000099] Fwd: Póliza ñandú 50% & co + más? #1 a=b"
    cases = [case(1, "URGENTE", NOW - HOUR), case(2, due=NOW + HOUR, subject=awkward)]
    cfg = config()
    settings = cfg.settings
    parser = _Links()
    parser.feed(_html(cfg, lead_digest(cases, cfg)))
    replies = [(href, text) for href, text in parser.links if href.startswith("mailto:")]
    assert len(replies) == 2
    for (href, text), number in zip(replies, (1, 2), strict=True):
        assert tag(number) in text  # the case's tag is on the link itself
        assert " " not in href and "+" not in href  # RFC 6068: every space is %20
        url = urlsplit(href)
        assert unquote(url.path) == settings.intake.address
        (subject,) = parse_qs(url.query, strict_parsing=True)["subject"]
        assert f"[{tag(number)}]" in subject
        # The router threads a participant's mail by exactly this.
        assert tagged_case_id(subject, settings.case_tag_prefix) == number
    subject = parse_qs(urlsplit(replies[1][0]).query)["subject"][0]
    # One "Re:", one tag: the original's prefixes and other tags go, as in the router's mails.
    assert subject == f"Re: [{tag(2)}] Póliza ñandú 50% & co + más? #1 a=b"


def _mail(cfg: Config, digest: Digest) -> email.message.EmailMessage:
    mail = render_digest(Renderer(cfg), digest, cfg, NOW)
    return email.message_from_bytes(mail.data, policy=email.policy.default)  # type: ignore[return-value]


def _html(cfg: Config, digest: Digest) -> str:
    part = _mail(cfg, digest).get_body(preferencelist=("html",))
    assert part is not None
    return str(part.get_content())


def _text(cfg: Config, digest: Digest) -> str:
    part = _mail(cfg, digest).get_body(preferencelist=("plain",))
    assert part is not None
    return str(part.get_content())
