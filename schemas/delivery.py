"""Delivery request, envelope and per-recipient result models."""

import base64
import binascii
import functools
import ipaddress
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Annotated, Any, Literal, Self

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    create_model,
    model_validator,
)

from schemas.reply import Reply

#: RFC 5321 4.5.3.1.3: a path is at most 256 octets, angle brackets included.
MAX_ADDRESS_OCTETS = 254

#: Bidirectional overrides and isolates (they make an address display as another,
#: "Trojan Source") and the byte-order mark; other format characters such as the
#: zero-width joiners are legitimate in internationalised names.
_INVISIBLE = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069\ufeff")

RecipientStatus = Literal["delivered", "transient_failure", "permanent_failure"]
DeliveryStatus = Literal["delivered", "partial", "transient_failure", "permanent_failure"]


# `\s` in a str pattern is exactly str.isspace(); one regex scan, not a generator per character.
_SPACE = re.compile(r"\s")
_SPACE_OTHER_THAN_BLANK = re.compile(r"[^\S ]")
_DOMAIN_FORBIDDEN = re.compile(r'[\s@"]')


def check_address(value: str, *, allow_empty: bool = False) -> str:
    """Return `value` if it is safe to use as an SMTP envelope address.

    This is a safety check, not a full RFC 5321 parser: it refuses what could
    inject a command or header (control characters, angle brackets), stray
    whitespace outside a quoted local part, and malformed quoting or `@`s.
    Internationalised (UTF-8) addresses are accepted; whether the next hop
    takes them is the relay's business. Raises ValueError with the reason.
    """
    if not value:
        if allow_empty:
            return value
        raise ValueError("address must not be empty")
    try:
        octets = len(value.encode("utf-8"))
    except UnicodeEncodeError:
        raise ValueError("address is not valid Unicode (lone surrogate)") from None
    if octets > MAX_ADDRESS_OCTETS:
        raise ValueError(f"address is longer than {MAX_ADDRESS_OCTETS} octets")
    if not value.isprintable():  # fast path: printable text has no control or format characters
        for char in value:
            if unicodedata.category(char) == "Cc" or char in _INVISIBLE:
                raise ValueError(f"address contains a control or invisible formatting character ({char!r})")
    if "<" in value or ">" in value:
        raise ValueError("address contains angle brackets; give the bare address")

    if value.startswith('"'):
        end = _closing_quote(value)
        quoted, rest = value[1:end], value[end + 1 :]
        if _SPACE_OTHER_THAN_BLANK.search(quoted):
            raise ValueError("quoted local part contains whitespace other than a space")
        if rest and not rest.startswith("@"):
            raise ValueError("unexpected characters after the quoted local part")
        local, domain = None, rest[1:] if rest else None
    else:
        if _SPACE.search(value):
            raise ValueError("address contains whitespace outside a quoted local part")
        if value.count("@") > 1:
            raise ValueError("address contains more than one '@' outside a quoted local part")
        if '"' in value:
            raise ValueError("address contains a '\"' outside a quoted local part")
        local, at, rest_domain = value.partition("@")
        domain = rest_domain if at else None

    if local == "":
        raise ValueError("address has an empty local part")
    if domain is not None:
        if not domain:
            raise ValueError("address has an empty domain after '@'")
        if _DOMAIN_FORBIDDEN.search(domain):
            raise ValueError("address domain contains whitespace, '@' or '\"'")
    return value


def domain_of(address: str) -> str | None:
    """The domain of a validated address, lower-cased; None when it has none (`postmaster`)."""
    start = _closing_quote(address) + 1 if address.startswith('"') else 0
    at = address.rfind("@", start)
    return address[at + 1 :].lower() if at >= 0 else None


def _closing_quote(value: str) -> int:
    """Index of the quote closing a quoted local part that starts at 0."""
    i = 1
    while i < len(value):
        if value[i] == "\\":
            i += 2
            continue
        if value[i] == '"':
            return i
        i += 1
    raise ValueError("address has an unterminated quoted local part")


