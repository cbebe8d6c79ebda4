"""Delivery request, envelope and per-recipient result models."""

import base64
import binascii
import functools
import ipaddress
import re
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from email.errors import HeaderParseError
from email.headerregistry import Address
from functools import cached_property
from typing import Annotated, Any, Literal, Self, cast

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    create_model,
    model_validator,
)
from pydantic_core import PydanticCustomError

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


# The compose form: a message built by the service from fields (app/compose.py builds it).

#: RFC 5322 2.1.1: a line is at most 998 characters; a header that fits on one line needs no folding.
MAX_LINE = 998
#: Headers the builder writes itself: a client's copy would contradict or duplicate them
#: (Bcc must never reach the message; Reply-To and Sender have their own meaning).
_STRUCTURAL = frozenset(
    (
        "from",
        "to",
        "cc",
        "bcc",
        "reply-to",
        "sender",
        "subject",
        "date",
        "orig-date",
        "message-id",
        "mime-version",
        "return-path",
    )
)
#: RFC 5322 3.6.8: printable ASCII except the colon.
_FIELD_NAME = re.compile(r"^[!-9;-~]{1,76}$")
#: RFC 2045 5.1: type/subtype, each an RFC 2045 token.
_MEDIA_TYPE = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+/[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
#: RFC 5322 msg-id: dot-atom-text "@" (dot-atom-text or a literal), without the angle brackets.
_CONTENT_ID = re.compile(r"^[!#-'*+\-/-9=?A-Z^-~.]+@[!#-'*+\-/-9=?A-Z^-~.\[\]]+$")


#: Line and paragraph separators: Python's email breaks lines at them too (str.splitlines).
_LINE_SEPARATORS = frozenset(("Zl", "Zp"))


def _check_line(value: str, *, tab: bool = True) -> str:
    """One header line's worth of text: no CR, LF, NUL or other control character (a TAB is folding
    whitespace in a header), no line or paragraph separator, and valid Unicode."""
    if not value.isprintable():  # fast path: printable text has none of them
        for char in value:
            category = unicodedata.category(char)
            if category == "Cc" and not (tab and char == "\t"):
                raise ValueError(f"contains a control character ({char!r}); CR, LF and NUL would inject headers")
            if category in _LINE_SEPARATORS:
                raise ValueError(f"contains a line or paragraph separator (U+{ord(char):04X})")
    _check_unicode(value)
    return value


def _check_unicode(value: str) -> str:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("is not valid Unicode (lone surrogate)") from None
    return value


def _check_body_text(value: str) -> str:
    if "\x00" in value:
        raise ValueError("contains a NUL character")
    return _check_unicode(value)


def _check_header_address(value: str) -> str:
    """An address for a header: safe for the envelope (check_address), with a domain, and one the
    RFC 5322 grammar reads back unchanged (a comment such as `a(b)@x` would be dropped)."""
    check_address(value)
    if domain_of(value) is None:
        raise ValueError("address has no domain; a message header needs local@domain")
    if value.isascii():
        try:
            parsed = Address(addr_spec=value).addr_spec
        except (HeaderParseError, ValueError, IndexError) as exc:
            raise ValueError(f"not an RFC 5322 address: {str(exc).rstrip(')')}") from None
        except Exception:  # the parser's own bugs (AttributeError on some quoted-pair inputs): not an address
            raise ValueError("not an RFC 5322 address") from None
        if parsed != value:
            raise ValueError(f"not an RFC 5322 address (it reads as {parsed!r})")
    return value


HeaderAddress = Annotated[
    str,
    AfterValidator(_check_header_address),
    Field(examples=["bob@example.net"], json_schema_extra={"maxLength": MAX_ADDRESS_OCTETS}),
]


def _mailbox_input(value: Any) -> Any:
    return {"address": value} if isinstance(value, str) else value


class Mailbox(BaseModel):
    """An address in a message header, with an optional display name. A plain string is the address alone."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    address: HeaderAddress
    name: Annotated[str, Field(max_length=255), AfterValidator(_check_line)] | None = Field(
        default=None, description="display name; non-ASCII is sent as RFC 2047 encoded words", examples=["Bob Smith"]
    )


MailboxInput = Annotated[Mailbox, BeforeValidator(_mailbox_input)]


def _as_list(value: Any) -> Any:
    return value if isinstance(value, list) else [value]


Mailboxes = Annotated[list[MailboxInput], BeforeValidator(_as_list)]


def _check_field_name(value: str) -> str:
    if not _FIELD_NAME.match(value):
        raise ValueError("a header name is 1 to 76 printable ASCII characters other than ':' and space")
    lower = value.lower()
    if lower in _STRUCTURAL or lower.startswith(("content-", "resent-")):
        raise ValueError(f"{value} is set by the service from the content's fields; it cannot be given as a header")
    return value


HeaderName = Annotated[str, AfterValidator(_check_field_name)]
HeaderValue = Annotated[str, AfterValidator(_check_line)]


def _check_file_name(value: str) -> str:
    _check_line(value, tab=False)
    if "/" in value or "\\" in value:
        raise ValueError("a file name without a path ('/' or '\\')")
    return value


def _check_media_type(value: str) -> str:
    if not _MEDIA_TYPE.match(value):
        raise ValueError("a media type such as application/pdf (type/subtype, without parameters)")
    if value.lower().startswith(("multipart/", "message/")):
        raise ValueError("multipart/* and message/* cannot be attached as data; use application/octet-stream")
    return value.lower()


def _check_content_id(value: str) -> str:
    bare = value[1:-1] if value.startswith("<") and value.endswith(">") else value
    if not _CONTENT_ID.match(bare):
        raise ValueError("a content id such as logo@example.com (ASCII, left@right, no spaces)")
    return bare


class Attachment(BaseModel):
    """A file in the message: an attachment, or, `inline`, an image the HTML shows as `cid:<content_id>`."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    filename: Annotated[str, Field(min_length=1, max_length=255), AfterValidator(_check_file_name)] = Field(
        examples=["report.pdf"]
    )
    content_type: Annotated[str, AfterValidator(_check_media_type)] = Field(
        default="application/octet-stream", examples=["application/pdf"]
    )
    data: str = Field(description="the file's bytes, base64 (standard alphabet, padded)", examples=["JVBERi0xLjQK"])
    inline: bool = Field(
        default=False, description="part of the HTML (multipart/related) instead of an attachment; needs `content_id`"
    )
    content_id: Annotated[str, AfterValidator(_check_content_id)] | None = Field(
        default=None,
        description="for an inline part: the id the HTML refers to as `cid:<id>` (without angle brackets)",
        examples=["logo@example.com"],
    )

    _bytes: bytes = PrivateAttr(default=b"")

    @model_validator(mode="after")
    def _decode(self) -> Self:
        if self.inline and self.content_id is None:
            raise ValueError("an inline attachment needs a `content_id` (the HTML shows it as cid:<content_id>)")
        self._bytes = _decode_field(self.data, "data")
        return self

    @property
    def raw(self) -> bytes:
        return self._bytes


