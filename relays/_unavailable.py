"""Stand-in for relay types whose delivery is not built yet: validated, never crashing."""

from relays.base import same_result
from schemas.delivery import Envelope, RecipientResult
from schemas.reply import Reply


class UnavailableRelay:
    """Answers every recipient with a permanent 554 saying the type is not available yet."""

    def __init__(self, name: str, options: object, context: object = None) -> None:
        self.name = name
        self.type = str(getattr(options, "type", "unknown"))

    async def deliver(self, envelope: Envelope) -> list[RecipientResult]:
        text = f"5.3.3 relay type {self.type!r} is not available in this version of mailrelay"
        return same_result(
            envelope,
            Reply(code=554, enhanced_status="5.3.3", message=text, command="[RELAY]"),
        )

    async def aclose(self) -> None:
        return None
