"""Daemon: runs the intake, the outbox sender and the scheduler until told to stop.

Owns the asyncio loop, the wiring of config -> store -> pipeline -> sender,
reload on SIGHUP (a broken configuration is refused and the last good one
kept), and shutdown: on SIGTERM/SIGINT the intake stops taking new mail, the message
in hand and the outbox row in flight are finished, and the process exits 0.
The IMAP poller, which blocks, runs in its own thread.

With `outbound.sender_process` the sender runs in a child process instead
(`mailrouter run --sender-only`), which the daemon starts, wakes through the
child's standard input (a line per new batch of outbox rows), restarts if it
dies, and stops by closing that input: a child whose daemon is gone, killed
included, sees the end of its input and stops too.

With `http.listen`, /healthz, /readyz and /metrics are served on the loop (`httpd`); the
counts behind /metrics are moved here, around the pipeline and the sender (`metrics`).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.interval import IntervalTrigger

from mailrouter import __version__
from mailrouter.config import Config, ConfigError
from mailrouter.deliver.sender import Sender
from mailrouter.deliver.transports import make_transport, outbound_lanes
from mailrouter.deliver.webhooks import WebhookTransport
from mailrouter.httpd import HttpServer, health_routes
from mailrouter.intake.imap import ImapIntake
from mailrouter.metrics import Metrics
from mailrouter.model import FailedMail, ImapSource, IntakeHooks, Result, TemporaryFailure
from mailrouter.service import Followup, Pipeline, load_checked
from mailrouter.store.db import Conflict, Store

log = logging.getLogger(__name__)

SENDER_IDLE_SECONDS = 5.0
# The longest wait between tries while the database is out of reach.
DATABASE_RETRY_MAX_SECONDS = 30.0
SENDER_PROCESS_STOP_SECONDS = 60.0  # a row in flight to a slow relay, finished before exit
SENDER_PROCESS_MAX_RESTART_SECONDS = 60.0


def utc_now() -> datetime:
    return datetime.now(UTC)


class Daemon:
    def __init__(
        self, config: Config, clock: Callable[[], datetime] = utc_now, *, sender_only: bool = False
    ) -> None:
        """`sender_only`: this process is the sender process of a daemon (see the module)."""
        self.config = config
        self.sender_only = sender_only
        self.sender_process: asyncio.subprocess.Process | None = None
        self.clock = clock
        self.store = Store(config.database_url, state_dir=config.state_dir)
        # Replaced whole on reload; intakes fetch it per mail, so each mail sees one config.
        self.pipeline = Pipeline(config, self.store, clock)
        self.transport = make_transport(config)
        self.metrics = Metrics(
            self.store,
            clock,
            source=config.settings.intake.source,
            providers=lambda: self.config.providers.keys(),
            stuck_outbox_seconds=config.settings.http.stuck_outbox_seconds,
        )
        self.sender = Sender(
            self.store,
            self.transport,
            config.settings.outbound.retry,
            clock,
            on_failed=self._delivery_failed,
            lanes=outbound_lanes(config),
            on_try=self.metrics.sent,
            posts=WebhookTransport(lambda: self.config.settings.notify),
        )
        self.followup = Followup(config, self.store, clock)
        self.stopping = asyncio.Event()
        self.outbox_changed = asyncio.Event()
        self.ready = threading.Event()  # set once the intake is listening (tests wait on it)
        self.http: HttpServer | None = None
        # The tasks /healthz answers for: none may end before the daemon stops.
        self.loops: dict[str, asyncio.Future[Any]] = {}

    def stop(self) -> None:
        self.stopping.set()

    def _delivery_failed(self, session: Any, failed: FailedMail) -> None:
        self.pipeline.delivery_failed(session, failed)
        self.metrics.sent(failed.kind, "failed")

    def _ingest(self, raw: bytes, source: ImapSource | None, size: int | None) -> Result:
        """The pipeline of the moment's `process`, counted and timed for /metrics."""
        (result,) = self._counted(1, lambda: [self.pipeline.process(raw, source, size)])
        return result

    def _ingest_group(self, mails: list[tuple[bytes, ImapSource]]) -> list[Result]:
        """The pipeline of the moment's `process_group`, each mail counted, the group's
        time shared among them."""
        return self._counted(len(mails), lambda: self.pipeline.process_group(mails))

    def _counted(self, mails: int, process: Callable[[], list[Result]]) -> list[Result]:
        """The outcomes of `process` on `mails` mails, each counted for /metrics (as not
        received, should it raise: they wait to be read again)."""
        started = time.monotonic()
        try:
            results = process()
        except Exception:
            for _ in range(mails):
                self.metrics.not_received()
            raise
        each = (time.monotonic() - started) / mails
        for result in results:
            self.metrics.received(result, each)
        return results

    def intake_hooks(self) -> IntakeHooks:
        """What the intakes are handed: each call reaches the pipeline of the moment (a
        reload replaces it, so each mail sees one configuration)."""
        return IntakeHooks(
            ingest=self._ingest,
            ingest_group=self._ingest_group,
            known=lambda mailbox, validity, uids: self.pipeline.known_outcomes(
                mailbox, validity, uids
            ),
            max_bytes=self.config.settings.intake.max_message_bytes,
            large_mail=self.store.large_mail,
            claim=lambda mailbox, validity, uids: self.pipeline.claim_uids(mailbox, validity, uids),
            release=lambda mailbox, validity, uids: self.pipeline.release_uids(
                mailbox, validity, uids
            ),
        )

    def reload(self) -> bool:
        """Re-read the configuration; a broken one is refused and the running one kept.

        Routes, providers, templates, fields, SLA and allowed senders apply at once;
        the intake, outbound and database settings in use need a restart to change.
        """
        try:
            new = load_checked(self.config.path)
        except ConfigError as exc:
            log.error("configuration reload refused; still running the last good one:\n%s", exc)
            return False
        running = self.config.settings
        restart = ("intake", "outbound", "database", "http")
        fixed = {name: getattr(running, name) for name in restart}
        changed = [name for name, value in fixed.items() if getattr(new.settings, name) != value]
        if changed:
            log.warning("changes to %s take effect after a restart", ", ".join(changed))
        self.config = Config(
            path=new.path, settings=new.settings.model_copy(update=fixed), providers=new.providers
        )
        self.pipeline = Pipeline(self.config, self.store, self.clock)
        self.followup = Followup(self.config, self.store, self.clock)
        if self.sender_process is not None and self.sender_process.returncode is None:
            self.sender_process.send_signal(signal.SIGHUP)  # its failure notices use templates
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
        if self.sender_only:
            await self._run_sender_only()
            return
        with self.store.one_daemon():
            await self._run()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        in_process = not self.config.settings.outbound.sender_process
        wake = self.outbox_changed.set if in_process else self._wake_sender_process

        def wake_sender() -> None:
            loop.call_soon_threadsafe(wake)

        sender_task = asyncio.create_task(
            self._sender_loop() if in_process else self._keep_sender_process()
        )
        self.loops["sender"] = sender_task
        scheduler = self._start_scheduler(wake_sender)
        settings = self.config.settings
        # PostgreSQL: mail queued by another daemon (or the CLI) wakes this one's sender.
        stop_listening = threading.Event()
        listener = threading.Thread(
            target=self.store.listen, args=(stop_listening, wake_sender), name="outbox-listen"
        )
        if self.store.postgresql:
            listener.start()
        try:
            await self._start_http()
            if settings.intake.source in ("smtp", "lmtp"):
                await self._serve_smtp(wake_sender)
            else:
                await self._serve_imap(wake_sender)
        finally:
            if self.http is not None:
                await self.http.close()
            self.stopping.set()
            self.outbox_changed.set()
            scheduler.shutdown(wait=False)
            stop_listening.set()
            if listener.is_alive():
                await asyncio.to_thread(listener.join)
            await sender_task
            self.sender.close()
            await self.transport.close()
            if self.sender.posts is not None:
                await self.sender.posts.close()
            self.store.close()
            log.info("mailrouter stopped")

    def _start_scheduler(self, wake_sender: Callable[[], None]) -> AsyncIOScheduler:
        """Reminders every `reminder_check_seconds`; digests on the `digest.schedule` cron,
        plus once at start for a run missed while the daemon was down (never twice: each
        digest is recorded per recipient and period); the address log's old rows hourly."""
        settings = self.config.settings
        # Each run asks for `self.followup` anew: a reload (SIGHUP) replaces it.
        scheduler = AsyncIOScheduler(timezone=self.config.calendar().zone)

        async def remind() -> None:
            queued = await _scheduled(
                "reminder run", "trying again at the next one", lambda: self.followup.remind()
            )
            if queued:
                wake_sender()

        async def digests() -> None:
            run = await _scheduled(
                "digest run",
                "the next start or run catches up",
                lambda: self.followup.scheduled_digests(),
            )
            if run is not None and run.queued:
                wake_sender()

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

        async def forget() -> None:
            await _scheduled(
                "address log clean-up",
                "trying again in an hour",
                lambda: self.followup.forget_old_addresses(),
            )

        scheduler.add_job(forget, IntervalTrigger(hours=1), coalesce=True, max_instances=1)
        scheduler.add_job(forget)  # now too: a daemon restarted more often than hourly
        scheduler.start()
        return scheduler

    async def _serve_smtp(self, wake_sender: Callable[[], None]) -> None:
        intake = self.config.settings.intake
        # Here, not at the top: aiosmtpd weighs several MB that an IMAP daemon never uses.
        from mailrouter.intake.smtp import start_smtp_server

        server = await start_smtp_server(intake, self.intake_hooks(), wake_sender)
        where = intake.listen.socket or f"{intake.listen.host}:{intake.listen.port}"
        log.info(
            "mailrouter listening on %s (%s) for <%s>; outbound: %s",
            where,
            intake.source.upper(),
            intake.address,
            self._outbound_description(),
        )
        self.metrics.intake_state(True)
        self.ready.set()
        try:
            await self.stopping.wait()
        finally:
            self.metrics.intake_state(False)
            server.close()
            await server.wait_closed()

    async def _serve_imap(self, wake_sender: Callable[[], None]) -> None:
        settings = self.config.settings.intake.imap
        stop_thread = threading.Event()
        poller = ImapIntake(
            settings,
            self.intake_hooks(),
            wake_sender,
            stop_thread,
            on_state=self.metrics.intake_state,
        )
        log.info(
            "mailrouter polling %s; outbound: %s", poller.mailbox, self._outbound_description()
        )
        worker = asyncio.create_task(asyncio.to_thread(poller.run_forever))
        self.loops["imap intake"] = worker
        self.ready.set()
        try:
            await self.stopping.wait()
        finally:
            stop_thread.set()
            await worker  # finishes the message in hand

    async def _start_http(self) -> None:
        """/healthz, /readyz and /metrics on `http.listen`, if it is set."""
        address = self.config.settings.http.address
        if address is None:
            return
        routes = health_routes(
            version=__version__,
            dead_loops=lambda: [name for name, task in self.loops.items() if task.done()],
            checks=lambda: self.metrics.readiness().checks,
            registry=self.metrics.registry,
        )
        self.http = HttpServer(*address, routes)
        await self.http.start()
        log.info(
            "health and metrics on http://%s/ (healthz, readyz, metrics)",
            self.config.settings.http.listen,
        )

    def _outbound_description(self) -> str:
        outbound = self.config.settings.outbound
        if outbound.transport == "smtp":
            return (
                f"SMTP relay {outbound.smtp.host}:{outbound.smtp.port} ({outbound.smtp.security})"
            )
        return f"files in {self.config.outbox_dir}"

    async def _sender_loop(self) -> None:
        outage = 0.0  # seconds to wait before the next try while the database is away
        while True:
            try:
                await self.sender.deliver_due(should_stop=self.stopping.is_set)
                if outage:
                    log.info("outbox sender: the database is back")
                outage = 0.0
            except TemporaryFailure as exc:
                if not outage:
                    log.warning("outbox sender: %s; the outbox waits, retrying with backoff", exc)
                outage = min(max(outage * 2, 0.5), DATABASE_RETRY_MAX_SECONDS)
            except Exception:
                log.exception("outbox sender error; retrying shortly")
            if self.stopping.is_set():
                return
            if self.outbox_changed.is_set() and not outage:
                self.outbox_changed.clear()  # queued while we sent: no need to ask when
                continue
            wait = outage or await self._idle_seconds()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.outbox_changed.wait(), wait)
            self.outbox_changed.clear()

    async def _run_sender_only(self) -> None:
        """The sender process: send until the daemon closes our standard input."""
        loop = asyncio.get_running_loop()
        wakes = sys.stdin.fileno()
        os.set_blocking(wakes, False)
        # Ctrl-C reaches the whole process group; the daemon decides when we stop.
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGINT, lambda: None)

        def woken() -> None:
            try:
                if not os.read(wakes, 4096):
                    loop.remove_reader(wakes)  # the end of input stays readable
                    self.stop()  # the daemon stopped, or died
            except BlockingIOError:
                return
            self.outbox_changed.set()

        loop.add_reader(wakes, woken)
        log.info("mailrouter sender process; outbound: %s", self._outbound_description())
        try:
            await self._sender_loop()
        finally:
            loop.remove_reader(wakes)
            self.sender.close()
            await self.transport.close()
            if self.sender.posts is not None:
                await self.sender.posts.close()
            self.store.close()

    def _sender_command(self) -> list[str]:
        level = logging.getLevelName(logging.getLogger().getEffectiveLevel())
        config = str(self.config.path)
        return [sys.executable, "-m", "mailrouter", "--config", config, "--log-level", level]

    async def _keep_sender_process(self) -> None:
        """Run the sender process until we stop; start it again, after a growing pause, if
        it dies. Rows it had claimed are released by the next one (their owner is dead)."""
        loop = asyncio.get_running_loop()
        pause = 1.0
        while True:
            started = loop.time()
            try:
                child = await asyncio.create_subprocess_exec(
                    *self._sender_command(), "run", "--sender-only", stdin=asyncio.subprocess.PIPE
                )
            except OSError as exc:
                log.error(
                    "cannot start the sender process (%s); trying again in %.0f s", exc, pause
                )
            else:
                self.sender_process = child
                self._wake_sender_process()  # whatever is due already
                exited = asyncio.create_task(child.wait())
                stopping = asyncio.create_task(self.stopping.wait())
                await asyncio.wait({exited, stopping}, return_when=asyncio.FIRST_COMPLETED)
                stopping.cancel()
                if self.stopping.is_set():
                    await self._stop_sender_process(child, exited)
                    return
                if loop.time() - started > SENDER_PROCESS_MAX_RESTART_SECONDS:
                    pause = 1.0  # it had been running well: not a crash loop
                log.error(
                    "the sender process exited with status %s; starting it again in %.0f s",
                    child.returncode,
                    pause,
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.stopping.wait(), pause)
            if self.stopping.is_set():
                return
            pause = min(pause * 2, SENDER_PROCESS_MAX_RESTART_SECONDS)

    async def _stop_sender_process(
        self, child: asyncio.subprocess.Process, exited: asyncio.Task[int]
    ) -> None:
        if child.stdin is not None:
            child.stdin.close()  # its cue to finish the row in flight and exit
        try:
            await asyncio.wait_for(asyncio.shield(exited), SENDER_PROCESS_STOP_SECONDS)
        except TimeoutError:
            log.error("the sender process did not stop in time; killing it")
            child.kill()
            await exited

    def _wake_sender_process(self) -> None:
        child = self.sender_process
        if child is None or child.stdin is None or child.stdin.is_closing():
            return
        if child.stdin.transport.get_write_buffer_size() == 0:  # a wake on its way is enough
            child.stdin.write(b"\n")

    async def _idle_seconds(self) -> float:
        try:
            upcoming = await asyncio.to_thread(self.sender.next_wakeup)
        except Exception:
            return SENDER_IDLE_SECONDS
        if upcoming is None:
            return SENDER_IDLE_SECONDS
        seconds = (upcoming - self.clock()).total_seconds()
        return min(SENDER_IDLE_SECONDS, max(0.05, seconds))


