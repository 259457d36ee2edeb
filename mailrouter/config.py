"""Configuration: loads and validates `config.yaml` and `providers/*.yaml`.

Owns the shape of every setting (pydantic models), `${ENV_VAR}` interpolation,
and error reporting as `file:line: field: problem` so an admin can fix a broken
file without guessing. Nothing else reads YAML or the environment.
"""

from __future__ import annotations

import functools
import os
import re
import ssl
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time
from pathlib import Path
from typing import Any, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import re2  # type: ignore[import-untyped]
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

DAY_NAMES = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")

_RE2_OPTIONS = re2.Options()
_RE2_OPTIONS.log_errors = False  # a refused pattern is reported as a config problem
# Unicode spaces an HTML mail is full of, which RE2's \s (ASCII only, unlike Python's)
# does not match: mail text is given to admin patterns with them made plain spaces.
_PLAIN_SPACES = str.maketrans(
    dict.fromkeys(
        "\xa0\u1680\u2000\u2001\u2002\u2003\u2004"
        "\u2005\u2006\u2007\u2008\u2009\u200a\u202f\u205f\u3000",
        " ",
    )
)


@functools.lru_cache(maxsize=256)
def linear_pattern(pattern: str) -> Any:
    """An admin's regular expression (routes, ticket numbers) compiled by RE2 (google-re2),
    which matches in time linear in the text whatever the pattern: `(a+)+$` costs what
    `a+` costs, where Python's engine backtracks for minutes on one crafted line. Raises
    ValueError for what RE2 cannot run: backreferences and lookaround."""
    try:
        return re2.compile(pattern, options=_RE2_OPTIONS)
    except re2.error as exc:
        reason = exc.args[0].decode() if exc.args and isinstance(exc.args[0], bytes) else exc
        raise ValueError(
            f"bad regular expression {pattern!r}: {reason} (patterns run on RE2, in linear "
            "time: no backreferences or lookaround)"
        ) from exc


def pattern_search(pattern: str, text: str) -> Any:
    """`re.search` with an admin's pattern, on RE2 (see `linear_pattern`)."""
    return linear_pattern(pattern).search(text.translate(_PLAIN_SPACES))


@dataclass(frozen=True)
class Calendar:
    """When SLA time runs: built from `timezone` and `business_hours` (see `Config.calendar`)."""

    zone: ZoneInfo
    business_hours: bool = False
    days: frozenset[int] = frozenset(range(5))  # Monday = 0
    start: time = time(8, 0)
    end: time = time(18, 0)
    holidays: frozenset[date] = frozenset()
    # A country's public holidays (the `holidays` library, years computed as asked).
    country_holidays: Any = field(default=None, compare=False, hash=False)

    def is_working_day(self, day: date) -> bool:
        if day.weekday() not in self.days or day in self.holidays:
            return False
        return self.country_holidays is None or day not in self.country_holidays

    def _at(self, day: date, moment: time) -> datetime:
        return datetime.combine(day, moment, tzinfo=self.zone).astimezone(UTC)


PRIORITIES = ("BAJA", "MEDIA", "ALTA", "URGENTE")

_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def email_address(value: str) -> str:
    """`value` if it is an email address (as a config or a command writes one)."""
    if not re.fullmatch(r"[^@\s<>]+@[^@\s<>]+\.[^@\s<>]+", value):
        raise ValueError(f"{value!r} is not an email address")
    return value


# A label: a word of letters, digits, "-", "_" or "." (accents welcome), as people write
# them in commands and mail rules filter on them (X-Mailrouter-Labels).
LABEL_MAX = 40
_LABEL = re.compile(r"[^\W_][\w.-]*")


def label_name(text: str) -> str | None:
    """`text` as a label (lower case, spaces as "-"), or None if it cannot be one."""
    name = "-".join(text.strip().lower().split())
    return name if len(name) <= LABEL_MAX and _LABEL.fullmatch(name) else None


class _Model(BaseModel):
    # A typo in a key must be an error, not a silently ignored setting.
    model_config = ConfigDict(extra="forbid", populate_by_name=True)


class ListenSettings(_Model):
    host: str = "127.0.0.1"
    port: int = Field(2525, ge=0, le=65535)
    # A unix socket path instead of host:port (LMTP from a local Postfix or Dovecot).
    socket: str = ""


