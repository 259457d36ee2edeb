"""`mailrouter quarantine`: a queue a lead empties (list, show, release, attach, drop), on
SQLite through the command itself; each act recorded on the mail's row with who and when."""

from __future__ import annotations

import email
import email.policy
import json
import re
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from email.message import EmailMessage
from pathlib import Path

import pytest

from mailrouter.cli import main
from mailrouter.config import load_config
from mailrouter.service import Pipeline, Quarantine, QuarantineError, case_number
from mailrouter.store.db import Store
from mailrouter.store.repo import SqlCaseBook
from mailrouter.store.tables import Message
from tests.conftest import escalation, headers_of

pytestmark = pytest.mark.integration

LEAD = "lead.ana"  # the OS user the commands run as (getpass reads LOGNAME first)
HIBOT = "soporte@hibot.us"
STRANGER = "soporte@ejemplo-falso.example"
NOTE = re.compile(
    r" — (released|dropped|attached to ESC-\d{6}) by lead\.ana"
    r" at \d{4}-\d\d-\d\d \d\d:\d\d:\d\d UTC$"
)

VENDOR_REPLY = (
    b"From: Soporte HIBOT <soporte@hibot.us>\r\n"
    b"To: escalaciones@example.com\r\n"
    b"Subject: Re: consulta\r\n"
    b"Message-ID: <v1@hibot.us>\r\n"
    b"Date: Mon, 16 Nov 2026 15:00:00 -0500\r\n"
    b"\r\n"
    b"Hola, no sabemos a que caso corresponde esto.\r\n"
)
# A stranger's subject carrying terminal escape sequences (a title change, a colour).
HOSTILE = (
    b"From: x@evil.example.org\r\n"
    b"To: escalaciones@example.com\r\n"
    b"Subject: hola \x1b]0;pwned\x07 \x1b[31mrojo\r\n"
    b"Message-ID: <h1@evil.example.org>\r\n"
    b"\r\n"
    b"texto \x1b[2J borrado\r\n"
)
# More header fields than the parser reads: refused before it is parsed further.
UNREADABLE = (
    b"From: laura.gomez@example.com\r\nSubject: muchos campos\r\n"
    + b"X-Relleno: a\r\n" * 1001
    + b"\r\nhola\r\n"
)
# An agent of a team whose domain is not in allowed_senders yet.
NEW_AGENT = "laura.gomez@agentes.example.net"
PDF = b"%PDF-1.4\n% informe de prueba\n" + b"0" * 300


def from_new_agent() -> bytes:
    """01-hibot-basic.eml as an agent of the new team writes it."""
    return escalation("01-hibot-basic.eml").replace(b"laura.gomez@example.com", NEW_AGENT.encode())


def stranger_with_attachment() -> bytes:
    msg = EmailMessage()
    msg["From"] = "Cliente <cliente@evil.example.org>"
    msg["To"] = "escalaciones@example.com"
    msg["Subject"] = "Informe del problema"
    msg["Message-ID"] = "<a1@evil.example.org>"
    msg.set_content("Adjunto el informe del error en la campaña.\n")
    msg.add_attachment(PDF, maintype="application", subtype="pdf", filename="informe.pdf")
    return msg.as_bytes(policy=email.policy.SMTP)


class Setup:
    """A configuration on a temp SQLite database, the pipeline the daemon would run, and
    the command as a lead types it."""

    def __init__(self, write_config: Callable[..., Path], overrides: dict[str, object]) -> None:
        self.write_config = write_config
        self.path = write_config(overrides)
        self.config = load_config(self.path)
        self.store = Store(self.config.database_url)
        self.pipeline = Pipeline(self.config, self.store, lambda: datetime.now(UTC))

    def process(self, raw: bytes, whole_size: int | None = None) -> int:
        """Process one mail; return the id of its inbound row."""
        self.pipeline.process(raw, None, whole_size)
        return max(m.id for m in self.store.inbound())

    def command(self, *args: str) -> int:
        return main(["--config", str(self.path), "quarantine", *args])

    def row(self, number: int) -> Message:
        (found,) = [m for m in self.store.inbound() if m.id == number]
        return found

    def listed(self) -> list[int]:
        return [m.id for m in self.store.quarantined(1000)]

    def close(self) -> None:
        self.store.close()


