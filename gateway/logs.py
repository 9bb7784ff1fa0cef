"""Process logging for `gateway serve`: text (the default) or one JSON object a line
(`server.log_format: json`), for the gateway's loggers and uvicorn's alike, in every worker.

A JSON line has `time` (RFC 3339, UTC), `level`, `logger`, `message`, `pid`, and `exception`
when there is one; fields a call passes in `extra` are kept when they are plain values. What
the gateway logs never holds a key (tests/gateway/test_logs.py scans for them).
"""

from __future__ import annotations

import datetime
import logging
import os
from typing import Any

import orjson

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
# attributes every LogRecord has: not repeated as extra fields
_STANDARD = frozenset(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {
    "message", "asctime", "color_message", "taskName"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC)
            .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
            "pid": os.getpid(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and isinstance(value, str | int | float | bool):
                out[key] = value
        if record.exc_info:
            out["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(out).decode()


def log_config(fmt: str, level: str = "INFO") -> dict[str, Any]:
    """A logging.config.dictConfig for uvicorn's `log_config` (so workers get it too): the
    root logger and uvicorn's loggers on stderr, in `fmt` (text | json)."""
    formatter: dict[str, Any] = ({"()": "gateway.logs.JsonFormatter"} if fmt == "json"
                                 else {"format": TEXT_FORMAT})
    return {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"gateway": formatter},
        "handlers": {"stderr": {"class": "logging.StreamHandler", "formatter": "gateway",
                                "stream": "ext://sys.stderr"}},
        "root": {"handlers": ["stderr"], "level": level},
        "loggers": {name: {"handlers": [], "level": level, "propagate": True}
                    for name in ("uvicorn", "uvicorn.error", "uvicorn.access")},
    }