class OAuth2Settings(_Model):
    """How to get the access token a server takes instead of a password (XOAUTH2)."""

    provider: Literal["microsoft", "google", "command"] | None = None
    # microsoft: the app registration (client credentials)
    tenant_id: str = ""
    client_id: str = ""
    client_secret: str = ""
    # Another sign-in authority (an OpenID Connect issuer URL): tests, sovereign clouds.
    authority: str = ""
    # google: a service account with domain-wide delegation, acting as `username`
    service_account_file: str = ""
    # command: prints an access token on stdout (any other provider, a token broker)
    token_command: str = ""
    scopes: list[str] = []
    # outbound.smtp only: the intake's block, not written twice
    same_as: Literal["imap"] | None = None

    @model_validator(mode="after")
    def _complete(self) -> OAuth2Settings:
        if self.same_as is not None:
            if self.provider is not None:
                raise ValueError("give either same_as or a provider, not both")
            return self
        if self.provider is None:
            raise ValueError("give a provider (microsoft, google or command) or same_as: imap")
        needs = {
            "microsoft": (
                "client_id",
                "client_secret",
                *(() if self.authority else ("tenant_id",)),
            ),
            "google": ("service_account_file",),
            "command": ("token_command",),
        }[self.provider]
        missing = [name for name in needs if not getattr(self, name)]
        if missing:
            raise ValueError(f"provider {self.provider} needs {', '.join(missing)}")
        return self


class _ServerSettings(_Model):
    """A mail server we connect to: certificates are always verified (ca_file to pin a CA)."""

    host: str = "127.0.0.1"
    username: str = ""
    password: str = ""
    # Instead of the password: log in with an OAuth2 access token (XOAUTH2).
    oauth2: OAuth2Settings | None = None
    timeout: float = Field(60.0, gt=0)
    ca_file: str = ""


class ImapSettings(_ServerSettings):
    port: int = Field(993, ge=1, le=65535)
    security: Literal["tls", "starttls", "none"] = "tls"
    folder: str = "INBOX"
    processed_folder: str = "Processed"
    quarantine_folder: str = "Quarantine"
    poll_interval: float = Field(30.0, gt=0)
    reconnect_max: float = Field(60.0, gt=0)


class IntakeSettings(_Model):
    address: str
    # smtp: the built-in SMTP listener; lmtp: the same speaking LMTP (an MTA hands mail
    # over with a reply per recipient); imap: poll a mailbox.
    source: Literal["smtp", "lmtp", "imap"] = "smtp"
    listen: ListenSettings = ListenSettings()
    imap: ImapSettings = ImapSettings()
    max_message_bytes: int = Field(25 * 1024 * 1024, gt=0)
    # Reading one mail (MIME, HTML, fields) stops after this long: it is quarantined.
    mail_deadline_seconds: float = Field(30.0, gt=0)

    @field_validator("address")
    @classmethod
    def _is_address(cls, value: str) -> str:
        return email_address(value).lower()

    @property
    def domain(self) -> str:
        return self.address.rsplit("@", 1)[1]


class FileTransportSettings(_Model):
    dir: str = "var/outbox"


class SmtpSettings(_ServerSettings):
    port: int = Field(587, ge=1, le=65535)
    security: Literal["tls", "starttls", "none"] = "starttls"
    connections: int = Field(
        4, ge=1, le=32, description="mails sent at once, each over its own kept-open connection"
    )


class RetrySettings(_Model):
    """Backoff for temporary delivery failures (4xx, connection errors)."""

    first_delay: float = Field(30.0, gt=0, description="seconds before the first retry")
    max_delay: float = Field(3600.0, gt=0, description="ceiling of one wait, seconds")
    give_up_after: float = Field(24 * 3600.0, gt=0, description="seconds since first try")


class OutboundSettings(_Model):
    transport: Literal["file", "smtp"] = "file"
    from_: str = Field(alias="from")
    file: FileTransportSettings = FileTransportSettings()
    smtp: SmtpSettings = SmtpSettings()
    retry: RetrySettings = RetrySettings()
    sender_process: bool = Field(
        False,
        description="send the outbox from a process of its own, on a second core: more "
        "escalations a second in a burst, for a second interpreter's memory",
    )


