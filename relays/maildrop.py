"""`maildrop`: local delivery with courier maildrop, `maildrop -f <sender> [extra args]`."""

from relays._process import ProcessRunner, error_text, exit_reply
from relays.base import DeliveryContext, RelayError
from relays.context import RelayContext
from schemas.delivery import Envelope, RecipientResult
from schemas.relay_options import MaildropOptions
from schemas.reply import Step

STEP: Step = "[MAILDROP]"
_PREFIX = "maildrop: "


class MaildropRelay:
    """One run per message: maildrop's filter decides where it goes for every recipient.
    Exit 75 is transient, any other failure permanent."""

    def __init__(self, name: str, options: MaildropOptions, context: RelayContext) -> None:
        self.options = options
        self.runner = ProcessRunner(options, name, STEP)

    async def deliver(self, envelope: Envelope, context: DeliveryContext) -> list[RecipientResult]:
        args = [self.options.path, "-f", envelope.sender or "MAILER-DAEMON", *self.options.extra_args]
        try:
            exit = await self.runner.run(args, envelope.message, envelope.recipients, context)
        except RelayError as exc:
            reply = exc.reply
        else:
            text = error_text(exit).removeprefix(_PREFIX)
            reply = exit_reply(exit, STEP, text, transient=frozenset({75}), what="maildrop")
        return [RecipientResult(recipient=r, reply=reply) for r in envelope.recipients]

    async def aclose(self) -> None:
        return None
