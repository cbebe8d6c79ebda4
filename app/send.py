"""`mailrelay send`: build a message (or take a raw one), deliver it through a running mailrelay, and say
what became of each recipient, with a sysexits(3) status a script can act on.

The message is built here with the standard library's `email` package and sent in the raw form: the
client needs nothing from the service beyond `POST /relays/{name}/deliver`.
"""

import argparse
import base64
import json
import mimetypes
import os
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from email import policy
from email.message import EmailMessage
from email.parser import BytesHeaderParser
from email.utils import formatdate, getaddresses, make_msgid, parseaddr
from pathlib import Path
from typing import Any, Final, TextIO

import httpx

# sysexits(3), as sendmail(8) and its callers know them.
EX_OK: Final = 0
EX_USAGE: Final = 64
EX_DATAERR: Final = 65
EX_NOUSER: Final = 67
EX_UNAVAILABLE: Final = 69
EX_SOFTWARE: Final = 70
EX_IOERR: Final = 74
EX_TEMPFAIL: Final = 75
EX_NOPERM: Final = 77
EX_CONFIG: Final = 78

URL_ENV: Final = "MAILRELAY_URL"
RELAY_ENV: Final = "MAILRELAY_RELAY"
#: The client's one key (the service's own variable, MAILRELAY_API_KEYS, lists every key it accepts).
KEY_ENV: Final = "MAILRELAY_API_KEY"
DEFAULT_URL: Final = "http://127.0.0.1:8080"
#: Above the service's default delivery_deadline (50 s): its answer, not our timeout, ends a slow delivery.
DEFAULT_TIMEOUT: Final = 60.0


class SendError(Exception):
    """The delivery could not be asked for or its answer not read: `status` is the exit status."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Service:
    """Where to deliver: the service's base URL, the relay and the API key (None: no key)."""

    url: str
    relay: str
    key: str | None
    timeout: float = DEFAULT_TIMEOUT


@dataclass(frozen=True)
class Outcome:
    """The service's answer: its HTTP status and JSON body (a delivery result, or a problem document)."""

    http_status: int
    body: dict[str, Any]

    @property
    def recipients(self) -> list[dict[str, Any]]:
        found = self.body.get("recipients")
        return found if isinstance(found, list) else []

    @property
    def exit_status(self) -> int:
        return exit_status(self)


def deliver(service: Service, sender: str, recipients: Sequence[str], message: bytes) -> Outcome:
    """One POST /relays/{relay}/deliver; SendError when there is no answer to show."""
    url = f"{service.url.rstrip('/')}/relays/{service.relay}/deliver"
    headers = {"Accept": "application/json, application/problem+json"}
    if service.key:
        headers["Authorization"] = f"Bearer {service.key}"
    # base64: the message goes as it is, 8-bit and all, without a text round trip.
    payload = {
        "sender": sender,
        "recipients": list(recipients),
        "message_base64": base64.b64encode(message).decode("ascii"),
    }
    try:
        response = httpx.post(url, json=payload, headers=headers, timeout=service.timeout)
    except httpx.ConnectError as exc:
        raise SendError(EX_TEMPFAIL, f"cannot reach mailrelay at {service.url}: {exc}; nothing was sent") from None
    except httpx.TimeoutException:
        raise SendError(
            EX_TEMPFAIL,
            f"no answer from mailrelay within {service.timeout:g} s; the message may or may not have been delivered",
        ) from None
    except httpx.HTTPError as exc:
        raise SendError(
            EX_TEMPFAIL, f"the connection to mailrelay failed ({exc}); the message may or may not have been delivered"
        ) from None
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):
        raise SendError(EX_SOFTWARE, f"mailrelay answered {response.status_code} without a JSON body")
    return Outcome(response.status_code, body)