class Condition(_Model):
    """One test on a message; exactly one of field/subject/sender is given."""

    field: str | None = None
    equals: str | list[str] | None = None
    matches: str | None = None
    subject: str | None = None
    sender: str | None = None

    @model_validator(mode="after")
    def _one_kind(self) -> Condition:
        kinds = [k for k in ("field", "subject", "sender") if getattr(self, k) is not None]
        if len(kinds) != 1:
            raise ValueError("give exactly one of 'field', 'subject' or 'sender'")
        if self.field is not None and (self.equals is None) == (self.matches is None):
            raise ValueError("a 'field' condition needs exactly one of 'equals' or 'matches'")
        if self.field is None and (self.equals is not None or self.matches is not None):
            raise ValueError("'equals'/'matches' only go with 'field'")
        for pattern in (self.matches, self.subject):
            if pattern is not None:
                linear_pattern(pattern)
        return self

    @property
    def equals_list(self) -> list[str]:
        if self.equals is None:
            return []
        return [self.equals] if isinstance(self.equals, str) else list(self.equals)


class Route(_Model):
    name: str
    when: Condition | None = None
    to: str
    # Given to every case this route opens (the product, the client's segment...).
    labels: list[str] = []

    @field_validator("labels")
    @classmethod
    def _labels(cls, value: list[str]) -> list[str]:
        return [_label(text) for text in value]


def _label(text: str) -> str:
    name = label_name(text)
    if name is None:
        raise ValueError(
            f"{text!r} is not a label: letters, digits, '-', '_' or '.', "
            f"at most {LABEL_MAX} characters"
        )
    return name


class FieldSpec(_Model):
    """A canonical field: the label shown to agents, every alias accepted, and its kind
    (`email` values must be an address; `priority` one of BAJA/MEDIA/ALTA/URGENTE; `phone`
    a valid number, kept in E.164; `date` a date, kept as YYYY-MM-DD)."""

    label: str
    aliases: list[str] = []
    type: Literal["text", "email", "priority", "phone", "date"] = "text"


def _reason(error: Any) -> str:
    """One pydantic error as `where: what`, our own checks without pydantic's prefix."""
    message = str(error["msg"]).removeprefix("Value error, ")
    where = ".".join(str(part) for part in error["loc"])
    return f"{where}: {message}" if where else message


class HolidaySettings(_Model):
    country: str = Field(pattern=r"^[A-Z]{2}$")
    subdivision: str | None = None
    dates: list[date] = []

    @model_validator(mode="after")
    def _known(self) -> HolidaySettings:
        import holidays

        supported = holidays.list_supported_countries()
        if self.country not in supported:
            raise ValueError(f"no public holidays known for country {self.country!r}")
        if self.subdivision is not None and self.subdivision not in supported[self.country]:
            raise ValueError(f"unknown subdivision {self.subdivision!r} of {self.country}")
        return self


class BusinessHours(_Model):
    """Count SLA windows only in working hours (the zone is `timezone`)."""

    enabled: bool = False
    days: list[Literal["mon", "tue", "wed", "thu", "fri", "sat", "sun"]] = [
        "mon",
        "tue",
        "wed",
        "thu",
        "fri",
    ]
    start: time = time(8, 0)
    end: time = time(18, 0)
    # A list of dates, or {country: CO, subdivision: ..., dates: [...]}: that country's
    # public holidays (Colombia's moved to Monday included) plus the dates given.
    holidays: list[date] | HolidaySettings = []

    @field_validator("holidays", mode="before")
    @classmethod
    def _one_shape(cls, value: Any) -> Any:
        # Told apart here, so a mistake is reported once, in the shape the admin chose.
        if isinstance(value, dict):
            try:
                return HolidaySettings.model_validate(value)
            except ValidationError as exc:
                raise ValueError("; ".join(_reason(e) for e in exc.errors())) from None
        return value

    @property
    def holiday_dates(self) -> list[date]:
        return self.holidays if isinstance(self.holidays, list) else self.holidays.dates

    @model_validator(mode="after")
    def _sane(self) -> BusinessHours:
        if self.enabled and (not self.days or self.start >= self.end):
            raise ValueError("business hours need at least one day and start before end")
        return self


class TeamMember(_Model):
    name: str = ""


class EscalationMember(_Model):
    """One of the escalation team: written as an address, or with the settings below."""

    address: str
    name: str = ""
    # What `#asignar` may call them instead of the address (e.g. "pedro").
    short: str = ""
    # Skipped by the assignment until this day is over (in `timezone`): back the day after.
    away_until: date | None = None

    @field_validator("address")
    @classmethod
    def _is_address(cls, value: str) -> str:
        return email_address(value).lower()

    @field_validator("short")
    @classmethod
    def _short(cls, value: str) -> str:
        value = value.strip().lower()
        if value and not re.fullmatch(r"[^\s@#]+", value):
            raise ValueError(f"{value!r}: a short name is one word, without '@' or '#'")
        return value

    def away(self, today: date) -> bool:
        return self.away_until is not None and today <= self.away_until


