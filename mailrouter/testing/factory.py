"""Realistic escalations, generated: unique Message-IDs and clients, the four destinations."""

from __future__ import annotations

import itertools
import random
from datetime import UTC, datetime, timedelta
from email.message import EmailMessage
from email.policy import SMTP
from email.utils import format_datetime

AGENTS = [
    ("Laura Gómez", "laura.gomez@example.com"),
    ("Andrés Pérez", "andres.perez@example.com"),
    ("María Núñez", "maria.nunez@example.com"),
]
PRIORITIES = ["BAJA", "MEDIA", "ALTA", "URGENTE"]
VENDORS = {
    "hibot": "soporte@hibot.us",
    "panda": "soporte_revendedores@clickpanda.com",
    "operaciones": "support@example.hs-inbox.com",
    "tech": "tech@example.com",
}


def fragment(kind: str, n: int, priority: str, rng: random.Random) -> str:
    client = f"Cliente Prueba {n:05d}"
    description = " ".join(
        rng.choice(
            [
                "el usuario",
                "no puede",
                "ingresar",
                "desde ayer",
                "aparece un error",
                "en la campaña",
                "de la póliza",
                "tras actualizar",
                "la aplicación",
            ]
        )
        for _ in range(40)
    )
    if kind == "hibot":
        return (
            f"Proveedor: HIBOT\nCliente: {client}\nUsuario que tiene el problema: user{n}\n"
            f"Correo asociado al usuario: user{n}@cliente{n}.example\nPrioridad: {priority}\n"
            f"Descripción del problema: {description}\n"
        )
    if kind == "panda":
        return (
            f"Proveedor: PANDA\nCliente: {client}\nUsuario con el problema: mkt{n}\n"
            f"Campaña afectada: Campaña {n}\n"
            f"Email asociado al usuario en el reseller: mkt{n}@cliente{n}.example\n"
            f"Prioridad: {priority}\nDescripción: {description}\n"
        )
    if kind == "operaciones":
        return (
            f"Proveedor: Operaciones\nCliente: {client}\nCategoría de servicio: Incidencia\n"
            f"Categoría: Incidente\nPrioridad: {priority}\nPropietario externo: Laura Gómez\n"
            f"Descripción: {description}\n"
        )
    return (
        f"Área: Tech\nNúmero de póliza: {n:04d}-26\nNombre del cliente: {client}\n"
        f"Prioridad: {priority}\nQué: {description}\nCómo: Perfil > Endosos > Guardar\n"
        f"Cuándo: hoy a las 10:{n % 60:02d}\nDónde: App Android 5.2.0\n"
    )


def escalations(count: int, seed: int = 7, start: int = 0) -> list[tuple[str, bytes]]:
    """`count` escalations as (destination id, raw bytes), numbered from `start`."""
    rng = random.Random(seed + start)
    kinds = list(VENDORS)
    out = []
    for n in range(start, start + count):
        kind = kinds[n % len(kinds)]
        name, address = AGENTS[n % len(AGENTS)]
        msg = EmailMessage(policy=SMTP)
        msg["From"] = f"{name} <{address}>"
        msg["To"] = "escalaciones@example.com"
        msg["Subject"] = f"Escalamiento {kind} - Cliente Prueba {n:05d}"
        msg["Date"] = format_datetime(datetime(2026, 11, 16, tzinfo=UTC) + timedelta(minutes=n))
        msg["Message-ID"] = f"<gen-{seed}-{n}@example.com>"
        text = "Hola equipo,\n\n" + fragment(kind, n, rng.choice(PRIORITIES), rng) + "\nGracias\n"
        msg.set_content(text)
        html = (
            "<html><body>"
            + "".join(f"<p>{line}</p>" for line in text.splitlines())
            + "</body></html>"
        )
        msg.add_alternative(html, subtype="html")
        out.append((kind, msg.as_bytes()))
    return out


_message_ids = itertools.count(1)


def reply(
    sender: str,
    text: str,
    *,
    subject: str = "Re: algo",
    in_reply_to: str | None = None,
    references: list[str] | None = None,
    headers: dict[str, str] | None = None,
) -> bytes:
    """A plain mail to the intake from `sender` (a reply when `in_reply_to` is given), with
    a Message-ID of its own."""
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = "escalaciones@example.com"
    msg["Subject"] = subject
    msg["Message-ID"] = f"<t{next(_message_ids)}@test.example>"
    if in_reply_to:
        msg["In-Reply-To"] = f"<{in_reply_to}>"
    if references:
        msg["References"] = " ".join(f"<{r}>" for r in references)
    for name, value in (headers or {}).items():
        msg[name] = value
    msg.set_content(text)
    return msg.as_bytes()
