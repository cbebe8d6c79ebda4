"""Everything a `custom` relay needs, from one module.

A custom relay is any object with two coroutine methods (see `Relay`):

    from relays.plugin import DeliveryContext, Envelope, RecipientResult, Reply

    class MyRelay:
        async def deliver(self, envelope: Envelope, context: DeliveryContext) -> list[RecipientResult]:
            ...  # hand the message over; right before, await context.sending(envelope.recipients)
        async def aclose(self) -> None: ...

    def factory(options: dict) -> MyRelay:  # relay.<name>.factory: "package.module:factory"
        return MyRelay()
"""

from relays.base import DeliveryContext, Relay
from schemas.delivery import Envelope, RecipientResult
from schemas.reply import Reply

__all__ = ["DeliveryContext", "Envelope", "RecipientResult", "Relay", "Reply"]
