"""CLI: the `mailrouter` command (also `python -m mailrouter`).

`init [DIR]` writes a starter configuration; `run` starts the daemon; `check-config`
validates the configuration; `route FILE.eml` explains what would happen to a mail
without sending or writing anything (with `--db`, given the cases already in the
database); `cases` lists the cases; `quarantine` lists, shows, releases (again, or onto
a case) and drops the mail that was kept aside; `digest` previews or sends the digests.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import email
import email.policy
import json
import logging
import os
import re
import shlex
import signal
import sys
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mailrouter import __version__
from mailrouter.config import Config, ConfigError, label_name, literal_secrets
from mailrouter.core.parse import Deadline, Refused, field_aliases, parse_message
from mailrouter.core.render import Renderer
from mailrouter.core.route import decide, sender_allowed
from mailrouter.core.team import case_labels
from mailrouter.model import (
    CaseInfo,
    IntakeHooks,
    OutgoingMail,
    Result,
    case_tag,
)
from mailrouter.store.db import Store

if TYPE_CHECKING:
    from mailrouter.service import HeldContent, HeldMail


def _load(args: argparse.Namespace) -> Config:
    from mailrouter.service import load_checked

    return load_checked(args.config)


def cmd_run(args: argparse.Namespace) -> int:
    # Told to stop while starting (a deploy, a fast restart): there is no work in hand yet,
    # so stop cleanly. Once running, the daemon's own handler finishes the work in hand.
    signal.signal(signal.SIGTERM, _stop_while_starting)
    from mailrouter.daemon import run_daemon

    config = _load(args)
    logs = config.settings.logging
    if logs.level is not None:
        logging.getLogger().setLevel(logs.level)
    if logs.format == "json":
        from mailrouter.logjson import use_json

        use_json(config.settings.case_tag_prefix)
    if not args.sender_only:
        for warning in config_warnings(config):
            logging.getLogger("mailrouter").warning("%s: %s", config.path, warning)
    run_daemon(config, sender_only=args.sender_only)
    return 0


def _stop_while_starting(_signum: int, _frame: object) -> None:
    raise SystemExit(0)


def cmd_check_connection(args: argparse.Namespace) -> int:
    """Log into the IMAP intake and the SMTP relay as the daemon would, send nothing and
    create no folder: one line per server; exit 1 if one fails, with why."""
    from mailrouter.deliver.transports import SmtpTransport
    from mailrouter.intake.imap import ImapIntake

    config = _load(args)
    s = config.settings
    checks: list[tuple[str, Callable[[], str]]] = []
    if s.intake.source == "imap":
        imap = s.intake.imap
        hooks = IntakeHooks(
            ingest=_nothing_ingested, known=lambda *_: {}, max_bytes=1, large_mail=_no_turn
        )
        checks.append((f"IMAP {imap.host}:{imap.port}", ImapIntake(imap, hooks).check))
    if s.outbound.transport == "smtp":
        smtp = s.outbound.smtp
        transport = SmtpTransport(smtp)
        checks.append((f"SMTP {smtp.host}:{smtp.port}", lambda: asyncio.run(transport.check())))
    if not checks:
        print("nothing to connect to: the intake is the SMTP listener, outbound writes files")
        return 0
    failed = 0
    for server, check in checks:
        try:
            print(check())
        except Exception as exc:  # one line, no traceback: what a login or a connection said
            failed += 1
            said = " ".join(str(exc).split())[:300] or type(exc).__name__
            print(f"{server}: FAILED: {type(exc).__name__}: {said}", file=sys.stderr)
    return 1 if failed else 0


def _nothing_ingested(raw: bytes, source: object, size: object) -> Result:
    raise AssertionError("check-connection fetches no mail")


@contextlib.contextmanager
def _no_turn(size: int) -> Iterator[None]:
    yield


def cmd_check_config(args: argparse.Namespace) -> int:
    config = _load(args)
    s = config.settings
    listen = s.intake.listen.socket or f"{s.intake.listen.host}:{s.intake.listen.port}"
    intake = (
        f"{s.intake.source.upper()} listener {listen}"
        if s.intake.source in ("smtp", "lmtp")
        else f"IMAP {s.intake.imap.host}:{s.intake.imap.port}/{s.intake.imap.folder}"
    )
    outbound = (
        f"files in {config.outbox_dir}"
        if s.outbound.transport == "file"
        else f"SMTP {s.outbound.smtp.host}:{s.outbound.smtp.port}"
    )
    for secret in literal_secrets(config.path):
        print(secret, file=sys.stderr)
    for warning in config_warnings(config):
        print(f"{config.path}: warning: {warning}", file=sys.stderr)
    print(
        f"{config.path}: OK: intake <{s.intake.address}> via {intake}; "
        f"{len(config.providers)} providers ({', '.join(sorted(config.providers))}); "
        f"{len(s.routes)} routes; outbound {outbound}"
    )
    return 0


_LOOPBACK = ("127.0.0.1", "::1", "localhost")


def config_warnings(config: Config) -> list[str]:
    """What is allowed but unsafe where strangers can write to the intake."""
    s, warnings = config.settings, []
    servers = []
    if s.intake.source == "imap":
        servers.append(("intake.imap", s.intake.imap.host, s.intake.imap.security))
    if s.outbound.transport == "smtp":
        servers.append(("outbound.smtp", s.outbound.smtp.host, s.outbound.smtp.security))
    for name, host, security in servers:
        if security == "none" and host not in _LOOPBACK:
            warnings.append(
                f"{name}.security is none on {host}: the login and every mail cross the "
                "network unencrypted; use tls or starttls"
            )
    if s.loop_protection.max_per_sender_per_hour is not None:
        warnings.append(
            "loop_protection.max_per_sender_per_hour is no longer used: escalations are never "
            "limited; what the router sends to one address is (max_replies_per_address_per_hour)"
        )
    for provider in sorted(config.providers.values(), key=lambda p: p.id):
        if not provider.senders and sender_allowed(provider.address, s.allowed_senders):
            warnings.append(
                f"provider {provider.id}: its replies are recognised by "
                f"{provider.sender_patterns[0]}, which covers the agents too: set `senders` "
                "to the addresses that speak for it"
            )
    if s.authentication.require == "none":
        warnings.append(
            "authentication.require is none: a From header is believed as written; anyone "
            "can write as an agent or a vendor (README, Security)"
        )
    elif (
        s.intake.source in ("smtp", "lmtp")
        and not s.intake.listen.socket
        and s.intake.listen.host not in _LOOPBACK
    ):
        warnings.append(
            f"the SMTP listener on {s.intake.listen.host} trusts Authentication-Results: only "
            "an MTA in front of it may reach it, or anyone can write those results"
        )
    return warnings


def _text_of(data: bytes) -> str:
    """A rendered mail as a person reads it: headers, then decoded text parts."""
    # The parts' own headers read as compat32's plain strings: the default policy parses a
    # header again at every look, three looks a part, and that was most of a dry run's
    # printing of a big team's digests. The mail's headers, shown, are decoded by it.
    msg = email.message_from_bytes(data, policy=email.policy.compat32)
    shown = email.policy.default
    lines = [
        f"{name}: {' '.join(str(shown.header_fetch_parse(name, value)).split())}"
        for name, value in msg.items()
    ]
    for part in msg.walk():
        if part.is_multipart():
            continue
        payload = part.get_payload(decode=True)
        payload = payload if isinstance(payload, bytes) else b""
        if part.get_content_maintype() == "text" and not part.get_filename():
            lines += ["", _decoded_text(payload, part.get_content_charset()).rstrip()]
        else:
            lines += [
                "",
                f"[adjunto: {part.get_filename()} ({part.get_content_type()}, "
                f"{len(payload)} bytes)]",
            ]
    return "\n".join(lines)


def _decoded_text(payload: bytes, charset: str | None) -> str:
    try:
        text = payload.decode(charset or "us-ascii", "replace")
    except LookupError:  # a charset Python does not know
        text = payload.decode("utf-8", "replace")
    return text.replace("\r\n", "\n")


def cmd_route(args: argparse.Namespace) -> int:
    config = _load(args)
    raw = Path(args.file).read_bytes()
    deadline = Deadline(config.settings.intake.mail_deadline_seconds)
    try:
        mail = parse_message(raw, field_aliases(config), config.settings.intake.address, deadline)
    except Refused as exc:
        print(f"Outcome:     quarantined ({exc})")
        print("\nDry run: nothing was sent or written.")
        return 0
    today = datetime.now(config.calendar().zone).date()
    decision = decide(mail, config, today)
    if decision.fields is not None:  # typed values as the router keeps them
        mail = dataclasses.replace(mail, fields=decision.fields)
    labels = {name: spec.label for name, spec in config.settings.fields.items()}
    print(f"From:        {mail.from_name} <{mail.from_address}>")
    print(f"Subject:     {mail.subject}")
    print(f"Message-ID:  {mail.message_id}")
    print("Fields found:")
    for name, value in mail.fields.items():
        print(f"  {labels.get(name, name)} [{name}]: {value}")
    if not mail.fields:
        print("  (none)")
    if mail.attachments:
        print("Attachments: " + ", ".join(a.filename for a in mail.attachments))
    print(f"Outcome:     {decision.outcome} ({decision.reason})")
    if decision.route is not None and decision.provider is not None:
        print(f"Rule:        {decision.route.name}")
        print(f"Destination: {decision.provider.name} <{decision.provider.address}>")
        print(f"Priority:    {decision.priority}")
    if args.db:
        mails = _explain_with_database(config, raw)
        if mails is None:
            return 1
    elif decision.outcome in ("route", "needs_info"):
        now = datetime.now(UTC)
        tag = f"{config.settings.case_tag_prefix}-??????"
        case = CaseInfo(tag, decision.priority, "new", "(según la prioridad)")
        mails = Renderer(config).decision_mails(case, mail, decision, now)
    else:
        mails = []
    for outgoing in mails:
        title = f"{outgoing.kind} to {', '.join(outgoing.recipients)}"
        note = "" if args.db else " (case number assigned on arrival)"
        print(f"\n----- {title}{note} -----")
        print(_text_of(outgoing.data))
    print("\nDry run: nothing was sent or written.")
    return 0


def _explain_with_database(config: Config, raw: bytes) -> list[OutgoingMail] | None:
    """Print what the mail would do given the cases in the configured database (read only);
    return the mails it would send, or None when there is no usable database."""
    from mailrouter.service import explain
    from mailrouter.store.db import Store, schema_is_current, sqlite_path

    database = config.database_url
    # The decision paths log what they do as if it were done: in a dry run, it is not.
    logging.getLogger("mailrouter.core").setLevel(logging.WARNING)
    file = sqlite_path(database)
    if file is not None and not file.exists():
        print(f"no database at {file}: nothing has been processed there yet", file=sys.stderr)
        return None
    store = Store(database, run_migrations=False)
    try:
        if not schema_is_current(store.engine):
            print(
                f"the database {_without_password(database)} is not at this version's schema: "
                "run `mailrouter db upgrade` (or start the daemon), then try again",
                file=sys.stderr,
            )
            return None
        found = explain(config, store, raw, datetime.now(UTC))
    finally:
        store.close()
    prefix = config.settings.case_tag_prefix
    result = found.result
    tag = case_tag(prefix, result.case_id) if result.case_id else ""
    print(f"\nWith the cases in {database} (read only):")
    if found.seen_before:
        on_case = f", case {tag}" if tag else ""
        print(f"  Already processed: {result.outcome} ({result.reason}){on_case}")
        print("  Arriving again, it would change nothing and send nothing.")
        return []
    if found.opened:
        verdict = f"open a new case, {tag} (if nothing arrives before it)"
    elif result.reason.startswith("duplicate of"):
        verdict = f"be added to {tag} as a duplicate escalation"
    elif result.case_id:
        verdict = f"thread into {tag}"
    else:
        verdict = "belong to no case"
    print(f"  It would:    {verdict}")
    print(f"  Outcome:     {result.outcome} ({result.reason})")
    for case_id, kind, detail in found.events:
        print(f"  History:     {case_tag(prefix, case_id)} {kind}: {detail}")
    if not found.mails:
        print("  Mails:       none")
    return found.mails


def cmd_cases(args: argparse.Namespace) -> int:
    config = _load(args)
    store = Store(config.database_url)
    prefix = config.settings.case_tag_prefix
    since = datetime.combine(args.since, datetime.min.time(), UTC) if args.since else None
    now = datetime.now(UTC)
    label = None
    if args.label is not None:
        label = label_name(args.label)
        if label is None:
            store.close()
            print(f"{args.label!r} is not a label", file=sys.stderr)
            return 2
    filters = {"status": args.status, "provider": args.provider, "agent": args.agent}
    rows = store.cases(
        limit=args.limit,
        since=since,
        now=now,
        owner=args.owner,
        label=label,
        ack_providers=[p.id for p in config.providers.values() if p.ticket_number],
        ack_before=now - timedelta(hours=config.settings.vendor_ack_hours),
        **filters,
    )
    store.close()
    if args.json:
        print(json.dumps([_case_json(case, prefix, config, now) for case in rows], indent=1))
        return 0
    print(
        f"{'case':<11} {'created (UTC)':<17} {'agent':<30} {'destination':<12} "
        f"{'priority':<8} {'status':<15} {'owner':<30} labels"
    )
    for case in rows:
        print(
            f"{case.tag(prefix):<11} {case.created_at:%Y-%m-%d %H:%M} "
            f"{case.agent_address[:30]:<30} {case.provider:<12} {case.priority:<8} "
            f"{case.status:<15} {(case.owner or '-')[:30]:<30} "
            f"{', '.join(case_labels(case, config, now)) or '-'}"
        )
    if not rows:
        print("(no cases)")
    return 0


def cmd_case(args: argparse.Namespace) -> int:
    """One case: its fields, status, due time, and its timeline."""
    from mailrouter.service import case_number

    config = _load(args)
    prefix = config.settings.case_tag_prefix
    number = case_number(args.tag, prefix)
    if number is None:
        print(f"{args.tag!r} is not a case: give it as {prefix}-123", file=sys.stderr)
        return 2
    store = Store(config.database_url)
    found = store.case(number)
    store.close()
    if found is None:
        print(f"no case {case_tag(prefix, number)}", file=sys.stderr)
        return 1
    case, timeline = found
    if args.json:
        entries = [{"at": at.isoformat(), "what": what, "detail": d} for at, what, d in timeline]
        now = datetime.now(UTC)
        print(json.dumps({**_case_json(case, prefix, config, now), "timeline": entries}, indent=1))
        return 0
    due = case.follow_up_due.strftime("%Y-%m-%d %H:%M UTC") if case.follow_up_due else "-"
    print(f"{case.tag(prefix)}  {case.status}  {case.priority}  to {case.provider}")
    print(f"agent:     {case.agent_name} <{case.agent_address}>")
    print(f"owner:     {case.owner or '-'}")
    print(f"labels:    {', '.join(case_labels(case, config, datetime.now(UTC))) or '-'}")
    print(f"subject:   {case.subject}")
    print(f"follow-up: {due}")
    print(f"ticket:    {case.vendor_ticket or '-'}")
    for name, value in case.fields.items():
        print(f"  {name}: {' '.join(str(value).split())[:200]}")
    print()
    for at, what, detail in timeline:
        print(f"{at:%Y-%m-%d %H:%M}  {what:<28} {detail}")
    return 0


def _case_json(case: Any, prefix: str, config: Config, now: datetime) -> dict[str, Any]:
    def moment(value: datetime | None) -> str | None:
        return value.isoformat() if value else None

    return {
        "case": case.tag(prefix),
        "created": moment(case.created_at),
        "status": case.status,
        "provider": case.provider,
        "priority": case.priority,
        "agent": case.agent_address,
        "owner": case.owner,
        "labels": case_labels(case, config, now),
        "client": case.client,
        "subject": case.subject,
        "follow_up_due": moment(case.follow_up_due),
        "vendor_ticket": case.vendor_ticket,
        "fields": case.fields,
    }


def _who() -> str:
    """Who is acting, for the record: the OS user."""
    import getpass

    try:
        return getpass.getuser()
    except (OSError, KeyError):  # no login name anywhere (a bare container)
        return f"uid {os.getuid()}"


# What a mail's text must not bring to a lead's terminal: control characters (escape
# sequences) and the marks that reorder what is shown (bidi overrides).
_UNPRINTABLE = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def _shown(text: str) -> str:
    """A stranger's text as it may be printed to a terminal."""
    return _UNPRINTABLE.sub("?", text.replace("\r\n", "\n"))


