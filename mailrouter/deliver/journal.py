"""The sent journal: which outbox rows the relay has accepted but the database may not yet
record as sent, and who owns a claim. A kill between the relay's 250 and the database
write does not repeat the mail: whoever releases the dead sender's claims reads this.
"""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from pathlib import Path


def process_identity() -> str:
    """`host:pid:start` of this process; `start` tells a live process from a reused pid."""
    return f"{socket.gethostname()}:{os.getpid()}:{_start_ticks(os.getpid())}"


def _start_ticks(pid: int) -> str:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "?"
    # Field 22 (starttime), counted after the parenthesised command name.
    return stat.rsplit(")", 1)[1].split()[19]


class SentJournal:
    """The rows a sender has had accepted by the relay but may not have recorded as sent
    yet: a line per mail, written the moment the relay answers 250 (in the kernel's hands
    from then on, so a killed process keeps it) and synced to disk before the database
    write, which can wait its turn behind the intake's transaction. Emptied when those
    writes are committed; removed when the sender closes. If the sender dies, whoever
    releases its claims reads its journal first and records the rows listed there as sent
    instead of sending them again: a kill repeats a mail only in the instant between the
    250 and the line (microseconds for a sender in a process of its own; up to a few
    milliseconds in one process, while the intake's thread holds the interpreter before
    the sender's turn). One file per sender, named after its process
    (`<pid>-<start>-<n>.ids`) in `<database>-sent/` beside an SQLite file."""

    def __init__(self, folder: Path | None, identity: str) -> None:
        self.folder = folder
        _, pid, start = claimant(identity)
        self.path = folder / f"{pid}-{start}-{id(self):x}.ids" if folder else None
        self._fd: int | None = None
        self._opening = threading.Lock()

    def record(self, row_id: int) -> None:
        if self.path is None:
            return
        with self._opening:
            if self._fd is None:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        os.write(self._fd, f"{row_id}\n".encode())  # one short O_APPEND write: whole or not

    def sync(self) -> None:
        """On disk, not only in the kernel: for a power cut, not only a kill."""
        if self._fd is not None:
            os.fsync(self._fd)

    def clear(self) -> None:
        """Every recorded row's "sent" is committed: forget them."""
        if self._fd is not None:
            os.ftruncate(self._fd, 0)

    def close(self, *, remove: bool = True) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self.path is not None and remove:
            self.path.unlink(missing_ok=True)

    def files_of(self, owner: str, here: str) -> list[Path]:
        """The journals of the process that made claim `owner` (`host:pid:start:batch`), if
        it ran on this host (`here`): another host's journal is on that host."""
        host, pid, start = claimant(owner)
        if host != here or self.folder is None or not self.folder.is_dir() or not pid.isdigit():
            return []
        return sorted(self.folder.glob(f"{pid}-{start}-*.ids"))

    def dead_files(self) -> list[Path]:
        """Journals left by processes of this host that no longer run."""
        if self.folder is None or not self.folder.is_dir():
            return []
        dead = []
        for path in self.folder.glob("*.ids"):
            pid, _, rest = path.stem.partition("-")
            start = rest.rsplit("-", 1)[0]
            if pid.isdigit() and _start_ticks(int(pid)) != start:
                dead.append(path)
        return dead


def listed(paths: list[Path]) -> set[int]:
    ids: set[int] = set()
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            ids.update(int(line) for line in path.read_text().split() if line.isdigit())
    return ids


def claimant(claimed_by: str) -> tuple[str, str, str]:
    """(host, pid, start) of the process that made a claim (`host:pid:start[:batch]`)."""
    host, _, rest = claimed_by.partition(":")
    pid, _, start = rest.partition(":")
    return host, pid, start.split(":", 1)[0]


def claim_is_dead(claimed_by: str, here: str) -> bool:
    """Whether a claim was made by a process on this host that no longer runs."""
    host, pid, start = claimant(claimed_by)
    if host != here or not pid.isdigit():
        return False  # another machine's claim: only its lease can expire it
    return _start_ticks(int(pid)) != start