def _check_sender(value: str) -> str:
    return check_address(value, allow_empty=True)


def _check_recipient(value: str) -> str:
    return check_address(value)


def _check_ip(value: str) -> str:
    if "%" in value:  # an IPv6 zone may hold anything: not a client's public address anyway
        raise ValueError("an IP address without a zone (%...)")
    return str(ipaddress.ip_address(value))


#: For the OpenAPI document only (check_address is the rule): no control characters, angle brackets
#: or whitespace outside a quoted local part, at most 254 octets.
_ADDRESS_PATTERN = r'^(?:"[^"\x00-\x1f\x7f-\x9f]*"|[^\s"<>@\x00-\x1f\x7f-\x9f]+)(?:@[^\s"<>@\x00-\x1f\x7f-\x9f]+)?$'
Sender = Annotated[
    str,
    AfterValidator(_check_sender),
    Field(
        description='envelope sender (MAIL FROM); "" is the null reverse-path used by bounces',
        examples=["alice@example.com"],
        json_schema_extra={"maxLength": MAX_ADDRESS_OCTETS, "pattern": f"(?:{_ADDRESS_PATTERN})|^$"},
    ),
]
Recipient = Annotated[
    str,
    AfterValidator(_check_recipient),
    Field(
        examples=["bob@example.net"],
        json_schema_extra={"minLength": 1, "maxLength": MAX_ADDRESS_OCTETS, "pattern": _ADDRESS_PATTERN},
    ),
]
#: Characters refused in client text: controls (Cc), format characters (Cf: the soft hyphen, zero-width
#: and bidirectional marks), which display as nothing, and the line and paragraph separators (Zl, Zp),
#: which break a line for some readers; all reach pipe arguments and logs.
_NOT_CLIENT_TEXT = frozenset(("Cc", "Cf", "Zl", "Zp"))


def _check_client_text(value: str) -> str:
    if not value.isprintable():  # fast path: printable text has none of them
        for char in value:
            if unicodedata.category(char) in _NOT_CLIENT_TEXT:
                raise ValueError(
                    f"contains a control, line separator or invisible formatting character (U+{ord(char):04X})"
                )
    return value


#: Free text that ends up in process arguments and logs: one line, bounded. The pattern is for the
#: OpenAPI document (the common cases); _check_client_text is the rule.
ClientText = Annotated[
    str,
    Field(max_length=255, pattern=r"^[^\x00-\x1f\x7f-\x9f\u00ad\u200b-\u200f\u2028-\u202e\u2060-\u206f\ufeff]*$"),
    AfterValidator(_check_client_text),
]


class ClientInfo(BaseModel):
    """Facts about the original client, used by `pipe` macros and logs only."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    ip: Annotated[str, AfterValidator(_check_ip)] | None = Field(default=None, examples=["192.0.2.1"])
    host: ClientText | None = Field(default=None, examples=["client.example.com"])
    ehlo: ClientText | None = Field(default=None, examples=["client.example.com"])
    protocol: ClientText | None = Field(default=None, examples=["ESMTPA"])
    auth: ClientText | None = Field(default=None, examples=["alice"])


class DeliveryRequest(BaseModel):
    """The JSON request form of `POST /relays/{name}/deliver`."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "sender": "alice@example.com",
                    "recipients": ["bob@example.net", "carol@example.org"],
                    "message": "From: alice@example.com\r\nSubject: hi\r\n\r\nHello\r\n",
                }
            ]
        },
    )

    sender: Sender
    recipients: list[Recipient] = Field(min_length=1, description="one or more envelope recipients (RCPT TO)")
    message: str | None = Field(default=None, description="the raw RFC 5322 message as text; sent as UTF-8")
    message_base64: str | None = Field(
        default=None,
        description="the raw message, base64-encoded, for 8-bit or binary content (instead of `message`)",
    )
    client: ClientInfo | None = None
    require_tls: bool = Field(
        default=False,
        description="deliver only over hops that are encrypted and whose receiver was authenticated (a CA-verified "
        "certificate for its name, MTA-STS or DANE): RFC 8689's REQUIRETLS, made synchronous. A hop that cannot be "
        "secured so is not used; when none can, the recipients fail with 550 5.7.10 and nothing is sent",
    )

    _raw: bytes = PrivateAttr(default=b"")

    @model_validator(mode="after")
    def _decode_message(self) -> Self:
        if (self.message is None) == (self.message_base64 is None):
            raise ValueError("give exactly one of `message` and `message_base64`")
        if self.message is not None:
            try:
                raw = self.message.encode("utf-8")
            except UnicodeEncodeError:
                raise ValueError("`message` is not valid Unicode (lone surrogate)") from None
        else:
            assert self.message_base64 is not None  # noqa: S101 - narrowed by the check above
            raw = decode_base64(self.message_base64, what="`message_base64`")
        if not raw:
            raise ValueError("the message is empty")
        self._raw = raw
        return self

    @property
    def raw_message(self) -> bytes:
        return self._raw


