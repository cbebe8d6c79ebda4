"""`POST /relays/{name}/deliveries`: many deliveries in one NDJSON request, each result streamed back as it finishes.

Named for the collection it adds to (`/deliver` is one delivery, `/deliveries` many), under the
same `/relays/{name}` prefix, so a key scoped to a relay reaches both or neither.
"""

import asyncio
import dataclasses
import functools
import logging
from collections import Counter, deque
from collections.abc import AsyncIterator
from http import HTTPStatus
from typing import Annotated, Final, cast

import orjson
from fastapi import APIRouter, Request, Response
from fastapi.responses import StreamingResponse
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, create_model
from starlette.types import Message, Receive, Scope, Send

from app import idempotency, logs
from app.auth import Principal
from app.budget import Holding

# The single route's own checks, so that a line is read exactly as a /deliver body is.
from app.compose import add_missing_headers as complete_headers
from app.delivery import Answer, Deadline, Delivery, Refused
from app.deps import RelayName, find_relay
from app.intake import _CHECKED_JSON_BYTES, _check_json_values, _loc, _message, envelope_of, media_type
from app.lifespan import Runtime, Services
from app.problems import ProblemError, problem_doc
from app.routes.relays import DEADLINE_HEADER, _deadline, quota_check, quota_give_back, with_quota_state
from relays.base import Relay
from relays.rates import QuotaAnswer
from schemas.config import BatchSettings, ServiceSettings
from schemas.delivery import DeliveryRequest, DeliveryResult, Envelope, check_address, request_model
from schemas.problem import FieldError, Problem
from schemas.relay_options import RelayOptions

logger = logging.getLogger(__name__)
router = APIRouter(prefix="/relays", tags=["relays"])

NDJSON: Final = "application/x-ndjson"
#: Lines longer than this are parsed (and a composed message built) in a worker thread, as /deliver does.
_BUILD_IN_THREAD: Final = 256 * 1024
#: Also accepted: the same format under its other names.
_NDJSON_TYPES: Final = frozenset((NDJSON, "application/jsonl", "application/jsonlines", "application/x-jsonlines"))
#: A batch writes its answer lines at most once per this many seconds: the lines that finish
#: meanwhile go in the same write, and a line waits at most this long once its delivery ended (the
#: last ones not at all). Each write is a chunk through the ASGI stack and a send(): at c8 a batch
#: runs 2 deliveries (its share) and finishes a line every few ms, one write each before.
WRITE_EVERY: Final = 0.025


def _check_key(value: str | None) -> str | None:
    if value is not None and (problem := idempotency.key_problem(value)):
        raise ValueError(problem)
    return value


# The length bound on the str alone: on `str | None` pydantic applied it to a null key too, whose
# TypeError made the line a 500.
LineKey = Annotated[Annotated[str, Field(max_length=idempotency.MAX_KEY_LENGTH)] | None, AfterValidator(_check_key)]
_KEY_DESCRIPTION: Final = (
    "as the Idempotency-Key header of /deliver, for this line alone: a repeat (in this batch or any later "
    "request by the same API key) replays this line's result instead of sending again"
)


