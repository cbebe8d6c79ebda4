"""`pipe`: the message on a command's standard input, once per recipient, like Postfix pipe(8)."""

import asyncio

from relays import replies
from relays._process import ProcessRunner, error_text, exit_reply
from relays.base import DeliveryContext, RelayError
from relays.context import RelayContext
from schemas.delivery import Envelope, RecipientResult
from schemas.relay_options import PipeOptions
from schemas.reply import Reply, Step

#: Postfix pipe(8) with sysexits.h: only EX_OSERR and EX_TEMPFAIL are worth retrying.
TRANSIENT_STATUSES = frozenset({71, 75})
STEP: Step = "[PIPE]"


class PipeRelay:
    """Runs `args` with macros filled in, each macro value exactly one argument."""

    def __init__(self, name: str, options: PipeOptions, context: RelayContext) -> None:
        self.name = name
        self.options = options
        self.runner = ProcessRunner(options, name, STEP)

    async def deliver(self, envelope: Envelope, context: DeliveryContext) -> list[RecipientResult]:
        # One run per recipient, concurrently; the runner bounds how many at once.
        outcomes = await asyncio.gather(*(self._deliver_one(envelope, rcpt, context) for rcpt in envelope.recipients))
        return [
            RecipientResult(recipient=r, reply=reply) for r, reply in zip(envelope.recipients, outcomes, strict=True)
        ]

    async def _deliver_one(self, envelope: Envelope, recipient: str, context: DeliveryContext) -> Reply:
        values = macro_values(envelope, recipient)
        args = [arg.format_map(values) for arg in self.options.args]
        if refusal := _option_injection(self.options.args, args):
            return refusal
        try:
            exit = await self.runner.run(args, envelope.message, [recipient], context)
        except RelayError as exc:
            return exc.reply
        return exit_reply(
            exit,
            STEP,
            error_text(exit, self.options.error_pattern),
            transient=TRANSIENT_STATUSES,
            what=args[0],
            text_decides=True,
        )

    async def aclose(self) -> None:
        return None


def macro_values(envelope: Envelope, recipient: str) -> dict[str, str]:
    client = envelope.client
    return {
        "sender": envelope.sender,
        "recipient": recipient,
        "message_id": envelope.message_id or "",
        "client_ip": (client.ip if client else None) or "",
        "client_host": (client.host if client else None) or "",
        "client_ehlo": (client.ehlo if client else None) or "",
        "client_protocol": (client.protocol if client else None) or "",
        "client_auth": (client.auth if client else None) or "",
    }


def _option_injection(templates: list[str], args: list[str]) -> Reply | None:
    """A value from the request must not become an option of the command: refuse an
    argument that starts with "-" only because of a macro, unless a "--" came before it
    (exec already keeps every value one argument and away from any shell)."""
    for template, arg in zip(templates[1:], args[1:], strict=True):
        if template == "--":
            return None
        if arg.startswith("-") and not template.startswith("-"):
            return replies.argument_is_an_option(STEP, arg)
    return None