class EscalationTeam(_Model):
    """Who owns the follow-up of each case, and how a new case gets its owner."""

    members: list[EscalationMember] = []
    # round_robin: each member in turn; least_open: the member with the fewest cases in
    # progress; none: cases have no owner.
    assign: Literal["round_robin", "least_open", "none"] = "none"
    # When every member is away: the first team lead owns the case (lead), or nobody (none).
    fallback: Literal["lead", "none"] = "lead"

    @field_validator("members", mode="before")
    @classmethod
    def _bare_addresses(cls, value: Any) -> Any:
        if isinstance(value, list):
            return [{"address": item} if isinstance(item, str) else item for item in value]
        return value

    @model_validator(mode="after")
    def _members_once(self) -> EscalationTeam:
        addresses = [member.address for member in self.members]
        doubled = sorted({a for a in addresses if addresses.count(a) > 1})
        if doubled:
            raise ValueError(f"members: {', '.join(doubled)} listed twice")
        shorts = [member.short for member in self.members if member.short]
        doubled = sorted({s for s in shorts if shorts.count(s) > 1})
        if doubled:
            raise ValueError(f"members: the short name {', '.join(doubled)} is given twice")
        if self.assign != "none" and not self.members:
            raise ValueError(f"assign: {self.assign} needs at least one member")
        return self

    def member(self, name: str) -> EscalationMember | None:
        """The member `name` is the address or the short name of."""
        name = name.strip().lower()
        return next((m for m in self.members if name in (m.address, m.short)), None)


class TeamSettings(_Model):
    leads: list[str] = []
    agents: dict[str, TeamMember] = {}
    escalation: EscalationTeam = EscalationTeam()

    @model_validator(mode="after")
    def _someone_to_fall_back_on(self) -> TeamSettings:
        escalation = self.escalation
        if escalation.assign != "none" and escalation.fallback == "lead" and not self.leads:
            raise ValueError(
                "escalation.fallback: lead, but team.leads is empty (add a lead, or say "
                "fallback: none)"
            )
        return self


class DigestSettings(_Model):
    schedule: str = "0 8 * * mon-fri"  # crontab, in `timezone`
    send_empty: bool = False
    max_cases: int = Field(default=50, ge=1, le=10_000)  # lines per table; the rest counted

    @field_validator("schedule")
    @classmethod
    def _cron(cls, value: str) -> str:
        from apscheduler.triggers.cron import CronTrigger

        try:
            CronTrigger.from_crontab(value)
        except ValueError as exc:
            raise ValueError(f"not a crontab schedule ({exc})") from exc
        return value


class LoopSettings(_Model):
    """Last-resort brakes for a loop that slips past every header check."""

    # Automatic replies (acknowledgements, missing fields, notices) to one address in an
    # hour; past it the router stops answering that address for the hour. 0: no limit.
    max_replies_per_address_per_hour: int = Field(10, ge=0)
    max_relays_per_case_per_hour: int = Field(20, ge=0, description="0: no limit")
    # No longer used: escalations from allowed senders are never limited (what is limited
    # is what the router sends). Accepted so older files load; check-config says so.
    max_per_sender_per_hour: int | None = Field(None, ge=0)


class AuthenticationSettings(_Model):
    """Whose word to take on who sent a mail (see core/authn.py and the README's Security)."""

    # Authentication-Results from these receiving hosts only (their authserv-id).
    trusted_authserv_ids: list[str] = []
    # none: From is believed as written. dmarc: the From domain passes DMARC. dkim-or-spf:
    # an aligned DKIM signature or SPF pass (or DMARC) is enough.
    require: Literal["none", "dmarc", "dkim-or-spf"] = "none"

    @model_validator(mode="after")
    def _someone_to_trust(self) -> AuthenticationSettings:
        if self.require != "none" and not self.trusted_authserv_ids:
            raise ValueError(
                f"require: {self.require} needs trusted_authserv_ids: the receiving hosts "
                "whose Authentication-Results count"
            )
        return self


