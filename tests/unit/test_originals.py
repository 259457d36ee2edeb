"""The customer's original travels (issue 19, item 4): a forwarded mail — attached as
message/rfc822, or inline after a forward separator — reaches the vendor as a mail of its
own, named from its subject with .eml, with its own attachments inside it."""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage

from mailrouter.core.handle import Handler
from mailrouter.testing.book import MemoryCaseBook
from mailrouter.testing.factory import reply as compose
from tests.unit.test_handle import LAURA, arrive, only, sample

FRAGMENT = (
    "Proveedor: HIBOT\nCliente: Lafise\nUsuario que tiene el problema: mrodriguez\n"
    "Correo asociado al usuario: mrodriguez@lafise.com.ni\n"
    "Descripción del problema: ver el correo del cliente\n"
)


def customer_mail() -> EmailMessage:
    original = EmailMessage()
    original["From"] = "Marta Rodríguez <mrodriguez@lafise.com.ni>"
    original["To"] = "soporte@example.com"
    original["Subject"] = "No puedo entrar a INBOUND: urgente/hoy"
    original["Date"] = "Mon, 16 Nov 2026 08:00:00 -0500"
    original.set_content("Buenos días, desde ayer no puedo entrar.\nDescripción: otra cosa\n")
    original.add_attachment(b"\x89PNG...", maintype="image", subtype="png", filename="error.png")
    return original


def forwarded_parts(book: MemoryCaseBook) -> list[EmailMessage]:
    forward = email.message_from_bytes(only(book, "forward").raw, policy=email.policy.default)
    assert isinstance(forward, EmailMessage)
    return list(forward.iter_attachments())  # type: ignore[arg-type]


def test_an_attached_mail_reaches_the_vendor_whole(handler: Handler, book: MemoryCaseBook) -> None:
    escalation = EmailMessage()
    escalation["From"] = f"Laura <{LAURA}>"
    escalation["To"] = "escalaciones@example.com"
    escalation["Subject"] = "Escalamiento HIBOT"
    escalation.set_content(FRAGMENT)
    escalation.add_attachment(customer_mail())  # message/rfc822, as mail clients attach it
    raw = bytes(escalation)
    mail = handler.parse(raw)
    # Neither its text nor its attachments are the agent's.
    assert "desde ayer" not in mail.body
    assert mail.fields["descripcion"] == "ver el correo del cliente"
    assert arrive(handler, book, raw).outcome == "routed"
    (part,) = forwarded_parts(book)
    assert part.get_content_type() == "message/rfc822"
    assert part.get_filename() == "No puedo entrar a INBOUND urgente hoy.eml"
    inner = part.get_content()
    assert inner["Subject"] == "No puedo entrar a INBOUND: urgente/hoy"
    assert inner["From"] == "Marta Rodríguez <mrodriguez@lafise.com.ni>"
    assert inner["Date"] == "Mon, 16 Nov 2026 08:00:00 -0500"
    assert [a.get_filename() for a in inner.iter_attachments()] == ["error.png"]


def test_an_outlook_forward_inline_travels_as_a_mail(
    handler: Handler, book: MemoryCaseBook
) -> None:
    # Sample 11: "RV:" and Outlook's "-----Mensaje original-----" block.
    assert arrive(handler, book, sample("11-forwarded-customer-mail.eml")).outcome == "routed"
    (part,) = forwarded_parts(book)
    assert part.get_content_type() == "message/rfc822"
    assert part.get_filename() == "Campaña en cola.eml"
    inner = part.get_content()
    assert inner["From"] == "Envíos Comfama <envios@comfama.example>"
    assert inner["Subject"] == "Campaña en cola"
    assert "la campaña lleva dos horas en cola" in inner.get_content()
    assert book.cases[1].fields["cliente"] == "Comfama"  # the agent's, not the original's


def test_a_gmail_forward_inline_travels_as_a_mail(handler: Handler, book: MemoryCaseBook) -> None:
    text = FRAGMENT + (
        "\n---------- Forwarded message ---------\n"
        "From: Marta <mrodriguez@lafise.com.ni>\nDate: Mon, Nov 16, 2026 at 8:00 AM\n"
        "Subject: Clave bloqueada\nTo: <soporte@example.com>\n\nNo puedo entrar.\n"
    )
    raw = compose(f"Laura <{LAURA}>", text, subject="Fwd: Clave bloqueada")
    assert arrive(handler, book, raw).outcome == "routed"
    (part,) = forwarded_parts(book)
    assert part.get_filename() == "Clave bloqueada.eml"
    assert "No puedo entrar." in part.get_content().get_content()


def test_an_eml_attached_as_octet_stream_is_a_mail(handler: Handler, book: MemoryCaseBook) -> None:
    escalation = EmailMessage()
    escalation["From"] = f"Laura <{LAURA}>"
    escalation["To"] = "escalaciones@example.com"
    escalation["Subject"] = "Escalamiento HIBOT"
    escalation.set_content(FRAGMENT)
    escalation.add_attachment(
        bytes(customer_mail()), maintype="application", subtype="octet-stream", filename="x.eml"
    )
    assert arrive(handler, book, bytes(escalation)).outcome == "routed"
    (part,) = forwarded_parts(book)
    assert part.get_content_type() == "message/rfc822" and part.get_filename() == "x.eml"


def test_a_quoted_reply_is_not_a_forwarded_original(handler: Handler) -> None:
    text = FRAGMENT + "\n-----Mensaje original-----\nDe: Pedro <p@x.com>\nAsunto: hola\n\nviejo\n"
    mail = handler.parse(compose(f"Laura <{LAURA}>", text, subject="RE: hola"))
    assert mail.attachments == []
