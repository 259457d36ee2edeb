"""The pure core: parsing fragments and choosing routes, on the sample escalations."""

from __future__ import annotations

from pathlib import Path

import mailparser
import pytest

from mailrouter.cli import main
from mailrouter.config import Config, load_config
from mailrouter.core import parse
from mailrouter.core.parse import (
    agent_part,
    bodies_of,
    extract_fields,
    field_aliases,
    html_to_text,
    normalize,
    parse_message,
    read_message,
)
from mailrouter.core.route import decide, normalize_priority, sender_allowed
from mailrouter.model import Attachment
from tests.conftest import CORPUS, ESCALATIONS, PROJECT, escalation


@pytest.fixture(scope="module")
def config() -> Config:
    return load_config(PROJECT / "config.yaml")


def parsed(config: Config, name: str):  # type: ignore[no-untyped-def]
    return parse_message(escalation(name), field_aliases(config), config.settings.intake.address)


# file -> (outcome, rule, provider, priority) with the shipped configuration
ROUTES = {
    "01-hibot-basic.eml": ("route", "proveedor-hibot", "hibot", "ALTA"),
    "02-panda-basic.eml": ("route", "proveedor-panda", "panda", "MEDIA"),
    "03-operaciones-encuestas.eml": ("route", "proveedor-operaciones", "operaciones", "MEDIA"),
    "04-tech-endoso.eml": ("route", "proveedor-tech", "tech", "URGENTE"),
    "05-hibot-html-only.eml": ("route", "proveedor-hibot", "hibot", "BAJA"),
    "06-hibot-missing-correo.eml": ("needs_info", "proveedor-hibot", "hibot", "MEDIA"),
    "07-panda-no-accents.eml": ("route", "proveedor-panda", "panda", "ALTA"),
    # Its rule; finding the open case it duplicates needs the database (threading issue).
    "08-hibot-duplicate.eml": ("route", "proveedor-hibot", "hibot", "URGENTE"),
    "11-forwarded-customer-mail.eml": ("route", "proveedor-panda", "panda", "ALTA"),
    "12-subject-injection.eml": ("route", "proveedor-hibot", "hibot", "BAJA"),
}


@pytest.mark.parametrize("name", sorted(ROUTES))
def test_samples_route_as_their_readme_says(config: Config, name: str) -> None:
    outcome, rule, provider, priority = ROUTES[name]
    decision = decide(parsed(config, name), config)
    assert decision.outcome == outcome, decision.reason
    assert decision.route is not None and decision.route.name == rule
    assert decision.provider is not None and decision.provider.id == provider
    assert decision.priority == priority


def test_fields_of_hibot_sample(config: Config) -> None:
    mail = parsed(config, "01-hibot-basic.eml")
    assert mail.from_address == "laura.gomez@example.com"
    assert mail.from_name == "Laura Gómez"
    assert mail.fields["cliente"] == "Lafise Nicaragua"
    assert mail.fields["usuario"] == "mrodriguez"
    assert mail.fields["correo_usuario"] == "mrodriguez@lafise.com.ni"
    # A value continues over the following lines, up to the blank line.
    assert mail.fields["descripcion"].startswith("El usuario no puede ingresar a la plataforma")
    assert mail.fields["descripcion"].endswith("restableció la contraseña dos veces.")
    assert "Gracias" not in mail.fields["descripcion"]


def test_labels_without_accents_or_case(config: Config) -> None:
    mail = parsed(config, "07-panda-no-accents.eml")
    assert mail.fields["campana"] == "Recordatorio de pago"
    assert mail.fields["email_reseller"] == "admin@colsubsidio.example"
    assert mail.fields["descripcion"].startswith("rebotan todos")


def test_html_only_table(config: Config) -> None:
    mail = parsed(config, "05-hibot-html-only.eml")
    assert mail.fields["cliente"] == "Banco Azteca"
    assert mail.fields["correo_usuario"] == "agente07@bancoazteca.example"
    assert "no se asignan al agente aunque aparece disponible" in mail.fields["descripcion"]


def test_quoted_original_never_overrides_agent(config: Config) -> None:
    mail = parsed(config, "11-forwarded-customer-mail.eml")
    assert mail.fields["cliente"] == "Comfama"
    assert mail.fields["prioridad"] == "ALTA"
    assert "NO ES ESTE" not in mail.agent_text


