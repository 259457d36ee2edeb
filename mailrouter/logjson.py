"""Log lines as JSON objects, one a line, for a log store (`logging.format: json`).

Each line has `time` (ISO 8601, UTC), `level`, `logger` and `message`, and where they
apply `case` (the first case tag in the message), `message_id` and `provider` (given by
the code that logs, as `extra`), and `error` (an exception's type and message, never its
traceback: a mail's trouble is one line).
"""

from __future__ import annotations

import json
import logging
import re
from datetime import UTC, datetime

_EXTRA_FIELDS = ("message_id", "provider", "outcome", "sender")


class JsonFormatter(logging.Formatter):
    def __init__(self, case_prefix: str = "ESC") -> None:
        super().__init__()
        self.case_tag = re.compile(rf"\b{re.escape(case_prefix)}-\d{{6,12}}\b")

    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        line: dict[str, object] = {
            "time": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": message,
        }
        case = getattr(record, "case", None) or _first(self.case_tag.findall(message))
        if case:
            line["case"] = case
        for name in _EXTRA_FIELDS:
            value = getattr(record, name, None)
            if value is not None:
                line[name] = value
        if record.exc_info and record.exc_info[1] is not None:
            error = record.exc_info[1]
            line["error"] = f"{type(error).__name__}: {error}"
        return json.dumps(line, ensure_ascii=False, default=str)


def _first(found: list[str]) -> str | None:
    return found[0] if found else None


def use_json(case_prefix: str) -> None:
    """Every handler of the root logger writes JSON from now on."""
    for handler in logging.getLogger().handlers:
        handler.setFormatter(JsonFormatter(case_prefix))