class HttpSettings(_Model):
    """The daemon's /healthz, /readyz and /metrics (Prometheus): off unless `listen` is set."""

    # host:port to serve them on ([::1]:9464 for IPv6); empty: no server.
    listen: str = ""
    # /readyz fails while the oldest outgoing mail not yet sent was queued longer ago.
    stuck_outbox_seconds: float = Field(900.0, gt=0)

    @field_validator("listen")
    @classmethod
    def _host_and_port(cls, value: str) -> str:
        value = value.strip()
        if value:
            host, _, port = value.rpartition(":")
            if not host.strip("[]") or not port.isdigit() or not 1 <= int(port) <= 65535:
                raise ValueError(f"{value!r} is not host:port (e.g. 127.0.0.1:9464)")
        return value

    @property
    def address(self) -> tuple[str, int] | None:
        """(host, port) to listen on; None when the server is off."""
        if not self.listen:
            return None
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]"), int(port)


NotifyEvent = Literal["urgent", "overdue", "undeliverable", "vendor_reply"]
NOTIFY_EVENTS: tuple[NotifyEvent, ...] = ("urgent", "overdue", "undeliverable", "vendor_reply")


class NotifyTarget(_Model):
    """A chat channel or a webhook told of what needs someone: its posts leave through the
    outbox, as mails do (retried with backoff, never twice for one event)."""

    kind: Literal["slack", "teams", "webhook"]
    # The incoming-webhook URL: a secret (it is all it takes to post), so ${ENV_VAR}.
    url: str = Field(min_length=1)
    events: list[NotifyEvent] = list(NOTIFY_EVENTS)
    # How the outbox names the target (the URL is not stored); default "<kind>-<n>".
    name: str = Field("", pattern=r"^[A-Za-z0-9_.-]{0,64}$")
    timeout: float = Field(10.0, gt=0)

    @field_validator("url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("https://", "http://")):
            raise ValueError("not an http(s):// URL")
        return value


class LoggingSettings(_Model):
    """How the daemon writes its log (standard error; journald keeps it under systemd)."""

    # text: "time LEVEL logger: message"; json: one JSON object a line, for a log store.
    format: Literal["text", "json"] = "text"
    # None: --log-level (INFO by default) decides.
    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] | None = None


class Settings(_Model):
    intake: IntakeSettings
    allowed_senders: list[str] = Field(min_length=1)
    outbound: OutboundSettings
    database: str = "sqlite:///var/mailrouter.db"
    # This host's own files: on PostgreSQL, the senders' journals (`sent/`), which let a
    # daemon restarted here finish a killed one's sends without repeating them. (On SQLite
    # they are beside the database file.) Relative to the config file.
    state_dir: str = "var"
    providers_dir: str = "providers"
    templates_dir: str = "templates"
    case_tag_prefix: str = Field("ESC", pattern=r"^[A-Z][A-Z0-9]{1,9}$")
    default_priority: Literal["BAJA", "MEDIA", "ALTA", "URGENTE"] = "MEDIA"
    timezone: str = "America/Bogota"
    # How dates and times are written in mails (CLDR locale, by babel): es_CO writes
    # "martes, 17 de noviembre de 2026, 2:05 p. m.".
    locale: str = "es_CO"
    # ISO 3166 country: phone numbers written without "+" are of this country, and
    # `business_hours.holidays: {country: ...}` defaults to it.
    country: str = Field("CO", pattern=r"^[A-Z]{2}$")
    sla_hours: dict[str, float] = {
        "URGENTE": 4,
        "ALTA": 24,
        "MEDIA": 48,
        "BAJA": 72,
    }
    fields: dict[str, FieldSpec]
    routes: list[Route] = Field(min_length=1)
    loop_protection: LoopSettings = LoopSettings()
    authentication: AuthenticationSettings = AuthenticationSettings()
    business_hours: BusinessHours = BusinessHours()
    # Vendors that open tickets and have not sent one this many hours after the forward
    # are flagged "no vendor acknowledgement".
    vendor_ack_hours: float = Field(2.0, gt=0)
    # How often the daemon looks for cases that became overdue, in seconds.
    reminder_check_seconds: float = Field(60.0, gt=0)
    team: TeamSettings = TeamSettings()
    digest: DigestSettings = DigestSettings()
    http: HttpSettings = HttpSettings()
    logging: LoggingSettings = LoggingSettings()
    notify: list[NotifyTarget] = []

    @field_validator("sla_hours")
    @classmethod
    def _every_priority(cls, value: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(value) - set(PRIORITIES))
        if unknown:
            raise ValueError(f"unknown priorities {unknown}; use {', '.join(PRIORITIES)}")
        missing = [p for p in PRIORITIES if p not in value]
        if missing:
            raise ValueError(f"give a window for every priority; missing {', '.join(missing)}")
        if any(hours <= 0 for hours in value.values()):
            raise ValueError("windows must be positive numbers of hours")
        return value

    @field_validator("locale")
    @classmethod
    def _known_locale(cls, value: str) -> str:
        from babel import Locale, UnknownLocaleError

        try:
            Locale.parse(value)
        except (UnknownLocaleError, ValueError) as exc:
            raise ValueError(f"unknown locale {value!r} (e.g. es_CO, es_ES, en_US)") from exc
        return value

    @field_validator("timezone")
    @classmethod
    def _known_zone(cls, value: str) -> str:
        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError) as exc:
            raise ValueError(f"unknown time zone {value!r}") from exc
        return value

    @model_validator(mode="after")
    def _one_oauth2_block(self) -> Settings:
        smtp = self.outbound.smtp
        if smtp.oauth2 is not None and smtp.oauth2.same_as == "imap":
            if self.intake.imap.oauth2 is None:
                raise ValueError(
                    "outbound.smtp.oauth2.same_as: imap, but intake.imap has no oauth2"
                )
            self.outbound.smtp = smtp.model_copy(update={"oauth2": self.intake.imap.oauth2})
        return self

    @model_validator(mode="after")
    def _notify_names(self) -> Settings:
        for index, target in enumerate(self.notify):
            if not target.name:
                target.name = f"{target.kind}-{index + 1}"
        names = [target.name for target in self.notify]
        doubled = sorted({name for name in names if names.count(name) > 1})
        if doubled:
            raise ValueError(f"notify: two targets named {', '.join(doubled)}")
        return self

    @model_validator(mode="after")
    def _default_route_last(self) -> Settings:
        for index, route in enumerate(self.routes[:-1]):
            if route.when is None:
                raise ValueError(
                    f"route {route.name!r} (#{index + 1}) has no 'when' but is not last: "
                    "the routes after it could never match"
                )
        return self