def test_subject_injection_is_flattened(config: Config) -> None:
    mail = parsed(config, "12-subject-injection.eml")
    assert "\r" not in mail.subject and "\n" not in mail.subject
    assert mail.subject == "Escalamiento HIBOT - prueba Bcc: fuga@evil.example"


def test_attachment_kept(config: Config) -> None:
    mail = parsed(config, "04-tech-endoso.eml")
    (attachment,) = mail.attachments
    assert attachment.filename == "error-endoso.png"
    assert attachment.content_type == "image/png"
    assert attachment.payload.startswith(b"\x89PNG")


def test_out_of_office_is_machine_mail(config: Config) -> None:
    mail = parsed(config, "09-agent-out-of-office.eml")
    assert mail.machine_reason == "Auto-Submitted: auto-replied"
    assert decide(mail, config).outcome == "ignore"


def test_spoofed_sender_quarantined_without_reply(config: Config) -> None:
    decision = decide(parsed(config, "10-spoofed-sender.eml"), config)
    assert decision.outcome == "quarantine"
    assert "soporte@ejemplo-falso.example is not in allowed_senders" in decision.reason


def test_missing_field_is_named(config: Config) -> None:
    decision = decide(parsed(config, "06-hibot-missing-correo.eml"), config)
    assert [m.label for m in decision.missing] == ["Correo asociado al usuario"]


def test_own_mail_is_machine_mail(config: Config) -> None:
    raw = (
        b"From: Mesa <escalaciones@example.com>\r\nTo: x@example.com\r\nSubject: hi\r\n"
        b"X-Mailrouter-Loop: escalaciones@example.com\r\n\r\nCliente: A\r\n"
    )
    mail = parse_message(raw, field_aliases(config), "escalaciones@example.com")
    assert mail.machine_reason == "the router's own mail (loop header)"


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("ALTA", "ALTA"),
        ("alta", "ALTA"),
        ("Urgente!", "URGENTE"),
        ("high", "ALTA"),
        ("🔴 urgente", "URGENTE"),
        ("🟢", "BAJA"),
        ("Media", "MEDIA"),
        ("whenever", None),
        ("", None),
    ],
)
def test_priority_normalisation(given: str, expected: str | None) -> None:
    assert normalize_priority(given) == expected


def test_invalid_priority_is_reported(config: Config) -> None:
    raw = escalation("01-hibot-basic.eml").replace(b"Prioridad: ALTA", b"Prioridad: cuando puedas")
    decision = decide(parse_message(raw, field_aliases(config), "escalaciones@example.com"), config)
    assert decision.outcome == "needs_info"
    assert "cuando puedas" in decision.missing[0].problem


def test_sender_globs() -> None:
    assert sender_allowed("Laura@Example.com", ["*@example.com"])
    assert not sender_allowed("laura@example.com.evil", ["*@example.com"])
    assert not sender_allowed("", ["*"])


ALIASES = {
    normalize("Cliente"): "cliente",
    normalize("Descripción"): "descripcion",
    normalize("Prioridad"): "prioridad",
}


def test_extract_fields_rules() -> None:
    text = "**Cliente:** ACME\nDESCRIPCION : línea uno\nlínea dos\n\nsegundo párrafo\n"
    assert extract_fields(text, ALIASES) == {
        "cliente": "ACME",
        "descripcion": "línea uno línea dos\n\nsegundo párrafo",
    }


@pytest.mark.parametrize(
    "line",
    [
        "Cliente - ACME",
        "cliente – ACME",
        "CLIENTE : ACME",
        "__Cliente__: ACME",
        "Cliente:ACME",
        "* Cliente: ACME",
        "Cliente.: ACME",
    ],
)
def test_label_forms(line: str) -> None:
    assert extract_fields(line, ALIASES) == {"cliente": "ACME"}


def test_unknown_label_continues_the_value_and_first_wins() -> None:
    text = "Descripción: falla\nNota: revisar hoy\nCliente: A\nCliente: B"
    assert extract_fields(text, ALIASES) == {
        "descripcion": "falla Nota: revisar hoy",
        "cliente": "A",
    }


