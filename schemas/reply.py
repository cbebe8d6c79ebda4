"""The SMTP-style reply every outcome carries."""

import re
from collections.abc import Mapping
from typing import Final, Literal, Self, get_args

from pydantic import BaseModel, ConfigDict, Field, field_validator

#: The SMTP and LMTP commands whose reply (or failure) can end a delivery attempt.
SmtpCommand = Literal["EHLO", "HELO", "LHLO", "STARTTLS", "AUTH", "MAIL", "RCPT", "DATA"]
#: The steps mailrelay names in `Reply.command` when a reply answered no single command.
Step = Literal[
    "[DEADLINE]",
    "[ROUTE]",
    "[DNS]",
    "[CONNECT]",
    "[BANNER]",
    "[SEND_DATA]",
    "[HTTP]",
    "[PIPE]",
    "[MAILDROP]",
    "[DOVECOT]",
]
#: Every `command` a reply from mailrelay's own relays carries: the one definition that
#: relays/replies.py, the relays (typed with it) and the OpenAPI description follow.
Command = Literal[SmtpCommand, Step]

#: What each step covers, for the API's description of `command`.
STEP_MEANINGS: Final[Mapping[Step, str]] = {
    "[DEADLINE]": "the service's delivery deadline passed first",
    "[ROUTE]": "the recipient has nowhere to go (no domain, or only internal addresses, which mx refuses by default)",
    "[DNS]": "looking up the domain's mail hosts and their addresses",
    "[CONNECT]": "connecting to the next hop (TLS included)",
    "[BANNER]": "the SMTP or LMTP server's greeting",
    "[SEND_DATA]": "sending the message data and waiting for the final reply",
    "[HTTP]": "the request to an http next hop",
    "[PIPE]": "running the pipe relay's command",
    "[MAILDROP]": "running maildrop",
    "[DOVECOT]": "running dovecot-lda",
}

COMMAND_DESCRIPTION: Final = (
    "what this reply answered: an SMTP command ("
    + ", ".join(get_args(SmtpCommand))
    + ") or a step of the delivery that mailrelay names: "
    + "; ".join(f"{step} {meaning}" for step, meaning in STEP_MEANINGS.items())
    + ". A result carried from an http next hop keeps the command that hop reported."
)

#: Most characters of reply text a result carries (and so `X-Smtp-Reply`); longer text is cut
#: there and ends with TRUNCATED. The readers bound a reply at 64 KiB; this keeps results small.
MAX_TEXT = 1000
TRUNCATED: Final = " [truncated]"

_ESCAPED_ONLY = re.compile(r"[^\ud800-\udc7f\udd00-\udfff]*", re.DOTALL)
_ENHANCED = re.compile(r"([245])\.(\d{1,3})\.(\d{1,3})(?=\s|$)")


class Reply(BaseModel):
    """A reply as the next hop sent it, or as mailrelay synthesised it.

    `code` decides the outcome class (2xx delivered, 4xx transient, 5xx
    permanent); `enhanced_status` is the RFC 3463 code read off the front of
    `message`, which is kept exactly as sent; `command` is what it answered.
    """

    model_config = ConfigDict(frozen=True)

    code: int = Field(ge=200, le=599, description="3-digit SMTP reply code", examples=[250])
    enhanced_status: str | None = Field(
        default=None,
        description="RFC 3463 enhanced status code, when the text starts with one",
        examples=["2.0.0"],
    )
    message: str = Field(
        description=f"reply text as sent by the next hop; text longer than {MAX_TEXT} characters is cut "
        f"there and ends with {TRUNCATED.strip()!r}",
        examples=["2.0.0 Ok: queued as 4F1C"],
    )
    command: str | None = Field(
        default=None,
        description=COMMAND_DESCRIPTION,
        examples=["[SEND_DATA]"],
    )

    @field_validator("code")
    @classmethod
    def _final_class(cls, code: int) -> int:
        # An outcome is final: 1xx/3xx replies are steps inside a session.
        if code // 100 not in (2, 4, 5):
            raise ValueError("a final reply code is 2xx, 4xx or 5xx")
        return code

    @field_validator("message", "command")
    @classmethod
    def _valid_text(cls, text: str | None) -> str | None:
        # Servers send any bytes; aiosmtplib keeps undecodable ones as lone
        # surrogates, which no JSON encoder takes. Make them U+FFFD.
        if text is None:
            return text
        if len(text) > MAX_TEXT:  # a reply can be 64 KiB: results and headers carry at most this
            text = text[:MAX_TEXT] + TRUNCATED
        if text.isascii():
            return text
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            return text.encode("utf-8", "surrogateescape" if _ESCAPED_ONLY.fullmatch(text) else "surrogatepass").decode(
                "utf-8", "replace"
            )
        return text

    @classmethod
    def parse(cls, code: int, message: str, command: str | None = None) -> Self:
        """Build a reply, reading an enhanced status code off the front of `message`.

        The enhanced code only counts when its class matches the reply code's
        first digit, as RFC 3463 requires.
        """
        match = _ENHANCED.match(message)
        enhanced = match.group(0) if match and match.group(1) == str(code)[0] else None
        return cls(code=code, enhanced_status=enhanced, message=message, command=command)

    @property
    def is_success(self) -> bool:
        return self.code < 400

    @property
    def is_transient(self) -> bool:
        return 400 <= self.code < 500