class Provider(_Model):
    id: str = ""
    name: str
    address: str
    required: list[str] = []
    template: str
    # Who writes back for this destination (globs); default: anyone at the address's domain.
    senders: list[str] = []
    # The vendor's own ticket number in its replies: a regex whose group 1 is the number.
    ticket_number: str | None = None
    # Subject of what we relay to the vendor once its ticket is known ({tag}, {ticket},
    # {subject} = the forward's subject); without it, "Re: <the forward's subject>".
    ticket_subject: str | None = None
    # Fields that identify "the same case" for duplicate detection (normalised compare);
    # a key that one of the two mails lacks is not compared.
    duplicate_keys: list[str] = ["cliente"]

    @field_validator("ticket_number")
    @classmethod
    def _one_group(cls, value: str | None) -> str | None:
        if value is not None and linear_pattern(value).groups < 1:
            raise ValueError("needs a group (...) around the number")
        return value

    @property
    def sender_patterns(self) -> list[str]:
        return self.senders or [f"*@{self.address.rsplit('@', 1)[1].lower()}"]

    @field_validator("address")
    @classmethod
    def _is_address(cls, value: str) -> str:
        return email_address(value)


def _country_holidays(holidays_setting: list[date] | HolidaySettings) -> Any:
    if isinstance(holidays_setting, list):
        return None
    import holidays

    return holidays.country_holidays(holidays_setting.country, subdiv=holidays_setting.subdivision)


def tls_context(ca_file: str) -> ssl.SSLContext:
    """Verifying TLS context: the system's trusted CAs, or only `ca_file` when given."""
    return ssl.create_default_context(cafile=ca_file or None)


@dataclass(frozen=True)
class Problem:
    file: Path
    line: int
    field: str
    problem: str

    def __str__(self) -> str:
        return f"{self.file}:{self.line}: {self.field}: {self.problem}"


class ConfigError(Exception):
    def __init__(self, problems: list[Problem]) -> None:
        self.problems = problems
        super().__init__("\n".join(str(p) for p in problems))