def _decode_field(value: str, field_name: str) -> bytes:
    try:
        return base64.b64decode(value.encode("ascii"), validate=True)
    except (UnicodeEncodeError, binascii.Error):
        raise PydanticCustomError("base64", "is not valid base64", {"loc": field_name}) from None


class Content(BaseModel):
    """The compose form's message, built by the service: headers, text and/or HTML, attachments."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    from_: MailboxInput = Field(alias="from", description="the author: an address, or {address, name}")
    to: Mailboxes = Field(default_factory=list, description="addresses, each a string or {address, name}")
    cc: Mailboxes = Field(default_factory=list)
    bcc: Mailboxes = Field(default_factory=list, description="envelope recipients only: never written in the message")
    reply_to: Mailboxes = Field(default_factory=list)
    subject: Annotated[str, Field(max_length=MAX_LINE - len("Subject: ")), AfterValidator(_check_line)] | None = None
    text: Annotated[str, AfterValidator(_check_body_text)] | None = Field(default=None, description="text/plain body")
    html: Annotated[str, AfterValidator(_check_body_text)] | None = Field(default=None, description="text/html body")
    headers: dict[HeaderName, HeaderValue] = Field(
        default_factory=dict,
        description="further headers (e.g. X-Campaign, List-Unsubscribe); one line each; not the ones the service "
        "writes (From, To, Cc, Bcc, Reply-To, Sender, Subject, Date, Orig-Date, Message-ID, MIME-Version, Content-*, "
        "Resent-*, Return-Path)",
    )
    attachments: list[Attachment] = Field(default_factory=list)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.text is None and self.html is None and not self.attachments:
            raise ValueError("give `text`, `html` or `attachments`: the message needs a body")
        for name, value in self.headers.items():
            if len(name) + 2 + len(value) > MAX_LINE:
                raise PydanticCustomError(
                    "too_long",
                    "header line is longer than {limit} characters",
                    {"loc": f"headers.{name}", "limit": MAX_LINE},
                )
        seen: set[str] = set()
        for i, attachment in enumerate(self.attachments):
            if attachment.inline and self.html is None:
                raise PydanticCustomError(
                    "inline_without_html", "an inline attachment needs `html` to show it", {"loc": f"attachments[{i}]"}
                )
            if attachment.content_id is not None:
                if attachment.content_id.lower() in seen:
                    raise PydanticCustomError(
                        "duplicate", "content id given twice", {"loc": f"attachments[{i}].content_id"}
                    )
                seen.add(attachment.content_id.lower())
        return self

    def envelope_recipients(self) -> list[str]:
        """To, Cc and Bcc, each address once (domains compared without case): a second RCPT of the
        same address would deliver a second copy."""
        seen: set[str] = set()
        out: list[str] = []
        for box in (*self.to, *self.cc, *self.bcc):
            at = box.address.rfind("@")
            key = box.address[:at] + box.address[at:].lower()
            if key not in seen:
                seen.add(key)
                out.append(box.address)
        return out


#: The compose form's example, in the model's schema and the route's OpenAPI examples.
COMPOSE_EXAMPLE: dict[str, Any] = {
    "content": {
        "from": {"address": "alice@example.com", "name": "Alice Example"},
        "to": ["bob@example.net"],
        "bcc": ["audit@example.com"],
        "subject": "Your report",
        "text": "Hello Bob,\n\nthe report is attached.\n",
        "html": '<p>Hello Bob,</p><p>the report is attached.</p><img src="cid:logo@example.com">',
        "headers": {"X-Campaign": "reports-2026-11"},
        "attachments": [
            {"filename": "report.pdf", "content_type": "application/pdf", "data": "JVBERi0xLjQK"},
            {
                "filename": "logo.png",
                "content_type": "image/png",
                "data": "iVBORw0KGgo=",
                "inline": True,
                "content_id": "logo@example.com",
            },
        ],
    }
}


def _form_error(loc: str, message: str) -> PydanticCustomError:
    """A whole-request error with the field it is about (ctx `loc`; app/intake.py puts it in the 422)."""
    return PydanticCustomError("request_form", message, {"loc": loc})


class DeliveryRequest(BaseModel):
    """The JSON request form of `POST /relays/{name}/deliver`: a finished message (`message` or
    `message_base64`), or `content` from which the service builds one."""

    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "examples": [
                {
                    "sender": "alice@example.com",
                    "recipients": ["bob@example.net", "carol@example.org"],
                    "message": "From: alice@example.com\r\nSubject: hi\r\n\r\nHello\r\n",
                },
                COMPOSE_EXAMPLE,
            ]
        },
    )

    # Defaults stand for "not given" (model_fields_set tells): required with `message`, taken from `content`
    # otherwise, and set by the validator, so that `sender` and `recipients` are the envelope's in both forms.
    sender: Sender = Field(
        default="",
        description='envelope sender (MAIL FROM); "" is the null reverse-path used by bounces. Required with '
        "`message`; with `content` the default is its `from` address",
    )
    recipients: list[Recipient] = Field(
        default_factory=list,
        min_length=1,
        description="one or more envelope recipients (RCPT TO). Required with `message`; with `content` the "
        "default is its to, cc and bcc (each address once)",
    )
    message: str | None = Field(default=None, description="the raw RFC 5322 message as text; sent as UTF-8")
    message_base64: str | None = Field(
        default=None,
        description="the raw message, base64-encoded, for 8-bit or binary content (instead of `message`)",
    )
    content: Content | None = Field(
        default=None,
        description="instead of `message`: the message's fields; the service builds it (MIME, encoded words, "
        "Message-ID and Date) and answers its Message-ID",
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
        content = self.content
        forms = (self.message is not None) + (self.message_base64 is not None) + (content is not None)
        if forms != 1:
            if content is not None:
                raise _form_error(
                    "content", "give `content` or a finished message (`message`, `message_base64`), not both"
                )
            if forms:
                raise _form_error("body", "give exactly one of `message` and `message_base64`")
            raise _form_error("body", "give `message`, `message_base64` or `content`")
        given = self.model_fields_set
        if content is not None:
            # Set in __dict__: model_fields_set keeps telling what the client gave (a second private
            # attribute for it would cost every request 0.5 us, in the message form too).
            if "recipients" not in given:
                recipients = content.envelope_recipients()
                if not recipients:
                    raise _form_error("content.to", "no recipients: give `content.to`, `cc`, `bcc` or `recipients`")
                self.__dict__["recipients"] = recipients
            if "sender" not in given:
                self.__dict__["sender"] = content.from_.address
            return self
        if "sender" not in given:
            raise PydanticCustomError("missing", "Field required", {"loc": "sender"})
        if "recipients" not in given:
            raise PydanticCustomError("missing", "Field required", {"loc": "recipients"})
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
    def recipients_from_content(self) -> bool:
        """The recipients are content's to, cc and bcc (not counted by request_model's max_length)."""
        return self.content is not None and "recipients" not in self.model_fields_set

    @property
    def raw_message(self) -> bytes:
        """The finished message; a composed request has none until it is built (app.intake.envelope_of)."""
        if self.content is not None:
            raise RuntimeError("a `content` request's message is built by app.intake.envelope_of, not read here")
        # From the private dict: `self._raw` goes through pydantic's __getattr__, which raised and
        # caught two AttributeErrors per read (3.2 us against 0.05, pydantic 2.14), on every delivery.
        return cast(dict[str, bytes], self.__pydantic_private__)["_raw"]


@functools.lru_cache(maxsize=16)
def request_model(max_recipients: int) -> type[DeliveryRequest]:
    """DeliveryRequest whose recipients are counted before any is validated: a list longer than
    `max_recipients` fails at its first extra item, not after every address was checked."""
    model = create_model(
        "DeliveryRequest",
        __base__=DeliveryRequest,
        recipients=(
            list[Recipient],
            Field(
                default_factory=list,
                min_length=1,
                max_length=max_recipients,
                description=DeliveryRequest.model_fields["recipients"].description,
            ),
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
    #: What the client sent when the message was built or completed here (the compose form's body; a
    #: message before add_missing_headers): the same request gives a new Date and Message-ID each
    #: time, so this, not `message`, tells two requests apart (the idempotency fingerprint).
    origin: bytes | None = field(default=None, repr=False)
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


class DkimSignature(BaseModel):
    """Whether the relay signed the message with DKIM (RFC 6376), and as whom."""

    model_config = _RESULT_CONFIG

    signed: bool
    domain: str | None = Field(default=None, description="the signing domain (d=)", examples=["example.com"])
    selector: str | None = Field(default=None, description="the key's selector (s=)", examples=["mail2026"])
    algorithm: Literal["rsa-sha256", "ed25519-sha256"] | None = Field(default=None, description="a=")
    reason: str | None = Field(
        default=None, description="why it went unsigned", examples=["no signing identity for example.org"]
    )


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
    resumed: bool = Field(
        default=False,
        description="the TLS session of an earlier connection to this host was resumed (no certificate sent; it "
        "was checked as `authenticated` says when that session began, at most an hour before)",
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
    # Set by a signing relay (relays/dkim.py) on each of its results; the JSON has it once, as
    # DeliveryResult.dkim.
    dkim: DkimSignature | None = Field(default=None, exclude=True)
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
        description="the message's Message-Id header, if it has one: for a composed message (`content`), the one the service wrote",
        examples=["<abc@example.com>"],
    )
    elapsed_ms: float = Field(description="time the relay took, in milliseconds", examples=[41.7])
    dkim: DkimSignature | None = Field(
        default=None,
        description="DKIM signing: null when the relay has no `dkim` identities (or the delivery deadline "
        "answered); `signed: false` when the From: domain has none",
    )
    recipients: list[RecipientResult]

    @model_validator(mode="before")
    @classmethod
    def _derive_status(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(recipients := data.get("recipients"), list):
            statuses = [_status_of(r) for r in recipients]
            if None not in statuses:
                data = {**data, "status": delivery_status(s for s in statuses if s is not None)}
            if recipients and isinstance(first := recipients[0], RecipientResult) and first.dkim is not None:
                data = {**data, "dkim": first.dkim}
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
