"""OAuth2: the access tokens IMAP and SMTP log in with (XOAUTH2), for mailboxes where a
password no longer opens the door (Microsoft 365, Google Workspace).

A `TokenSource` hands out a token, fetching a new one shortly before the old one runs
out, and again at once when a server refuses the one it has (`refused`): tokens live
about an hour and the daemon for months. Where the token comes from is the `provider`:
Microsoft's client-credentials flow (msal), a Google service account with domain-wide
delegation (google-auth), or a command that prints one (any other provider, a broker).
A token or a secret never appears in a log line or an error: `TokenError` says which
step failed and what the identity provider answered, without either.
"""

from __future__ import annotations

import logging
import shlex
import subprocess
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from mailrouter.config import OAuth2Settings

log = logging.getLogger(__name__)

MICROSOFT_SCOPE = "https://outlook.office365.com/.default"
GOOGLE_SCOPE = "https://mail.google.com/"
# A token is replaced this long before it runs out: a login takes a moment, and an IDLE
# connection logs in again only when it reconnects.
REFRESH_BEFORE_SECONDS = 300.0
# A command says nothing of how long its token lives: it is asked again this often.
COMMAND_TOKEN_SECONDS = 600.0
COMMAND_TIMEOUT_SECONDS = 60.0


class TokenError(Exception):
    """No token could be had; the message names the step and the provider's answer."""


class TokenSource:
    """The access tokens of one account, cached in memory; safe to share between threads."""

    def __init__(
        self,
        settings: OAuth2Settings,
        username: str,
        ca_file: str = "",
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.settings = settings
        self.username = username
        self.ca_file = ca_file
        self.clock = clock
        self._lock = threading.Lock()
        self._token = ""
        self._expires_at = 0.0
        self._client: Any = None  # msal's application, which keeps its own cache

    def token(self) -> str:
        """A token valid for a while yet; fetched when there is none or it runs out soon."""
        with self._lock:
            if self._token and self.clock() < self._expires_at - REFRESH_BEFORE_SECONDS:
                return self._token
            token, lifetime = self._fetch()
            self._token, self._expires_at = token, self.clock() + lifetime
            log.info(
                "OAuth2 token for %s from %s (valid %d s)",
                self.username,
                self.settings.provider,
                lifetime,
            )
            return token

    def refused(self, token: str) -> None:
        """A server refused `token`: the next `token()` fetches a new one (unless another
        thread has done so already)."""
        with self._lock:
            if self._token == token:
                self._token, self._expires_at = "", 0.0
                if self._client is not None:
                    self._client = None  # msal would hand out its cached token again

    def _fetch(self) -> tuple[str, float]:
        provider = self.settings.provider
        if provider == "command":
            return self._from_command()
        if provider == "microsoft":
            return self._from_microsoft()
        return self._from_google()

    def _from_command(self) -> tuple[str, float]:
        command = shlex.split(self.settings.token_command)
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=COMMAND_TIMEOUT_SECONDS
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise TokenError(f"token_command could not run: {type(exc).__name__}") from None
        token = done.stdout.strip()
        if done.returncode != 0 or not token:
            # Its last line of stderr only: a command may echo more than it should.
            said = (done.stderr.strip().splitlines() or [""])[-1][:200]
            raise TokenError(f"token_command exited {done.returncode} with no token: {said}")
        return token.splitlines()[0], COMMAND_TOKEN_SECONDS

    def _from_microsoft(self) -> tuple[str, float]:
        import msal

        s = self.settings
        if self._client is None:
            where: dict[str, Any] = (
                {"oidc_authority": s.authority}
                if s.authority
                else {"authority": f"https://login.microsoftonline.com/{s.tenant_id}"}
            )
            if self.ca_file:
                where["http_client"] = _session(self.ca_file)
            try:
                self._client = msal.ConfidentialClientApplication(
                    s.client_id, client_credential=s.client_secret, timeout=30, **where
                )
            except Exception as exc:  # discovery of the authority: DNS, TLS, a wrong tenant
                raise TokenError(f"Microsoft sign-in unreachable: {_short(exc)}") from None
        try:
            result = self._client.acquire_token_for_client(scopes=s.scopes or [MICROSOFT_SCOPE])
        except Exception as exc:
            raise TokenError(f"Microsoft token request failed: {_short(exc)}") from None
        if "access_token" not in result:
            error = result.get("error", "no token")
            detail = str(result.get("error_description", "")).splitlines()[:1]
            raise TokenError(f"Microsoft refused: {error}: {' '.join(detail)[:200]}")
        return str(result["access_token"]), float(result.get("expires_in") or 3600)

    def _from_google(self) -> tuple[str, float]:
        import google.auth.exceptions
        from google.auth.transport.requests import Request
        from google.oauth2 import service_account

        s = self.settings
        try:
            credentials = service_account.Credentials.from_service_account_file(  # type: ignore[no-untyped-call]
                s.service_account_file, scopes=s.scopes or [GOOGLE_SCOPE], subject=self.username
            )
        except (OSError, ValueError) as exc:
            raise TokenError(f"service account file unusable: {_short(exc)}") from None
        session = _session(self.ca_file)
        try:
            credentials.refresh(Request(session))
        except google.auth.exceptions.GoogleAuthError as exc:
            raise TokenError(f"Google refused: {_short(exc)}") from None
        finally:
            session.close()
        expiry = credentials.expiry
        lifetime = (expiry.replace(tzinfo=UTC) - datetime.now(UTC)).total_seconds() if expiry else 0
        return str(credentials.token), max(lifetime, 60.0)


def _session(ca_file: str) -> Any:
    """An HTTP session that trusts `ca_file` (when given) on every request: requests lets
    REQUESTS_CA_BUNDLE in the environment win over a session's own `verify`, so the file is
    given per request, where the environment does not override it."""
    import requests

    class Verifying(requests.Session):
        def request(self, *args: Any, **kwargs: Any) -> Any:
            if ca_file:
                kwargs.setdefault("verify", ca_file)
            return super().request(*args, **kwargs)

    return Verifying()


def _short(exc: BaseException) -> str:
    """An exception in one line; provider libraries put the request, never the secret, in
    their messages, but a token could ride along in a URL: cut at 200 characters."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    if "CERTIFICATE_VERIFY_FAILED" in text:
        return "TLS: the server's certificate is not trusted (CERTIFICATE_VERIFY_FAILED; ca_file?)"
    return f"{type(exc).__name__}: {text}"[:200]