@functools.lru_cache(maxsize=16)
def request_model(max_recipients: int) -> type[DeliveryRequest]:
    """DeliveryRequest whose recipients are counted before any is validated: a list longer than
    `max_recipients` fails at its first extra item, not after every address was checked."""
    model = create_model(
        "DeliveryRequest",
        __base__=DeliveryRequest,
        recipients=(
            list[Recipient],
            Field(min_length=1, max_length=max_recipients, description="one or more envelope recipients (RCPT TO)"),
        ),
    )
    return model


def decode_base64(value: str, *, what: str) -> bytes:
    """Strict standard base64 (padding required, no stray characters)."""
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error):
        raise ValueError(f"{what} is not valid base64") from None


_HEADER_END = re.compile(rb"\r?\n\r?\n")
_MESSAGE_ID = re.compile(rb"^message-id[ \t]*:((?:[^\r\n]|\r?\n[ \t])*)", re.IGNORECASE | re.MULTILINE)


def find_message_id(message: bytes) -> str | None:
    """The Message-Id header's value, unfolded, or None when there is none."""
    end = _HEADER_END.search(message)
    match = _MESSAGE_ID.search(message, 0, end.start() if end else len(message))
    if not match:
        return None
    # One printable line of at most 998 characters (RFC 5322's line limit): it may become a
    # command argument (`pipe`'s {message_id}), where a NUL or a huge value would not do.
    text = match.group(1).decode("utf-8", "replace")
    if not text.isprintable():  # folded, or worse: the usual value needs no pass per character
        text = "".join(c for c in text if c.isprintable() or c.isspace())
    value = " ".join(text.split())[:998]
    return value or None


@dataclass(frozen=True)
class Envelope:
    """What a relay delivers: sender, recipients, the raw message, client facts.

    Built only from validated input (`DeliveryRequest` or the raw form), so
    relays may trust every address.
    """

    sender: str
    recipients: Sequence[str]
    message: bytes = field(repr=False)
    client: ClientInfo | None = None
    #: Only over encrypted hops whose receiver was authenticated (DeliveryRequest.require_tls).
    require_tls: bool = False

    @cached_property
    def message_id(self) -> str | None:
        return find_message_id(self.message)


def reply_status(code: int) -> RecipientStatus:
    """A recipient's status follows its reply code's class, so a 250 can never be a failure."""
    klass = code // 100
    if klass == 2:
        return "delivered"
    return "transient_failure" if klass == 4 else "permanent_failure"


def delivery_status(statuses: Iterable[RecipientStatus]) -> DeliveryStatus:
    """The whole delivery's status from its recipients' statuses."""
    seen = set(statuses)
    if seen == {"delivered"}:
        return "delivered"
    if "delivered" in seen:
        return "partial"
    return "transient_failure" if "transient_failure" in seen else "permanent_failure"


