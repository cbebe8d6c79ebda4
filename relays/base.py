"""The relay interface and the error tree relays use internally."""

import inspect
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

from typing_extensions import TypeIs

from schemas.delivery import Envelope, RecipientResult
from schemas.reply import Reply


@runtime_checkable
class Relay(Protocol):
    """Delivers envelopes to one configured destination.

    `deliver()` returns exactly one RecipientResult per recipient of the
    envelope, in the same order, and never raises for a delivery outcome
    (refusals, timeouts, unreachable hosts are results). An exception out of
    `deliver()` is a bug and becomes a 500. `aclose()` releases connections,
    processes and clients; it is called once, at shutdown.
    """

    async def deliver(self, envelope: Envelope) -> list[RecipientResult]: ...

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