class BatchDelivery(DeliveryRequest):
    """One line of a batch: the JSON form of `POST /relays/{name}/deliver`, and its own idempotency key."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "sender": "alice@example.com",
                    "recipients": ["bob@example.net"],
                    "message": "From: alice@example.com\r\nSubject: hi\r\n\r\nHello\r\n",
                    "idempotency_key": "order-4711-confirmation",
                }
            ]
        },
    )

    idempotency_key: LineKey = Field(default=None, description=_KEY_DESCRIPTION)


class BatchResultLine(BaseModel):
    """One line of a batch's answer: one delivery's outcome, or why it was not tried.

    The last line of a complete answer is instead `{"done": true, "answered": N, "statuses": {"200": n, ...}}`;
    an answer without it was cut off (the service stopped): lines without a result line may or may not have
    been delivered, exactly as a /deliver request whose answer never came.
    """

    index: int = Field(description="the request line's number, from 0 (blank lines count, and get no answer)")
    status: int = Field(
        description="the HTTP status /deliver would have answered: 200, 207, 400, 503, 409, 413, 422..."
    )
    result: DeliveryResult | None = Field(default=None, description="a delivery outcome: the body /deliver answers")
    problem: Problem | None = Field(default=None, description="otherwise: why nothing was delivered (RFC 9457)")
    replayed: bool | None = Field(default=None, description="true: the stored result of an earlier delivery")
    retry_after: int | None = Field(default=None, description="with 503 and 409: seconds to wait before a retry")


@functools.lru_cache(maxsize=16)
def _line_model(max_recipients: int) -> type[DeliveryRequest]:
    # request_model(), whose recipients are counted before any is validated, with the line's key.
    model = create_model(
        "BatchDelivery",
        __base__=request_model(max_recipients),
        idempotency_key=(LineKey, Field(default=None, description=_KEY_DESCRIPTION)),
    )
    return cast(type[DeliveryRequest], model)


#: The keys of the common line (common_line): a finished message as text, and the line's own options.
_COMMON_KEYS: Final = frozenset(("sender", "recipients", "message", "idempotency_key", "require_tls"))


#: Addresses a batch remembers as checked (_Batch.known): its lines mostly repeat one sender.
KNOWN_ADDRESSES: Final = 256


def common_line(
    line: bytes, settings: ServiceSettings, known: set[str] | None = None
) -> tuple[Envelope, str | None] | None:
    """The envelope and key of a line of the common shape (`sender`, `recipients`, `message`, optionally
    `idempotency_key` and `require_tls`, each of its JSON type), checked by the functions the line model
    runs (check_address, idempotency.key_problem, the size limit); None for any other line, and for any
    line one of those checks refuses: the model then reads it and words its 422 or 413. It accepts only
    what the model accepts, into the same envelope (tests/test_batch_lines.py compares the two).

    About 6 us a line against 14 for the model's (model_validate_json, its validators, the private
    attribute, envelope_of), 1 KiB message, one recipient (timeit, 2026-12-01): of a batch line's
    ~260 us at c8, the part that is neither HTTP nor SMTP.

    `known`: addresses check_address passed before (a batch's, at most KNOWN_ADDRESSES, never the
    empty one, which only a sender may be): not checked again; those it passes now are added."""
    try:
        data = orjson.loads(line)  # refuses what jiter refuses too: lone surrogates, invalid UTF-8
    except orjson.JSONDecodeError:
        return None
    if type(data) is not dict or not data.keys() <= _COMMON_KEYS:
        return None
    sender, recipients, message = data.get("sender"), data.get("recipients"), data.get("message")
    key, require_tls = data.get("idempotency_key"), data.get("require_tls", False)
    if type(sender) is not str or type(message) is not str or type(recipients) is not list:
        return None
    if not message or not 0 < len(recipients) <= settings.max_recipients or type(require_tls) is not bool:
        return None
    if key is not None and (type(key) is not str or idempotency.key_problem(key) is not None):
        return None  # key_problem holds it to MAX_KEY_LENGTH characters, as the field's max_length
    raw = message.encode()  # no lone surrogate: orjson refused those
    if len(raw) > settings.max_message_size:
        return None
    if not all(type(r) is str for r in recipients):
        return None
    if known is None:
        known = set()
    try:
        # check_address returns its argument or raises: an address it passed once passes again.
        for recipient in recipients:
            if recipient not in known:
                check_address(recipient)
                if len(known) < KNOWN_ADDRESSES:
                    known.add(recipient)
        if sender not in known:
            check_address(sender, allow_empty=True)
            if sender and len(known) < KNOWN_ADDRESSES:
                known.add(sender)
    except ValueError:
        return None
    envelope = Envelope(sender=sender, recipients=recipients, message=raw, require_tls=require_tls)
    return envelope, key


def parse_line(
    line: bytes, settings: ServiceSettings, *, add_missing_headers: bool, known: set[str] | None = None
) -> tuple[Envelope, str | None]:
    """A line's envelope (its message built in the compose form) and idempotency key; ProblemError
    (422, 413) as /deliver would answer the same body. Builds on the calling thread. `known`: as
    common_line's."""
    if len(line) > _CHECKED_JSON_BYTES:
        _check_json_values(line, settings.max_recipients)
    common = common_line(line, settings, known)
    if common is not None:
        return (_completed(common[0]), common[1]) if add_missing_headers else common
    envelope, key, composed = model_line(line, settings)
    if add_missing_headers and not composed:  # the relay's option, as /deliver applies it
        envelope = _completed(envelope)
    return envelope, key


