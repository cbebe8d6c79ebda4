"""`pipe`: the message on a command's standard input, once per recipient, like Postfix pipe(8)."""

import asyncio

from relays._process import ProcessRunner, error_text, exit_reply
from relays.base import RelayError
from relays.context import RelayContext
from schemas.delivery import Envelope, RecipientResult
from schemas.relay_options import PipeOptions
from schemas.reply import Reply

#: Postfix pipe(8) with sysexits.h: only EX_OSERR and EX_TEMPFAIL are worth retrying.
TRANSIENT_STATUSES = frozenset({71, 75})
STEP = "[PIPE]"


class PipeRelay:
    """Runs `args` with macros filled in, each macro value exactly one argument."""

    def __init__(self, name: str, options: PipeOptions, context: RelayContext) -> None:
        self.name = name
        self.options = options
        self.runner = ProcessRunner(options, name, STEP)

    async def deliver(self, envelope: Envelope) -> list[RecipientResult]:
        # One run per recipient, concurrently; the runner bounds how many at once.
        replies = await asyncio.gather(*(self._deliver_one(envelope, rcpt) for rcpt in envelope.recipients))
        return [
            RecipientResult(recipient=r, reply=reply) for r, reply in zip(envelope.recipients, replies, strict=True)
        ]

    async def _deliver_one(self, envelope: Envelope, recipient: str) -> Reply:
        values = macro_values(envelope, recipient)
        args = [arg.format_map(values) for arg in self.options.args]
        if refusal := _option_injection(self.options.args, values):
            return refusal
        try:
            exit = await self.runner.run(args, envelope.message)
        except RelayError as exc:
            return exc.reply
        return exit_reply(
            exit, STEP, error_text(exit, self.options.error_pattern), transient=TRANSIENT_STATUSES, what=args[0]
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


def _option_injection(templates: list[str], values: dict[str, str]) -> Reply | None:
    """An address that starts with "-" must not become an option of the command: refuse it
    where a macro starts an argument and no "--" came before (exec already stops any shell)."""
    for position, template in enumerate(templates[1:], start=1):
        if "--" in templates[1:position]:
            return None
        for name, value in values.items():
            if template.startswith(f"{{{name}}}") and value.startswith("-"):
                return Reply(
                    code=553,
                    enhanced_status="5.1.3",
                    message=f"5.1.3 {{{name}}} starts with '-' and would be read as an option; "
                    'put "--" before it in the relay\'s args',
                    command=STEP,
                )
    return None
