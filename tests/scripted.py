"""A relay with scripted outcomes, loaded through the real `custom` factory path.

Options: `replies`, a mapping recipient -> "CODE text" (others get 250);
`command`, the command the scripted replies answered (default RCPT);
`misbehave`: "raise" or "drop_one" to break the relay contract on purpose;
`delay`: seconds each delivery takes (for limits and deadlines);
`stall_after_data`: seconds to wait after telling the context the data went out
(a next hop that took the message and never answered).
"""

import asyncio
from typing import Any

from relays.base import DeliveryContext
from schemas.delivery import Envelope, RecipientResult
from schemas.reply import Reply


class ScriptedRelay:
    def __init__(self, options: dict[str, Any]) -> None:
        self.replies: dict[str, str] = dict(options.get("replies", {}))
        self.command: str = options.get("command", "RCPT")
        self.misbehave: str | None = options.get("misbehave")
        self.delay: float = float(options.get("delay", 0))
        self.stall_after_data: float = float(options.get("stall_after_data", 0))
        self.delivered: list[Envelope] = []
        self.closed = False

    async def deliver(self, envelope: Envelope, context: DeliveryContext) -> list[RecipientResult]:
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.misbehave == "raise":
            raise RuntimeError("scripted failure")
        self.delivered.append(envelope)
        if self.stall_after_data:
            await context.sending(envelope.recipients)
            await asyncio.sleep(self.stall_after_data)
        results = []
        for rcpt in envelope.recipients:
            code, _, text = self.replies.get(rcpt, "250 2.0.0 Ok: queued").partition(" ")
            command = "[SEND_DATA]" if code.startswith("2") else self.command
            results.append(
                RecipientResult(recipient=rcpt, reply=Reply.parse(int(code), text, command), host="sink.test:25")
            )
        return results[1:] if self.misbehave == "drop_one" else results

    async def aclose(self) -> None:
        self.closed = True


def factory(options: dict[str, Any]) -> ScriptedRelay:
    return ScriptedRelay(options)


class OneArgumentRelay:
    """A relay written for the first contract, `deliver(envelope)`, with no context (and, as some
    had, an optional argument of its own that a context must not be passed to)."""

    def __init__(self, options: dict[str, Any]) -> None:
        self.delay: float = float(options.get("delay", 0))

    async def deliver(self, envelope: Envelope, delay: float | None = None) -> list[RecipientResult]:
        await asyncio.sleep(self.delay if delay is None else delay)
        reply = Reply.parse(250, "2.0.0 Ok", "[SEND_DATA]")
        return [RecipientResult(recipient=r, reply=reply) for r in envelope.recipients]

    async def aclose(self) -> None:
        pass


def one_argument_factory(options: dict[str, Any]) -> OneArgumentRelay:
    return OneArgumentRelay(options)


def not_a_relay(options: dict[str, Any]) -> object:
    return object()


def failing_factory(options: dict[str, Any]) -> ScriptedRelay:
    raise ValueError("bad options for the scripted relay")


NOT_CALLABLE = 42
