"""The delivery core: one delivery through a relay, from a validated envelope to its answer, without HTTP.

The HTTP routes are adapters around it: they read and validate the request,
hand a `Delivery` to `DeliveryCore.deliver`, and write the `Answer` back. The
core waits for a slot (`Limiter`), claims, replays or releases the
idempotency key, runs the relay under the deadline, tracks which recipients
the next hop may already have (the relay's `DeliveryContext`), and tells its
observers (metrics, the delivery log) what happened. What it refuses before
anything is sent is a `Refused`.
"""

import asyncio
import contextlib
import logging
import math
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple, Protocol

from app import idempotency
from app.idempotency import IdempotencyStore, StoredResponse
from app.limits import Limiter, Overloaded
from relays import replies
from relays.base import DeliveryContext, Relay, check_results
from schemas.delivery import DeliveryResult, DeliveryStatus, Envelope, RecipientResult
from schemas.reply import Reply

logger = logging.getLogger(__name__)

#: The claim's margin over the deadline, for writing the result back.
CLAIM_MARGIN = 30.0
#: The answer headers a replay repeats.
_STORED_HEADERS = ("X-Smtp-Reply", "Retry-After")

#: The HTTP status that stands for each outcome.
HTTP_STATUS: dict[DeliveryStatus, int] = {
    "delivered": 200,
    "partial": 207,
    "transient_failure": 503,
    "permanent_failure": 400,
}

RefusalReason = Literal["overloaded", "draining", "store_unavailable", "key_in_use", "key_mismatch"]


class Refused(Exception):
    """Nothing was sent: the delivery was refused before it started.

    `status` is the HTTP status that says so; `retry_after` (seconds), when
    set, tells the client when to try again.
    """

    def __init__(self, reason: RefusalReason, status: int, detail: str, retry_after: int | None = None) -> None:
        super().__init__(detail)
        self.reason = reason
        self.status = status
        self.detail = detail
        self.retry_after = retry_after


class Deadline(NamedTuple):
    """When a delivery is cut off: `at` in event loop time, and its length in seconds (for the reply)."""

    at: float
    seconds: float

    @classmethod
    def within(cls, seconds: float) -> "Deadline":
        return cls(asyncio.get_running_loop().time() + seconds, seconds)


@dataclass(slots=True)
class Delivery:
    """One delivery as the core takes it: validated, with everything the caller decided."""

    relay_name: str
    relay: Relay
    envelope: Envelope
    deadline: Deadline
    #: Who asks (an API key's name): the scope of idempotency keys, and the delivery log's `key`.
    caller: str
    idempotency_key: str | None = None
    #: Answer a partial outcome as a transient failure of the whole envelope: slimta's http
    #: relay (the message/rfc822 form) reads any 2xx as success for every recipient.
    retry_whole_envelope: bool = False


class Answer(NamedTuple):
    """What the client gets: an HTTP status, headers and a JSON body.

    `result` is the delivery result it was made from, None for a replay
    (`replayed`) of an earlier request's answer.
    """

    status: int
    headers: dict[str, str]
    body: bytes
    result: DeliveryResult | None
    replayed: bool = False


class DeliveryObserver(Protocol):
    """Told about every delivery the core runs or refuses (metrics, the delivery log).

    Called on the event loop's thread, on the hot path: keep it cheap, and never raise.
    """

    def started(self, delivery: Delivery) -> None:
        """It holds its slots and is about to run."""

    def ended(self, delivery: Delivery) -> None:
        """It gave its slots back, whatever happened (also when the relay raised)."""

    def finished(self, delivery: Delivery, result: DeliveryResult, seconds: float) -> None:
        """It has a result; `seconds` is the time the relay took."""

    def refused(self, relay_name: str, reason: RefusalReason) -> None:
        """It was refused before it started (overloaded, draining)."""


