"""Hostile mails (issue 18), generated at the sizes that were reported: shapes that froze
the parser, a display name that spoke as an agent, headers and MIME trees no escalation
has. Each is built when asked for, with a `variant` number that makes it a mail of its own
(its Message-ID, client and user), so that a burst holding the same shape twice has two
escalations, not a duplicate.

`padded_normal(size)` is the fair measure for a large shape: a normal escalation padded
with a text attachment to the same size. A 7 MB mail cannot cost what a 2 KB one costs;
what matters is that a hostile one costs no more per byte than a normal one of its size.
"""

from __future__ import annotations

import email
import email.policy
from collections.abc import Callable, Collection
from email.message import EmailMessage

from mailrouter.testing.factory import escalations

AGENT = "Laura Gómez <laura.gomez@example.com>"
SPOOF = "carla.diaz@example.com <x@evil.example.org>"
TRUSTED_HOST = "mx.example.com"
# The `authentication` settings under which the Authentication-Results shape is read: its
# headers claim the trusted host, so that they are parsed, not skipped as a stranger's.
AUTHENTICATION = {"trusted_authserv_ids": [TRUSTED_HOST], "require": "dkim-or-spf"}
AUTHENTICATION_SHAPE = "16 Authentication-Results of 1000 chars"
# Too large to send into a daemon burst many times over: the bench reads them in-process.
LARGE = frozenset({"HTML table 7 MB", "header 5 MB"})

CRLF = b"\r\n"
Builder = Callable[[int], bytes]


def _fields(variant: int) -> tuple[str, str]:
    """A complete HIBOT fragment around the place where a hostile run goes: after the
    client's line, where the label scanner meets it among real fields."""
    before = f"Hola equipo,\n\nProveedor: HIBOT\nCliente: Lafise {variant}\n"
    after = (
        f"Usuario que tiene el problema: hostil{variant}\n"
        f"Correo asociado al usuario: hostil{variant}@lafise.com.ni\n"
        "Prioridad: ALTA\n"
        "Descripción del problema: el usuario no puede ingresar desde esta mañana.\n\n"
        "Gracias,\nLaura Gómez\n"
    )
    return before, after


def _message(variant: int, sender: str = AGENT) -> EmailMessage:
    msg = EmailMessage(policy=email.policy.SMTP)
    msg["From"] = sender
    msg["To"] = "escalaciones@example.com"
    msg["Subject"] = f"Escalamiento HIBOT - Lafise {variant}"
    msg["Date"] = "Mon, 16 Nov 2026 14:05:00 -0500"
    msg["Message-ID"] = f"<hostile-{variant}@example.com>"
    return msg


def text_mail(run: str, variant: int, *, sender: str = AGENT, cte: str | None = None) -> bytes:
    """An escalation whose text carries `run` after the client's line."""
    before, after = _fields(variant)
    msg = _message(variant, sender)
    if cte:
        msg.set_content(before + run + "\n" + after, cte=cte)
    else:
        msg.set_content(before + run + "\n" + after)
    return msg.as_bytes()


def html_mail(html: str, variant: int) -> bytes:
    """An escalation with no text part: its fields are read from the HTML."""
    before, after = _fields(variant)
    lines = "".join(f"<p>{line}</p>\n" for line in (before + after).splitlines() if line)
    msg = _message(variant)
    msg.set_content(f"<html><body>\n{lines}{html}\n</body></html>\n", subtype="html")
    return msg.as_bytes()


def _head(variant: int, *extra: bytes) -> bytes:
    """The header of a hand-built mail (the email package would refuse or repair these)."""
    lines = [
        f"From: {AGENT}".encode(),
        b"To: escalaciones@example.com",
        f"Subject: Escalamiento HIBOT - Lafise {variant}".encode(),
        b"Date: Mon, 16 Nov 2026 14:05:00 -0500",
        f"Message-ID: <hostile-{variant}@example.com>".encode(),
        b"MIME-Version: 1.0",
        *extra,
    ]
    return CRLF.join(lines) + CRLF


def _with_subject(raw: bytes, subject: bytes) -> bytes:
    head, body = raw.split(CRLF + CRLF, 1)
    kept = [line for line in head.split(CRLF) if not line.startswith(b"Subject:")]
    return CRLF.join([*kept, b"Subject: " + subject]) + CRLF + CRLF + body


def _authentication_results(count: int, length: int) -> bytes:
    """`count` well-formed header lines of `length` characters from the trusted host, each
    a run of failed DKIM results: read as far as the parser's budget, and failing."""
    prefix = f"Authentication-Results: {TRUSTED_HOST}; "
    result = "dkim=fail header.d=a.example"
    fits = (length - len(prefix) + 2) // (len(result) + 2)
    spare = length - len(prefix) - (fits * (len(result) + 2) - 2)
    # The spare characters go into the first signer's name, to make the length exact.
    results = [f"dkim=fail header.d={'a' * (1 + spare)}.example", *[result] * (fits - 1)]
    line = (prefix + "; ".join(results)).encode() + CRLF
    return line * count


