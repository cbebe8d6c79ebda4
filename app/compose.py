"""Build a message from the compose form's fields, and add what a raw message lacks (RFC 6409 8)."""

import re
import secrets
import time
from collections.abc import Callable
from datetime import UTC, datetime
from email import policy as email_policy
from email.headerregistry import Address
from email.message import EmailMessage, MIMEPart
from email.policy import EmailPolicy
from email.utils import format_datetime
from typing import NamedTuple

import idna

from schemas.delivery import Attachment, Content, Mailbox, domain_of
from schemas.relay_options import machine_fqdn

#: The SMTP policy with 7-bit transfer encodings: non-ASCII text goes quoted-printable or base64, so the
#: message needs no 8BITMIME from any hop. SMTPUTF8 (a non-ASCII address) implies 8BITMIME: 8bit there.
_SMTP_7BIT = email_policy.SMTP.clone(cte_type="7bit")


class Built(NamedTuple):
    message: bytes
    message_id: str


def uses_utf8(content: Content) -> bool:
    """Whether a header address is non-ASCII: only SMTPUTF8 (RFC 6532) can carry it. Display names
    and the subject alone go as RFC 2047 encoded words, which every server takes."""
    boxes = (content.from_, *content.to, *content.cc, *content.reply_to)
    return not all(box.address.isascii() for box in boxes)


def size_floor(content: Content) -> int:
    """Fewer octets than the built message has, known before building it: the bodies as UTF-8 and each
    attachment's base64 (the builder writes base64 again, with line breaks). A request over the
    size limit by this measure is refused without building anything."""
    size = sum(len(a.data) for a in content.attachments)
    for body in (content.text, content.html):
        if body is not None:
            size += len(body)  # characters: at most the UTF-8 octets, counted without encoding
    return size


