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
import functools
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
from relays.redis_link import REDIS_TIMEOUT
from schemas.delivery import DeliveryResult, DeliveryStatus, Envelope, RecipientResult
from schemas.reply import Reply

logger = logging.getLogger(__name__)

#: The answer headers a replay repeats.
_STORED_HEADERS = ("X-Smtp-Reply", "Retry-After")
_STORED_SET = frozenset(_STORED_HEADERS)

#: The HTTP status that stands for each outcome.
HTTP_STATUS: dict[DeliveryStatus, int] = {
    "delivered": 200,
    "partial": 207,
    "transient_failure": 503,
    "permanent_failure": 400,
}

RefusalReason = Literal["overloaded", "draining", "store_unavailable", "key_in_use", "key_mismatch"]
#: What a keyed request's claim found (or what became of a delivery finishing in the background).
KeyEvent = Literal[
    "claimed",
    "taken_over",
    "replayed",
    "in_doubt",
    "in_use",
    "mismatch",
    "store_unavailable",
    "background_started",
    "background_stored",
    "background_cut",
    "background_full",
]

#: The answer to a repeat whose earlier attempt lapsed (its instance died) after the data was about
#: to leave: the next hop may have it, so it is not sent again. A new key asks for a resend.
IN_DOUBT = Reply(
    code=451,
    enhanced_status="4.3.0",
    message="4.3.0 Idempotency-Key in doubt: an earlier attempt may have delivered this message; not sent again "
    "(send it with a new Idempotency-Key to deliver it again)",
    command="[SEND_DATA]",
)


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
    #: The answer carries X-Smtp-Reply. A batch line's has no headers of its own (its status and
    #: body go in a result line): about 2 us a line saved (timeit). A keyed answer always has it:
    #: stored, it may be replayed to /deliver.
    reply_header: bool = True


class Answer(NamedTuple):
    """What the client gets: an HTTP status, headers and a JSON body.

    `result` is the delivery result it was made from, None for a replay
    (`replayed`) of an earlier request's answer. `attempted`: this request
    ran a delivery (False: a replay, or a key in doubt: nothing was sent for it).
    """

    status: int
    headers: dict[str, str]
    body: bytes
    result: DeliveryResult | None
    replayed: bool = False
    attempted: bool = True


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
        """It was refused before it started (overloaded, draining, and the key's refusals)."""


class KeyObserver(Protocol):
    """Optional, beside DeliveryObserver (the core uses observers that have `key_event`): the
    idempotency keys' events, store errors by operation, and claims found lost by a compare-and-set."""

    def key_event(self, relay_name: str, event: KeyEvent) -> None: ...

    def store_error(self, operation: idempotency.Operation) -> None: ...

    def claim_lost(self, operation: idempotency.Operation) -> None: ...


