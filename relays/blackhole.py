"""`blackhole`: accepts every message and discards it."""

from relays import replies
from relays.base import DeliveryContext, same_result
from relays.ids import unique_hex
from schemas.delivery import Envelope, RecipientResult
from schemas.relay_options import BlackholeOptions


class BlackholeRelay:
    """Delivers every recipient with `250 2.0.0 Message Delivered; <id>`, one id per message."""

    def __init__(self, name: str, options: BlackholeOptions, context: object = None) -> None:
        self.name = name

    async def deliver(self, envelope: Envelope, context: DeliveryContext) -> list[RecipientResult]:
        return same_result(envelope, replies.blackholed(unique_hex()))

    async def aclose(self) -> None:
        return None
