"""Daemon: runs the intake, the outbox sender and the scheduler until told to stop.

Owns the asyncio loop, the wiring of config -> store -> pipeline -> sender,
reload on SIGHUP (a broken configuration is refused and the last good one
kept), and shutdown: on SIGTERM/SIGINT the intake stops taking new mail, the message
in hand and the outbox row in flight are finished, and the process exits 0.
The IMAP poller, which blocks, runs in its own thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import signal
import threading
from collections.abc import Callable
from datetime import UTC, datetime

from aiosmtpd.smtp import SMTP
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.interval import IntervalTrigger

from mailrouter.config import Config, ConfigError, load_config
from mailrouter.deliver import FileTransport, Sender, SmtpTransport, Transport
from mailrouter.digest import Followup
from mailrouter.intake import ImapIntake, SmtpIntake
from mailrouter.pipeline import Pipeline
from mailrouter.store import Store

log = logging.getLogger(__name__)

SENDER_IDLE_SECONDS = 5.0


def utc_now() -> datetime:
    return datetime.now(UTC)


def make_transport(config: Config) -> Transport:
    outbound = config.settings.outbound
    if outbound.transport == "smtp":
        return SmtpTransport(outbound.smtp)
    return FileTransport(config.outbox_dir)


def outbound_lanes(config: Config) -> int:
    """Mails in flight at once: one per relay connection; a folder is written one at a time."""
    outbound = config.settings.outbound
    return outbound.smtp.connections if outbound.transport == "smtp" else 1


class Daemon:
    def __init__(self, config: Config, clock: Callable[[], datetime] = utc_now) -> None:
        self.config = config
        self.clock = clock
        self.store = Store(config.database_url)
        # Replaced whole on reload; intakes fetch it per mail, so each mail sees one config.
        self.pipeline = Pipeline(config, self.store, clock)
        self.transport = make_transport(config)
        self.sender = Sender(
            self.store,
            self.transport,
            config.settings.outbound.retry,
            clock,
            on_failed=lambda session, row, error: self.pipeline.delivery_failed(
                session, row, error
            ),
            lanes=outbound_lanes(config),
        )
        self.followup = Followup(config, self.store, clock)
        self.stopping = asyncio.Event()
        self.outbox_changed = asyncio.Event()
        self.ready = threading.Event()  # set once the intake is listening (tests wait on it)

    def stop(self) -> None:
        self.stopping.set()

    def current_pipeline(self) -> Pipeline:
        return self.pipeline

    def reload(self) -> bool:
        """Re-read the configuration; a broken one is refused and the running one kept.

        Routes, providers, templates, fields, SLA and allowed senders apply at once;
        the intake, outbound and database settings in use need a restart to change.
        """
        try:
            new = load_config(self.config.path)
        except ConfigError as exc:
            log.error("configuration reload refused; still running the last good one:\n%s", exc)
            return False
        running = self.config.settings
        fixed = {name: getattr(running, name) for name in ("intake", "outbound", "database")}
        changed = [name for name, value in fixed.items() if getattr(new.settings, name) != value]
        if changed:
            log.warning("changes to %s take effect after a restart", ", ".join(changed))
        self.config = Config(
            path=new.path, settings=new.settings.model_copy(update=fixed), providers=new.providers
        )
        self.pipeline = Pipeline(self.config, self.store, self.clock)
        self.followup = Followup(self.config, self.store, self.clock)
        log.info(
            "configuration reloaded: %d providers, %d routes",
            len(self.config.providers),
            len(self.config.settings.routes),
        )
        return True

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            # Outside the main thread (tests) this is refused: the caller uses stop().
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.add_signal_handler(signum, self.stop)
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGHUP, self.reload)

        def wake_sender() -> None:
            loop.call_soon_threadsafe(self.outbox_changed.set)

        sender_task = asyncio.create_task(self._sender_loop())
        scheduler = self._start_scheduler(wake_sender)
        settings = self.config.settings
        try:
            if settings.intake.source == "smtp":
                await self._serve_smtp(wake_sender)
            else:
                await self._serve_imap(wake_sender)
        finally:
            self.stopping.set()
            self.outbox_changed.set()
            scheduler.shutdown(wait=False)
            await sender_task
            await self.transport.close()
            self.store.close()
            log.info("mailrouter stopped")

    def _start_scheduler(self, wake_sender: Callable[[], None]) -> AsyncIOScheduler:
        """Reminders every `reminder_check_seconds`; digests on the `digest.schedule` cron,
        plus once at start for a run missed while the daemon was down (never twice: each
        digest is recorded per recipient and period)."""
        settings = self.config.settings
        scheduler = AsyncIOScheduler(timezone=self.config.calendar().zone)

        async def remind() -> None:
            try:
                if await asyncio.to_thread(lambda: self.followup.remind()):
                    wake_sender()
            except Exception:
                log.exception("reminder run failed; trying again at the next one")

        async def digests() -> None:
            try:
                run = await asyncio.to_thread(lambda: self.followup.scheduled_digests())
                if run.queued:
                    wake_sender()
            except Exception:
                log.exception("digest run failed; the next start or run catches up")

        scheduler.add_job(
            remind,
            IntervalTrigger(seconds=settings.reminder_check_seconds),
            coalesce=True,
            max_instances=1,
            misfire_grace_time=3600,
        )
        scheduler.add_job(
            digests,
            self.followup.digest_trigger(),
            coalesce=True,
            max_instances=1,
            misfire_grace_time=3600,
        )
        scheduler.add_job(digests)  # now: catch up on a run missed while we were down
        scheduler.start()
        return scheduler

    async def _serve_smtp(self, wake_sender: Callable[[], None]) -> None:
        intake = self.config.settings.intake
        handler = SmtpIntake(self.current_pipeline, intake.address, wake_sender)
        server = await asyncio.get_running_loop().create_server(
            lambda: SMTP(
                handler,
                hostname=intake.domain,
                # Larger mail is still taken and quarantined with a reason, not bounced blind.
                data_size_limit=intake.max_message_bytes * 2,
                enable_SMTPUTF8=True,
            ),
            intake.listen.host,
            intake.listen.port,
        )
        log.info(
            "mailrouter listening on %s:%s for <%s>; outbound: %s",
            intake.listen.host,
            intake.listen.port,
            intake.address,
            self._outbound_description(),
        )
        self.ready.set()
        try:
            await self.stopping.wait()
        finally:
            server.close()
            await server.wait_closed()

    async def _serve_imap(self, wake_sender: Callable[[], None]) -> None:
        settings = self.config.settings.intake.imap
        stop_thread = threading.Event()
        poller = ImapIntake(settings, self.current_pipeline, wake_sender, stop_thread)
        log.info(
            "mailrouter polling %s; outbound: %s", poller.mailbox, self._outbound_description()
        )
        worker = asyncio.create_task(asyncio.to_thread(poller.run_forever))
        self.ready.set()
        try:
            await self.stopping.wait()
        finally:
            stop_thread.set()
            await worker  # finishes the message in hand

    def _outbound_description(self) -> str:
        outbound = self.config.settings.outbound
        if outbound.transport == "smtp":
            return (
                f"SMTP relay {outbound.smtp.host}:{outbound.smtp.port} ({outbound.smtp.security})"
            )
        return f"files in {self.config.outbox_dir}"

    async def _sender_loop(self) -> None:
        while True:
            try:
                await self.sender.deliver_due(should_stop=self.stopping.is_set)
            except Exception:
                log.exception("outbox sender error; retrying shortly")
            if self.stopping.is_set():
                return
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.outbox_changed.wait(), await self._idle_seconds())
            self.outbox_changed.clear()

    async def _idle_seconds(self) -> float:
        try:
            upcoming = await asyncio.to_thread(self.sender.next_wakeup)
        except Exception:
            return SENDER_IDLE_SECONDS
        if upcoming is None:
            return SENDER_IDLE_SECONDS
        seconds = (upcoming - self.clock()).total_seconds()
        return min(SENDER_IDLE_SECONDS, max(0.05, seconds))


def run_daemon(config: Config) -> None:
    return_large_buffers_to_the_system()
    asyncio.run(Daemon(config).run())


def return_large_buffers_to_the_system() -> None:
    """Have glibc give every buffer over 256 KB its own mapping, returned when freed. By
    default it raises that threshold after the first large free, so the copies a 10 MB
    attachment passes through stay in the heap as fragments: the daemon grew by hundreds
    of MB over a few such mails instead of going back to its size."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt(_M_MMAP_THRESHOLD, 256 * 1024)
    except (OSError, AttributeError):  # not glibc: nothing to tune
        log.debug("mallopt unavailable; large buffers are left to the allocator's defaults")


_M_MMAP_THRESHOLD = -3  # from glibc's <malloc.h>
