"""OAuth2 logins (issue 20): tokens from Microsoft's and Google's flows against a local
HTTPS authority that answers in their format, a token command, IMAP XOAUTH2 checked by a
real Dovecot (its oauth2 passdb introspects each token), SMTP XOAUTH2 by an aiosmtpd relay
that requires it, and the daemon end to end through both."""

from __future__ import annotations

import asyncio
import shutil
import ssl
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from aiosmtpd.controller import Controller
from imapclient.exceptions import LoginError

from mailrouter.cli import main
from mailrouter.config import ImapSettings, OAuth2Settings, SmtpSettings, load_config
from mailrouter.deliver.transports import SmtpTransport, TemporaryFailure
from mailrouter.intake.imap import ImapIntake
from mailrouter.model import IntakeHooks
from mailrouter.oauth2 import REFRESH_BEFORE_SECONDS, TokenError, TokenSource
from mailrouter.testing.oauth import TokenAuthority, XOAuth2Relay, make_ca, service_account_file
from mailrouter.testing.servers import (
    Dovecot,
    RecordingRelay,
    dovecot_binary,
    free_port,
    start_dovecot,
    stop_dovecot,
    wait_until,
)
from tests.conftest import DaemonThread, crlf, escalation

MAILBOX = "escalaciones"


@pytest.fixture
def authority() -> Iterator[TokenAuthority]:
    server = TokenAuthority().start()
    yield server
    server.stop()


@pytest.fixture
def https_authority(tmp_path: Path) -> Iterator[tuple[TokenAuthority, Path]]:
    ca_file, context = make_ca(tmp_path)
    server = TokenAuthority().start(context)
    yield server, ca_file
    server.stop()


@pytest.fixture
def oauth_dovecot(authority: TokenAuthority) -> Iterator[Dovecot]:
    binary = dovecot_binary()
    if binary is None:
        pytest.fail("Dovecot is not installed: `make test` installs dovecot-imapd (as root)")
    server, result = start_dovecot(binary, f"{authority.base_url}/introspect")
    assert result.returncode == 0, (server.base / "startup.log").read_text(errors="replace")
    yield server
    stop_dovecot(server)
    shutil.rmtree(server.base, ignore_errors=True)


@pytest.fixture
def oauth_relay(authority: TokenAuthority) -> Iterator[XOAuth2Relay]:
    port = free_port()
    relay = XOAuth2Relay("127.0.0.1", port, authority=authority)
    controller = Controller(
        relay, hostname="127.0.0.1", port=port, auth_required=True, auth_require_tls=False
    )
    controller.start()
    yield relay
    controller.stop()


def token_file(tmp_path: Path, token: str) -> Path:
    path = tmp_path / "token"
    path.write_text(token + "\n")
    return path


def command_settings(path: Path) -> OAuth2Settings:
    """A token command that prints whatever the file holds: a broker rotating tokens."""
    return OAuth2Settings(
        provider="command",
        token_command=f"{sys.executable} -c \"print(open('{path}').read().strip())\"",
    )


def microsoft(authority: TokenAuthority) -> OAuth2Settings:
    """An app registration at the test's authority (an OpenID Connect issuer, like Entra)."""
    return OAuth2Settings(
        provider="microsoft",
        client_id=authority.client_id,
        client_secret=authority.client_secret,
        authority=f"{authority.base_url}/contoso",
    )


# --- where a token comes from ---------------------------------------------------------------


def test_a_token_is_cached_and_fetched_again_before_it_runs_out(tmp_path: Path) -> None:
    path = token_file(tmp_path, "first")
    now = [1000.0]
    source = TokenSource(command_settings(path), MAILBOX, clock=lambda: now[0])
    assert source.token() == "first"
    path.write_text("second")
    assert source.token() == "first"  # cached
    now[0] += 600 - REFRESH_BEFORE_SECONDS + 1  # the command's token is asked again hourly-ish
    assert source.token() == "second"
    path.write_text("third")
    source.refused("stale")  # another token than ours: nothing to drop
    assert source.token() == "second"
    source.refused("second")  # a server refused ours
    assert source.token() == "third"