def _header_lines(raw: bytes) -> list[str]:
    """A mail's header fields, decoded and unfolded, each on one line; one that cannot be
    decoded is shown as written."""
    import email.parser

    msg = email.parser.BytesHeaderParser(policy=email.policy.default).parsebytes(raw)
    lines = []
    for name, value in msg.raw_items():
        try:
            text = str(msg.policy.header_fetch_parse(name, value))
        except Exception:
            text = str(value)
        lines.append(_shown(f"{name}: {' '.join(text.split())}"))
    return lines


def _quarantine_list(args: argparse.Namespace, rows: Sequence[HeldMail]) -> None:
    if args.json:
        import json

        listed = [
            {
                "id": held.id,
                "received": held.received.isoformat(),
                "from": held.sender,
                "reason": held.reason,
                "subject": held.subject,
            }
            for held in rows
        ]
        print(json.dumps(listed, ensure_ascii=False, indent=2))
        return
    print(f"{'#':>6} {'received (UTC)':<17} {'from':<32} reason / subject")
    for held in rows:
        print(
            f"{held.id:>6} {held.received:%Y-%m-%d %H:%M} {_shown(held.sender[:32]):<32} "
            f"{_shown(held.reason)}\n{'':>58}{_shown(held.subject[:80])}"
        )
    if not rows:
        matching = f" with a reason holding {args.reason!r}" if args.reason else ""
        print(f"(nothing in quarantine{matching})")