def exit_status(outcome: Outcome) -> int:
    """0 when every recipient was delivered; 75 when any failure is transient (retry later); 67 when the
    others were refused as unknown addresses (5.1.x), else 69; for a refusal before anything was tried,
    the status that says why."""
    recipients = outcome.recipients
    if not recipients:  # a problem document: nothing was delivered
        status = outcome.http_status
        if status in (409, 429, 503) or status == 408:
            return EX_TEMPFAIL
        if status in (401, 403):
            return EX_NOPERM
        if status == 404:
            return EX_CONFIG
        if status in (400, 413, 415, 422):
            return EX_DATAERR
        return EX_SOFTWARE
    failed = [r for r in recipients if r.get("status") != "delivered"]
    if not failed:
        return EX_OK
    if any(r.get("status") == "transient_failure" for r in failed):
        return EX_TEMPFAIL
    enhanced = [str((r.get("reply") or {}).get("enhanced_status") or "") for r in failed]
    return EX_NOUSER if all(e.startswith("5.1.") for e in enhanced) else EX_UNAVAILABLE


def report(outcome: Outcome, out: TextIO, *, as_json: bool) -> None:
    """The answer as a table of recipients (or a problem's title and detail), or as the service's JSON."""
    if as_json:
        out.write(json.dumps({"http_status": outcome.http_status, **outcome.body}, indent=2) + "\n")
        return
    recipients = outcome.recipients
    if not recipients:
        body = outcome.body
        out.write(f"not delivered: {outcome.http_status} {body.get('title', '')}: {body.get('detail', '')}\n")
        for error in body.get("errors") or []:
            out.write(f"  {error.get('loc')}: {error.get('message')}\n")
        return
    rows = [("RECIPIENT", "STATUS", "REPLY", "HOST")]
    for r in recipients:
        reply = r.get("reply") or {}
        text = str(reply.get("message", "")).replace("\r", " ").replace("\n", " ")
        code = f"{reply.get('code', '')} {text}".strip()
        rows.append((str(r.get("recipient", "")), str(r.get("status", "")), code, str(r.get("host") or "-")))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    for row in rows:
        out.write("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row[:3])) + "  " + row[3] + "\n")
    message_id = outcome.body.get("message_id")
    out.write(f"{outcome.body.get('status', '')}" + (f" (Message-ID {message_id})" if message_id else "") + "\n")


def add_missing_headers(message: EmailMessage, sender: str) -> None:
    """Date and Message-ID when absent, as a submission server adds them (RFC 6409 8.3, 8.4)."""
    if message["Date"] is None:
        message["Date"] = formatdate(localtime=True)
    if message["Message-ID"] is None:
        domain = sender.rpartition("@")[2] if "@" in sender else socket.getfqdn()
        message["Message-ID"] = make_msgid(domain=domain or None)


def compose(
    sender: str,
    to: Sequence[str],
    subject: str,
    text: str | None,
    html: str | None,
    attachments: Sequence[Path],
    cc: Sequence[str] = (),
) -> bytes:
    """An RFC 5322 message: text and/or HTML (multipart/alternative), attachments (multipart/mixed)."""
    message = EmailMessage(policy=policy.SMTP)
    message["From"] = sender
    message["To"] = ", ".join(to)
    if cc:
        message["Cc"] = ", ".join(cc)
    message["Subject"] = subject
    add_missing_headers(message, parseaddr(sender)[1])
    if text is not None or html is None:
        message.set_content(text or "")
        if html is not None:
            message.add_alternative(html, subtype="html")
    else:
        message.set_content(html, subtype="html")
    for path in attachments:
        kind, encoding = mimetypes.guess_type(path.name)
        if kind is None or encoding is not None:  # a .gz is not its content's type
            kind = "application/octet-stream"
        maintype, subtype = kind.split("/", 1)
        message.add_attachment(path.read_bytes(), maintype=maintype, subtype=subtype, filename=path.name)
    return message.as_bytes(policy=policy.SMTP)


def _read_file(path: str, what: str) -> bytes:
    try:
        return sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except OSError as exc:
        raise SendError(EX_IOERR if path == "-" else EX_DATAERR, f"cannot read {what} {path}: {exc}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    where = parser.add_argument_group("the service")
    where.add_argument("--url", help=f"mailrelay's base URL (default: ${URL_ENV}, else {DEFAULT_URL})")
    where.add_argument("--relay", help=f"the relay to deliver through (default: ${RELAY_ENV})")
    where.add_argument(
        "--timeout", type=float, default=DEFAULT_TIMEOUT, help="seconds to wait for the answer (default: %(default)s)"
    )
    what = parser.add_argument_group("the message (the API key comes from $" + KEY_ENV + ")")
    what.add_argument("--from", dest="sender", metavar="ADDRESS", help="sender: From header and envelope sender")
    what.add_argument("--to", action="append", default=[], metavar="ADDRESS", help="a recipient (repeatable)")
    what.add_argument("--cc", action="append", default=[], metavar="ADDRESS", help="a Cc recipient (repeatable)")
    what.add_argument(
        "--bcc", action="append", default=[], metavar="ADDRESS", help="a recipient left out of the headers"
    )
    what.add_argument("--subject", default="", help="the Subject")
    body = what.add_mutually_exclusive_group()
    body.add_argument("--body", help="the text body")
    body.add_argument("--body-file", metavar="FILE", help="the text body from FILE (- for standard input)")
    what.add_argument("--html-file", metavar="FILE", help="an HTML body (with a text body: multipart/alternative)")
    what.add_argument("--attach", action="append", default=[], metavar="FILE", help="attach FILE (repeatable)")
    what.add_argument(
        "--raw",
        metavar="FILE",
        help="send FILE (- for standard input) as the finished RFC 5322 message instead of building one; "
        "--to gives the recipients, --from the sender (default: the From header's address)",
    )
    parser.add_argument("--json", action="store_true", help="print the service's JSON answer instead of a table")


def service_from(args: argparse.Namespace, env: Mapping[str, str]) -> Service:
    url = args.url or env.get(URL_ENV) or DEFAULT_URL
    relay = args.relay or env.get(RELAY_ENV)
    if not relay:
        raise SendError(EX_USAGE, f"give --relay (or set ${RELAY_ENV})")
    return Service(url=url, relay=relay, key=env.get(KEY_ENV) or None, timeout=args.timeout)


def run(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> int:
    """`mailrelay send`; its exit status."""
    env = os.environ if env is None else env
    try:
        service = service_from(args, env)
        recipients = [*args.to, *args.cc, *args.bcc]
        if not recipients:
            raise SendError(EX_USAGE, "give at least one --to (or --cc, --bcc)")
        if args.raw is not None:
            if args.body is not None or args.body_file or args.html_file or args.attach or args.subject:
                raise SendError(EX_USAGE, "--raw sends a finished message: no --subject, --body, --html-file, --attach")
            message = _read_file(args.raw, "the message")
            sender = args.sender
            if sender is None:
                found = [a for _, a in getaddresses(header_values(message, "From")) if a]
                if not found:
                    raise SendError(EX_USAGE, "give --from: the message has no From address")
                sender = found[0]
        else:
            if not args.sender:
                raise SendError(EX_USAGE, "give --from")
            text = args.body
            if args.body_file:
                text = _read_file(args.body_file, "the body").decode("utf-8", "replace")
            html = _read_file(args.html_file, "the HTML body").decode("utf-8", "replace") if args.html_file else None
            for path in args.attach:
                if not Path(path).is_file():
                    raise SendError(EX_DATAERR, f"cannot attach {path}: not a readable file")
            message = compose(
                args.sender, args.to, args.subject, text, html, [Path(p) for p in args.attach], cc=args.cc
            )
            sender = parseaddr(args.sender)[1] or args.sender
        outcome = deliver(service, sender, [parseaddr(r)[1] or r for r in recipients], message)
    except SendError as exc:
        sys.stderr.write(f"mailrelay send: {exc}\n")
        return exc.status
    except (ValueError, TypeError) as exc:  # a header the email package refuses (a CR/LF in --subject, ...)
        sys.stderr.write(f"mailrelay send: {exc}\n")
        return EX_DATAERR
    report(outcome, sys.stdout, as_json=args.json)
    return outcome.exit_status


def header_values(message: bytes, name: str) -> list[str]:
    """Every value of header `name` in a raw message's head, unfolded."""
    head = BytesHeaderParser().parsebytes(message)
    return [str(value) for value in head.get_all(name, [])]