def test_a_failing_command_is_a_clear_error(tmp_path: Path) -> None:
    settings = OAuth2Settings(provider="command", token_command=f"{sys.executable} -c 'exit(3)'")
    with pytest.raises(TokenError, match="token_command exited 3 with no token"):
        TokenSource(settings, MAILBOX).token()


def test_microsoft_client_credentials(https_authority: tuple[TokenAuthority, Path]) -> None:
    authority, ca_file = https_authority
    settings = microsoft(authority)
    source = TokenSource(settings, "escalaciones@contoso.com", str(ca_file))
    token = source.token()
    assert authority.valid[token] == "app"
    source.refused(token)  # revoked early: msal's own cache is left behind too
    assert source.token() != token and len(authority.issued) == 2
    wrong = settings.model_copy(update={"client_secret": "not-the-secret"})
    with pytest.raises(TokenError) as refused:
        TokenSource(wrong, "escalaciones@contoso.com", str(ca_file)).token()
    assert "Microsoft refused: invalid_client" in str(refused.value)
    assert "not-the-secret" not in str(refused.value)


def test_an_expired_microsoft_token_is_replaced(
    https_authority: tuple[TokenAuthority, Path],
) -> None:
    authority, ca_file = https_authority
    authority.lifetime = 1  # shorter than our margin: every call finds it about to run out
    settings = microsoft(authority)
    source = TokenSource(settings, "escalaciones@contoso.com", str(ca_file))
    first = source.token()
    assert wait_until(lambda: source.token() != first, timeout=10)


def test_the_authority_s_certificate_is_verified(
    https_authority: tuple[TokenAuthority, Path],
) -> None:
    authority, _ = https_authority
    settings = microsoft(authority)
    with pytest.raises(TokenError, match="CERTIFICATE_VERIFY_FAILED") as untrusted:
        TokenSource(settings, "escalaciones@contoso.com").token()  # no ca_file: not trusted
    assert authority.client_secret not in str(untrusted.value)


def test_google_service_account(
    https_authority: tuple[TokenAuthority, Path], tmp_path: Path
) -> None:
    authority, ca_file = https_authority
    key_file = service_account_file(tmp_path, authority)
    settings = OAuth2Settings(provider="google", service_account_file=str(key_file))
    token = TokenSource(settings, "escalaciones@contoso.com", str(ca_file)).token()
    assert authority.valid[token] == "escalaciones@contoso.com"  # the delegated mailbox
    authority.client_id = "another-service-account"
    with pytest.raises(TokenError, match="Google refused"):
        TokenSource(settings, "escalaciones@contoso.com", str(ca_file)).token()


# --- IMAP and SMTP with XOAUTH2 ---------------------------------------------------------------


def imap_settings(dovecot: Dovecot, oauth2: OAuth2Settings) -> ImapSettings:
    return ImapSettings(
        host=dovecot.host,
        port=dovecot.port,
        security="none",
        username=MAILBOX,
        oauth2=oauth2,
    )


def no_hooks() -> IntakeHooks:
    return IntakeHooks(ingest=lambda *a: None, known=lambda *a: {}, max_bytes=1, large_mail=None)  # type: ignore[arg-type]


def test_imap_logs_in_with_xoauth2_and_picks_up_a_rotated_token(
    oauth_dovecot: Dovecot, authority: TokenAuthority, tmp_path: Path
) -> None:
    first = authority.issue(MAILBOX)
    path = token_file(tmp_path, first)
    intake = ImapIntake(imap_settings(oauth_dovecot, command_settings(path)), no_hooks())
    assert wait_until(lambda: _logs_in(intake), timeout=10)
    # The token is revoked before it runs out; the broker has a new one.
    authority.revoke(first)
    path.write_text(authority.issue(MAILBOX))
    client = intake.connect()  # refused once, fetched again, in
    client.logout()
    # A token nobody honours is refused, twice, with the server's answer.
    path.write_text("forged")
    authority.revoke(authority.issued[-1])
    with pytest.raises(LoginError):
        intake.connect()