_Done = TypeVar("_Done")


async def _scheduled(job: str, next_time: str, work: Callable[[], _Done]) -> _Done | None:
    """A scheduler job's `work`, run in a thread: a failure is one line in the log, and the
    job's next run tries again (None then)."""
    try:
        return await asyncio.to_thread(work)
    except (TemporaryFailure, Conflict) as exc:
        log.warning("%s: %s; %s", job, exc, next_time)
    except asyncio.CancelledError:
        pass  # the daemon is stopping: the run commits or not, whole, in its thread
    except Exception:
        log.exception("%s failed; %s", job, next_time)
    return None


def run_daemon(config: Config, *, sender_only: bool = False) -> None:
    return_large_buffers_to_the_system()
    asyncio.run(daemon_once_the_database_answers(config, sender_only).run())


def daemon_once_the_database_answers(
    config: Config, sender_only: bool = False, sleep: Callable[[float], None] = time.sleep
) -> Daemon:
    """The daemon, made as soon as its database answers: one started while the database is
    down or restarting (a host booting, a fail-over) waits for it with backoff, a line each
    time, instead of exiting. (A SIGTERM meanwhile stops it: `cli.cmd_run`.)"""
    wait = 0.5
    while True:
        try:
            return Daemon(config, sender_only=sender_only)
        except TemporaryFailure as exc:
            log.warning("mailrouter cannot start yet: %s; trying again in %.1f s", exc, wait)
            sleep(wait)
            wait = min(wait * 2, DATABASE_RETRY_MAX_SECONDS)


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
