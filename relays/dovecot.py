"""`dovecot`: local delivery with dovecot's LDA, `dovecot-lda -e -f <sender> -d <recipient>` per recipient."""

import asyncio
import os
import shutil

from relays._process import ProcessRunner, error_text, exit_reply
from relays.base import DeliveryContext, RelayError
from relays.context import RelayContext
from schemas.delivery import Envelope, RecipientResult
from schemas.relay_options import DovecotOptions
from schemas.reply import Reply, Step

STEP: Step = "[DOVECOT]"
#: Where Debian installs it, off $PATH.
DEBIAN_PATH = "/usr/lib/dovecot/dovecot-lda"


class DovecotRelay:
    """Exit 75 is transient, any other failure permanent (67 unknown user, 77 over quota).
    `-e` makes dovecot report a rejection to us instead of sending a bounce itself."""

    def __init__(self, name: str, options: DovecotOptions, context: RelayContext) -> None:
        self.options = options
        self.runner = ProcessRunner(options, name, STEP)
        self.path = find_lda(options.path)

    async def deliver(self, envelope: Envelope, context: DeliveryContext) -> list[RecipientResult]:
        replies = await asyncio.gather(*(self._deliver_one(envelope, rcpt, context) for rcpt in envelope.recipients))
        return [
            RecipientResult(recipient=r, reply=reply) for r, reply in zip(envelope.recipients, replies, strict=True)
        ]

    async def _deliver_one(self, envelope: Envelope, recipient: str, context: DeliveryContext) -> Reply:
        sender = envelope.sender or "MAILER-DAEMON"
        args = [self.path, "-e", *self.options.extra_args, "-f", sender, "-d", recipient]
        try:
            exit = await self.runner.run(args, envelope.message, [recipient], context)
        except RelayError as exc:
            return exc.reply
        return exit_reply(exit, STEP, error_text(exit), transient=frozenset({75}), what="dovecot-lda")

    async def aclose(self) -> None:
        return None


def find_lda(path: str) -> str:
    """`path` as configured; the bare default is looked up on $PATH, then at Debian's place."""
    if os.sep in path:
        return path
    return shutil.which(path) or (DEBIAN_PATH if path == "dovecot-lda" and os.access(DEBIAN_PATH, os.X_OK) else path)