def model_line(line: bytes, settings: ServiceSettings) -> tuple[Envelope, str | None, bool]:
    """Any line, read by the line model (request_model's, as /deliver reads its body): its envelope,
    key, and whether its message was built (the compose form); ProblemError (422, 413) otherwise."""
    try:
        parsed = _line_model(settings.max_recipients).model_validate_json(line)
    except ValidationError as exc:
        errors = [
            FieldError(loc=_line_loc(e), message=_message(e, settings.max_recipients))
            for e in exc.errors(include_input=False, include_url=False)
        ]
        raise ProblemError(422, "the line is invalid; nothing was delivered", errors=errors) from None
    key: str | None = getattr(parsed, "idempotency_key", None)
    return envelope_of(parsed, settings, line), key, parsed.content is not None


def _completed(envelope: Envelope) -> Envelope:
    message = complete_headers(envelope.message, envelope.sender)
    if message is envelope.message:
        return envelope
    return dataclasses.replace(envelope, message=message, origin=envelope.message)  # require_tls and all kept


def _line_loc(error: object) -> str:
    loc = _loc(error)
    return "line" if loc == "body" else loc


class _Await:
    """_Batch._ready's answer for a line whose delivery needs a wait first (_Batch._prepare)."""


_AWAIT: Final = _Await()
_DRAINING: Final = "shutting down; not accepting deliveries"


class _TooLong:
    """A line over max_line_bytes: answered 413; its bytes are skipped, never held."""


TOO_LONG: Final = _TooLong()


class LineSplitter:
    """Splits a body fed in pieces into numbered lines, each at most `limit` bytes (without its LF).

    Blank lines keep their number but are not returned. Holds at most one partial line (`limit` bytes)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.index = 0
        self._partial = bytearray()
        self._skipping = False

    def feed(self, data: bytes, *, last: bool = False) -> list[tuple[int, bytes | _TooLong]]:
        lines: list[tuple[int, bytes | _TooLong]] = []
        start = 0
        while True:
            end = data.find(b"\n", start)
            if end < 0:
                break
            if not self._partial and not self._skipping and end - start <= self.limit:
                self._emit(data[start:end], lines)  # whole in this piece, the usual case: no copy to _partial
            else:
                self._take(data[start:end], lines, complete=True)
            start = end + 1
        if start < len(data):
            self._take(data[start:], lines, complete=False)
        if last and (self._partial or self._skipping):
            self._take(b"", lines, complete=True)  # a last line without its LF
        return lines

    def _take(self, piece: bytes, lines: list[tuple[int, bytes | _TooLong]], *, complete: bool) -> None:
        if not self._skipping:
            if len(self._partial) + len(piece) > self.limit:
                lines.append((self.index, TOO_LONG))  # answered at once; the rest of it is read past
                self._skipping = True
                self._partial.clear()
            else:
                self._partial += piece
        if complete:
            if self._skipping:
                self.index += 1
            else:
                self._emit(bytes(self._partial), lines)
            self._partial.clear()
            self._skipping = False

    def _emit(self, line: bytes, lines: list[tuple[int, bytes | _TooLong]]) -> None:
        """A complete line: numbered, and returned unless blank."""
        line = line.strip()  # tolerates CRLF and indentation
        if line:
            lines.append((self.index, line))
        self.index += 1


class _NdjsonStream(StreamingResponse):
    """StreamingResponse without its disconnect listener: under ASGI spec 2.3 (uvicorn) that listener
    reads receive() beside the route, which reads the request body there while answering."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.stream_response(send)


