"""Field values as agents write them (issue 19, item 3): values over several lines, without
the signature, closing or quoted history after them, and typed values checked and kept in
one form (phones in E.164, dates as ISO), a bad one answered like a missing field."""

from __future__ import annotations

from datetime import UTC, date, datetime, timedelta

import pytest

from mailrouter.core.handle import Handler
from mailrouter.core.route import parse_day
from mailrouter.testing.book import MemoryCaseBook
from mailrouter.testing.factory import reply as compose
from tests.unit.test_handle import LAURA, NOW, arrive, body_of, only

BASE = (
    "Proveedor: HIBOT\nCliente: Lafise\nUsuario que tiene el problema: mrodriguez\n"
    "Correo asociado al usuario: mrodriguez@lafise.com.ni\nPrioridad: ALTA\n"
)


def escalate(
    handler: Handler, book: MemoryCaseBook, extra: str, now: datetime = NOW
) -> tuple[str, dict[str, str]]:
    raw = compose(f"Laura <{LAURA}>", BASE + extra, subject="Escalamiento HIBOT")
    result = arrive(handler, book, raw, now)
    fields = handler.parse(raw).fields if result.case_id is None else book.cases[1].fields
    return result.outcome, fields


@pytest.mark.parametrize(
    ("ending", "name"),
    [
        ("\n\nSaludos,\nLaura Gómez\nCustomer Success\n", "a closing and a name"),
        ("\n-- \nLaura Gómez | +57 300 123 4567\n", "a -- signature"),
        ("\n\nEnviado desde mi iPhone\n", "a mobile footer"),
        ("\n\nOn Mon, Nov 16, 2026 at 10:00 AM Pedro <p@x.com> wrote:\n> antes\n", "a quote"),
        ("\n\nEl lun, 16 nov 2026 a las 10:00, Pedro <p@x.com> escribió:\n> antes\n", "a quote"),
        (
            "\n\nDe: Pedro <p@x.com>\nEnviado: lunes, 16 de noviembre de 2026 10:00\n"
            "Para: soporte@example.com\nAsunto: antes\n\ntexto viejo\n",
            "an Outlook block",
        ),
    ],
)
def test_the_last_field_runs_over_lines_and_stops_before_the_rest(
    handler: Handler, book: MemoryCaseBook, ending: str, name: str
) -> None:
    text = "Descripción del problema: no puede ingresar\ndesde esta mañana,\nni con otra clave."
    outcome, fields = escalate(handler, book, text + ending)
    assert outcome == "routed", name
    assert fields["descripcion"] == "no puede ingresar desde esta mañana, ni con otra clave."


def test_a_phone_is_kept_in_e164(handler: Handler, book: MemoryCaseBook) -> None:
    extra = "Descripción del problema: no entra\nTeléfono: 300 123 4567\n"
    outcome, fields = escalate(handler, book, extra)
    assert outcome == "routed"
    assert fields["telefono"] == "+573001234567"
    assert "+573001234567" in body_of(only(book, "forward"))


def test_a_bad_phone_is_answered_like_a_missing_field(
    handler: Handler, book: MemoryCaseBook
) -> None:
    outcome, _ = escalate(handler, book, "Descripción del problema: x\nCelular: 300-123\n")
    assert outcome == "needs_info"
    answer = body_of(only(book, "needs_info"))
    assert "Teléfono de contacto" in answer and "«300-123» no es un teléfono válido" in answer
    assert not book.outbox("forward")


def test_a_date_is_kept_as_iso(handler: Handler, book: MemoryCaseBook) -> None:
    outcome, fields = escalate(handler, book, "Descripción del problema: x\nFecha: 16/11/2026\n")
    assert outcome == "routed" and fields["fecha_incidente"] == "2026-11-16"


def test_a_relative_date_is_read_in_the_team_s_time_zone(
    handler: Handler, book: MemoryCaseBook
) -> None:
    # 03:00 UTC on the 17th is still the evening of the 16th in Bogotá.
    late = datetime(2026, 11, 17, 3, 0, tzinfo=UTC)
    _, fields = escalate(handler, book, "Descripción del problema: x\nFecha: hoy\n", late)
    assert fields["fecha_incidente"] == "2026-11-16"


def test_an_impossible_date_is_answered(handler: Handler, book: MemoryCaseBook) -> None:
    outcome, _ = escalate(handler, book, "Descripción del problema: x\nFecha: 31/02/2026\n")
    assert outcome == "needs_info"
    assert "«31/02/2026» no es una fecha" in body_of(only(book, "needs_info"))


@pytest.mark.parametrize(
    ("written", "day"),
    [
        ("16/11/2026", date(2026, 11, 16)),
        ("16-11-26", date(2026, 11, 16)),
        ("2026-11-16", date(2026, 11, 16)),
        ("16 de noviembre de 2026", date(2026, 11, 16)),
        ("16 nov 2026", date(2026, 11, 16)),
        ("16 Noviembre 2026", date(2026, 11, 16)),
        ("3 setiembre 2026", date(2026, 9, 3)),
        ("November 16 2026", None),
        ("ayer", date(2026, 11, 15)),
        ("mañana", date(2026, 11, 17)),
        ("la semana pasada", None),
        ("9" * 5000, None),
    ],
)
def test_dates_as_agents_write_them(written: str, day: date | None) -> None:
    assert parse_day(written, date(2026, 11, 16)) == day


def test_the_shipped_samples_still_route(handler: Handler, book: MemoryCaseBook) -> None:
    from tests.unit.test_handle import sample

    for n, name in enumerate(["01-hibot-basic.eml", "02-panda-basic.eml", "04-tech-endoso.eml"]):
        result = arrive(handler, book, sample(name), NOW + timedelta(minutes=n))
        assert result.outcome == "routed", (name, result.reason)
