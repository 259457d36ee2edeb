"""The peer of `make bench`: django-helpdesk's `get_email` ingesting the same kind of Dovecot
mailbox (an IMAP queue, one ticket per mail, nothing forwarded). Runs in a virtualenv of its
own (`var/bench/peer-venv`, built by bench/run.py), never in the router's:

    peer-venv/bin/python bench/peer.py HOST PORT USER PASSWORD WORKDIR

Prints one JSON line: seconds, tickets, messages left in INBOX. Mail the helpdesk would send
(acknowledgements to submitters) goes to Django's in-memory backend: nothing leaves.
"""

from __future__ import annotations

import imaplib
import json
import sys
import time
from pathlib import Path


def configure(workdir: Path) -> None:
    import django
    from django.conf import settings

    settings.configure(
        DEBUG=False,
        SECRET_KEY="bench-only",
        USE_TZ=True,
        SITE_ID=1,
        DATABASES={
            "default": {"ENGINE": "django.db.backends.sqlite3", "NAME": str(workdir / "peer.db")}
        },
        INSTALLED_APPS=[
            "django.contrib.auth",
            "django.contrib.contenttypes",
            "django.contrib.sessions",
            "django.contrib.sites",
            "django.contrib.humanize",
            "django.contrib.messages",
            "rest_framework",
            "helpdesk",
        ],
        EMAIL_BACKEND="django.core.mail.backends.locmem.EmailBackend",
        TEMPLATES=[
            {
                "BACKEND": "django.template.backends.django.DjangoTemplates",
                "APP_DIRS": True,
                "OPTIONS": {"context_processors": []},
            }
        ],
        MEDIA_ROOT=str(workdir / "media"),
        DEFAULT_AUTO_FIELD="django.db.models.AutoField",
        LOGGING_CONFIG=None,
        HELPDESK_TEAMS_MODE_ENABLED=False,  # teams need pinax-teams: not what is measured
    )
    django.setup()


def main(host: str, port: int, user: str, password: str, workdir: Path) -> dict[str, float]:
    configure(workdir)
    from django.core.management import call_command
    from helpdesk.email import process_email
    from helpdesk.models import Queue, Ticket

    call_command("migrate", verbosity=0)
    Queue.objects.create(
        title="Escalaciones",
        slug="esc",
        email_address="escalaciones@example.com",
        allow_email_submission=True,
        email_box_type="imap",
        email_box_host=host,
        email_box_port=port,
        email_box_ssl=False,
        email_box_user=user,
        email_box_pass=password,
        email_box_imap_folder="INBOX",
        email_box_interval=0,
        logging_type="none",
    )
    started = time.monotonic()
    process_email(quiet=True)
    seconds = time.monotonic() - started
    server = imaplib.IMAP4(host, port)
    server.login(user, password)
    left = int(server.select("INBOX")[1][0] or b"0")
    server.logout()
    return {"seconds": seconds, "tickets": Ticket.objects.count(), "left_in_inbox": left}


if __name__ == "__main__":
    host, port, user, password, workdir = sys.argv[1:6]
    print(json.dumps(main(host, int(port), user, password, Path(workdir))))