class DeliveryCore:
    """Runs deliveries for one configuration (its limiter and idempotency store)."""

    def __init__(
        self,
        limiter: Limiter,
        store: IdempotencyStore,
        observers: Sequence[DeliveryObserver] = (),
        *,
        queue_timeout: float,
        retry_after: int,
    ) -> None:
        self.limiter = limiter
        self.store = store
        self.observers = tuple(observers)
        self.queue_timeout = queue_timeout
        self.retry_after = retry_after
        #: The deadline timers of the deliveries running now, for `cut_running`.
        self._running: set[asyncio.Timeout] = set()
        self._shutting_down = False

    def cut_running(self) -> int:
        """Shutdown: cut every running delivery now, answered as a deadline cut (451 4.4.7, possibly
        delivered where its data had left) with a text that names the shutdown. Returns how many."""
        self._shutting_down = True
        now = asyncio.get_running_loop().time()
        for timer in self._running:
            timer.reschedule(now)
        return len(self._running)

    def refuse(
        self, relay_name: str, reason: Literal["overloaded", "draining"], detail: str, retry_after: int
    ) -> Refused:
        """A 503 refusal, counted by the observers: raise what this returns."""
        for observer in self.observers:
            observer.refused(relay_name, reason)
        return Refused(reason, 503, detail, retry_after)

    def overloaded(self, relay_name: str, why: str) -> Refused:
        """No room within queue_timeout (slots, or the body budget): a counted 503 refusal."""
        detail = f"overloaded: {why}; nothing was delivered, retry later"
        return self.refuse(relay_name, "overloaded", detail, max(1, math.ceil(self.queue_timeout)))

    async def deliver(self, delivery: Delivery) -> Answer:
        """Deliver, or replay what an earlier request with the same idempotency key got.
        Raises Refused when nothing was tried."""
        if delivery.idempotency_key is None:
            return await self._run(delivery)

        store = self.store
        key = idempotency.scoped_key(delivery.caller, delivery.idempotency_key)
        fingerprint = idempotency.fingerprint(delivery.relay_name, delivery.envelope)
        loop = asyncio.get_running_loop()
        try:
            # The claim outlives any delivery (deadline), so it cannot lapse while one runs.
            claim = await store.claim(key, fingerprint, hold=delivery.deadline.at - loop.time() + CLAIM_MARGIN)
        except idempotency.StoreUnavailable as exc:
            logger.error("idempotency store unavailable: %s", exc)
            raise Refused(
                "store_unavailable",
                503,
                "the idempotency store is unavailable, so a repeat could not be recognised; nothing was delivered",
                self.retry_after,
            ) from None
        if isinstance(claim, idempotency.Replay):
            stored = claim.response
            return Answer(stored.status, _replayed_headers(stored.headers), stored.body, None, replayed=True)
        if isinstance(claim, idempotency.Running):
            raise Refused(
                "key_in_use", 409, "a request with this Idempotency-Key is still running; retry when it has finished", 1
            )
        if isinstance(claim, idempotency.Mismatch):
            raise Refused(
                "key_mismatch",
                422,
                "this Idempotency-Key was used for a different request (relay, envelope or message); "
                "use a new key for a new message",
            )

        try:
            answer = await self._run(delivery)
        except BaseException:
            with contextlib.suppress(idempotency.StoreUnavailable):
                await asyncio.shield(store.release(key, claim))
            raise
        try:
            if answer.status == 503:  # not final (a whole-envelope partial too): the same key may be retried
                await store.release(key, claim)
            else:
                headers = {name: answer.headers[name] for name in _STORED_HEADERS if name in answer.headers}
                await store.complete(key, claim, fingerprint, StoredResponse(answer.status, headers, answer.body))
        except idempotency.StoreUnavailable as exc:
            # The delivery happened; the client gets its result. A repeat may not be recognised.
            logger.error("idempotency store unavailable after delivery; the result was not stored: %s", exc)
        return answer

    async def _run(self, delivery: Delivery) -> Answer:
        """Wait for a slot, deliver within the deadline, and make the answer."""
        name, envelope, deadline = delivery.relay_name, delivery.envelope, delivery.deadline
        loop = asyncio.get_running_loop()
        try:
            held = await self.limiter.acquire(name, min(self.queue_timeout, deadline.at - loop.time()))
        except Overloaded as exc:
            raise self.overloaded(
                name, f"{exc.what} already has {exc.limit} deliveries in flight and none finished in time"
            ) from None
        observers = self.observers
        for observer in observers:
            observer.started(delivery)
        context = DeliveryContext(deadline.at)
        started = time.perf_counter()
        timer = asyncio.timeout_at(deadline.at)
        self._running.add(timer)
        try:
            async with timer:
                results = await delivery.relay.deliver(envelope, context)
        except TimeoutError:
            if not timer.expired():
                raise
            results = deadline_results(envelope, context, deadline.seconds, shutdown=self._shutting_down)
        finally:
            self._running.discard(timer)
            self.limiter.release(held)
            for observer in observers:
                observer.ended(delivery)
        seconds = time.perf_counter() - started
        check_results(name, envelope, results)
        result = DeliveryResult(
            relay=name,
            message_id=envelope.message_id,
            elapsed_ms=round(seconds * 1000, 3),
            recipients=results,
        )
        for observer in observers:
            observer.finished(delivery, result, seconds)
        return self._answer(delivery, result)

    def _answer(self, delivery: Delivery, result: DeliveryResult) -> Answer:
        outcome = result.status
        status = HTTP_STATUS[outcome]
        summary = summary_reply(result)
        if outcome == "partial" and delivery.retry_whole_envelope:
            # Mail systems prefer a duplicate to a loss: say "try again" for the whole
            # envelope (the JSON body still has every outcome).
            status = 503
            summary = replies.partial_delivery(result.recipients, summary)
        headers = {"X-Smtp-Reply": format_smtp_reply(summary)}
        if status == 503:
            headers["Retry-After"] = str(self.retry_after)
        return Answer(status, headers, result.model_dump_json().encode(), result)