def _logs_in(intake: ImapIntake) -> bool:
    try:
        intake.connect().logout()
    except LoginError:
        return False  # Dovecot answers before its auth process is ready
    return True


def test_smtp_sends_with_xoauth2_and_picks_up_a_rotated_token(
    oauth_relay: XOAuth2Relay, authority: TokenAuthority, tmp_path: Path
) -> None:
    first = authority.issue(MAILBOX)
    path = token_file(tmp_path, first)
    settings = SmtpSettings(
        host=oauth_relay.host,
        port=oauth_relay.port,
        security="none",
        username=MAILBOX,
        oauth2=command_settings(path),
    )
    transport = SmtpTransport(settings)
    data = crlf(escalation("01-hibot-basic.eml"))

    async def send(name: str) -> None:
        try:
            await transport.send(f"{MAILBOX}@example.com", ["soporte@hibot.us"], data, name)
        finally:
            await transport.close()

    asyncio.run(send("one"))
    authority.revoke(first)
    path.write_text(authority.issue(MAILBOX))
    asyncio.run(send("two"))
    assert len(oauth_relay.messages) == 2 and oauth_relay.logins == [MAILBOX, MAILBOX]
    path.write_text("forged")
    authority.revoke(authority.issued[-1])
    with pytest.raises(TemporaryFailure, match="relay refused our login"):
        asyncio.run(send("three"))  # kept and retried later: fixing the token sends it


# --- the daemon end to end --------------------------------------------------------------------


def test_the_daemon_reads_and_sends_with_oauth2(
    oauth_dovecot: Dovecot,
    oauth_relay: XOAuth2Relay,
    authority: TokenAuthority,
    write_config: Callable[..., Path],
    run_daemon: Callable[[Path], DaemonThread],
    tmp_path: Path,
) -> None:
    path = token_file(tmp_path, authority.issue(MAILBOX))
    broker = command_settings(path).model_dump(exclude_defaults=True)
    config = write_config(
        {
            "intake": {
                "source": "imap",
                "imap": {
                    "host": oauth_dovecot.host,
                    "port": oauth_dovecot.port,
                    "security": "none",
                    "username": MAILBOX,
                    "password": "",
                    "poll_interval": 1,
                    "oauth2": broker,
                },
            },
            "outbound": {
                "transport": "smtp",
                "smtp": {
                    "host": oauth_relay.host,
                    "port": oauth_relay.port,
                    "security": "none",
                    "username": MAILBOX,
                    "oauth2": {"same_as": "imap"},
                },
            },
        }
    )
    assert (
        load_config(config).settings.outbound.smtp.oauth2
        == load_config(config).settings.intake.imap.oauth2
    )
    mailbox = oauth_dovecot.client("escalaciones")  # the static passdb, for the test's own use
    mailbox.append("INBOX", crlf(escalation("01-hibot-basic.eml")))
    mailbox.logout()
    run_daemon(config)
    assert wait_until(lambda: len(oauth_relay.to("soporte@hibot.us")) == 1, timeout=60)
    assert MAILBOX in oauth_relay.logins
    # The broker rotates the token and the old one is revoked before it runs out; the IMAP
    # server restarts, so the running daemon must log in again: its cached token is
    # refused, it asks the command again, and mail flows on.
    first = authority.issued[0]
    authority.revoke(first)
    path.write_text(authority.issue(MAILBOX))
    oauth_dovecot.take_down()
    asked = len(authority.introspected)
    oauth_dovecot.start()
    mailbox = oauth_dovecot.client("escalaciones")
    mailbox.append("INBOX", crlf(escalation("02-panda-basic.eml")))
    mailbox.logout()
    panda = "soporte_revendedores@clickpanda.com"
    assert wait_until(lambda: len(oauth_relay.to(panda)) == 1, timeout=90)
    # It did log in again: first with the revoked token, refused, then with the new one.
    again = authority.introspected[asked:]
    assert first in again and again[-1] == authority.issued[-1]


