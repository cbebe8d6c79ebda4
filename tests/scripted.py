"""A relay with scripted outcomes, loaded through the real `custom` factory path.

Options: `replies`, a mapping recipient -> "CODE text" (others get 250);
`command`, the command the scripted replies answered (default RCPT);
`misbehave`: "raise" or "drop_one" to break the relay contract on purpose;
`delay`: seconds each delivery takes (for limits and deadlines).
"""

import asyncio
from typing import Any

from schemas.delivery import Envelope, RecipientResult
from schemas.reply import Reply


class ScriptedRelay:
    def __init__(self, options: dict[str, Any]) -> None:
        self.replies: dict[str, str] = dict(options.get("replies", {}))
        self.command: str = options.get("command", "RCPT")
        self.misbehave: str | None = options.get("misbehave")
        self.delay: float = float(options.get("delay", 0))
        self.delivered: list[Envelope] = []
        self.closed = False

    async def deliver(self, envelope: Envelope) -> list[RecipientResult]:
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.misbehave == "raise":
            raise RuntimeError("scripted failure")
        self.delivered.append(envelope)
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


def not_a_relay(options: dict[str, Any]) -> object:
    return object()


def failing_factory(options: dict[str, Any]) -> ScriptedRelay:
    raise ValueError("bad options for the scripted relay")


NOT_CALLABLE = 42