def deadline_results(
    envelope: Envelope, context: DeliveryContext, seconds: float, *, shutdown: bool = False
) -> list[RecipientResult]:
    """Every recipient's result when the deadline (or a shutdown, `cut_running`) cut the delivery
    off: possibly delivered where the relay said the data had gone out."""
    if shutdown:
        maybe = replies.shutdown_cut(maybe_delivered=True)
        not_sent = replies.shutdown_cut(maybe_delivered=False)
    else:
        maybe = replies.deadline_reached(seconds, maybe_delivered=True)
        not_sent = replies.deadline_reached(seconds, maybe_delivered=False)
    return [
        RecipientResult(recipient=r, reply=maybe, possibly_delivered=True)
        if context.may_have(r)
        else RecipientResult(recipient=r, reply=not_sent)
        for r in envelope.recipients
    ]


def summary_reply(result: DeliveryResult) -> Reply:
    """The reply that speaks for the whole delivery: the first one of the outcome's class.

    For a partial outcome that is the first failed recipient's reply.
    """
    wanted = {"partial": ("transient_failure", "permanent_failure")}.get(result.status, (result.status,))
    return next(r.reply for r in result.recipients if r.status in wanted)


def format_smtp_reply(reply: Reply) -> str:
    """slimta's `X-Smtp-Reply` header: `<code>; message="<text>"`.

    Never `; command="<cmd>"`: python-slimta 5.0.5's HttpRelay calls `.decode('ascii')`
    on the command it reads there (a `str`), its client greenlet dies and `relay.attempt()`
    never returns (tests/api/test_slimta.py). The JSON body keeps the command.
    slimta's parser reads a quoted value up to the next `"` and knows no
    escapes, so quotes inside become `'`; the value is kept to printable ASCII.
    """
    return f'{reply.code}; message="{_header_text(reply.message)}"'


#: `; command="..."` at the end of an X-Smtp-Reply stored by a version that still wrote it.
_STORED_COMMAND = re.compile(r'; command="[^"]*"$')


def _replayed_headers(stored: dict[str, str]) -> dict[str, str]:
    """The stored headers, without the `command=` that earlier versions put in X-Smtp-Reply
    (results outlive an upgrade in Redis for `ttl`; slimta's client hangs on it)."""
    return {
        name: _STORED_COMMAND.sub("", value) if name.lower() == "x-smtp-reply" else value
        for name, value in stored.items()
    }


def _header_text(text: str) -> str:
    # Printable ASCII; `"` becomes `'` (slimta's parser stops at the next quote) and `\`
    # is escaped as in a quoted-string, so our own parser reads the text back exactly.
    if not (text.isascii() and text.isprintable()):  # the usual case needs no pass per character
        text = "".join(c if " " <= c <= "~" else (" " if c in "\r\n\t" else "?") for c in text)
    return text.replace("\\", "\\\\").replace('"', "'")
