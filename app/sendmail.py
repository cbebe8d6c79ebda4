"""`sendmail`: the sendmail(8) command line that cron, PHP's mail(), git send-email and logwatch call,
delivering through a running mailrelay instead of a local queue.

Installed as the console script `sendmail` (link it as /usr/sbin/sendmail) and as `mailrelay sendmail`.
It reads the message on standard input and answers the way sendmail's callers expect: silence and 0
when every recipient has it, else a line per failed recipient and 75 (transient, retry later), 67 or
69 (permanent), 64 (usage), 78 (configuration). There is no queue: the answer is the delivery's.

Configuration, the environment first, then the file ($MAILRELAY_SENDMAIL_CONFIG, `-C FILE`, else
/etc/mailrelay/sendmail.conf), one `key value` (or `key = value`) a line, `#` comments:

    url           http://mailrelay.internal:8080   # $MAILRELAY_URL
    relay         outbound                         # $MAILRELAY_RELAY
    api_key_file  /run/secrets/mailrelay-key       # or api_key KEY; $MAILRELAY_API_KEY
    sender        cron@host.example.com            # default envelope sender; $MAILRELAY_SENDER
    timeout       60                               # seconds to wait for the answer
"""

import getpass
import os
import re
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from email.utils import formataddr, formatdate, getaddresses, make_msgid, parseaddr
from pathlib import Path
from typing import Final

from app.send import (
    DEFAULT_TIMEOUT,
    EX_CONFIG,
    EX_IOERR,
    EX_OK,
    EX_USAGE,
    KEY_ENV,
    RELAY_ENV,
    URL_ENV,
    SendError,
    Service,
    deliver,
)

CONFIG_ENV: Final = "MAILRELAY_SENDMAIL_CONFIG"
SENDER_ENV: Final = "MAILRELAY_SENDER"
DEFAULT_CONFIG: Final = Path("/etc/mailrelay/sendmail.conf")
_CONFIG_KEYS: Final = frozenset(("url", "relay", "api_key", "api_key_file", "sender", "timeout"))
#: The most bytes read from standard input: far above any relay's message limit, so a runaway
#: producer cannot fill memory; mailrelay refuses what is over its own limit (max_message_size).
MAX_MESSAGE: Final = 256 * 1024 * 1024

#: Options that take a value (the next argument when not attached): accepted and ignored, except
#: -f/-r (sender), -F (full name), -C (configuration file).
_WITH_VALUE: Final = frozenset("fFrCBNRVXLhAO")
#: Flags accepted and ignored: sendmail's -m (me too), -n (no aliases), -U (initial submission),
#: -v (verbose), -G (gateway), -q... (queue run: there is no queue), -d (debug).
_IGNORED_FLAGS: Final = frozenset("mnUvGd")
_HEADER_NAME = re.compile(rb"^([!-9;-~]+):")
#: `key value` or `key = value`: the separator is the first blank or `=` after the key, so a value keeps
#: its own `=` (base64 keys end with it) and a `#` inside it; a comment starts at a `#` after a blank.
_CONFIG_LINE = re.compile(r"([A-Za-z_]+)(?:\s*=\s*|\s+)(.*)")
_COMMENT = re.compile(r"(?:^|\s)#")


@dataclass
class Options:
    extract: bool = False  # -t
    dot_ends: bool = True  # without -i / -oi, a line of a single "." ends the message
    sender: str | None = None  # -f / -r
    full_name: str | None = None  # -F
    config: Path | None = None  # -C
    recipients: list[str] = field(default_factory=list)


class UsageError(Exception):
    pass


def parse_args(argv: Sequence[str]) -> Options | int:
    """sendmail's getopt-style options; an int is an exit status for modes that do nothing here."""
    options = Options()
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        i += 1
        if arg == "--":
            options.recipients += args[i:]
            break
        if not arg.startswith("-") or arg == "-":
            options.recipients.append(arg)
            continue
        letter, rest = arg[1], arg[2:]
        if letter == "o":  # -oi, -oem, -odb, -oQ/dir, ... (-oi alone matters)
            if rest in ("i", "i=true", "i=True"):
                options.dot_ends = False
            continue
        if letter == "b":  # the mode: -bm (deliver, the default); -bi (newaliases) and -q have nothing to do
            if rest in ("m", ""):
                continue
            if rest == "i":
                return EX_OK
            raise UsageError(f"-b{rest} is not supported: this sendmail only delivers (-bm)")
        if letter == "q":
            return EX_OK  # a queue run: there is no queue
        if letter in _WITH_VALUE:
            if rest:
                value = rest
            elif i < len(args):
                value = args[i]
                i += 1
            else:
                raise UsageError(f"-{letter} needs a value")
            if letter in "fr":
                options.sender = value
            elif letter == "F":
                options.full_name = value
            elif letter == "C":
                options.config = Path(value)
            continue
        # Clustered flags, such as -ti or -it.
        for flag in arg[1:]:
            if flag == "t":
                options.extract = True
            elif flag == "i":
                options.dot_ends = False
            elif flag not in _IGNORED_FLAGS:
                raise UsageError(f"unknown option -{flag}")
    return options