@dataclass(frozen=True)
class Config:
    """The loaded configuration, passed explicitly to whatever needs it."""

    path: Path
    settings: Settings
    providers: dict[str, Provider] = field(default_factory=dict)

    @property
    def base_dir(self) -> Path:
        return self.path.parent

    def resolve(self, relative: str) -> Path:
        path = Path(relative)
        return path if path.is_absolute() else self.base_dir / path

    @property
    def database_url(self) -> str:
        # A relative SQLite path is relative to the config file, not to the cwd,
        # so `mailrouter --config /etc/x/config.yaml` finds the same database.
        url = self.settings.database
        prefix = "sqlite:///"
        if url.startswith(prefix) and not url.startswith(prefix + "/") and url != prefix:
            return prefix + str(self.resolve(url[len(prefix) :]))
        return url

    def calendar(self) -> Calendar:
        return self._calendar

    @functools.cached_property
    def _calendar(self) -> Calendar:
        # Built once per configuration: due times and case summaries ask for it per mail.
        hours = self.settings.business_hours
        return Calendar(
            zone=ZoneInfo(self.settings.timezone),
            business_hours=hours.enabled,
            days=frozenset(DAY_NAMES.index(d) for d in hours.days),
            start=hours.start,
            end=hours.end,
            holidays=frozenset(hours.holiday_dates),
            country_holidays=_country_holidays(hours.holidays),
        )

    def agent_name(self, address: str, fallback: str = "") -> str:
        member = self.settings.team.agents.get(address.lower())
        return member.name if member and member.name else fallback

    @property
    def state_dir(self) -> Path:
        return self.resolve(self.settings.state_dir)

    @property
    def outbox_dir(self) -> Path:
        return self.resolve(self.settings.outbound.file.dir)

    @property
    def templates_dir(self) -> Path:
        return self.resolve(self.settings.templates_dir)


def _line_of(node: yaml.Node | None, loc: tuple[int | str, ...]) -> int:
    """The 1-based line of the deepest YAML node that `loc` reaches."""
    line = node.start_mark.line + 1 if node is not None else 1
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            for key_node, value_node in node.value:
                if key_node.value == part:
                    line = key_node.start_mark.line + 1
                    node = value_node
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if part >= len(node.value):
                return line
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line


def _field_name(loc: tuple[int | str, ...]) -> str:
    name = ""
    for part in loc:
        if isinstance(part, int):
            name += f"[{part}]"
        else:
            name += ("." if name else "") + str(part)
    return name or "(top level)"


def _interpolate(
    value: Any, loc: tuple[int | str, ...], missing: list[tuple[int | str, ...]]
) -> Any:
    if isinstance(value, dict):
        return {k: _interpolate(v, (*loc, k), missing) for k, v in value.items()}
    if isinstance(value, list):
        return [_interpolate(v, (*loc, i), missing) for i, v in enumerate(value)]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        name, default = match.group(1), match.group(2)
        if name in os.environ:
            return os.environ[name]
        if default is not None:
            return default
        missing.append((*loc, f"${{{name}}}"))
        return ""

    return _ENV_REF.sub(substitute, value)