def _mime_parts(variant: int, count: int) -> bytes:
    before, after = _fields(variant)
    first = b"--B\r\nContent-Type: text/plain; charset=utf-8\r\n\r\n"
    first += (before + after).replace("\n", "\r\n").encode()
    rest = b"".join(
        b"--B\r\nContent-Type: text/plain\r\n\r\nparte %d\r\n" % i for i in range(count)
    )
    head = _head(variant, b"Content-Type: multipart/mixed; boundary=B")
    return head + CRLF + first + rest + b"--B--\r\n"


def _nested(variant: int, depth: int) -> bytes:
    opening = b"".join(
        b"Content-Type: multipart/mixed; boundary=B%d\r\n\r\n--B%d\r\n" % (i, i)
        for i in range(depth)
    )
    closing = b"".join(b"\r\n--B%d--\r\n" % i for i in reversed(range(depth)))
    return _head(variant) + opening + b"Content-Type: text/plain\r\n\r\nx\r\n" + closing


def _header_fields(variant: int, count: int) -> bytes:
    fields = b"".join(b"X-H%d: v\r\n" % i for i in range(count))
    return _head(variant) + fields + CRLF + b"Cliente: Lafise\r\n"


def _long_header(variant: int, size: int) -> bytes:
    return _head(variant) + b"X-Long: " + b"a " * (size // 2) + CRLF + CRLF + b"x\r\n"


def _html_table(size: int) -> str:
    # One row a line, as table generators write them: a single 7 MB line is no SMTP mail.
    row = "<tr><td>Cliente:</td><td>Lafise</td></tr>\n"
    return "<table>\n" + row * (size // len(row)) + "</table>"


BUILDERS: dict[str, Builder] = {
    "spaces 5000": lambda v: text_mail(" " * 5000, v),
    "tabs 250": lambda v: text_mail("\t" * 250, v),
    "colons 5000": lambda v: text_mail(":" * 5000, v),
    # Each encoded line stays under the 1001-byte limit; decoded, they join into one run.
    "quoted-printable spaces 20000": lambda v: text_mail(" " * 20_000, v, cte="quoted-printable"),
    "HTML-only 160 KB": lambda v: html_mail("<p>x</p>" * 20_000, v),
    "HTML table 7 MB": lambda v: html_mail(_html_table(7 * 1024 * 1024), v),
    "display-name spoof": lambda v: text_mail("", v, sender=SPOOF),
    "subject 200 KB": lambda v: _with_subject(text_mail("", v), b"palabra " * 25_000),
    AUTHENTICATION_SHAPE: lambda v: _authentication_results(16, 1000) + text_mail("", v),
    "900 MIME parts": lambda v: _mime_parts(v, 900),
    "3000 nested multiparts": lambda v: _nested(v, 3000),
    "5000 header fields": lambda v: _header_fields(v, 5000),
    "header 5 MB": lambda v: _long_header(v, 5 * 1024 * 1024),
}


def hostile(name: str, variant: int = 0) -> bytes:
    return BUILDERS[name](variant)


def shapes(variant: int = 0, skip: Collection[str] = ()) -> dict[str, bytes]:
    """Every hostile shape but those in `skip`, by name."""
    return {name: build(variant) for name, build in BUILDERS.items() if name not in skip}


def authenticated(raw: bytes) -> bytes:
    """`raw` with a passing result from the trusted host: a normal escalation as a router
    requiring authentication receives it."""
    result = f"Authentication-Results: {TRUSTED_HOST}; dkim=pass header.d=example.com"
    return result.encode() + CRLF + raw


def padded_normal(size: int) -> bytes:
    """A generated escalation with a plain-text attachment of filler, about `size` bytes in
    all (the escalation alone when it is that large already)."""
    (_, normal), *_ = escalations(1)
    if size <= len(normal):
        return normal
    filler = size - len(normal)
    padded = _padded(normal, filler)
    # The MIME wrapping and line ends add a few hundred bytes: once corrected, it is close.
    return _padded(normal, filler - (len(padded) - size))


def _padded(normal: bytes, filler: int) -> bytes:
    msg = email.message_from_bytes(normal, policy=email.policy.SMTP)
    assert isinstance(msg, EmailMessage)
    msg.make_mixed()
    line = "registro de la sesion sin novedad, linea de relleno para el tamano\n"
    text = (line * (max(filler, 0) // len(line) + 1))[: max(filler, 0)]
    msg.add_attachment(text, subtype="plain", filename="registro.txt")
    return msg.as_bytes()
