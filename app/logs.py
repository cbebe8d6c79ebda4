"""Logging: JSON lines in a container, readable text on a terminal."""

import atexit
import json
import logging
import logging.handlers
import queue
import sys
import time
from typing import Any, Literal

from app.observability import REQUEST_ID

LogFormat = Literal["auto", "json", "text"]
#: Attributes every LogRecord has; anything else was passed in `extra` and is a field.
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "color_message"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": getattr(record, "event", None) or "log",
            "message": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD and key not in entry:
                entry[key] = value
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str, ensure_ascii=False)


class TextFormatter(logging.Formatter):
    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s%(fields)s")

    def format(self, record: logging.LogRecord) -> str:
        extra = {k: v for k, v in record.__dict__.items() if k not in _STANDARD and k not in ("event", "fields")}
        record.fields = "".join(f" {k}={v}" for k, v in extra.items())
        return super().format(record)


class _ContextQueueHandler(logging.handlers.QueueHandler):
    """Hands records to the writer thread: the event loop never waits on a slow log pipe.
    The request id lives in a contextvar, so it is taken here, on the loop's side."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        if not hasattr(record, "request_id"):
            request_id = REQUEST_ID.get()
            if request_id != "-":
                record.request_id = request_id
        return record  # formatted by the writer thread, not here


_listener: logging.handlers.QueueListener | None = None


def setup_logging(level: str, log_format: LogFormat) -> None:
    global _listener
    chosen = log_format
    if chosen == "auto":
        chosen = "text" if sys.stderr.isatty() else "json"
    writer = logging.StreamHandler(sys.stderr)
    writer.setFormatter(JsonFormatter() if chosen == "json" else TextFormatter())
    if _listener is not None:
        _listener.stop()
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    _listener = logging.handlers.QueueListener(records, writer)
    _listener.start()
    atexit.register(_listener.stop)  # flushes what is queued when the process ends
    root = logging.getLogger()
    root.handlers[:] = [_ContextQueueHandler(records)]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