def test_sign_off_ends_agent_part() -> None:
    text = "Cliente: A\nDescripción: no entra\n\nGracias,\nLaura\nCustomer Success"
    assert extract_fields(agent_part(text), ALIASES)["descripcion"] == "no entra"
    # A sentence that merely starts like a sign-off is kept.
    long = "Descripción: x\nGracias a la actualización de ayer el módulo de pagos dejó de cargar"
    assert "módulo de pagos" in extract_fields(agent_part(long), ALIASES)["descripcion"]


def test_agent_part_cuts_quotes_and_signature() -> None:
    assert agent_part("Cliente: A\n\nOn Mon, Bob wrote:\n> Cliente: B") == "Cliente: A"
    assert agent_part("Cliente: A\n-- \nLaura") == "Cliente: A"
    text = "Cliente: A\nDe: Bob <b@x>\nEnviado el: lunes\nCliente: B"
    assert agent_part(text) == "Cliente: A"


def test_html_to_text_tables() -> None:
    html = "<table><tr><td><b>Cliente:</b></td><td>ACME</td></tr></table><p>Hola<br>mundo</p>"
    assert html_to_text(html).splitlines() == ["Cliente: ACME", "", "Hola", "mundo"]


@pytest.mark.parametrize("name", sorted(p.name for p in ESCALATIONS.glob("*.eml")))
def test_route_command_explains_each_sample(
    name: str, capsys: pytest.CaptureFixture[str], tmp_path_factory: pytest.TempPathFactory
) -> None:
    assert main(["--config", str(PROJECT / "config.yaml"), "route", str(ESCALATIONS / name)]) == 0
    out = capsys.readouterr().out
    assert "Dry run: nothing was sent or written." in out
    if name in ROUTES:
        outcome, rule, _provider, priority = ROUTES[name]
        assert f"Rule:        {rule}\n" in out
        assert f"Priority:    {priority}\n" in out
        kind = "forward" if outcome == "route" else "needs_info"
        assert f"----- {kind} to " in out
    else:
        assert "Rule:" not in out and "-----" not in out
    if name == "06-hibot-missing-correo.eml":
        # Exactly what the agent would be told: the missing field, and the template to fill.
        reply = out.split("----- needs_info to andres.perez@example.com")[1]
        assert "  - Correo asociado al usuario\n" in reply
        assert "---------- Plantilla HIBOT ----------" in reply


def test_sender_and_regex_conditions(config: Config) -> None:
    from mailrouter.config import Condition
    from mailrouter.core.route import condition_matches

    mail = parsed(config, "04-tech-endoso.eml")
    assert condition_matches(Condition(sender="*@example.com"), mail)
    assert not condition_matches(Condition(sender="*@ventas.example.com"), mail)
    assert condition_matches(Condition(field="poliza", matches=r"^\d{4}-\d{2}$"), mail)
    assert not condition_matches(Condition(field="usuario", matches="."), mail)
    assert condition_matches(Condition(subject=r"(?i)^tech\b"), mail)
    assert condition_matches(Condition(field="proveedor", equals=["TÉCH", "x"]), mail)


def _bodies_in_short(bodies: tuple[str, str, list[Attachment]]) -> tuple[object, ...]:
    plain, html, attachments = bodies
    # Not the file names: mail-parser names an unnamed attachment at random.
    return plain, html, [(item.content_type, item.payload) for item in attachments]


@pytest.mark.parametrize("folder", [CORPUS, ESCALATIONS], ids=["corpus", "escalations"])
def test_mail_parser_reads_the_same_bodies_from_the_mime_headers_alone(folder: Path) -> None:
    compared = 0
    for path in sorted(folder.rglob("*")):
        if not path.is_file() or path.suffix not in {".eml", ".txt", ""}:
            continue
        msg = read_message(path.read_bytes())
        try:
            whole = _bodies_in_short(bodies_of(mailparser.MailParser(msg)))
        except Exception:
            continue
        view = parse._mime_view(msg)
        assert all(k.lower().startswith(("content-", "mime-version")) for k in view)
        assert _bodies_in_short(parse._bodies_mailparser(msg)) == whole, path.name
        compared += 1
    assert msg.get("From") is not None  # the view left the mail itself whole
    assert compared >= 10
