"""Logging: JSON lines in a container, readable text on a terminal."""

import atexit
import json
import logging
import logging.handlers
import queue
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, TextIO

import orjson

from app.observability import REQUEST_ID
from schemas.delivery import DeliveryResult, domain_of

if TYPE_CHECKING:  # the core imports nothing of ours at run time, and we nothing of it
    from app.delivery import Delivery

LogFormat = Literal["auto", "json", "text"]
#: Attributes every LogRecord has; anything else was passed in `extra` and is a field.
_STANDARD = set(logging.makeLogRecord({}).__dict__) | {"message", "asctime", "color_message"}


class Event(NamedTuple):
    """One structured log line, queued without a LogRecord (see `event`)."""

    created: float
    levelno: int
    name: str
    message: str
    fields: dict[str, Any]


class _LineFormatter(logging.Formatter):
    """Formats LogRecords and Events alike, through `line`."""

    def format(self, record: logging.LogRecord) -> str:
        fields = {k: v for k, v in record.__dict__.items() if k not in _STANDARD}
        exception = self.formatException(record.exc_info) if record.exc_info else None
        return self.line(record.created, record.levelno, record.name, record.getMessage(), fields, exception)

    def format_event(self, event: Event) -> str:
        return self.line(event.created, event.levelno, event.name, event.message, event.fields, None)

    def line(
        self, created: float, levelno: int, name: str, message: str, fields: dict[str, Any], exception: str | None
    ) -> str:
        raise NotImplementedError


class JsonFormatter(_LineFormatter):
    def __init__(self) -> None:
        super().__init__()
        self._second = -1
        self._stamp = ""

    def line(
        self, created: float, levelno: int, name: str, message: str, fields: dict[str, Any], exception: str | None
    ) -> str:
        second = int(created)
        if second != self._second:  # strftime once a second, not once a line
            self._second, self._stamp = second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        entry: dict[str, Any] = {
            "ts": f"{self._stamp}.{int(created * 1000) % 1000:03d}Z",
            "level": _LEVELS.get(levelno) or logging.getLevelName(levelno).lower(),
            "logger": name,
            "event": fields.get("event") or "log",
            "message": message,
        }
        for key, value in fields.items():
            if key not in entry:
                entry[key] = value
        if exception:
            entry["exception"] = exception
        try:  # orjson: a fifth of json.dumps's time, and this runs once per delivery
            return orjson.dumps(entry, default=str, option=orjson.OPT_NON_STR_KEYS).decode()
        except TypeError:  # a lone surrogate (undecodable bytes from a server) and the like
            return json.dumps(entry, default=str, ensure_ascii=False)


_LEVELS = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warning", logging.ERROR: "error"}


class TextFormatter(_LineFormatter):
    def line(
        self, created: float, levelno: int, name: str, message: str, fields: dict[str, Any], exception: str | None
    ) -> str:
        stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(created)) + f",{int(created * 1000) % 1000:03d}"
        extra = "".join(f" {k}={v}" for k, v in fields.items() if k != "event")
        text = f"{stamp} {logging.getLevelName(levelno):<7} {name}: {message}{extra}"
        return f"{text}\n{exception}" if exception else text


def event(logger: logging.Logger, message: str, fields: dict[str, Any], level: int = logging.INFO) -> None:
    """`logger.log(level, message, extra=fields)`, the same line, for events logged per request.

    When the service's own writer takes the logger's lines, the line is queued
    for it directly: the logging machinery's per-call work (a LogRecord,
    handler locks, filters) was about a tenth of a blackhole delivery (bench/).
    """
    if not logger.isEnabledFor(level):
        return
    writer = _writer
    if writer is None or not _only_writer_takes(logger, writer.handler):
        logger.log(level, message, extra=fields)
        return
    if "request_id" not in fields and (request_id := _request_id()):
        fields["request_id"] = request_id
    writer.records.put(Event(time.time(), level, logger.name, message, fields))