# libyaml's safe loader where PyYAML was built with it: the pure-Python one took 40 ms a
# file, twice (the values, then the nodes that give each its line), a tenth of a daemon's
# start-up; the same safe constructors build the values.
_SAFE_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def _read_yaml(path: Path) -> tuple[Any, yaml.Node | None]:
    """Parse one YAML file, once, into its values and the nodes that say where each is;
    raise ConfigError pointing at the bad line."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([Problem(path, 1, "(file)", f"cannot read: {exc.strerror}")]) from exc
    try:
        loader = _SAFE_LOADER(text)
        try:
            node = loader.get_single_node()
            return (loader.construct_document(node) if node is not None else None), node
        finally:
            loader.dispose()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 1
        reason = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([Problem(path, line, "(syntax)", str(reason))]) from exc


def _validate(
    model: type[_Model], path: Path, data: Any, node: yaml.Node | None
) -> tuple[Any, list[Problem]]:
    missing: list[tuple[int | str, ...]] = []
    data = _interpolate(data if data is not None else {}, (), missing)
    problems = [
        Problem(
            path,
            _line_of(node, loc[:-1]),
            _field_name(loc[:-1]),
            f"environment variable {loc[-1]} is not set",
        )
        for loc in missing
    ]
    if not isinstance(data, dict):
        return None, [*problems, Problem(path, 1, "(top level)", "expected a mapping of keys")]
    try:
        return model.model_validate(data), problems
    except ValidationError as exc:
        for error in exc.errors():
            loc = tuple(error["loc"])
            # pydantic prefixes our own checks with "Value error, "; the reason is enough.
            message = error["msg"].removeprefix("Value error, ")
            problems.append(Problem(path, _line_of(node, loc), _field_name(loc), message))
        return None, problems


# Keys whose value is a secret; `url`: a webhook's URL is all it takes to post to it.
_SECRET_KEY = re.compile(r"(?i)(password|secret|token|^url)$")
# A database URL with a password in it (user:password@host).
_URL_PASSWORD = re.compile(r"://[^/@:]*:[^/@]+@")


def literal_secrets(path: Path) -> list[Problem]:
    """Secrets written in the file itself (a `password:` that is not `${ENV_VAR}`): they
    end up in backups, tickets and git. Told as warnings; the file still loads."""
    data, node = _read_yaml(path)
    found: list[Problem] = []

    def walk(value: Any, loc: tuple[int | str, ...]) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                secret = _SECRET_KEY.search(str(key)) or (
                    key == "database" and isinstance(item, str) and _URL_PASSWORD.search(item)
                )
                if isinstance(item, str) and item and secret:
                    if not _ENV_REF.search(item):
                        where = (*loc, key)
                        found.append(
                            Problem(
                                path,
                                _line_of(node, where),
                                _field_name(where),
                                "warning: a secret written in the file; use ${ENV_VAR}",
                            )
                        )
                else:
                    walk(item, (*loc, key))
        elif isinstance(value, list):
            for index, item in enumerate(value):
                walk(item, (*loc, index))

    walk(data, ())
    return found


def load_config(path: Path | str) -> Config:
    """Load and cross-check config.yaml and its providers; raise ConfigError listing all faults."""
    path = Path(path).resolve()
    data, node = _read_yaml(path)
    settings, problems = _validate(Settings, path, data, node)
    if settings is None:
        raise ConfigError(problems)
    config = Config(path=path, settings=settings)
    providers: dict[str, Provider] = {}
    providers_dir = config.resolve(settings.providers_dir)
    provider_files = sorted(providers_dir.glob("*.yaml")) if providers_dir.is_dir() else []
    if not provider_files:
        problems.append(
            Problem(
                path,
                _line_of(node, ("providers_dir",)),
                "providers_dir",
                f"no provider files in {providers_dir}",
            )
        )
    for provider_path in provider_files:
        try:
            pdata, pnode = _read_yaml(provider_path)
        except ConfigError as exc:
            problems.extend(exc.problems)
            continue
        provider, pproblems = _validate(Provider, provider_path, pdata, pnode)
        problems.extend(pproblems)
        if provider is None:
            continue
        provider.id = provider_path.stem
        providers[provider.id] = provider
        for index, name in enumerate([*provider.required, *provider.duplicate_keys]):
            key = "required" if index < len(provider.required) else "duplicate_keys"
            position = index if key == "required" else index - len(provider.required)
            if name not in settings.fields:
                problems.append(
                    Problem(
                        provider_path,
                        _line_of(pnode, (key, position)),
                        f"{key}[{position}]",
                        f"unknown field {name!r} (known: {', '.join(sorted(settings.fields))})",
                    )
                )
        if not (config.templates_dir / provider.template).is_file():
            problems.append(
                Problem(
                    provider_path,
                    _line_of(pnode, ("template",)),
                    "template",
                    f"no such template {config.templates_dir / provider.template}",
                )
            )
    for index, route in enumerate(settings.routes):
        if provider_files and route.to not in providers:
            problems.append(
                Problem(
                    path,
                    _line_of(node, ("routes", index, "to")),
                    f"routes[{index}].to",
                    f"unknown provider {route.to!r} (known: {', '.join(sorted(providers))})",
                )
            )
        if route.when is not None and route.when.field and route.when.field not in settings.fields:
            problems.append(
                Problem(
                    path,
                    _line_of(node, ("routes", index, "when", "field")),
                    f"routes[{index}].when.field",
                    f"unknown field {route.when.field!r}",
                )
            )
    if settings.routes[-1].when is not None:
        problems.append(
            Problem(
                path,
                _line_of(node, ("routes", len(settings.routes) - 1)),
                f"routes[{len(settings.routes) - 1}]",
                "the last route must have no 'when': it is the default for everything else",
            )
        )
    if problems:
        raise ConfigError(problems)
    return Config(path=path, settings=settings, providers=providers)
