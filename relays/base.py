"""The relay interface and the error tree relays use internally."""

import asyncio
import inspect
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Protocol, runtime_checkable

from typing_extensions import TypeIs

from schemas.delivery import Envelope, RecipientResult
from schemas.reply import Reply


class DeliveryContext:
    """What the service tells a relay about one delivery, and what the relay tells it back.

    `deadline` is the event loop time (`loop.time()`) at which the service
    cancels `deliver()` and answers every recipient with a transient failure.
    Before that, a relay awaits `sending(recipients)` right before the next
    hop could act on the message for those recipients (the final "." of the
    SMTP data written, a delivery agent started, an HTTP request sent): if the
    deadline then cuts the delivery off, those recipients are answered
    `possibly_delivered`, so the client knows a retry may send a second copy.
    A relay that cannot await there may call `data_sent(recipients)` instead.
    Tasks the relay starts may share the context; it is used from the event
    loop's thread only.
    """

    __slots__ = ("_before_sending", "_gate", "_sent", "deadline")

    def __init__(self, deadline: float, before_sending: Callable[[], Awaitable[None]] | None = None) -> None:
        self.deadline = deadline
        self._sent: set[str] = set()
        #: The service's own step before any data leaves (an idempotency claim records the
        #: progress); awaited once, by the first `sending`. It raises only CancelledError.
        self._before_sending = before_sending
        #: While that step runs, and after: done when it passed, cancelled when it stopped the
        #: delivery. Every `sending` waits for it, so no data leaves before the record, or after a stop.
        self._gate: asyncio.Future[None] | None = None

    async def sending(self, recipients: Iterable[str]) -> None:
        """The data is about to leave for these recipients: await this, then send.

        The service first records that durably where it must (an idempotency
        key's claim, so that a retry after a crash cannot send a second copy),
        then the recipients count as `data_sent`. It raises only CancelledError, when the
        service stops the delivery before anything leaves (its idempotency claim was lost and
        a repeat took it over): handle it as a deadline cut at that point, sending nothing.
        Concurrent callers (recipients or hosts sent to at once) all wait for that record.
        """
        if self._gate is not None or self._before_sending is not None:
            await self._before()
        self.data_sent(recipients)

    async def _before(self) -> None:
        # Relays send to several recipients or hosts at once (pipe, dovecot, mx): a second
        # `sending` during the first one's store round trip went ahead and sent, and when the
        # step then stopped the delivery, the service answered that nothing was sent.
        gate = self._gate
        if gate is None:
            hook, self._before_sending = self._before_sending, None
            assert hook is not None  # noqa: S101 - the caller checked
            gate = self._gate = asyncio.get_running_loop().create_future()
            try:
                await hook()
            except BaseException:
                gate.cancel()
                raise
            gate.set_result(None)
        elif not gate.done():
            await asyncio.shield(gate)  # a caller's own cancellation leaves the others' gate alone
        elif gate.cancelled():
            raise asyncio.CancelledError

    def remaining(self) -> float:
        """Seconds until the deadline (negative once past it)."""
        return self.deadline - asyncio.get_running_loop().time()

    def data_sent(self, recipients: Iterable[str]) -> None:
        """The next hop may now deliver to these recipients, whatever happens next (prefer `sending`)."""
        self._sent.update(recipients)

    def may_have(self, recipient: str) -> bool:
        """True once `data_sent` named `recipient`."""
        return recipient in self._sent


@runtime_checkable
class Relay(Protocol):
    """Delivers envelopes to one configured destination.

    `deliver()` returns exactly one RecipientResult per recipient of the
    envelope, in the same order, and never raises for a delivery outcome
    (refusals, timeouts, unreachable hosts are results). An exception out of
    `deliver()` is a bug and becomes a 500. The service cancels `deliver()`
    at `context.deadline`; a relay tells it through `await context.sending()`
    which recipients the next hop may already have (see DeliveryContext).
    `aclose()` releases connections, processes and clients; it is called
    once, at shutdown.
    """

    async def deliver(self, envelope: Envelope, context: DeliveryContext) -> list[RecipientResult]: ...

    async def aclose(self) -> None: ...


def is_relay(obj: object) -> TypeIs[Relay]:
    """True when `obj` has the Relay methods, and both are coroutine functions."""
    return (
        isinstance(obj, Relay) and inspect.iscoroutinefunction(obj.deliver) and inspect.iscoroutinefunction(obj.aclose)
    )


class RelayError(Exception):
    """A delivery attempt failed with `reply`; build it with `from_reply`."""

    def __init__(self, reply: Reply) -> None:
        super().__init__(f"{reply.code} {reply.message}")
        self.reply = reply

    @classmethod
    def from_reply(cls, reply: Reply) -> "RelayError":
        """The error class that matches the reply code, so class and code never disagree."""
        return TransientRelayError(reply) if reply.is_transient else PermanentRelayError(reply)


class TransientRelayError(RelayError):
    """4xx: the next hop may accept later."""


class PermanentRelayError(RelayError):
    """5xx: retrying will not help."""


def same_result(envelope: Envelope, reply: Reply, host: str | None = None) -> list[RecipientResult]:
    """One identical result per recipient: for outcomes that concern the whole envelope."""
    return [RecipientResult(recipient=r, reply=reply, host=host) for r in envelope.recipients]


class RelayContractError(RuntimeError):
    """A relay broke the one-result-per-recipient contract (a bug in that relay)."""


def check_results(relay_name: str, envelope: Envelope, results: Sequence[RecipientResult]) -> None:
    """Refuse results that do not answer each recipient once, in order."""
    # Counts only: recipient addresses do not belong in error logs.
    if len(results) != len(envelope.recipients):
        raise RelayContractError(
            f"relay {relay_name!r} returned {len(results)} results for {len(envelope.recipients)} recipients"
        )
    if any(r.recipient != rcpt for r, rcpt in zip(results, envelope.recipients, strict=True)):
        raise RelayContractError(f"relay {relay_name!r} returned results out of recipient order")