@pytest.fixture
def setup(
    write_config: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> Iterator[Callable[..., Setup]]:
    monkeypatch.setenv("LOGNAME", LEAD)
    made: list[Setup] = []

    def make(overrides: dict[str, object] | None = None) -> Setup:
        made.append(Setup(write_config, overrides or {}))
        return made[-1]

    yield make
    for one in made:
        one.close()


def errors(capsys: pytest.CaptureFixture[str]) -> list[str]:
    """What the last command said on stderr, line by line (never a traceback)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.splitlines()


def test_list_alone_by_reason_and_as_json(
    setup: Callable[..., Setup], capsys: pytest.CaptureFixture[str]
) -> None:
    s = setup()
    s.process(escalation("01-hibot-basic.eml"))  # routed: not in quarantine
    spoofed = s.process(escalation("10-spoofed-sender.eml"))
    vendor = s.process(VENDOR_REPLY)
    attached = s.process(stranger_with_attachment())
    capsys.readouterr()

    assert s.command() == 0  # alone: the list
    out = capsys.readouterr().out
    assert [int(line.split()[0]) for line in out.splitlines()[1:] if line[:6].strip()] == [
        spoofed,
        vendor,
        attached,
    ]
    assert f"sender {STRANGER} is not in allowed_senders" in out
    assert "unmatched vendor reply" in out and "Informe del problema" in out

    assert s.command("list", "--reason", "VENDOR reply") == 0
    out = capsys.readouterr().out
    assert "unmatched vendor reply" in out and STRANGER not in out

    assert s.command("list", "--json") == 0
    listed = json.loads(capsys.readouterr().out)
    assert [m["id"] for m in listed] == [spoofed, vendor, attached]
    assert all(set(m) == {"id", "received", "from", "reason", "subject"} for m in listed)
    first = listed[0]
    assert first["from"] == STRANGER and first["subject"] == "Escalamiento HIBOT - urgente"
    assert first["reason"] == f"sender {STRANGER} is not in allowed_senders"
    assert datetime.fromisoformat(first["received"]).utcoffset() == UTC.utcoffset(None)

    assert s.command("list", "--json", "--reason", "allowed_senders", "--limit", "1") == 0
    assert [m["id"] for m in json.loads(capsys.readouterr().out)] == [attached]
    assert s.command("--limit", "1") == 0  # the older spelling of the limit
    assert f"{attached:>6} " in capsys.readouterr().out

    assert s.command("list", "--reason", "nada parecido") == 0
    assert "(nothing in quarantine with a reason holding 'nada parecido')" in (
        capsys.readouterr().out
    )


def test_show_decodes_the_text_lists_attachments_and_keeps_escapes_off_the_terminal(
    setup: Callable[..., Setup], capsys: pytest.CaptureFixture[str]
) -> None:
    s = setup()
    spoofed = s.process(escalation("10-spoofed-sender.eml"))
    attached = s.process(stranger_with_attachment())
    hostile = s.process(HOSTILE)
    capsys.readouterr()

    assert s.command("show", str(spoofed)) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"Message #{spoofed}, received ")
    assert f"Reason: sender {STRANGER} is not in allowed_senders" in out
    assert f"From: Soporte <{STRANGER}>" in out
    assert "Subject: Escalamiento HIBOT - urgente" in out
    # The quoted-printable text, decoded.
    assert "Por favor restablecer la contraseña y enviarla a este correo." in out
    assert "=C3=B1" not in out

    assert s.command("show", str(attached)) == 0
    out = capsys.readouterr().out
    assert "Adjunto el informe del error en la campaña." in out
    assert f"Attachments:\n  informe.pdf (application/pdf, {len(PDF)} bytes)" in out
    assert "JVBERi0" not in out  # the attachment's base64 is not printed

    assert s.command("show", str(hostile)) == 0
    out = capsys.readouterr().out
    assert "\x1b" not in out and "\x07" not in out
    assert "Subject: hola ?]0;pwned? ?[31mrojo" in out
    assert "texto ?[2J borrado" in out


def test_show_raw_writes_the_stored_bytes(
    setup: Callable[..., Setup], capsysbinary: pytest.CaptureFixture[bytes]
) -> None:
    s = setup()
    raw = stranger_with_attachment()
    number = s.process(raw)
    capsysbinary.readouterr()
    assert s.command("--show", str(number)) == 0  # the older spelling
    assert capsysbinary.readouterr().out == raw
    assert s.command("show", str(number), "--raw") == 0
    assert capsysbinary.readouterr().out == raw


def test_release_after_the_sender_is_allowed_routes_the_mail(
    setup: Callable[..., Setup], capsys: pytest.CaptureFixture[str]
) -> None:
    s = setup()
    raw = from_new_agent()
    number = s.process(raw)
    assert s.row(number).outcome == "quarantined"
    assert s.store.cases() == []
    # The admin adds the new team's domain.
    s.write_config({"allowed_senders": ["*@example.com", "*@agentes.example.net"]})
    capsys.readouterr()

    assert s.command("release", str(number)) == 0
    out = capsys.readouterr().out
    assert out == f"message #{number}: routed (route 'proveedor-hibot' matched), case ESC-000001\n"
    (case,) = s.store.cases()
    assert case.provider == "hibot" and case.status == "open"
    kinds = sorted((m.kind, *m.recipients) for m in s.store.outbound(case.id))
    assert kinds == [("acknowledgement", NEW_AGENT), ("forward", HIBOT)]

    # The quarantined row keeps its bytes and says who released it and when.
    row = s.row(number)
    assert row.outcome == "released"
    assert row.raw == raw and row.dedupe_key is None
    assert (row.reason or "").startswith(f"sender {NEW_AGENT} is not in allowed_senders — ")
    assert NOTE.search(row.reason or "") and " — released by lead.ana at " in (row.reason or "")
    (routed,) = [m for m in s.store.inbound() if m.id != number]
    assert (routed.outcome, routed.case_id, routed.raw) == ("routed", case.id, raw)
    assert s.listed() == []

    # Released once: a second release, an attach or a drop of it is refused.
    assert s.command("release", str(number)) == 1
    (line,) = errors(capsys)
    assert line.startswith(f"no quarantined message #{number} (released: ")
    assert s.command("drop", str(number)) == 1
    assert len(errors(capsys)) == 1
    assert s.row(number).outcome == "released"
    # The mail arriving again is the routed one: nothing new.
    again = s.pipeline.process(raw)
    assert (again.outcome, again.duplicate, again.case_id) == ("routed", True, case.id)
    assert len(s.store.outbound()) == 2


def test_release_of_a_mail_still_unwanted_quarantines_it_again(
    setup: Callable[..., Setup], capsys: pytest.CaptureFixture[str]
) -> None:
    s = setup()
    number = s.process(escalation("10-spoofed-sender.eml"))
    capsys.readouterr()
    assert s.command("release", str(number)) == 0
    out = capsys.readouterr().out
    assert out == (
        f"message #{number}: quarantined (sender {STRANGER} is not in allowed_senders)\n"
    )
    (again,) = s.listed()
    assert again != number and s.row(number).outcome == "released"
    assert s.store.outbound() == [] and s.store.cases() == []


def test_attach_to_a_case_threads_relays_and_writes_the_history(
    setup: Callable[..., Setup], capsys: pytest.CaptureFixture[str]
) -> None:
    s = setup()
    s.process(escalation("01-hibot-basic.eml"))
    spoofed = s.process(escalation("10-spoofed-sender.eml"))
    with_pdf = s.process(stranger_with_attachment())
    (case,) = s.store.cases()
    (forward,) = [m for m in s.store.outbound(case.id) if m.kind == "forward"]
    capsys.readouterr()

    assert s.command("release", str(spoofed), "--attach-to", "esc-1") == 0
    out = capsys.readouterr().out
    assert out == (
        f"message #{spoofed}: threaded (attached to ESC-000001 from quarantine by {LEAD}), "
        "case ESC-000001\n"
    )
    assert s.command("release", str(with_pdf), "--attach-to", "ESC-000001") == 0
    capsys.readouterr()

    relays = [m for m in s.store.outbound(case.id) if m.kind == "relay_to_vendor"]
    assert [m.recipients for m in relays] == [[HIBOT], [HIBOT]]
    first = headers_of(relays[0].raw)
    assert first["In-Reply-To"] == f"<{forward.message_id}>"
    assert "[ESC-000001]" in str(first["Subject"])
    body = first.get_body(preferencelist=("plain",))
    assert body is not None and "restablecer la contraseña" in str(body.get_content())
    second = headers_of(relays[1].raw)
    (pdf,) = second.iter_attachments()
    assert pdf.get_filename() == "informe.pdf" and pdf.get_content() == PDF
    # Nothing to the strangers themselves.
    everyone = {r for m in s.store.outbound() for r in m.recipients}
    assert STRANGER not in everyone and "cliente@evil.example.org" not in everyone

    history = [(e.kind, e.detail) for e in s.store.events(case.id)]
    assert ("attached_from_quarantine", f"{LEAD}: message #{spoofed} from {STRANGER}") in history
    assert (
        "attached_from_quarantine",
        f"{LEAD}: message #{with_pdf} from cliente@evil.example.org",
    ) in history
    assert [k for k, _ in history].count("relayed_to_vendor") == 2
    (case,) = s.store.cases()
    assert case.status == "awaiting_vendor"

    for number in (spoofed, with_pdf):
        row = s.row(number)
        assert row.outcome == "attached" and row.dedupe_key is None and row.case_id is None
        match = NOTE.search(row.reason or "")
        assert match and match.group(1) == "attached to ESC-000001"
    threaded = [m for m in s.store.inbound() if m.case_id == case.id and m.outcome == "threaded"]
    assert sorted(m.sender for m in threaded) == ["cliente@evil.example.org", STRANGER]
    assert all("attached to ESC-000001 from quarantine" in (m.reason or "") for m in threaded)
    assert s.listed() == []


def test_attach_to_a_closed_case_records_without_relaying(
    setup: Callable[..., Setup], capsys: pytest.CaptureFixture[str]
) -> None:
    s = setup()
    s.process(escalation("01-hibot-basic.eml"))
    number = s.process(escalation("10-spoofed-sender.eml"))
    quarantine = Quarantine(s.config, s.store, lambda: datetime.now(UTC))
    with s.store.transaction() as session:  # the agent closed it (#resuelto)
        closing = SqlCaseBook(session).case(1)
        assert closing is not None
        closing.status = "closed"
    result = quarantine.attach(number, "ESC-1", "lead.ana")
    assert result.outcome == "threaded" and result.case_id == 1
    assert "not relayed to the vendor (case closed" in result.reason
    assert [m.kind for m in s.store.outbound(1) if m.kind == "relay_to_vendor"] == []
    assert ("attached_from_quarantine", f"lead.ana: message #{number} from {STRANGER}") in [
        (e.kind, e.detail) for e in s.store.events(1)
    ]


def test_drop_marks_the_mail_and_keeps_it(
    setup: Callable[..., Setup], capsys: pytest.CaptureFixture[str]
) -> None:
    s = setup()
    raw = escalation("10-spoofed-sender.eml")
    number = s.process(raw)
    capsys.readouterr()
    assert s.command("drop", str(number)) == 0
    assert capsys.readouterr().out == (
        f"message #{number} dropped by {LEAD} (kept in the database, no longer listed)\n"
    )
    row = s.row(number)
    assert row.outcome == "dropped" and row.raw == raw
    assert row.dedupe_key is not None  # still answers for its mail
    match = NOTE.search(row.reason or "")
    assert match and match.group(1) == "dropped"
    assert s.listed() == []
    # The same mail again gets the outcome it was given: dropped, not a new quarantine.
    again = s.pipeline.process(raw)
    assert (again.outcome, again.duplicate) == ("dropped", True)
    assert s.listed() == [] and len(s.store.inbound()) == 1
    assert s.command("show", str(number)) == 0  # what was dropped can still be read
    assert f"Message #{number}, received " in capsys.readouterr().out


def test_refusals_are_one_line_and_change_nothing(
    setup: Callable[..., Setup], capsys: pytest.CaptureFixture[str]
) -> None:
    s = setup({"intake": {"max_message_bytes": 100_000}})
    routed = s.process(escalation("01-hibot-basic.eml"))
    outgoing = max(m.id for m in s.store.outbound())
    spoofed = s.process(escalation("10-spoofed-sender.eml"))
    header = escalation("02-panda-basic.eml").split(b"\n\n", 1)[0] + b"\n\n"
    header_only = s.process(header, whole_size=300_000)  # over IMAP, too large
    unreadable = s.process(UNREADABLE)
    assert s.listed() == [spoofed, header_only, unreadable]
    assert "only its header is stored" in (s.row(header_only).reason or "")
    assert s.row(unreadable).reason == "more than 1000 header fields"
    capsys.readouterr()

    def refused(*args: str) -> str:
        assert s.command(*args) == 1
        (line,) = errors(capsys)
        return line

    for action in (("show",), ("release",), ("drop",), ("release", "--attach-to", "ESC-1")):
        assert refused(action[0], "999", *action[1:]) == "no message #999"
        assert refused(action[0], str(outgoing), *action[1:]) == f"no message #{outgoing}"
    assert refused("release", str(routed)) == (
        f"no quarantined message #{routed} (routed: route 'proveedor-hibot' matched)"
    )
    assert refused("drop", str(routed)).startswith(f"no quarantined message #{routed} (routed: ")
    assert refused("release", str(spoofed), "--attach-to", "ESC-999") == "no case ESC-000999"
    assert refused("release", str(spoofed), "--attach-to", "CASO-1") == (
        "'CASO-1' is not a case: give it as ESC-123"
    )
    assert refused("release", str(spoofed), "--attach-to", "ESC-1a").startswith("'ESC-1a'")

    line = refused("release", str(header_only))
    assert line.startswith(f"message #{header_only} cannot be released from the database")
    assert "in the IMAP folder 'Quarantine'" in line
    assert refused("release", str(header_only), "--attach-to", "ESC-1") == line
    line = refused("release", str(unreadable), "--attach-to", "ESC-1")
    assert line.startswith(f"message #{unreadable} cannot be attached: the router cannot read it")
    assert "more than 1000 header fields" in line

    # Nothing changed: all three still wait, the case has no new mail or history.
    assert s.listed() == [spoofed, header_only, unreadable]
    assert all(s.row(n).outcome == "quarantined" for n in s.listed())
    assert [e.kind for e in s.store.events(1)] == ["opened"]
    assert len(s.store.outbound(1)) == 2

    # What can be done with them: read the header-only one, drop it; release the other.
    assert s.command("show", str(header_only)) == 0
    out = capsys.readouterr().out
    assert (
        "Subject: " in out
        and "only its header is stored; the whole mail is in the IMAP folder 'Quarantine'" in out
    )
    assert s.command("drop", str(header_only)) == 0
    assert s.command("release", str(unreadable)) == 0
    out = capsys.readouterr().out
    assert out.endswith(": quarantined (more than 1000 header fields)\n")
    assert s.row(header_only).outcome == "dropped"
    assert s.row(unreadable).outcome == "released"


def test_the_time_recorded_is_the_clock_passed_in(write_config: Callable[..., Path]) -> None:
    config = load_config(write_config())
    store = Store(config.database_url)
    moment = datetime(2026, 11, 16, 19, 5, 7, tzinfo=UTC)
    Pipeline(config, store, lambda: moment).process(escalation("10-spoofed-sender.eml"))
    (held,) = Quarantine(config, store, lambda: moment).held()
    Quarantine(config, store, lambda: moment).drop(held.id, "someone")
    (row,) = store.inbound()
    assert (row.reason or "").endswith(" — dropped by someone at 2026-11-16 19:05:07 UTC")
    with pytest.raises(QuarantineError, match=f"no quarantined message #{held.id} \\(dropped: "):
        Quarantine(config, store, lambda: moment).drop(held.id, "someone")
    store.close()


def test_case_tags_a_lead_may_type() -> None:
    assert case_number("ESC-123", "ESC") == 123
    assert case_number(" esc-000123 ", "ESC") == 123
    assert case_number("MESA-7", "MESA") == 7
    for wrong in ("123", "ESC123", "ESC-", "ESC-12a", "ESC-١٢", "OTRO-12", "ESC-1-2"):
        assert case_number(wrong, "ESC") is None, wrong
