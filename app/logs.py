"""Logging: JSON lines in a container, readable text on a terminal."""

import asyncio
import atexit
import collections
import contextlib
import contextvars
import fcntl
import json
import logging
import logging.handlers
import os
import queue
import select
import stat
import sys
import threading
import time
from typing import TYPE_CHECKING, Any, Literal, NamedTuple, TextIO

import orjson

from app.observability import REQUEST_ID
from schemas.delivery import DeliveryResult, DkimSignature, HopSecurity, domain_of

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


def event(
    logger: logging.Logger, message: str, fields: dict[str, Any], level: int = logging.INFO, *, alone: bool = False
) -> None:
    """`logger.log(level, message, extra=fields)`, the same line, for events logged per request.

    When the service's own writer takes the logger's lines, the line is queued
    for it directly: the logging machinery's per-call work (a LogRecord,
    handler locks, filters) was about a tenth of a blackhole delivery (bench/).
    `alone`: no other delivery is running, so none can share its write: it is
    written at once, without waiting for the loop's next iteration.
    """
    if not logger.isEnabledFor(level):
        return
    writer = _writer
    if writer is None or not _only_writer_takes(logger, writer.handler):
        logger.log(level, message, extra=fields)
        return
    if "request_id" not in fields and (request_id := _request_id()):
        fields["request_id"] = request_id
    line = Event(time.time(), level, logger.name, message, fields)
    if not writer.add(line, alone) and writer.room(1):
        writer.records.put(line)


class DeliveryLog:
    """The delivery core's observer that writes one line per delivery: who, which relay, how many,
    what came back; never addresses or content."""

    def __init__(self, logger: logging.Logger | None = None) -> None:
        self.logger = logger or logging.getLogger("mailrelay.delivery")
        self.running = 0  # deliveries between started and ended: those that may share a write

    def started(self, delivery: "Delivery") -> None:
        self.running += 1

    def ended(self, delivery: "Delivery") -> None:
        self.running -= 1

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
                # How each recipient's message travelled: "TLSv1.3+dane", "TLSv1.3" (unauthenticated),
                # "plain"; null where no connection was made (and for relays without one).
                "hops": [_hop(r.security) for r in result.recipients],
                "dkim": _dkim(result.dkim),
            },
            alone=self.running == 0,
        )

    def refused(self, relay_name: str, reason: str) -> None:
        pass


def _hop(security: HopSecurity | None) -> str | None:
    if security is None:
        return None
    if not security.encrypted:
        return "plain"
    tls = security.tls_version or "TLS"
    return tls if security.authenticated == "none" else f"{tls}+{security.authenticated}"


def _dkim(signature: DkimSignature | None) -> str | None:
    """`domain/selector` when signed, `unsigned` when the relay signs but not this message, None
    when the relay does not sign."""
    if signature is None:
        return None
    return f"{signature.domain}/{signature.selector}" if signature.signed else "unsigned"


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

    def __init__(self, writer: "_Writer") -> None:
        super().__init__(writer.records)
        self.writer = writer

    def prepare(self, record: logging.LogRecord) -> logging.LogRecord:
        if not hasattr(record, "request_id") and (request_id := _request_id()):
            record.request_id = request_id
        return record  # formatted by the writer thread, not here

    def enqueue(self, record: logging.LogRecord) -> None:
        if self.writer.room(1):
            super().enqueue(record)


#: Kept for tests/servers/mailrelay.py, which polls a log file at this interval until it stops
#: growing; the writer no longer sleeps between batches (a delivery's answer waits for its line).
FLUSH_INTERVAL = 0.02
#: The most lines waiting for the writer thread (records, and delivery lines the destination did not
#: take at once); past it a line is dropped, counted, and the count written with the next lines.
MAX_QUEUED = 10_000
#: The longest a delivery's answer waits for its line when the log destination (a full pipe, a
#: stopped terminal) takes nothing; the answer then goes out and the line stays queued.
WRITE_WAIT = 5.0

#: The number of this request's delivery line on the loop's side (`written` waits for it).
_LINE: contextvars.ContextVar[int] = contextvars.ContextVar("mailrelay_log_line", default=0)


class _Batch(NamedTuple):
    """Delivery lines the destination did not take at once, for the writer thread."""

    data: bytes | str
    lines: int
    last: int  # the number of its last line