class _Lease:
    """A keyed delivery's claim while it runs: renewed by the core, and the relay's step before the
    data leaves (`DeliveryContext.sending`), which records that in the claim."""

    __slots__ = ("claim", "core", "finishing", "key", "lost", "relay_name", "sent")

    def __init__(self, core: "DeliveryCore", key: str, claim: idempotency.Claimed, relay_name: str) -> None:
        self.core, self.key, self.claim, self.relay_name = core, key, claim, relay_name
        self.sent = False
        #: A task finishes the delivery after its deadline cut, and stores the outcome.
        self.finishing = False
        #: The claim was found taken by a repeat before the data left: this delivery sends nothing.
        self.lost = False

    async def sending(self) -> None:
        """Takes at most REDIS_TIMEOUT (the store's bound): a store that fails here is logged and counted, and the
        delivery goes on (its claim then cannot tell a repeat after a crash). A claim found lost
        (it lapsed and a repeat took the key, which sends its own copy) stops the delivery here,
        before anything left: CancelledError, as a deadline cut at this await would raise."""
        self.sent = True
        core = self.core
        try:
            held = await core.store.sending(self.key, self.claim)
        except (idempotency.StoreUnavailable, TimeoutError) as exc:
            logger.error("idempotency store unavailable before the data left; progress not recorded: %s", exc)
            core.store_error("sending")
            return
        except Exception:
            logger.exception("recording the progress of an idempotency claim failed")
            core.store_error("sending")
            return
        if not held:
            logger.error("idempotency claim lost before the data left (it lapsed and a repeat took the key); not sent")
            core.claim_lost("sending")
            self.lost = True
            raise asyncio.CancelledError


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
        self.key_observers: tuple[KeyObserver, ...] = tuple(o for o in observers if hasattr(o, "key_event"))  # type: ignore[misc]
        #: The claims held now (renewed every third of the lease by one task), and the deliveries
        #: finishing in the background after a deadline cut (at most `finish_limit`).
        self._leases: set[_Lease] = set()
        self._renewer: asyncio.Task[None] | None = None
        #: Each finishing task, and the relay's task it waits for.
        self.finishing: dict[asyncio.Task[None], asyncio.Task[list[RecipientResult]]] = {}

    def cut_running(self) -> int:
        """Shutdown: cut every running delivery now, answered as a deadline cut (451 4.4.7, possibly
        delivered where its data had left) with a text that names the shutdown. Returns how many."""
        self._shutting_down = True
        now = asyncio.get_running_loop().time()
        for timer in self._running:
            # One already cut (its deadline, an earlier call: the drain calls this again and again)
            # is unwinding: asyncio refuses to reschedule it, and raising here left the rest uncut.
            with contextlib.suppress(RuntimeError):
                timer.reschedule(now)
        # Those finishing in the background stop too; their claims (data sent) lapse within the
        # lease, and repeats then get the "may have been delivered; not sent again" answer.
        for finisher, relay_task in self.finishing.items():
            finisher.cancel()
            relay_task.cancel()  # also when the finisher has not started yet
        return len(self._running) + len(self.finishing)

    def key_event(self, relay_name: str, event: KeyEvent) -> None:
        for observer in self.key_observers:
            observer.key_event(relay_name, event)

    def store_error(self, operation: idempotency.Operation) -> None:
        for observer in self.key_observers:
            observer.store_error(operation)

    def claim_lost(self, operation: idempotency.Operation) -> None:
        for observer in self.key_observers:
            observer.claim_lost(operation)

    def _refuse_key(
        self, relay_name: str, reason: RefusalReason, event: KeyEvent, status: int, detail: str, retry_after: int | None
    ) -> Refused:
        for observer in self.observers:
            observer.refused(relay_name, reason)
        self.key_event(relay_name, event)
        return Refused(reason, status, detail, retry_after)

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
        name = delivery.relay_name
        key = idempotency.scoped_key(delivery.caller, delivery.idempotency_key)
        fingerprint = idempotency.fingerprint(name, delivery.envelope)
        try:
            claim = await store.claim(key, fingerprint)
        except idempotency.StoreUnavailable as exc:
            logger.error("idempotency store unavailable: %s", exc)
            self.store_error("claim")
            raise self._refuse_key(
                name,
                "store_unavailable",
                "store_unavailable",
                503,
                "the idempotency store is unavailable, so a repeat could not be recognised; nothing was delivered",
                self.retry_after,
            ) from None
        if not isinstance(claim, idempotency.Claimed):  # the common case first: one check
            return self._not_claimed(delivery, claim)

        self.key_event(name, "taken_over" if claim.taken_over else "claimed")
        lease = _Lease(self, key, claim, name)
        self._hold(lease)
        try:
            answer = await self._run(delivery, lease)
        except BaseException:
            # A bug (500) or a cancellation. The key is freed unless the data may have left: then
            # its lease lapses, and repeats are told the message may have been delivered.
            self._leases.discard(lease)
            if not lease.sent:
                with contextlib.suppress(idempotency.StoreUnavailable):
                    await asyncio.shield(store.release(key, claim))
            raise
        if not lease.finishing:
            await self._settle(lease, answer)
        return answer

    def _not_claimed(self, delivery: Delivery, claim: idempotency.Claim) -> Answer:
        """The answer to a keyed request whose claim found the key taken: a replay, or in doubt.
        Raises Refused for one still running (409) and for one that named another request (422)."""
        name = delivery.relay_name
        if isinstance(claim, idempotency.Replay):
            self.key_event(name, "replayed")
            stored = claim.response
            return Answer(stored.status, _replayed_headers(stored.headers), stored.body, None, True, False)
        if isinstance(claim, idempotency.Running):
            raise self._refuse_key(
                name,
                "key_in_use",
                "in_use",
                409,
                "a request with this Idempotency-Key is still running; retry when it has finished",
                1,
            )
        if isinstance(claim, idempotency.Mismatch):
            raise self._refuse_key(
                name,
                "key_mismatch",
                "mismatch",
                422,
                "this Idempotency-Key was used for a different request (relay, envelope or message); "
                "use a new key for a new message",
                None,
            )
        self.key_event(name, "in_doubt")  # InDoubt: what remains of the Claim union
        return self._in_doubt(delivery)

    async def _settle(self, lease: _Lease, answer: Answer) -> None:
        """Store the answer for repeats, or free the key when nothing was sent and a retry may send.

        A transient answer is final too when the data may have left (a deadline cut after the
        final ".", a lost reply): a retry with the same key must not send a second copy."""
        self._leases.discard(lease)
        store, key, claim = self.store, lease.key, lease.claim
        result = answer.result
        operation: idempotency.Operation = "complete"
        try:
            if answer.status == 503 and not (result and any(r.possibly_delivered for r in result.recipients)):
                operation = "release"
                held = await store.release(key, claim)
            else:
                headers = answer.headers
                if not headers.keys() <= _STORED_SET:  # _answer makes only those: no copy as a rule
                    headers = {name: headers[name] for name in _STORED_HEADERS if name in headers}
                stored = StoredResponse(answer.status, headers, answer.body)
                held = await store.complete(key, claim, claim.fingerprint, stored)
        except idempotency.StoreUnavailable as exc:
            # The delivery happened; the client gets its result. A repeat may not be recognised.
            logger.error("idempotency store unavailable after delivery; the result was not stored: %s", exc)
            self.store_error(operation)
            return
        if not held:
            # Its lease lapsed (the renewals failed for a whole lease) and a repeat took the key.
            logger.error("idempotency claim lost before its result was stored (%s)", operation)
            self.claim_lost(operation)

    def _hold(self, lease: _Lease) -> None:
        self._leases.add(lease)
        if self._renewer is None or self._renewer.done():
            self._renewer = asyncio.get_running_loop().create_task(self._renew_leases())

    async def _renew_leases(self) -> None:
        """Renews every claim held, every third of the lease, in one round trip; ends when none is."""
        store = self.store
        while self._leases:
            await asyncio.sleep(store.settings.lease / 3)
            leases = list(self._leases)
            if not leases:
                return
            try:
                async with asyncio.timeout(REDIS_TIMEOUT):
                    held = await store.renew([(lease.key, lease.claim) for lease in leases])
            except (idempotency.StoreUnavailable, TimeoutError) as exc:
                logger.error("idempotency store unavailable; %d claims not renewed: %s", len(leases), exc)
                self.store_error("renew")
                continue
            for lease, ok in zip(leases, held, strict=True):
                if not ok and lease in self._leases:  # not stored or released in the meantime
                    logger.error("idempotency claim lost while its delivery ran (it lapsed and a repeat took it)")
                    self.claim_lost("renew")
                    self._leases.discard(lease)

    def _in_doubt(self, delivery: Delivery) -> Answer:
        envelope = delivery.envelope
        recipients = [
            RecipientResult(recipient=r, reply=IN_DOUBT, possibly_delivered=True) for r in envelope.recipients
        ]
        result = DeliveryResult(
            relay=delivery.relay_name, message_id=envelope.message_id, elapsed_ms=0.0, recipients=recipients
        )
        headers = {"X-Smtp-Reply": format_smtp_reply(IN_DOUBT), "Retry-After": str(self.retry_after)}
        return Answer(503, headers, result.model_dump_json().encode(), result, attempted=False)

    async def _run(self, delivery: Delivery, lease: _Lease | None = None) -> Answer:
        """Wait for a slot, deliver within the deadline, and make the answer.

        With a claim (`lease`) the relay runs as its own task, so that when the deadline cuts it
        after its data left, it may go on in the background (`_finish`) while the client gets
        the deadline's answer; the claim is kept until the true outcome is stored."""
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
        started = time.perf_counter()
        timer = asyncio.timeout_at(deadline.at)
        background: asyncio.Task[list[RecipientResult]] | None = None
        self._running.add(timer)
        try:
            if lease is None:
                context = DeliveryContext(deadline.at)
                async with timer:
                    results = await delivery.relay.deliver(envelope, context)
            else:
                context = DeliveryContext(deadline.at, lease.sending)
                task = loop.create_task(delivery.relay.deliver(envelope, context))
                # What asyncio.shield(task) does, without its two futures' callbacks: a deadline
                # cut cancels `ended`, never the relay's task.
                ended: asyncio.Future[None] = loop.create_future()
                task.add_done_callback(functools.partial(_wake, ended))
                try:
                    async with timer:
                        await ended
                    results = task.result()
                    if lease.lost:  # a relay whose tasks stopped at `sending` (mx's task group) returns
                        raise self._claim_lost_before_sending(name)  # what it has: nothing left at all
                except Refused:
                    raise
                except BaseException:
                    if timer.expired() and not task.done() and self._may_finish(name, envelope, context):
                        background = task
                    else:
                        task.cancel()
                        await asyncio.wait({task})  # unwinds as under the timeout itself
                        if not task.cancelled():
                            task.exception()  # retrieved: the relay was cut, its error does not matter
                        if lease.lost and not timer.expired():  # stopped before its data left (_Lease.sending)
                            raise self._claim_lost_before_sending(name) from None
                    raise
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
        answer = self._answer(delivery, result)
        if background is not None and lease is not None:
            lease.finishing = True
            finisher = loop.create_task(self._finish(delivery, background, lease, answer, started))
            self.finishing[finisher] = background
            finisher.add_done_callback(functools.partial(self._finished, lease))
        return answer

    def _claim_lost_before_sending(self, name: str) -> Refused:
        return self._refuse_key(
            name,
            "key_in_use",
            "in_use",
            409,
            "a repeat of this request took its Idempotency-Key over while it ran (its claim "
            "lapsed); nothing was sent here: retry to get that one's result",
            1,
        )

    def _finished(self, lease: _Lease, finisher: "asyncio.Task[None]") -> None:
        del self.finishing[finisher]
        if finisher.cancelled():
            # cut_running (shutdown): the claim says the data left; it lapses into "in doubt".
            self._leases.discard(lease)
            self.key_event(lease.relay_name, "background_cut")

    def _may_finish(self, name: str, envelope: Envelope, context: DeliveryContext) -> bool:
        """Whether a keyed delivery cut by its deadline goes on in the background: only when its
        data may have left (otherwise a retry may simply send), never at shutdown, and within
        `finish_limit`."""
        if self._shutting_down or not any(context.may_have(r) for r in envelope.recipients):
            return False
        if len(self.finishing) >= self.store.settings.finish_limit:
            self.key_event(name, "background_full")
            return False
        self.key_event(name, "background_started")
        return True

    async def _finish(
        self,
        delivery: Delivery,
        task: "asyncio.Task[list[RecipientResult]]",
        lease: _Lease,
        cut: Answer,
        started: float,
    ) -> None:
        """Wait (at most finish_timeout) for the next hop's reply of a delivery cut by its deadline
        after its data left, and store the true outcome for repeats (they get 409 until then)."""
        name, envelope = delivery.relay_name, delivery.envelope
        try:
            async with asyncio.timeout(self.store.settings.finish_timeout):
                results = await task
            check_results(name, envelope, results)
        except Exception:
            if not task.done():
                task.cancel()
            logger.exception("a delivery finishing after its deadline failed; its deadline answer is stored")
            self.key_event(name, "background_cut")
            await self._settle(lease, cut)
            return
        seconds = time.perf_counter() - started
        result = DeliveryResult(
            relay=name, message_id=envelope.message_id, elapsed_ms=round(seconds * 1000, 3), recipients=results
        )
        logger.info(
            "delivery finished after its deadline: %s in %.3f s; the result is stored for repeats",
            result.status,
            seconds,
            extra={"event": "finished_in_background", "relay": name, "message_id": envelope.message_id},
        )
        self.key_event(name, "background_stored")
        await self._settle(lease, self._answer(delivery, result))

    def _answer(self, delivery: Delivery, result: DeliveryResult) -> Answer:
        outcome = result.status
        status = HTTP_STATUS[outcome]
        headers: dict[str, str] = {}
        if delivery.reply_header or delivery.idempotency_key is not None or delivery.retry_whole_envelope:
            summary = summary_reply(result)
            if outcome == "partial" and delivery.retry_whole_envelope:
                # Mail systems prefer a duplicate to a loss: say "try again" for the whole
                # envelope (the JSON body still has every outcome).
                status = 503
                summary = replies.partial_delivery(result.recipients, summary)
            headers["X-Smtp-Reply"] = format_smtp_reply(summary)
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


def _wake(waiter: "asyncio.Future[None]", _: object) -> None:
    if not waiter.done():
        waiter.set_result(None)


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
