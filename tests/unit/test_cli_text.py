"""How a dry run prints a rendered mail: its headers decoded, its text parts in their
charsets, an attachment as one line."""

from __future__ import annotations

from email.message import EmailMessage

from mailrouter.cli import _text_of


def test_a_mail_is_printed_as_a_person_reads_it() -> None:
    mail = EmailMessage()
    mail["Subject"] = "Revisión urgente: ñandú y acción"
    mail["To"] = "Andrés Pérez <andres.perez@example.com>"
    mail.set_content("Canción de cuna.\nSegunda línea.\n", charset="iso-8859-1")
    mail.add_alternative("<p>Canción</p>", subtype="html")
    mail.add_attachment(b"%PDF", maintype="application", subtype="pdf", filename="acta.pdf")
    text = _text_of(mail.as_bytes())
    lines = text.split("\n")
    assert "Subject: Revisión urgente: ñandú y acción" in lines
    assert "To: Andrés Pérez <andres.perez@example.com>" in lines
    assert "Canción de cuna.\nSegunda línea." in text
    assert "<p>Canción</p>" in lines
    assert "[adjunto: acta.pdf (application/pdf, 4 bytes)]" in lines
    assert "\r" not in text


def test_a_text_part_in_an_unknown_charset_is_read_as_utf8() -> None:
    raw = (
        b"Subject: x\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: text/plain; charset=x-no-such-charset\r\n"
        b"Content-Transfer-Encoding: 8bit\r\n\r\n"
        b"se\xc3\xb1al\r\n"
    )
    assert _text_of(raw).endswith("\n\nseñal")