class _Writer:
    """Writes log lines with as few system calls as the lines' durability allows.

    Delivery lines (`event` on the event loop) are group-committed: those made in one
    iteration of the loop are written with one write(2) at the start of the next, on the
    loop, and their answers wait for it (`written`). That write never blocks the loop: to a
    regular file it returns once the kernel has the bytes; to a pipe, a terminal or a
    socket it is made non-blocking (O_NONBLOCK set for that one call and put back), and
    what the destination does not take at once goes to the writer thread, which waits
    for it; the answers then wait too, at most WRITE_WAIT seconds. Other records
    (warnings, errors, from any thread) go through the thread. Handing every delivery
    line to the thread instead cost about 55 us per delivery at concurrency 1
    (bench/inprocess.py), and batching there for 20 ms lost lines of acknowledged
    deliveries to a kill -9.
    """

    _STOP = logging.makeLogRecord({"msg": "stop"})

    def __init__(self, formatter: _LineFormatter, stream: TextIO) -> None:
        self.records: queue.SimpleQueue[logging.LogRecord | Event | _Batch] = queue.SimpleQueue()
        self.handler = _ContextQueueHandler(self)
        self.formatter = formatter
        self.stream = stream
        self.fd = _fileno(stream)
        # None: no descriptor (an in-memory stream) or a regular file: a write that never waits for a reader.
        self.flags: int | None = None
        if self.fd is not None and not stat.S_ISREG(os.fstat(self.fd).st_mode):
            self.flags = fcntl.fcntl(self.fd, fcntl.F_GETFL)
        self.lock = threading.Lock()  # one write at a time: the loop's and the thread's
        self.counting = threading.Lock()  # `queued` and `dropped` change on several threads
        self.queued = self.dropped = 0  # lines handed to the thread and not yet written; lines dropped
        # The loop's side, touched only on `self.loop`'s thread: its lines of this iteration,
        # numbered; how far they are written; the answers waiting (line number, future); the
        # batches with the thread (when their answers stop waiting, their last line).
        self.loop: asyncio.AbstractEventLoop | None = None
        self.pending: list[Event] = []
        # Lines numbered; written through `through`; answers not waiting through `released` (their
        # lines were given up on after WRITE_WAIT, or dropped: then earlier answers stop waiting too).
        self.numbered = self.through = self.released = 0
        self.waiting: list[tuple[int, asyncio.Future[None]]] = []
        self.unwritten: collections.deque[tuple[float, int]] = collections.deque()
        self.timer: asyncio.TimerHandle | None = None
        self.thread = threading.Thread(target=self._run, name="mailrelay-log-writer", daemon=True)
        self.thread.start()

    def room(self, lines: int) -> bool:
        """Counts `lines` as queued if they fit under MAX_QUEUED, else as dropped."""
        with self.counting:
            if self.queued + lines > MAX_QUEUED:
                self.dropped += lines
                return False
            self.queued += lines
            return True

    # -- the event loop's side

    def add(self, event: Event, alone: bool = False) -> bool:
        """Queues a delivery line from the event loop; False when not called on the writer's loop.
        `alone`: no other delivery could share the write, so it is tried at once (at concurrency 1
        the wait for the next iteration cost about a tenth of a blackhole delivery's CPU)."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return False
        if loop is not self.loop:
            if self.loop is not None:
                return False  # another loop (a test client's thread): the thread writes it, unawaited
            self.loop = loop
        self.numbered += 1
        _LINE.set(self.numbered)
        if alone and not self.pending and not self.unwritten:
            self._commit(self._encode([self._line(event)]), 1)
            return True
        if not self.pending:
            loop.call_soon(self._flush)
        self.pending.append(event)
        return True

    def _flush(self) -> None:
        """The lines of the last iteration, in one write; what the destination does not take at once
        goes to the thread, after what it already has (the order of lines is kept)."""
        events, self.pending = self.pending, []
        self._commit(self._encode([self._line(e) for e in events]), len(events))

    def _commit(self, data: bytes | str, lines: int) -> None:
        """Writes the `lines` numbered last, or hands what the destination did not take to the thread."""
        done = 0 if self.unwritten else self._write_now(data)
        if done == len(data):
            self._mark_written(self.numbered)
        elif self.room(lines):
            self.records.put(_Batch(data[done:], lines, self.numbered))
            loop = self.loop
            assert loop is not None  # noqa: S101 - set with the first line
            self.unwritten.append((loop.time() + WRITE_WAIT, self.numbered))
            if self.timer is None:  # one timer for all the batches with the thread
                self.timer = loop.call_at(self.unwritten[0][0], self._give_up)
        else:
            self._release(self.numbered)  # dropped: the answers do not wait for lines never written
            self.released = self.numbered

    def _write_now(self, data: bytes | str) -> int:
        """What of `data` the destination takes without waiting (0 while the thread is writing)."""
        if not self.lock.acquire(blocking=False):
            return 0
        try:
            if self.fd is None or self.flags is None:  # in memory, or a regular file
                return self._write_some(data)
            fcntl.fcntl(self.fd, fcntl.F_SETFL, self.flags | os.O_NONBLOCK)
            try:
                return self._write_some(data)
            except BlockingIOError:
                return 0
            finally:
                fcntl.fcntl(self.fd, fcntl.F_SETFL, self.flags)
        except OSError:
            return len(data)  # the destination is gone (a closed pipe): nowhere left to say so
        finally:
            self.lock.release()

    def _mark_written(self, last: int) -> None:
        if last > self.through:
            self.through = last
            while self.unwritten and self.unwritten[0][1] <= last:
                self.unwritten.popleft()
            self._release(last)

    def _give_up(self) -> None:
        """WRITE_WAIT has passed for the oldest batches with the thread: their answers go out."""
        self.timer = None
        loop = self.loop
        assert loop is not None  # noqa: S101 - set with the first line
        now = loop.time()
        while self.unwritten and self.unwritten[0][0] <= now:
            self.released = max(self.released, self.unwritten.popleft()[1])
            self._release(self.released)
        if self.unwritten:
            self.timer = loop.call_at(self.unwritten[0][0], self._give_up)

    def _release(self, last: int) -> None:
        """Wakes the answers waiting for lines up to `last` (written, or waited for long enough)."""
        still = []
        for number, future in self.waiting:
            if number > last:
                still.append((number, future))
            elif not future.done():  # cancelled when its request was
                future.set_result(None)
        self.waiting = still

    async def written(self, number: int | None = None) -> None:
        if number is None:
            number = _LINE.get()
        if number <= self.through or number <= self.released or self.loop is None:
            return
        if self.pending:
            # Its line waits for the write at the start of the next iteration (`_flush`, already
            # scheduled): one bare yield lets it run, cheaper than a future when it takes the lines.
            await asyncio.sleep(0)
            if number <= self.through or number <= self.released:
                return
        future = self.loop.create_future()
        self.waiting.append((number, future))
        await future

    # -- the writer thread

    def _run(self) -> None:
        while True:
            batch = [self.records.get()]
            while True:
                try:
                    batch.append(self.records.get_nowait())
                except queue.Empty:
                    break
            lines: list[str] = []
            chunks: list[bytes | str] = []
            written = last = 0
            for item in batch:
                if isinstance(item, _Batch):  # after the records before it, in order
                    chunks += [self._encode(lines), item.data]
                    written += len(lines) + item.lines
                    lines, last = [], item.last
                elif item is not self._STOP:
                    lines.append(self._line(item))
            chunks.append(self._encode(lines))
            written += len(lines)
            with self.counting:
                dropped, self.dropped = self.dropped, 0
            if dropped:
                chunks.append(self._encode([f"{dropped} log line(s) dropped: more than {MAX_QUEUED} waited\n"]))
            with self.lock:
                for chunk in chunks:
                    self._write_all(chunk)
            with self.counting:  # counted until written: the bound covers the lines held here too
                self.queued -= written
            if last and self.loop is not None:
                with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits
                    self.loop.call_soon_threadsafe(self._mark_written, last)
            if any(r is self._STOP for r in batch):
                return

    def _write_all(self, data: bytes | str) -> None:
        """Writes all of `data`, waiting for the destination as long as it takes."""
        try:
            while data:
                try:
                    done = self._write_some(data)
                except BlockingIOError:  # another process made the descriptor non-blocking for a moment
                    select.select([], [self.fd or 0], [], 1.0)
                    continue
                data = data[done:]
        except (OSError, ValueError):
            pass  # the destination is gone (a closed pipe): nowhere left to say so

    def _write_some(self, data: bytes | str) -> int:
        """One write(2) of `data` (encoded for a descriptor, text for an in-memory stream)."""
        if isinstance(data, str):
            self.stream.write(data)
            self.stream.flush()
            return len(data)
        return os.write(self.fd, data) if self.fd is not None else len(data)

    def _encode(self, lines: list[str]) -> bytes | str:
        text = "".join(lines)
        return text if self.fd is None else text.encode("utf-8", "backslashreplace")

    def _line(self, record: logging.LogRecord | Event) -> str:
        try:
            if isinstance(record, Event):
                return self.formatter.format_event(record) + "\n"
            return self.formatter.format(record) + "\n"
        except Exception as exc:  # a record that cannot be formatted must not stop the writer
            return f"log record from {record.name} could not be formatted: {exc!r}\n"

    def stop(self) -> None:
        """Write what is queued, then end the thread."""
        if self.pending:  # the loop has ended (atexit) with lines of its last iteration
            events, self.pending = self.pending, []
            self.records.put(_Batch(self._encode([self._line(e) for e in events]), 0, 0))
        if self.thread.is_alive():
            self.records.put(self._STOP)
            self.thread.join(timeout=5)


def _fileno(stream: TextIO) -> int | None:
    """The stream's descriptor, its buffered text flushed first; None for an in-memory stream."""
    try:
        fd = stream.fileno()
        stream.flush()
        os.fstat(fd)
    except (OSError, ValueError, AttributeError):
        return None
    return fd


async def written(number: int | None = None) -> None:
    """Returns once this request's delivery line (if it made one) was handed to the OS: the route
    awaits it before sending the answer, so that a crash cannot lose the line of an acknowledged
    delivery. Waits at most WRITE_WAIT seconds when the log destination takes nothing.
    `number`: the lines numbered up to it instead (`numbered()`: all made so far)."""
    writer = _writer
    if writer is not None:
        await writer.written(number)


def numbered() -> int:
    """The number of the last delivery line made: `written(numbered())` waits for every line made so
    far (a batch, once for the answers of a write, not once per delivery)."""
    writer = _writer
    return writer.numbered if writer is not None else 0


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