class DeliveryLog:
    """The delivery core's observer that writes one line per delivery: who, which relay, how many,
    what came back; never addresses or content."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.logger = logger or logging.getLogger("mailrelay.delivery")

    def started(self, delivery: "Delivery") -> None:
        pass

    def ended(self, delivery: "Delivery") -> None:
        pass

    def finished(self, delivery: "Delivery", result: DeliveryResult, seconds: float) -> None:
        sender = delivery.envelope.sender
        outcome = result.status
        event(
            self.logger,
            f"delivery via {result.relay}: {outcome}",
            {
                "event": "delivery",
                "relay": result.relay,
                "key": delivery.caller,
                "sender_domain": domain_of(sender) if sender else "",
                "recipients": len(result.recipients),
                "codes": [r.reply.code for r in result.recipients],
                "outcome": outcome,
                "elapsed_ms": result.elapsed_ms,
                "possibly_delivered": sum(r.possibly_delivered for r in result.recipients),
            },
        )

    def refused(self, relay_name: str, reason: str) -> None:
        pass


def _request_id() -> str | None:
    """The current request's id; it lives in a contextvar, so it is read on the loop's side."""
    request_id = REQUEST_ID.get()
    return None if request_id == "-" else request_id


def _only_writer_takes(logger: logging.Logger, handler: logging.Handler) -> bool:
    """True when the line would reach nothing but `handler` on the root logger, unfiltered."""
    current: logging.Logger | None = logger
    while current is not None and current is not logging.root:
        if current.handlers or current.filters or not current.propagate:
            return False
        current = current.parent
    root = logging.root
    return len(root.handlers) == 1 and root.handlers[0] is handler and not root.filters and not handler.filters


class _ContextQueueHandler(logging.handlers.QueueHandler):
    """Hands records to the writer thread: the event loop never waits on a slow log pipe.
    The request id lives in a contextvar, so it is taken here, on the loop's side."""

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        if not hasattr(record, "request_id") and (request_id := _request_id()):
            record.request_id = request_id
        return record  # formatted by the writer thread, not here


#: The most a log line waits for the writer thread under load.
FLUSH_INTERVAL = 0.02


class _Writer:
    """Formats and writes queued records on its own thread, in batches.

    A thread woken for every record, writing every line with its own system
    call (the GIL is let go during each), costs the event loop a hand-off per
    line: about a third of a blackhole delivery's throughput (bench/). So a
    batch is written with one call, and the thread then sleeps
    FLUSH_INTERVAL seconds: under load a line waits at most that long.
    """

    _STOP = logging.makeLogRecord({"msg": "stop"})

    def __init__(self, formatter: _LineFormatter, stream: TextIO) -> None:
        self.records: queue.SimpleQueue[logging.LogRecord | Event] = queue.SimpleQueue()
        self.handler = _ContextQueueHandler(self.records)
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

    def _line(self, record: logging.LogRecord | Event) -> str:
        try:
            if isinstance(record, Event):
                return self.formatter.format_event(record) + "\n"
            return self.formatter.format(record) + "\n"
        except Exception as exc:  # a record that cannot be formatted must not stop the writer
            return f"log record from {record.name} could not be formatted: {exc!r}\n"

    def stop(self) -> None:
        """Write what is queued, then end the thread."""
        if self.thread.is_alive():
            self.records.put(self._STOP)
            self.thread.join(timeout=5)


_writer: _Writer | None = None


def chosen_format(log_format: LogFormat, stream: TextIO | None = None) -> Literal["json", "text"]:
    """The format of lines to `stream` (standard error): "auto" is text on a terminal, else JSON."""
    if log_format == "auto":
        return "text" if (stream or sys.stderr).isatty() else "json"
    return log_format


def setup_logging(level: str, log_format: LogFormat, stream: TextIO | None = None) -> None:
    """The service's logging: every line to `stream` (standard error) from one writer thread."""
    global _writer
    stream = stream or sys.stderr
    chosen = chosen_format(log_format, stream)
    # Record fields no formatter here prints; computing them costs every log call a stack walk
    # (findCaller) and several lookups (logging's "Optimization" section). `_srcfile` is private,
    # with no public equivalent: tests/canaries/test_stdlib.py fails if setting it stops working.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    formatter = JsonFormatter() if chosen == "json" else TextFormatter()
    if _writer is not None:
        _writer.stop()
    _writer = _Writer(formatter, stream)
    atexit.register(_writer.stop)  # writes what is queued when the process ends
    root = logging.getLogger()
    root.handlers[:] = [_writer.handler]
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