def _quarantine_show(content: HeldContent) -> None:
    held, mail = content.held, content.mail
    print(f"Message #{held.id}, received {held.received:%Y-%m-%d %H:%M} UTC: {held.outcome}")
    print(f"Reason: {_shown(held.reason)}")
    print()
    print("\n".join(_header_lines(content.raw)))
    print()
    if held.header_only:
        print(f"({content.unreadable})")
        return
    if mail is None:
        print(f"(the router cannot read this mail: {_shown(content.unreadable or '')})")
        print(f"`mailrouter quarantine show {held.id} --raw > mail.eml` writes what is stored.")
        return
    print(_shown(mail.body.rstrip()) or "(no text)")
    if mail.attachments:
        print("\nAttachments:")
        for attachment in mail.attachments:
            print(
                f"  {_shown(attachment.filename)} "
                f"({_shown(attachment.content_type)}, {len(attachment.payload)} bytes)"
            )


def cmd_db(args: argparse.Namespace) -> int:
    """`db current`: the schema revision of the configured database (exit 1 if it is behind
    this version's); `db upgrade`: bring it to this version's (the daemon also does so at
    start; daemons starting together take turns)."""
    from mailrouter.store.db import SCHEMA_REVISION, schema_revision

    config = _load(args)
    store = Store(config.database_url, run_migrations=args.action == "upgrade")
    try:
        revision = schema_revision(store.engine)
    finally:
        store.close()
    where = _without_password(config.database_url)
    if revision == SCHEMA_REVISION:
        print(f"{where}: schema {revision} (this version's)")
        return 0
    print(
        f"{where}: schema {revision or 'none'}; this version's is {SCHEMA_REVISION}: "
        "run `mailrouter db upgrade` (or start the daemon)"
    )
    return 1