# --- check-connection, and certificates ---------------------------------------------------------


def test_check_connection_logs_in_and_says_how(
    oauth_dovecot: Dovecot,
    oauth_relay: XOAuth2Relay,
    authority: TokenAuthority,
    write_config: Callable[..., Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = token_file(tmp_path, authority.issue(MAILBOX))
    imap = {
        "host": oauth_dovecot.host,
        "port": oauth_dovecot.port,
        "security": "none",
        "username": MAILBOX,
        "oauth2": command_settings(path).model_dump(exclude_defaults=True),
    }
    smtp = {
        "host": oauth_relay.host,
        "port": oauth_relay.port,
        "security": "none",
        "username": MAILBOX,
        "oauth2": {"same_as": "imap"},
    }
    config = write_config(
        {
            "intake": {"source": "imap", "imap": imap},
            "outbound": {"transport": "smtp", "smtp": smtp},
        }
    )
    assert wait_until(lambda: main(["--config", str(config), "check-connection"]) == 0, timeout=10)
    out = capsys.readouterr().out.splitlines()
    imap_line = [line for line in out if line.startswith("IMAP")][-1]
    assert imap_line.startswith(
        f"IMAP 127.0.0.1:{oauth_dovecot.port}: no TLS, XOAUTH2 as {MAILBOX}"
    )
    assert "INBOX ok, Processed missing (created at start)" in imap_line  # none created
    assert [line for line in out if line.startswith("SMTP")][-1] == (
        f"SMTP 127.0.0.1:{oauth_relay.port}: no TLS, XOAUTH2 as {MAILBOX}: ok"
    )
    assert not oauth_relay.messages  # nothing sent
    authority.revoke(authority.issued[-1])
    path.write_text("forged")
    assert main(["--config", str(config), "check-connection"]) == 1
    err = capsys.readouterr().err
    assert f"IMAP 127.0.0.1:{oauth_dovecot.port}: FAILED: LoginError" in err
    assert f"SMTP 127.0.0.1:{oauth_relay.port}: FAILED: SMTPAuthenticationError" in err
    assert "Traceback" not in err and "forged" not in err


def test_a_relay_s_certificate_is_trusted_only_through_ca_file(tmp_path: Path) -> None:
    ca_file, context = make_ca(tmp_path)
    port = free_port()
    relay = RecordingRelay("127.0.0.1", port)
    controller = Controller(relay, hostname="127.0.0.1", port=port, tls_context=context)
    controller.start()
    try:
        settings = SmtpSettings(host="127.0.0.1", port=port, security="starttls")
        trusted = settings.model_copy(update={"ca_file": str(ca_file)})
        assert asyncio.run(SmtpTransport(trusted).check()).startswith(
            f"SMTP 127.0.0.1:{port}: TLSv1.3, no login: ok"
        )
        with pytest.raises(ssl.SSLCertVerificationError):
            asyncio.run(SmtpTransport(settings).check())
    finally:
        controller.stop()


def test_plain_text_to_a_remote_server_is_warned_about(
    write_config: Callable[..., Path], capsys: pytest.CaptureFixture[str]
) -> None:
    remote = {"host": "imap.example.net", "security": "none", "username": MAILBOX}
    config = write_config({"intake": {"source": "imap", "imap": remote}})
    assert main(["--config", str(config), "check-config"]) == 0
    assert "intake.imap.security is none on imap.example.net" in capsys.readouterr().err