def size_estimate(content: Content) -> int:
    """More octets than building the message holds at once (its parts, then the message), for the body
    budget: text as quoted-printable or base64 (at most 4/3 of its UTF-8 plus line breaks), attachments
    as base64 lines, headers encoded, each twice (the parts and the flattened message)."""
    text = sum(4 * len(body) for body in (content.text, content.html) if body is not None)  # up to 4 octets a char
    files = sum(len(a.data) * 80 // 76 + 512 for a in content.attachments)
    headers = 3 * sum(len(k) + len(v) + 4 for k, v in content.headers.items())
    headers += 3 * sum(len(b.address) + len(b.name or "") + 4 for b in (*content.to, *content.cc, *content.reply_to))
    return 2 * (text * 4 // 3 + files + headers + 4096)


def build(content: Content, now: datetime | None = None) -> Built:
    """The message as RFC 5322 bytes with CRLF line ends: From, To, Cc, Reply-To, Subject, Date,
    Message-ID, MIME-Version, the client's headers, then the MIME tree (multipart/alternative for
    text and HTML, multipart/related for inline images, multipart/mixed for attachments). Bcc is
    never written. `content` is validated (schemas.delivery), so building does not fail."""
    policy = email_policy.SMTPUTF8 if uses_utf8(content) else _SMTP_7BIT
    msg = EmailMessage(policy=policy)
    msg["From"] = _address(content.from_)
    if content.to:
        msg["To"] = [_address(b) for b in content.to]
    if content.cc:
        msg["Cc"] = [_address(b) for b in content.cc]
    if content.reply_to:
        msg["Reply-To"] = [_address(b) for b in content.reply_to]
    if content.subject is not None:
        msg["Subject"] = content.subject
    msg["Date"] = format_datetime(now or datetime.now(UTC))
    message_id = new_message_id(domain_of(content.from_.address))
    msg["Message-ID"] = message_id
    msg["MIME-Version"] = "1.0"
    for name, value in content.headers.items():
        msg[name] = value
    _body(content, policy)(msg)
    return Built(msg.as_bytes(policy=policy), message_id)


def _address(box: Mailbox) -> Address:
    if box.address.isascii():
        return Address(display_name=box.name or "", addr_spec=box.address)
    # The RFC 5322 parser refuses a non-ASCII local part (RFC 6532 allows it): split it here; it was
    # validated as an address (schemas.delivery.check_address).
    local, _, domain = box.address.rpartition("@")
    if local.startswith('"') and local.endswith('"'):
        local = re.sub(r"\\(.)", r"\1", local[1:-1])
    return Address(display_name=box.name or "", username=local, domain=domain)


Fill = Callable[[MIMEPart], None]


def _body(content: Content, policy: "EmailPolicy[EmailMessage]") -> Fill:
    """What fills the top part: the MIME tree, as functions that fill a given part (the message
    itself at the top, new MIMEParts below it, so that only the top has MIME-Version)."""
    inline = [a for a in content.attachments if a.inline]
    files = [a for a in content.attachments if not a.inline]
    views: list[Fill] = []
    if content.text is not None:
        views.append(_text(content.text, "plain"))
    if content.html is not None:
        html = _text(content.html, "html")
        views.append(_multipart("related", [html, *map(_file, inline)], policy) if inline else html)
    body = views[0] if len(views) == 1 else _multipart("alternative", views, policy) if views else None
    if not files:
        assert body is not None  # noqa: S101 - Content requires a body or an attachment
        return body
    return _multipart("mixed", [*([body] if body else []), *map(_file, files)], policy)


def _text(text: str, subtype: str) -> Fill:
    # utf-8, and quoted-printable or base64 (the shorter) unless it is ASCII with short lines; 8bit
    # under SMTPUTF8 (its policy allows 8-bit data).
    return lambda part: part.set_content(text, subtype=subtype)


def _file(attachment: Attachment) -> Fill:
    maintype, _, subtype = attachment.content_type.partition("/")

    def fill(part: MIMEPart) -> None:
        part.set_content(
            attachment.raw,
            maintype,
            subtype,
            disposition="inline" if attachment.inline else "attachment",
            filename=attachment.filename,
            cid=f"<{attachment.content_id}>" if attachment.content_id else None,
        )

    return fill


def _multipart(kind: str, children: list[Fill], policy: "EmailPolicy[EmailMessage]") -> Fill:
    def fill(part: MIMEPart) -> None:
        getattr(part, f"make_{kind}")()
        for child in children:
            sub = MIMEPart(policy=policy)
            child(sub)
            part.attach(sub)

    return fill


def new_message_id(domain: str | None) -> str:
    """`<time.random@domain>`: 128 random bits, unique without coordination between processes.
    The domain is the author's (RFC 5322 3.6.4 asks for one the author controls) as an A-label,
    else this machine's name."""
    right = _ascii_domain(domain) if domain else None
    return f"<{int(time.time())}.{secrets.token_hex(16)}@{right or machine_fqdn()}>"


def _ascii_domain(domain: str) -> str | None:
    if domain.isascii():
        return domain
    try:
        return idna.encode(domain, uts46=True).decode("ascii")
    except idna.IDNAError:
        return None


# The header section ends at the first empty line; a message that starts with one has no headers.
_HEADER_END = re.compile(rb"\r?\n\r?\n")
_DATE_OR_ID = re.compile(rb"^(date|message-id)[ \t]*:", re.IGNORECASE | re.MULTILINE)


def add_missing_headers(message: bytes, sender: str, now: datetime | None = None) -> bytes:
    """`message` with Date and Message-ID added at the top when its header section lacks them, as a
    submission server does (RFC 6409 8.2, 8.3); the message itself when it has both. Only the header
    section is scanned; the line end follows the message's first line."""
    if message.startswith((b"\r\n", b"\n")):
        end = 0
    else:
        found = _HEADER_END.search(message)
        end = found.start() if found else len(message)
    present = {m.group(1).lower() for m in _DATE_OR_ID.finditer(message, 0, end)}
    if len(present) == 2:
        return message
    first = message.find(b"\n")
    eol = b"\r\n" if first > 0 and message[first - 1] == 13 else b"\n" if first >= 0 else b"\r\n"
    added = b""
    if b"date" not in present:
        added += b"Date: " + format_datetime(now or datetime.now(UTC)).encode("ascii") + eol
    if b"message-id" not in present:
        added += b"Message-ID: " + new_message_id(domain_of(sender) if sender else None).encode("ascii") + eol
    return added + message