def load_config(path: Path | None, env: Mapping[str, str]) -> dict[str, str]:
    """The file's settings (a missing default file is no error), then the environment's over them."""
    explicit = path is not None or CONFIG_ENV in env
    chosen = path or Path(env.get(CONFIG_ENV) or DEFAULT_CONFIG)
    settings: dict[str, str] = {}
    try:
        text = chosen.read_text(encoding="utf-8")
    except FileNotFoundError:
        if explicit:
            raise SendError(EX_CONFIG, f"configuration file {chosen} not found") from None
        text = ""
    except OSError as exc:
        raise SendError(EX_CONFIG, f"cannot read {chosen}: {exc}") from None
    for number, raw in enumerate(text.splitlines(), 1):
        comment = _COMMENT.search(raw)
        line = (raw[: comment.start()] if comment else raw).strip()
        if not line:
            continue
        match = _CONFIG_LINE.fullmatch(line)
        key, value = (match.group(1).lower(), match.group(2).strip()) if match else ("", "")
        if key not in _CONFIG_KEYS or not value:
            raise SendError(
                EX_CONFIG,
                f"{chosen}:{number}: expected `KEY VALUE` with KEY one of {', '.join(sorted(_CONFIG_KEYS))}",
            )
        settings[key] = value
    for key, name in (("url", URL_ENV), ("relay", RELAY_ENV), ("api_key", KEY_ENV), ("sender", SENDER_ENV)):
        if env.get(name):
            settings[key] = env[name]
    if "api_key_file" in settings and "api_key" not in settings:
        try:
            settings["api_key"] = Path(settings["api_key_file"]).read_text(encoding="utf-8").strip()
        except OSError as exc:
            raise SendError(EX_CONFIG, f"cannot read api_key_file {settings['api_key_file']}: {exc}") from None
    return settings


def service_from(settings: Mapping[str, str]) -> Service:
    missing = [key for key in ("url", "relay") if not settings.get(key)]
    if missing:
        raise SendError(
            EX_CONFIG,
            f"no {' and no '.join(missing)} configured: set ${URL_ENV} and ${RELAY_ENV}, or url and relay in "
            f"{DEFAULT_CONFIG}",
        )
    try:
        timeout = float(settings.get("timeout", DEFAULT_TIMEOUT))
    except ValueError:
        raise SendError(EX_CONFIG, f"timeout must be a number of seconds, not {settings['timeout']!r}") from None
    return Service(url=settings["url"], relay=settings["relay"], key=settings.get("api_key") or None, timeout=timeout)


def read_message(*, dot_ends: bool) -> bytes:
    """Standard input, to its end or (without -i) to a line of a single "."."""
    data = sys.stdin.buffer.read(MAX_MESSAGE + 1)
    if len(data) > MAX_MESSAGE:
        raise SendError(EX_IOERR, f"the message is larger than {MAX_MESSAGE} bytes")
    if dot_ends:
        match = re.search(rb"(?:^|\n)\.\r?(?:\n|$)", data)
        if match is not None:
            data = data[: match.start() + (1 if match.group().startswith(b"\n") else 0)]
    return data


def split_message(message: bytes) -> tuple[list[bytes], bytes]:
    """The head's lines (each with its line end) and the rest (the blank line and the body)."""
    lines = message.splitlines(keepends=True)
    head: list[bytes] = []
    for number, line in enumerate(lines):
        if line in (b"\r\n", b"\n", b"\r"):
            return head, b"".join(lines[number:])
        continuation = bool(head) and line[:1] in (b" ", b"\t")
        if not continuation and not _HEADER_NAME.match(line):  # not a header: the body starts here
            return head, b"".join(lines[number:])
        head.append(line)
    return head, b""


