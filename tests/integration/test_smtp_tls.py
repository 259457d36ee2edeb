"""The SMTP transport's security modes against aiosmtpd relays: STARTTLS + login, implicit TLS."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import AuthResult, LoginPassword

from mailrouter.config import SmtpSettings
from mailrouter.deliver.transports import SmtpTransport, TemporaryFailure
from mailrouter.testing.servers import RecordingRelay, free_port

pytestmark = pytest.mark.integration

MAIL = b"From: a@example.com\r\nTo: b@example.com\r\nSubject: hola\r\n\r\ncuerpo\r\n"


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A throwaway self-signed certificate for 127.0.0.1 (it is its own CA)."""
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=127.0.0.1",
            "-addext",
            "subjectAltName=IP:127.0.0.1",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


def server_context(certificate: tuple[Path, Path]) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*certificate)
    return context


def check_login(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
    ok = isinstance(data, LoginPassword) and (data.login, data.password) == (b"bot", b"pw")
    return AuthResult(success=ok, handled=False)


@pytest.fixture
def starttls_relay(certificate: tuple[Path, Path]) -> Iterator[RecordingRelay]:
    port = free_port()
    recorder = RecordingRelay("127.0.0.1", port)
    controller = Controller(
        recorder,
        hostname="127.0.0.1",
        port=port,
        tls_context=server_context(certificate),
        require_starttls=True,
        auth_required=True,
        authenticator=check_login,
    )
    controller.start()
    yield recorder
    controller.stop()


@pytest.fixture
def implicit_tls_relay(certificate: tuple[Path, Path]) -> Iterator[RecordingRelay]:
    port = free_port()
    recorder = RecordingRelay("127.0.0.1", port)
    controller = Controller(
        recorder,
        hostname="127.0.0.1",
        port=port,
        ssl_context=server_context(certificate),
        server_hostname="127.0.0.1",
    )
    controller.start()
    yield recorder
    controller.stop()


def send(settings: SmtpSettings) -> None:
    async def go() -> None:
        transport = SmtpTransport(settings)
        try:
            await transport.send("a@example.com", ["b@example.com"], MAIL, "x")
        finally:
            await transport.close()

    asyncio.run(go())


def test_starttls_with_login(
    starttls_relay: RecordingRelay, certificate: tuple[Path, Path]
) -> None:
    send(
        SmtpSettings(
            host="127.0.0.1",
            port=starttls_relay.port,
            security="starttls",
            username="bot",
            password="pw",
            ca_file=str(certificate[0]),
        )
    )
    (received,) = starttls_relay.messages
    assert received.rcpt_tos == ["b@example.com"] and b"Subject: hola" in received.data


def test_wrong_password_is_temporary(
    starttls_relay: RecordingRelay, certificate: tuple[Path, Path]
) -> None:
    with pytest.raises(TemporaryFailure, match="refused our login"):
        send(
            SmtpSettings(
                host="127.0.0.1",
                port=starttls_relay.port,
                security="starttls",
                username="bot",
                password="wrong",
                ca_file=str(certificate[0]),
            )
        )
    assert starttls_relay.messages == []


def test_untrusted_certificate_is_refused(starttls_relay: RecordingRelay) -> None:
    # Without our CA the self-signed certificate must not be accepted.
    with pytest.raises(TemporaryFailure):
        send(
            SmtpSettings(
                host="127.0.0.1",
                port=starttls_relay.port,
                security="starttls",
                username="bot",
                password="pw",
            )
        )
    assert starttls_relay.messages == []


def test_implicit_tls(implicit_tls_relay: RecordingRelay, certificate: tuple[Path, Path]) -> None:
    send(
        SmtpSettings(
            host="127.0.0.1",
            port=implicit_tls_relay.port,
            security="tls",
            ca_file=str(certificate[0]),
        )
    )
    assert len(implicit_tls_relay.messages) == 1
