"""mailrouter: an email escalation router.

The mail's journey, one module per step: intake -> pipeline (parse -> route ->
render) -> store (the outbox) -> deliver. config feeds them all; cli and
daemon wire them up.
"""

from __future__ import annotations

__version__ = "0.1.0"