def _fields(head: list[bytes]) -> list[tuple[str, str, list[bytes]]]:
    """(lower-case name, unfolded value, its raw lines) of every header field."""
    fields: list[tuple[str, str, list[bytes]]] = []
    for line in head:
        if line[:1] in (b" ", b"\t") and fields:
            name, text, raw = fields[-1]
            fields[-1] = (name, text + " " + line.strip().decode("utf-8", "replace"), [*raw, line])
            continue
        key, _, value = line.partition(b":")
        fields.append(
            (key.strip().lower().decode("ascii", "replace"), value.strip().decode("utf-8", "replace"), [line])
        )
    return fields


def prepare(message: bytes, options: Options, sender: str) -> tuple[bytes, list[str]]:
    """The message to send and its recipients: with -t the To, Cc and Bcc addresses (Bcc then removed
    from the message), added to those given as arguments; From, Date and Message-ID when missing."""
    head, rest = split_message(message)
    fields = _fields(head)
    newline = b"\r\n" if head and head[0].endswith(b"\r\n") else b"\n"
    recipients = [address for arg in options.recipients for _, address in getaddresses([arg]) if address]
    if options.extract:
        values = [value for name, value, _ in fields if name in ("to", "cc", "bcc")]
        recipients += [address for _, address in getaddresses(values) if address]
    # Bcc never leaves in the message, -t or not (as Postfix's cleanup does).
    head = [line for name, _, raw in fields if name != "bcc" for line in raw]
    added: list[bytes] = []
    names = {name for name, _, _ in fields}
    if "from" not in names:
        added.append(b"From: " + formataddr((options.full_name or "", sender)).encode("utf-8") + newline)
    if "date" not in names:
        added.append(b"Date: " + formatdate(localtime=True).encode("ascii") + newline)
    if "message-id" not in names:
        domain = sender.rpartition("@")[2] or socket.getfqdn()
        added.append(b"Message-ID: " + make_msgid(domain=domain).encode("ascii") + newline)
    if not rest and not head:
        rest = newline
    elif not rest.startswith((b"\r\n", b"\n", b"\r")):
        rest = newline + rest  # no blank line between head and body yet
    unique = list(dict.fromkeys(recipients))
    return b"".join([*added, *head]) + rest, unique


def default_sender(options: Options, settings: Mapping[str, str], message: bytes) -> str:
    if options.sender is not None:
        if options.sender.strip() in ("", "<>"):
            return ""  # -f '<>': the null sender, as bounces use
        return parseaddr(options.sender)[1] or options.sender
    if settings.get("sender"):
        return settings["sender"]
    head, _ = split_message(message)
    for name, value, _ in _fields(head):
        if name == "from" and (address := parseaddr(value)[1]):
            return address
    try:
        user = getpass.getuser()
    except (KeyError, OSError):  # a uid without a passwd entry
        user = "nobody"
    return f"{user}@{socket.getfqdn()}"


def main(argv: Sequence[str] | None = None) -> int:
    """sendmail(8); its exit status."""
    args = sys.argv[1:] if argv is None else argv
    try:
        parsed = parse_args(args)
    except UsageError as exc:
        sys.stderr.write(f"sendmail: {exc}\nusage: sendmail [-t] [-i] [-f sender] [-F name] [recipient ...]\n")
        return EX_USAGE
    if isinstance(parsed, int):
        return parsed
    options = parsed
    try:
        settings = load_config(options.config, os.environ)
        service = service_from(settings)
        message = read_message(dot_ends=options.dot_ends)
        sender = default_sender(options, settings, message)
        prepared, recipients = prepare(message, options, sender)
        if not recipients:
            raise SendError(
                EX_USAGE,
                "no recipients: give them as arguments, or -t to take them from the To, Cc and Bcc headers",
            )
        outcome = deliver(service, sender, recipients, prepared)
    except SendError as exc:
        sys.stderr.write(f"sendmail: {exc}\n")
        return exc.status
    for r in outcome.recipients:
        if r.get("status") != "delivered":
            reply = r.get("reply") or {}
            sys.stderr.write(f"sendmail: {r.get('recipient')}: {r.get('status')}: {reply.get('message', '')}\n")
    if not outcome.recipients:
        body = outcome.body
        sys.stderr.write(f"sendmail: not delivered: {outcome.http_status} {body.get('detail', '')}\n")
    return outcome.exit_status