#: The batches streaming now, per relay: they share what it runs at once (_Batch.shared, _Batch._share).
_batches_on: Counter[Relay] = Counter()
#: Relay types with one destination, one pool: the batches streaming to them share it.
_ONE_DESTINATION = frozenset({"static", "lmtp"})


def shared_capacity(options: RelayOptions, batch: BatchSettings) -> int | None:
    """What the batches streaming to a relay share (_Batch._share), or None: each runs
    `concurrency`."""
    if options.type not in _ONE_DESTINATION:
        return None
    connections = int(getattr(options, "concurrent_connections", 0))
    waiting = min(connections, int(getattr(options, "max_waiting", connections)))
    return max(batch.concurrency, connections + waiting)


class _Batch:
    """One batch request: its reader, its running deliveries and the answer lines they put in `out`."""

    def __init__(
        self,
        request: Request,
        services: Services,
        runtime: Runtime,
        name: str,
        relay: Relay,
        principal: Principal,
        seconds: float,
    ) -> None:
        self.receive = request.receive
        self.instance = request.url.path
        self.services, self.runtime, self.name, self.relay, self.principal = services, runtime, name, relay, principal
        self.settings = runtime.config.mailrelay
        self.batch: BatchSettings = self.settings.batch
        self.seconds = seconds
        options = runtime.config.relay[name]
        self.complete = bool(getattr(options, "add_missing_headers", False))  # the relay's option, as /deliver's
        #: Addresses the batch's lines passed check_address with (common_line): most repeat a sender.
        self.known: set[str] = set()
        # What a one-destination relay (static, lmtp: one pool) runs at once (its connections, and
        # as many again waiting within its max_waiting), or `concurrency` if more: what the batches
        # streaming to it share (_share). None for the others: mx has a pool per MX host, so its
        # concurrent_connections says nothing of a batch that fans out over many domains.
        self.shared = shared_capacity(options, self.batch)
        #: Each takes the next line, delivers it, and takes the next: at most _share() of them. A task
        #: per line cost its creation, a callback and a wake-up of the reader per line (bench/).
        self.workers: set[asyncio.Task[None]] = set()
        self.idle = 0  # workers looking for a line (or about to): more are started only for lines beyond them
        #: Lines split off the body and not yet taken: those of one body chunk at most.
        self.lines: deque[tuple[int, bytes | _TooLong]] = deque()
        self.splitter = LineSplitter(self.batch.max_line_bytes)
        self.taken = 0  # lines taken, the blank ones apart: max_lines
        self.more = True  # the body has more to come
        #: No further line is taken: past max_lines, or the answer ended (the client left).
        self.stopped = False
        self.gone = False  # the client disconnected
        #: The next receive(), always under way: the body's next chunk (one held at most), and once the
        #: body has ended, what returns only when the client leaves. Either way a client that leaves is
        #: seen at once, and no further line starts.
        self._ahead: asyncio.Future[Message] | None = None
        #: Answer lines not yet written: at most one per line read (max_lines + 1 in all).
        self.out: asyncio.Queue[bytes | None] = asyncio.Queue()
        self.statuses: Counter[int] = Counter()
        #: Every delivery has ended (its line queued, then None): the last write waits no longer.
        self._read_all = False
        self._lingering: asyncio.Future[None] | None = None
        #: The request and each worker: the runtime is left when none is left.
        self._holds = 1
        #: What each line running took from the key's quotas (where it goes back, _not_sent).
        self._quota_taken: dict[int, QuotaAnswer] = {}

    async def stream(self) -> AsyncIterator[bytes]:
        _batches_on[self.relay] += 1
        self._receive_ahead()
        self._grow()  # the first worker: it takes the body's first lines
        try:
            ended = False
            while not ended:
                # The lines ready together go in one write: one chunk, one send, not one per line.
                lines: list[bytes] = []
                line = await self.out.get()  # at once when lines finished while the last write lingered
                while line is not None:
                    lines.append(line)
                    if self.out.empty():
                        break
                    line = self.out.get_nowait()
                ended = line is None
                if ended:  # the last lines and the summary in the same write
                    summary = {
                        "done": True,
                        "answered": self.statuses.total(),
                        "statuses": {str(k): v for k, v in self.statuses.items()},
                    }
                    lines.append(orjson.dumps(summary) + b"\n")
                # As /deliver: the deliveries' log lines are handed to the OS before their answers go
                # out; here once for the lines of this write (a wait per delivery cost a task step each).
                await logs.written(logs.numbered())
                yield b"".join(lines)
                if not ended and not self._read_all:
                    # The lines finishing meanwhile share the next write: a timer's wake per write, where
                    # waiting for the next line first cost a wake of its own as well.
                    await self._linger(WRITE_EVERY)
        finally:
            # Stops reading (lines not started are never delivered); running deliveries go on to
            # their end, so keyed ones store their outcomes for a repeat of the batch.
            self.stopped = True
            if self._ahead is not None:
                self._ahead.cancel()  # and the workers waiting for it end
            _batches_on[self.relay] -= 1
            if not _batches_on[self.relay]:
                del _batches_on[self.relay]
            self._release()

    def _release(self) -> None:
        self._holds -= 1
        if self._holds == 0:
            self.runtime.leave()

    async def _linger(self, seconds: float) -> None:
        """Waits `seconds`, or less when the last delivery ends meanwhile (its answer is not held)."""
        lingering = self._lingering = asyncio.get_running_loop().create_future()
        timer = asyncio.get_running_loop().call_later(seconds, self._stop_lingering)
        try:
            await lingering
        finally:
            timer.cancel()
            self._lingering = None

    def _stop_lingering(self) -> None:
        if self._lingering is not None and not self._lingering.done():
            self._lingering.set_result(None)

    def _share(self) -> int:
        """`concurrency`, or less: an even part of `shared` among the batches streaming to this
        relay, each at least one. 8 batches of 16 had 128 deliveries wait for a few connections,
        past the relay's max_waiting (those failed at once, 451 4.4.5), where 8 single requests
        would each have been delivered."""
        if self.shared is None:
            return self.batch.concurrency
        return min(self.batch.concurrency, -(-self.shared // max(1, _batches_on[self.relay])))

    def _grow(self) -> None:
        """Starts workers, up to the batch's share, for the lines (and the body still to read) that
        the idle ones will not take."""
        if self.stopped or self.gone:
            return
        share = self._share()
        while len(self.workers) < share and self.idle < len(self.lines) + self.more:
            worker = asyncio.get_running_loop().create_task(self._work())
            self.workers.add(worker)
            self.idle += 1
            self._holds += 1

    async def _work(self) -> None:
        worker = asyncio.current_task()
        core = self.runtime.core
        holding = Holding(self.runtime.limiter.bodies)  # the worker's line's share: given back after each
        try:
            while (taken := await self._take()) is not None:
                index, line = taken
                self.idle -= 1
                try:
                    delivery = self._ready(index, line, holding)
                    if isinstance(delivery, _Await):
                        delivery = await self._prepare(index, line, holding)
                    if delivery is not None:
                        # core.deliver awaited by the worker itself, not within a method around it: each
                        # level of the coroutine chain is walked again every time the delivery resumes
                        # (several times per SMTP transaction).
                        try:
                            answer = await core.deliver(delivery)
                        except Refused as refused:
                            await self._not_sent(index, delivery)
                            self._refused(index, refused)
                        else:
                            if not answer.attempted:
                                await self._not_sent(index, delivery)
                            self._answered(index, answer)
                except Exception:  # a bug: this line's outcome is unknown, the batch goes on
                    logger.exception("a batch delivery failed (line %d)", index)
                    self._problem(index, 500, "internal error; the delivery outcome is unknown, see the service log")
                finally:
                    holding.release()
                    self._quota_taken.pop(index, None)
                    self.idle += 1
                self._grow()  # another batch on the relay ended: a larger part (a smaller one: _take)
        except Exception:  # a bug: the lines this worker would have taken go to the others, if any
            logger.exception("a batch worker failed")
        finally:
            self.idle -= 1
            self.workers.discard(cast("asyncio.Task[None]", worker))
            if not self.workers:  # the last one: every line was taken, or none will be
                self.out.put_nowait(None)
                self._read_all = True
                self._stop_lingering()
            self._release()

    async def _take(self) -> tuple[int, bytes] | None:
        """The next line to deliver, reading the body as needed (lines too long are answered on the
        way); None when no line is left to take: the body ended, max_lines passed, the client left."""
        while not (self.stopped or self.gone):
            if len(self.workers) > self._share():  # another batch started on the relay while it waited
                return None  # (never the last worker: the share is at least one)
            if self.lines:
                index, line = self.lines.popleft()
                self.taken += 1
                if self.taken > self.batch.max_lines:
                    self.stopped = True
                    self._problem(
                        index,
                        413,
                        f"the batch has more than {self.batch.max_lines} lines; this line and those after it "
                        "were not read, nothing of them was delivered",
                    )
                    return None
                if isinstance(line, _TooLong):
                    self._problem(
                        index,
                        413,
                        f"the line is longer than {self.batch.max_line_bytes} bytes; nothing was delivered "
                        "(send larger messages to /deliver)",
                    )
                    continue
                return index, line
            if not self.more:
                return None
            ahead = self._ahead
            assert ahead is not None  # noqa: S101 - started with the stream, again after each chunk
            if not ahead.done():
                await ahead  # then the first worker here takes its chunk in, the others its lines
            else:
                self._take_in(ahead.result())
        return None

    def _take_in(self, message: Message) -> None:
        if message["type"] == "http.disconnect":
            self.gone = True
            return
        self.more = bool(message.get("more_body", False))
        self.lines.extend(self.splitter.feed(message.get("body", b""), last=not self.more))
        self._receive_ahead()
        self._grow()

    def _receive_ahead(self) -> None:
        ahead = self._ahead = asyncio.ensure_future(self.receive())
        ahead.add_done_callback(self._watched)

    def _watched(self, ahead: "asyncio.Future[Message]") -> None:
        if not ahead.cancelled() and ahead.exception() is None and ahead.result()["type"] == "http.disconnect":
            self.gone = True

    def _ready(self, index: int, line: bytes, holding: Holding) -> "Delivery | _Await | None":
        """The line's delivery, without awaiting anything: its share of the body budget free, the line
        small, no quota. _AWAIT otherwise (then _prepare, which may wait); None when answered already."""
        if len(line) > _BUILD_IN_THREAD or self.principal.quota is not None:
            return _AWAIT
        taken = holding.budget.try_take(self._budget_share(line))
        if taken is None:
            return _AWAIT
        holding.held = taken
        parsed = self._admit(index, self._parse(line, self.known))
        return None if parsed is None else self._delivery(*parsed)

    def _parse(self, line: bytes, known: set[str] | None) -> tuple[Envelope, str | None] | ProblemError:
        """parse_line, its ProblemError returned: it may run in a thread, and _admit answers it."""
        try:
            return parse_line(line, self.settings, add_missing_headers=self.complete, known=known)
        except ProblemError as exc:
            return exc

    def _admit(
        self, index: int, parsed: tuple[Envelope, str | None] | ProblemError
    ) -> tuple[Envelope, str | None] | None:
        """The parsed line, or None once it is answered: its problem (422, 413), or 503 while draining."""
        if isinstance(parsed, ProblemError):
            self._problem(index, parsed.status, parsed.detail, errors=parsed.errors)
            return None
        if self.services.draining:
            self._refused(index, self.runtime.core.refuse(self.name, "draining", _DRAINING, 5))
            return None
        return parsed

    def _delivery(self, envelope: Envelope, key: str | None) -> Delivery:
        # No X-Smtp-Reply: the answer goes into a result line, without headers of its own.
        deadline = Deadline.within(self.seconds)
        return Delivery(self.name, self.relay, envelope, deadline, self.principal.name, key, reply_header=False)

    def _budget_share(self, line: bytes) -> int:
        """As the JSON form of /deliver: the line and its decoded message, held from the body budget."""
        return len(line) + min(len(line), self.settings.max_message_size)

    async def _prepare(self, index: int, line: bytes, holding: Holding) -> Delivery | None:
        """_ready's work for any line, waiting as needed: for the body budget, a large line's parse in a
        thread, the key's quotas. None when the line was answered (nothing to deliver)."""
        core = self.runtime.core
        budget = holding.budget
        share = self._budget_share(line)
        taken = budget.try_take(share)
        if taken is None:
            loop = asyncio.get_running_loop()
            taken = await budget.take(share, loop.time() + self.settings.limits.queue_timeout)
            if taken is None:
                why = f"request bodies being handled already hold the body budget of {budget.capacity} bytes"
                self._refused(index, core.overloaded(self.name, why))
                return None
        holding.held = taken
        if len(line) > _BUILD_IN_THREAD:  # a large composed message would hold the loop while it is built
            # Without `known`: the loop's workers change it meanwhile.
            parsed = self._admit(index, await asyncio.to_thread(self._parse, line, None))
        else:
            parsed = self._admit(index, self._parse(line, self.known))
        if parsed is None:
            return None
        envelope, key = parsed
        if self.principal.quota is not None:  # each line takes its message from the key's quotas
            try:
                self._quota_taken[index] = await quota_check(self.runtime, self.principal, len(envelope.recipients))
            except ProblemError as exc:
                retry = (exc.headers or {}).get("Retry-After", "")
                self._problem(index, exc.status, exc.detail, retry_after=int(retry) if retry.isdigit() else None)
                return None
        return self._delivery(envelope, key)

    async def _not_sent(self, index: int, delivery: Delivery) -> None:
        """The line's message was not sent (refused, a replay, a key in doubt): what it took from
        the key's quotas goes back."""
        if (taken := self._quota_taken.pop(index, None)) is not None:
            await quota_give_back(self.runtime, self.principal, delivery.envelope, taken)

    def _answered(self, index: int, answer: Answer) -> None:
        parts = [b'{"index":%d,"status":%d' % (index, answer.status)]
        if answer.replayed:
            parts.append(b',"replayed":true')
        retry_after = answer.headers.get("Retry-After")
        if retry_after is not None and retry_after.isdigit():
            parts.append(b',"retry_after":%d' % int(retry_after))
        parts += [b',"result":', answer.body, b"}\n"]
        self._emit(answer.status, b"".join(parts))

    def _refused(self, index: int, refused: Refused) -> None:
        self._problem(index, refused.status, refused.detail, retry_after=refused.retry_after)

    def _problem(
        self,
        index: int,
        status: int,
        detail: str,
        *,
        errors: list[FieldError] | None = None,
        retry_after: int | None = None,
    ) -> None:
        problem = Problem(
            title=HTTPStatus(status).phrase, status=status, detail=detail, instance=self.instance, errors=errors
        )
        line = BatchResultLine(index=index, status=status, problem=problem, retry_after=retry_after)
        self._emit(status, line.model_dump_json(exclude_none=True).encode() + b"\n")

    def _emit(self, status: int, line: bytes) -> None:
        self.statuses[status] += 1
        self.out.put_nowait(line)


_BATCH_BODY = {
    "required": True,
    "content": {
        NDJSON: {
            "schema": {"$ref": "#/components/schemas/BatchDelivery"},
            "example": '{"sender": "alice@example.com", "recipients": ["bob@example.net"], '
            '"message": "Subject: hi\\r\\n\\r\\nHello\\r\\n", "idempotency_key": "order-4711"}\n'
            '{"sender": "alice@example.com", "recipients": ["carol@example.org"], '
            '"message": "Subject: hi\\r\\n\\r\\nHello\\r\\n"}\n',
        }
    },
}
_DEADLINE_PARAMETER = {
    "name": DEADLINE_HEADER,
    "in": "header",
    "required": False,
    "description": "seconds each delivery of the batch may take, counted from when it starts (not for the whole "
    "batch); it can only lower the service's delivery_deadline",
    "schema": {"type": "number", "exclusiveMinimum": 0},
}


@router.post(
    "/{name}/deliveries",
    name="deliver_batch",
    response_class=_NdjsonStream,
    openapi_extra={"requestBody": _BATCH_BODY, "parameters": [_DEADLINE_PARAMETER]},
    responses={
        200: {
            "description": "one NDJSON line per delivery, in the order they finish, then a `done` line",
            "content": {NDJSON: {"schema": {"$ref": "#/components/schemas/BatchResultLine"}}},
        },
        401: problem_doc("no API key, or not a valid one (only when keys are configured)"),
        403: problem_doc("the API key may not use this relay"),
        404: problem_doc("no relay of that name"),
        415: problem_doc("the Content-Type is not application/x-ndjson"),
        422: problem_doc("an invalid X-Delivery-Timeout, or an Idempotency-Key header (keys go in the lines)"),
        503: problem_doc("draining: nothing was read or delivered"),
    },
)
async def deliver_batch(name: RelayName, request: Request) -> Response:
    """Deliver many messages through the relay in one request; each result is streamed back as it finishes.

    The body is NDJSON (`application/x-ndjson`): one delivery per line, each
    in the JSON form of `/deliver` plus an optional `idempotency_key`. The
    answer is NDJSON too, in completion order: per line, its `index` (line
    number from 0), the `status` `/deliver` would have answered, and its
    `result` (the `/deliver` body) or a `problem` (RFC 9457) when nothing was
    delivered: 422 for an invalid line, 413 for one too long or past
    `mailrelay.batch.max_lines`, 503/409 for refusals. A bad line never stops
    the others. The last line is `{"done": true, ...}`; without it the
    answer was cut off. Every delivery is bound by the same limits,
    deadline (`X-Delivery-Timeout` applies to each delivery, from its start)
    and keys as one sent to `/deliver`; at most `mailrelay.batch.concurrency`
    of a batch run at once, and the next line is read only when one finished.
    If the client disconnects, the deliveries running go on to their end
    (keyed ones store their outcome for a repeat of the batch) and no further
    line is started.
    """
    services: Services = request.state.services
    runtime = services.current
    runtime.enter()  # before the first await, as /deliver: a reload or drain waits for the batch
    principal: Principal | None = None
    try:
        # Checked once for the whole batch: the same answers (401, 403, 404) as /deliver.
        principal = runtime.keyring.identify(request)
        relay = find_relay(name, runtime, principal)
        if services.draining:
            raise _refusal(runtime.core.refuse(name, "draining", "shutting down; not accepting deliveries", 5))
        form = media_type(request)
        if form not in _NDJSON_TYPES:
            raise ProblemError(
                415, f"Content-Type must be {NDJSON}, not {form or 'absent'}", headers={"Accept-Post": NDJSON}
            )
        if request.headers.get(idempotency.HEADER) is not None:
            raise ProblemError(
                422,
                "the request is invalid; nothing was delivered",
                errors=[
                    FieldError(
                        loc=idempotency.HEADER,
                        message="a batch takes no Idempotency-Key header: give each line its `idempotency_key`",
                    )
                ],
            )
        seconds = _deadline(request, runtime.config.mailrelay.delivery_deadline)
        quota_headers: dict[str, str] = {}
        if principal.quota is not None:  # the state as the batch starts; each line takes from it
            quota_headers = (
                await runtime.keyring.quotas(runtime.config.mailrelay).state(principal.name, principal.quota)
            ).headers
    except ProblemError as problem:
        runtime.leave()
        if principal is not None and principal.quota is not None:
            await with_quota_state(problem, runtime, principal)
        raise
    except BaseException:
        runtime.leave()
        raise
    batch = _Batch(request, services, runtime, name, relay, principal, seconds)
    # no-store: a proxy must not cache an answer; X-Accel-Buffering: nginx passes each line on at once.
    headers = {"Cache-Control": "no-store", "X-Accel-Buffering": "no", **quota_headers}
    return _NdjsonStream(batch.stream(), media_type=NDJSON, headers=headers)


def _refusal(refused: Refused) -> ProblemError:
    headers = {"Retry-After": str(refused.retry_after)} if refused.retry_after is not None else None
    return ProblemError(refused.status, refused.detail, headers=headers)
