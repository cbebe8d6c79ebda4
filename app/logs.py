"""Logging: JSON lines in a container, readable text on a terminal."""

import atexit
import json
import logging
import logging.handlers
import queue
import sys
import threading
import time
from typing import Any, Literal, TextIO

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


#: The most a log line waits for the writer thread under load.
FLUSH_INTERVAL = 0.05


class _Writer:
    """Formats and writes queued records on its own thread, in batches.

    A thread woken for every record, writing every line with its own system
    call (the GIL is let go during each), costs the event loop a hand-off per
    line: about a third of a blackhole delivery's throughput (bench/). So a
    batch is written with one call, and the thread then sleeps
    FLUSH_INTERVAL seconds: under load a line waits at most that long.
    """

    _STOP = logging.makeLogRecord({"msg": "stop"})

    def __init__(
        self, records: "queue.SimpleQueue[logging.LogRecord]", formatter: logging.Formatter, stream: TextIO
    ) -> None:
        self.records = records
        self.formatter = formatter
        self.stream = stream
        self.thread = threading.Thread(target=self._run, name="mailrelay-log-writer", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            batch = [self.records.get()]
            while True:
                try:
                    batch.append(self.records.get_nowait())
                except queue.Empty:
                    break
            lines = [self._line(r) for r in batch if r is not self._STOP]
            try:
                self.stream.write("".join(lines))
                self.stream.flush()
            except (OSError, ValueError):
                pass  # standard error is gone (a closed pipe): nowhere left to say so
            if any(r is self._STOP for r in batch):
                return
            time.sleep(FLUSH_INTERVAL)

    def _line(self, record: logging.LogRecord) -> str:
        try:
            return self.formatter.format(record) + "\n"
        except Exception as exc:  # a record that cannot be formatted must not stop the writer
            return f"log record from {record.name} could not be formatted: {exc!r}\n"

    def stop(self) -> None:
        """Write what is queued, then end the thread."""
        if self.thread.is_alive():
            self.records.put(self._STOP)
            self.thread.join(timeout=5)


_writer: _Writer | None = None


def setup_logging(level: str, log_format: LogFormat) -> None:
    global _writer
    chosen = log_format
    if chosen == "auto":
        chosen = "text" if sys.stderr.isatty() else "json"
    # Record fields no formatter here prints; computing them costs every log call a stack walk
    # (findCaller) and several lookups (logging's "Optimization" section).
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    formatter = JsonFormatter() if chosen == "json" else TextFormatter()
    if _writer is not None:
        _writer.stop()
    records: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
    _writer = _Writer(records, formatter, sys.stderr)
    atexit.register(_writer.stop)  # writes what is queued when the process ends
    root = logging.getLogger()
    root.handlers[:] = [_ContextQueueHandler(records)]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
