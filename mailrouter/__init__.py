"""mailrouter: an email escalation router.

The mail's journey, one module per step: intake -> pipeline (parse -> route ->
render) -> store (the outbox) -> deliver. config feeds them all; cli and
daemon wire them up.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:  # pyproject.toml's version, as installed (`mailrouter --version`)
    __version__ = version("mailrouter")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"
