"""The server's log lines: text for people, or one JSON object per line for log collectors.

``--log-format json`` writes each record as one object: ``ts`` (UTC, ISO 8601), ``level``,
``logger``, ``message``, ``process`` and, for lines logged while a Recommend call is being
served, ``request_id`` and the serving ``versions`` (model per name, index, config), plus
``exception`` with the traceback when there is one. The call's context is a
:class:`~contextvars.ContextVar` the servicer sets per call, so it follows the call's task and
nothing else.
"""

from __future__ import annotations

import logging
import sys
from contextvars import ContextVar
from datetime import UTC, datetime

import orjson

from recsys.types import ServingVersions

LOG_FORMATS = ("text", "json")
TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"

CALL: ContextVar[tuple[str, ServingVersions] | None] = ContextVar("recsys_call", default=None)
"""(request id, serving versions) of the Recommend call being served by this task, if any."""


def versions_dict(versions: ServingVersions) -> dict[str, object]:
    return {
        "models": versions.model_versions,
        "index": versions.index_version,
        "config": versions.config_version,
    }


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "process": record.process,
        }
        call = CALL.get()
        if call is not None:
            entry["request_id"] = call[0]
            entry["versions"] = versions_dict(call[1])
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return orjson.dumps(entry, default=str).decode()


def configure_logging(log_format: str = "text", level: int = logging.INFO) -> None:
    """Send the root logger's records to stderr in ``log_format`` (one of :data:`LOG_FORMATS`).

    As :func:`logging.basicConfig`: a root logger that already has handlers (a host program's,
    pytest's) is left as it is.
    """
    if log_format not in LOG_FORMATS:
        raise ValueError(f"log format {log_format!r}; expected one of {', '.join(LOG_FORMATS)}")
    root = logging.getLogger()
    if root.handlers:
        return
    handler = logging.StreamHandler(sys.stderr)
    formatter = JsonFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    handler.setFormatter(formatter)
    root.addHandler(handler)
    root.setLevel(level)