def _without_password(url: str) -> str:
    """A database URL fit for a log or a screen."""
    scheme, sep, rest = url.partition("://")
    credentials, at, place = rest.rpartition("@")
    if not at or ":" not in credentials:
        return url
    return f"{scheme}{sep}{credentials.split(':', 1)[0]}:***@{place}"


def cmd_quarantine(args: argparse.Namespace) -> int:
    from mailrouter.service import Quarantine, QuarantineError
    from mailrouter.store.db import StoreError

    config = _load(args)
    store = Store(config.database_url)
    queue = Quarantine(config, store, lambda: datetime.now(UTC))
    prefix = config.settings.case_tag_prefix
    try:
        if args.action is None and args.show is not None:
            args.action, args.id, args.raw = "show", args.show, True  # the older --show ID
        if args.action == "show":
            content = queue.show(args.id)
            if args.raw:
                sys.stdout.flush()
                sys.stdout.buffer.write(content.raw)
                sys.stdout.buffer.flush()
            else:
                _quarantine_show(content)
        elif args.action == "release":
            who = _who()
            if args.attach_to:
                result = queue.attach(args.id, args.attach_to, who)
            else:
                result = queue.release(args.id, who)
            on_case = f", case {case_tag(prefix, result.case_id)}" if result.case_id else ""
            again = "the same mail was processed before: " if result.duplicate else ""
            print(f"message #{args.id}: {again}{result.outcome} ({result.reason}){on_case}")
        elif args.action == "drop":
            who = _who()
            queue.drop(args.id, who)
            print(f"message #{args.id} dropped by {who} (kept in the database, no longer listed)")
        else:
            # Only the rows listed, without their bytes: a quarantine can hold large mails.
            _quarantine_list(args, queue.held(args.limit, args.reason))
    except QuarantineError as exc:
        print(_shown(str(exc)), file=sys.stderr)
        return 1
    except StoreError as exc:
        print(f"the database cannot be used now ({exc}); nothing was changed", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # The reader went away (`| head`): what is left of the output goes nowhere, quietly.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    finally:
        store.close()
    return 0


def _file_stem(address: str) -> str:
    """A file name inside the preview folder made from an address, which came from a mail
    and may hold "/" or "..": those become "_", so no path leaves the folder."""
    stem = re.sub(r"[^A-Za-z0-9@._+-]", "_", address)[:200].lstrip(".")
    return stem or "_"


def cmd_digest(args: argparse.Namespace) -> int:
    from mailrouter.daemon import Daemon, utc_now
    from mailrouter.service import Followup

    config = _load(args)
    if not args.preview and not args.now:
        print("give --preview DIR or --now", file=sys.stderr)
        return 2
    store = Store(config.database_url)
    followup = Followup(config, store, utc_now)
    if args.preview:
        folder = Path(args.preview)
        folder.mkdir(parents=True, exist_ok=True)
        for digest in followup.digests_now():
            if args.to and digest.recipient.lower() != args.to.lower():
                continue
            msg = email.message_from_bytes(
                followup.render_digest(digest).data, policy=email.policy.default
            )
            for subtype in ("html", "plain"):
                part = msg.get_body(preferencelist=(subtype,))
                suffix = "html" if subtype == "html" else "txt"
                target = folder / f"{_file_stem(digest.recipient)}.{suffix}"
                target.write_text(str(part.get_content()) if part else "", encoding="utf-8")
                print(target)
        return 0
    period = f"manual {utc_now():%Y-%m-%dT%H:%M}"
    run = followup.queue_digests(period, only_to=args.to, dry_run=args.dry_run)
    for digest, mail in run.rendered:
        print(f"{digest.recipient}: {mail.subject}")
        if args.dry_run:
            print(_text_of(mail.data), end="\n\n")
    for recipient in run.already_sent:
        print(f"{recipient}: already sent for {period}")
    if not args.dry_run and run.queued:
        daemon = Daemon(config)

        async def deliver() -> int:
            # The relay connections are closed on the loop that opened them: once
            # `asyncio.run` has closed it they can no longer be closed, only leaked.
            try:
                return await daemon.sender.deliver_due()
            finally:
                await daemon.transport.close()

        sent = asyncio.run(deliver())
        daemon.sender.close()
        print(f"{len(run.queued)} digests queued; {sent} mails sent (everything due in the outbox)")
    if not run.rendered:
        print("(no digest to send: nobody has open cases)")
    return 0


def cmd_init(args: argparse.Namespace) -> int:
    from mailrouter.defaults import install

    target = Path(args.dir)
    if target.exists() and not target.is_dir():
        print(f"{target} is not a directory", file=sys.stderr)
        return 1
    for path, written in install(target):
        print(f"wrote   {path}" if written else f"skipped {path} (already there, left as it is)")
    config = shlex.quote(str(target / "config.yaml"))
    print(
        "\nNext steps:\n"
        f"  1. edit {config} (intake, allowed_senders, team, outbound) and the providers/;\n"
        "     secrets come from the environment (${MAILROUTER_...}), never from the file\n"
        f"  2. mailrouter --config {config} check-config\n"
        f"  3. mailrouter --config {config} run"
    )
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mailrouter", description="Email escalation router: one intake address for agents."
    )
    parser.add_argument(
        "--config",
        default=os.environ.get("MAILROUTER_CONFIG", "config.yaml"),
        help="path to config.yaml (default: $MAILROUTER_CONFIG or ./config.yaml)",
    )
    parser.add_argument("--log-level", default=os.environ.get("MAILROUTER_LOG_LEVEL", "INFO"))
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of an unexpected error"
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    init = commands.add_parser(
        "init", help="write a starter config.yaml, providers/ and templates/ (never over a file)"
    )
    init.add_argument("dir", nargs="?", default=".", metavar="DIR", help="where (default: .)")
    init.set_defaults(func=cmd_init)
    run = commands.add_parser("run", help="run the daemon until SIGTERM/SIGINT")
    run.add_argument(
        "--sender-only",
        action="store_true",
        help="only send the outbox, until standard input closes (the daemon starts this "
        "itself when outbound.sender_process is on)",
    )
    run.set_defaults(func=cmd_run)
    commands.add_parser(
        "check-config", help="validate config.yaml and providers/*.yaml"
    ).set_defaults(func=cmd_check_config)
    commands.add_parser(
        "check-connection",
        help="log into the IMAP intake and the SMTP relay as the daemon would; send nothing",
    ).set_defaults(func=cmd_check_connection)
    route = commands.add_parser("route", help="dry run: explain what would happen to a mail")
    route.add_argument("file", help="an .eml file")
    route.add_argument(
        "--db",
        action="store_true",
        help="also look up the cases in the configured database, read only: would the mail "
        "thread into a case, be a duplicate, or open a new one?",
    )
    route.set_defaults(func=cmd_route)
    cases = commands.add_parser("cases", help="list cases")
    cases.add_argument("--limit", type=int, default=200)
    cases.add_argument(
        "--status",
        choices=(
            "open",
            "overdue",
            "needs_info",
            "vendor_replied",
            "awaiting_vendor",
            "closed",
            "undeliverable",
        ),
        help="open: being worked on; overdue: being worked on, follow-up past due",
    )
    cases.add_argument("--provider", help="a destination's id (providers/<id>.yaml)")
    cases.add_argument("--agent", help="the agent's address")
    cases.add_argument("--owner", help="the owner's address (team.escalation)")
    cases.add_argument(
        "--label", help="a label: stored (route, #etiqueta) or urgente, sin-acuse, undeliverable"
    )
    cases.add_argument("--since", type=date.fromisoformat, help="created on or after (YYYY-MM-DD)")
    cases.add_argument("--json", action="store_true", help="a JSON array instead of a table")
    cases.set_defaults(func=cmd_cases)
    case = commands.add_parser("case", help="one case: fields, status, due time, timeline")
    case.add_argument("tag", help="ESC-123 or ESC-000123")
    case.add_argument("--json", action="store_true")
    case.set_defaults(func=cmd_case)
    digest = commands.add_parser("digest", help="preview or send the digests now")
    digest.add_argument("--preview", metavar="DIR", help="write each digest's HTML and text here")
    digest.add_argument("--now", action="store_true", help="send the digests now")
    digest.add_argument("--to", metavar="ADDRESS", help="only the digest of this recipient")
    digest.add_argument("--dry-run", action="store_true", help="with --now: show, send nothing")
    digest.set_defaults(func=cmd_digest)
    db = commands.add_parser("db", help="the database's schema: current | upgrade")
    db.add_argument("action", choices=("current", "upgrade"))
    db.set_defaults(func=cmd_db)
    quarantine = commands.add_parser(
        "quarantine",
        help="work the quarantined mail: list, show, release (or attach to a case), drop",
        description="Alone: the same as `list`. Each release or drop is recorded on the "
        "mail's row with the OS user and the time (UTC); nothing is deleted.",
    )
    quarantine.add_argument("--limit", type=int, default=200, help=argparse.SUPPRESS)
    quarantine.add_argument(
        "--show", type=int, metavar="ID", help="write that raw mail to stdout (= show ID --raw)"
    )
    quarantine.set_defaults(func=cmd_quarantine, action=None, reason=None, json=False)
    held = quarantine.add_subparsers(dest="action", metavar="ACTION")
    listing = held.add_parser("list", help="the newest quarantined mails with the reason")
    listing.add_argument("--reason", metavar="TEXT", help="only those whose reason holds TEXT")
    listing.add_argument("--json", action="store_true", help="a JSON array, one object a mail")
    listing.add_argument("--limit", type=int, default=argparse.SUPPRESS, help="how many (200)")
    show = held.add_parser("show", help="headers, reason, text and attachments of a mail")
    show.add_argument("id", type=int, metavar="ID")
    show.add_argument("--raw", action="store_true", help="write the stored bytes to stdout")
    release = held.add_parser(
        "release", help="process a mail again as if it had just arrived, or attach it to a case"
    )
    release.add_argument("id", type=int, metavar="ID")
    release.add_argument(
        "--attach-to",
        metavar="CASE",
        help="add it to this case (ESC-123): its thread, its history, relayed to its vendor",
    )
    drop = held.add_parser("drop", help="put a mail aside for good (marked, never deleted)")
    drop.add_argument("id", type=int, metavar="ID")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=args.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    # aiosmtpd logs every SMTP command at INFO, and Alembic every start: keep the log for us.
    # APScheduler writes a line at INFO for every job run (every reminder check).
    for noisy in ("mail.log", "alembic", "mailparser", "apscheduler"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLogger().level))
    try:
        return int(args.func(args))
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        print(f"{len(exc.problems)} problem(s) in the configuration", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`mailrouter route x.eml | head`): the rest of the output
        # goes nowhere, quietly, and Python's flush at exit does not complain either.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:
        # One line for a person; the traceback for whoever debugs it (--debug).
        if args.debug:
            raise
        said = " ".join(str(exc).split())[:300]
        print(f"mailrouter: {type(exc).__name__}: {said} (--debug shows more)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
