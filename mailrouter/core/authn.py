"""Authn: did the domain in From really send this mail? Read from the Authentication-Results
(RFC 8601) that a trusted receiving host added; the router checks no signature itself.

Only the topmost run of results from one trusted authserv-id counts: a host prepends its
own results, and RFC 8601 section 5 has it delete any copy claiming its name that arrived
with the mail, so what a stranger wrote lies below it. A result counts only when it is
aligned with the From domain (the same domain, or a parent of it): an SPF pass for the
attacker's own envelope domain proves nothing about the From.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import authres

from mailrouter.config import AuthenticationSettings

# authres is slow (about 1 ms for a real 160-character header, 12 ms for 2 KB, and faster
# than linear growth beyond: 16,000 results take 9 s). A real run of results is a few
# hundred characters; only the trusted run is parsed, and only this much of it.
MAX_PARSED_CHARS = 1024
MAX_HEADERS = 16
# A real header states a handful of results (spf, dkim for one to three signatures, dmarc,
# arc, compauth, bimi); a crafted one states dozens within the same characters, and authres
# spends about 7 µs a character on them. Only the first results of a header are read.
MAX_RESULTS = 12


def _first_results(value: str, count: int) -> str:
    """`value` cut after its authserv-id and `count` results: at the `count + 1`-th ";"
    that is outside any comment or quoted string (one linear pass; authres has no such
    limit of its own)."""
    depth, quoted, escaped, seen = 0, False, False, 0
    for index, char in enumerate(value):
        if escaped:
            escaped = False
        elif char == "\\" and (quoted or depth):
            escaped = True
        elif quoted:
            quoted = char != '"'
        elif char == '"' and not depth:
            quoted = True
        elif char == "(":
            depth += 1
        elif char == ")" and depth:
            depth -= 1
        elif char == ";" and not depth:
            seen += 1
            if seen > count:
                return value[:index]
    return value


@dataclass(frozen=True)
class Verdict:
    passed: bool
    reason: str  # what was found, for the quarantine and the log


def _aligned(domain: str, from_domain: str) -> bool:
    domain = domain.strip().lower().rstrip(".")
    return bool(domain) and (from_domain == domain or from_domain.endswith("." + domain))


def _property(result: authres.AuthenticationResult, ptype: str, name: str) -> str:
    for prop in result.properties:
        if prop.type == ptype and prop.name == name and prop.value:
            return str(prop.value)
    return ""


def _authserv_id(value: str) -> str:
    """The authserv-id a header value starts with, read without parsing the rest."""
    head = value.split(";", 1)[0].split("(", 1)[0].split()
    return head[0].lower() if head else ""


def _results(headers: Sequence[str], trusted: set[str]) -> list[authres.AuthenticationResult]:
    """The results of the topmost run of headers from one trusted authserv-id."""
    chosen: str | None = None
    budget = MAX_PARSED_CHARS
    found: list[authres.AuthenticationResult] = []
    for value in headers[:MAX_HEADERS]:
        serv = _authserv_id(value)
        if chosen is None and serv not in trusted:
            continue  # another host's word: not even read
        if chosen is not None and serv != chosen:
            break
        chosen = serv
        if len(value) > budget:
            break
        budget -= len(value)
        try:
            header = authres.AuthenticationResultsHeader.parse_value(
                _first_results(value, MAX_RESULTS)
            )
        except (authres.AuthResError, ValueError, IndexError, AttributeError):
            break  # unreadable: it vouches for nothing, and ends the run
        found.extend(header.results)
    return found


def _passes(result: authres.AuthenticationResult, from_domain: str, require: str) -> bool:
    if str(result.result).lower() != "pass":
        return False
    method = str(result.method).lower()
    if method == "dmarc":
        stated = _property(result, "header", "from")
        return not stated or _aligned(stated, from_domain)
    if require != "dkim-or-spf":
        return False
    if method == "dkim":
        signer = _property(result, "header", "d") or _property(result, "header", "i")
        return _aligned(signer.rpartition("@")[2], from_domain)
    if method == "spf":
        envelope = _property(result, "smtp", "mailfrom") or _property(result, "smtp", "helo")
        return _aligned(envelope.rpartition("@")[2], from_domain)
    return False


def authenticate(
    headers: Sequence[str], from_address: str, settings: AuthenticationSettings
) -> Verdict:
    """Whether the From domain of a mail passes what `settings.require` asks, according to
    the Authentication-Results values `headers` (top to bottom, as in the mail)."""
    if settings.require == "none":
        return Verdict(True, "authentication not required")
    from_domain = from_address.rpartition("@")[2].lower()
    trusted = {name.lower() for name in settings.trusted_authserv_ids}
    results = _results(headers, trusted)
    if not results:
        return Verdict(False, "no Authentication-Results from a trusted host")
    for result in results:
        if _passes(result, from_domain, settings.require):
            return Verdict(True, f"{result.method}=pass for {from_domain}")
    seen = ", ".join(f"{r.method}={r.result}" for r in results[:6])
    return Verdict(False, f"{settings.require} does not pass for {from_domain} ({seen})")
