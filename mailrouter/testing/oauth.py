"""A local OAuth2 authority for the tests, on 127.0.0.1: it issues tokens the way Microsoft's
and Google's token endpoints answer (client credentials, a service account's signed JWT),
lets Dovecot's `oauth2` passdb introspect them (RFC 7662), and can revoke them. With a
private CA (`make_ca`), it serves HTTPS the way the real ones do.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import itertools
import json
import ssl
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

from aiosmtpd.smtp import AuthResult

from mailrouter.testing.servers import RecordingRelay


@dataclass
class TokenAuthority:
    """Tokens it issued and still honours, by token: the account they open."""

    client_id: str = "mailrouter-test"
    client_secret: str = "s3cret-app-password"
    lifetime: int = 3600
    valid: dict[str, str] = field(default_factory=dict)
    issued: list[str] = field(default_factory=list)
    refused_requests: int = 0
    introspected: list[str] = field(default_factory=list)  # tokens asked about, in order
    _numbers: Any = field(default_factory=lambda: itertools.count(1))
    _server: ThreadingHTTPServer | None = None
    _thread: threading.Thread | None = None
    base_url: str = ""

    def issue(self, account: str) -> str:
        token = f"tok-{next(self._numbers)}-{account}"
        self.valid[token] = account
        self.issued.append(token)
        return token

    def revoke(self, token: str) -> None:
        self.valid.pop(token, None)

    def start(self, tls: ssl.SSLContext | None = None) -> TokenAuthority:
        authority = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:
                return None

            def _answer(self, status: int, body: dict[str, Any]) -> None:
                data = json.dumps(body).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path.endswith("/.well-known/openid-configuration"):
                    base = authority.base_url
                    self._answer(
                        200,
                        {
                            "issuer": base,
                            "token_endpoint": f"{base}/token",
                            "authorization_endpoint": f"{base}/authorize",
                        },
                    )
                else:
                    self._answer(404, {"error": "not_found"})

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                form = {k: v[0] for k, v in parse_qs(self.rfile.read(length).decode()).items()}
                if self.path.startswith("/introspect"):
                    authority.introspected.append(form.get("token", ""))
                    account = authority.valid.get(form.get("token", ""))
                    body = {"active": True, "username": account} if account else {"active": False}
                    self._answer(200, body)
                elif self.path.startswith("/token"):
                    self._token(form)
                else:
                    self._answer(404, {"error": "not_found"})

            def _token(self, form: dict[str, str]) -> None:
                grant = form.get("grant_type", "")
                if grant == "client_credentials":
                    ok = (
                        form.get("client_id") == authority.client_id
                        and form.get("client_secret") == authority.client_secret
                    )
                    account = "app"
                elif grant == "urn:ietf:params:oauth:grant-type:jwt-bearer":
                    claims = _jwt_claims(form.get("assertion", ""))
                    account = str(claims.get("sub", ""))
                    ok = bool(account) and claims.get("iss") == authority.client_id
                else:
                    ok, account = False, ""
                if not ok:
                    authority.refused_requests += 1
                    self._answer(
                        401,
                        {"error": "invalid_client", "error_description": "AADSTS7000215: bad"},
                    )
                    return
                token = authority.issue(account)
                self._answer(
                    200,
                    {
                        "access_token": token,
                        "token_type": "Bearer",
                        "expires_in": authority.lifetime,
                    },
                )

        server = _QuietServer(("127.0.0.1", 0), Handler)
        if tls is not None:
            server.socket = tls.wrap_socket(server.socket, server_side=True)
        self._server = server
        scheme = "https" if tls is not None else "http"
        self.base_url = f"{scheme}://127.0.0.1:{server.server_address[1]}"
        self._thread = threading.Thread(target=server.serve_forever, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
        if self._thread is not None:
            self._thread.join(5)


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that does not trust our CA hangs up mid-handshake: that is the test.
        return None


def _jwt_claims(assertion: str) -> dict[str, Any]:
    """The claims of a JWT, unverified: enough for a test authority to know who asks."""
    try:
        payload = assertion.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    except (IndexError, ValueError):
        return {}
    return claims if isinstance(claims, dict) else {}


@dataclass
class XOAuth2Relay(RecordingRelay):
    """A recording relay that takes mail only after AUTH XOAUTH2 with a token `authority`
    honours, for the account the client names."""

    authority: TokenAuthority | None = None
    logins: list[str] = field(default_factory=list)

    async def auth_XOAUTH2(self, server: Any, args: list[str]) -> AuthResult:
        if len(args) < 2:
            return AuthResult(success=False, handled=False)
        try:
            text = base64.b64decode(args[1]).decode()
        except ValueError:
            return AuthResult(success=False, handled=False)
        fields = dict(part.split("=", 1) for part in text.split("\x01") if "=" in part)
        user, token = fields.get("user", ""), fields.get("auth", "").removeprefix("Bearer ")
        assert self.authority is not None
        if self.authority.valid.get(token) in (user, "app"):
            self.logins.append(user)
            return AuthResult(success=True)
        return AuthResult(success=False, handled=False)


def make_ca(folder: Path, host: str = "127.0.0.1") -> tuple[Path, ssl.SSLContext]:
    """A private CA and a certificate for `host` signed by it: the CA's PEM file (what a
    client trusts with `ca_file`) and a server-side TLS context."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "mailrouter test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, host)]))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(host))]),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    ca_file = folder / "ca.pem"
    ca_file.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    cert_file, key_file = folder / "server.pem", folder / "server.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    return ca_file, context


def service_account_file(folder: Path, authority: TokenAuthority) -> Path:
    """A Google service account key file whose token URI is `authority`'s."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    path = folder / "service-account.json"
    path.write_text(
        json.dumps(
            {
                "type": "service_account",
                "project_id": "mailrouter-test",
                "private_key_id": "k1",
                "private_key": pem,
                "client_email": authority.client_id,
                "client_id": "1",
                "token_uri": f"{authority.base_url}/token",
            }
        )
    )
    return path