# `status` is a stored field, derived by a before-validator that overrides any value given: a
# computed field would be serialised last, and reordering it took a wrap serializer that cost
# more than the rest of the response: model_dump_json 4.8 -> 1.2 us for a one-recipient result
# (timeit in-process, 2026-11-24). Stored, it is also computed once, not per read.
_RESULT_CONFIG = ConfigDict(frozen=True, json_schema_serialization_defaults_required=True)


def _derived(schema: dict[str, Any]) -> None:
    """A derived field's schema: read-only, and without the placeholder default."""
    schema.pop("default", None)
    schema["readOnly"] = True


class HopSecurity(BaseModel):
    """How the message travelled to the next hop that answered for the recipient."""

    model_config = ConfigDict(frozen=True)

    encrypted: bool = Field(description="the hop used TLS (STARTTLS or implicit)")
    tls_version: str | None = Field(default=None, examples=["TLSv1.3"])
    cipher: str | None = Field(default=None, examples=["TLS_AES_256_GCM_SHA384"])
    authenticated: Literal["none", "ca", "mta-sts", "dane"] = Field(
        default="none",
        description="how the receiver was authenticated: `none` (no TLS, or TLS without a check), `ca` (its "
        "certificate verified by a CA for its name), `mta-sts` (by the domain's MTA-STS policy), `dane` (by "
        "DNSSEC-signed TLSA records)",
    )


class RecipientResult(BaseModel):
    """The outcome for one recipient: the reply that decided it, and from where."""

    model_config = _RESULT_CONFIG

    recipient: str
    status: RecipientStatus = Field(
        default="delivered",  # never used: always derived from `reply`
        description="follows the reply code's class: 2xx delivered, 4xx transient_failure, 5xx permanent_failure",
        json_schema_extra=_derived,
    )
    reply: Reply
    host: str | None = Field(
        default=None,
        description="the next hop that gave the reply, as host:port",
        examples=["mx1.example.net:25"],
    )
    possibly_delivered: bool = Field(
        default=False,
        description="a transient failure after the whole message went out (the final reply never came, or the "
        "delivery deadline struck): the next hop may have delivered it, so a retry may duplicate it",
    )
    security: HopSecurity | None = Field(
        default=None,
        description="how the message travelled to `host` (SMTP and LMTP relays); null when no connection was made",
    )

    @model_validator(mode="before")
    @classmethod
    def _derive_status(cls, data: Any) -> Any:
        if isinstance(data, dict):
            status = _status_of(data)
            if status is not None:
                data = {**data, "status": status}
        return data


class DeliveryResult(BaseModel):
    """The response body of a delivery: one entry per recipient, in request order."""

    model_config = _RESULT_CONFIG

    relay: str = Field(examples=["outbound"])
    status: DeliveryStatus = Field(
        default="delivered",  # never used: always derived from `recipients`
        description="delivered (all), partial (some), transient_failure (none, one or more transient), "
        "permanent_failure (all permanent)",
        json_schema_extra=_derived,
    )
    message_id: str | None = Field(
        description="the message's Message-Id header, if it has one",
        examples=["<abc@example.com>"],
    )
    elapsed_ms: float = Field(description="time the relay took, in milliseconds", examples=[41.7])
    recipients: list[RecipientResult]

    @model_validator(mode="before")
    @classmethod
    def _derive_status(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(recipients := data.get("recipients"), list):
            statuses = [_status_of(r) for r in recipients]
            if None not in statuses:
                data = {**data, "status": delivery_status(s for s in statuses if s is not None)}
        return data


def _status_of(result: object) -> RecipientStatus | None:
    """A recipient result's status, from the model or from its input data; None if it has no valid code
    (validation then refuses the data)."""
    if isinstance(result, RecipientResult):
        return result.status
    reply = result.get("reply") if isinstance(result, dict) else None
    code = reply.code if isinstance(reply, Reply) else reply.get("code") if isinstance(reply, dict) else None
    try:
        return reply_status(int(code))  # type: ignore[arg-type]  # whatever came: int() decides
    except (TypeError, ValueError):
        return None
