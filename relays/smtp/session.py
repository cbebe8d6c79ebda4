"""One SMTP or LMTP connection on aiosmtplib: every step under its timeout, every failure a Reply.

aiosmtplib has no public API for pipelining, for LHLO, or for reading the replies to the message
data as they come, so the session uses these parts of it that its documentation does not cover
(pyproject.toml bounds aiosmtplib at the version tested; tests/canaries/test_aiosmtplib.py fails
naming the one that changed):

- `SMTP.transport`: the connection's asyncio transport (the TLS one after STARTTLS, None once
  closed), written to by the pipelined exchange and the data, aborted by `close()`;
- that transport's protocol, aiosmtplib's `SMTPProtocol`, swapped out for our reader and back
  (relays/smtp/reader.py `reading_replies`), after which it reads the next reply as before;
- `SMTP.last_ehlo_response` (its setter parses what `supports_extension()` and `login()` read)
  and `SMTP.last_helo_response`, set after our own EHLO, LHLO or HELO so that `starttls()` and
  `login()` do not greet again;
- `SMTPConnectError.__cause__`, the OSError of a failed connect, whose errno words the reply.
"""

import asyncio
import contextlib
import dataclasses
import os
import re
import socket
import ssl
import struct
import time
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Literal, NamedTuple, NoReturn, Self, cast

import aiosmtplib
import idna
from aiosmtplib import SMTPResponse

from relays import replies
from relays.base import DeliveryContext, RelayError
from relays.dane import DaneHost, check, peer_chain
from relays.smtp.reader import ReplyReader, ReplyTooLongError, reading_replies
from relays.smtp.resumption import ResumingContext, resuming_for
from relays.tls import client_context
from schemas.delivery import Envelope, HopSecurity
from schemas.relay_options import SmtpOptions, SmtpTlsOptions
from schemas.reply import Command, Reply

TlsMode = Literal["none", "starttls", "implicit", "opportunistic"]
#: Most seconds to wait for the reply to QUIT.
QUIT_TIMEOUT = 5.0
#: The message is written in pieces this size, each waiting until the server takes the last.
_DATA_CHUNK = 256 * 1024
#: A last piece up to this size goes out joined with its command and terminator (a TLS record's most).
_ONE_RECORD = 16 * 1024
#: A message up to _ONE_RECORD goes in one write with its envelope (MAIL, RCPT, BDAT LAST: RFC 3030
#: allows BDAT in a pipelined group) over a connection the server answered within this many seconds.
#: One that idled longer goes in two steps, so that a connection the server or a middlebox dropped
#: silently is found dead at MAIL, before the message went, and the delivery moves to a new one.
JOIN_WITHIN = 2.0


class Destination(NamedTuple):
    """Where a session goes: the address to connect to and the server's name.

    `name` is what TLS verifies and what results report; `address` may be an
    IP that DNS gave for that name. A tuple: made and hashed (the pool's key)
    once per MX delivery, where a frozen dataclass costs several times more.
    """

    address: str
    port: int
    name: str

    @property
    def label(self) -> str:
        return f"{self.name}:{self.port}"


@dataclass(frozen=True)
class SessionSettings:
    """The options of one SMTP or LMTP relay, ready for sessions to use."""

    ehlo_as: str
    connect_timeout: float
    command_timeout: float
    data_timeout: float
    tls_mode: TlsMode
    tls_context: ssl.SSLContext | None
    credentials: tuple[str, str] | None
    ipv4_only: bool
    lmtp: bool
    relay: str = ""  # the relay's name, for metrics
    auth_soft_bounce: bool = True
    max_recipients_per_batch: int = 100
    chunking: bool = True
    plaintext_fallback: bool = False
    #: Deliver only when the hop is encrypted and the server authenticated (a require_tls
    #: delivery): STARTTLS not offered then fails the host with 550 5.7.10.
    require_tls: bool = False
    #: The MX host's DNSSEC-validated TLSA records (relays/dane.py): TLS required, the server's
    #: certificate checked against them, not by a CA.
    dane: DaneHost | None = None

    @classmethod
    def from_options(cls, options: SmtpOptions, relay_name: str, *, lmtp: bool) -> Self:
        """Raises ConfigError (at relay.<name>.tls) when the TLS files cannot be used."""
        tls = options.tls
        context = None
        if tls is not None and tls.mode != "none":
            context = client_context(
                tls,
                f"relay.{relay_name}.tls",
                verify_by_default=tls.mode != "opportunistic",
                new=ResumingContext.default,
            )
        credentials = None
        if options.credentials is not None:
            credentials = (options.credentials.username, options.credentials.password.get_secret_value())
        return cls(
            ehlo_as=options.ehlo_as,
            connect_timeout=options.connect_timeout,
            command_timeout=options.command_timeout,
            data_timeout=options.data_timeout,
            tls_mode=tls.mode if tls else "none",
            tls_context=context,
            credentials=credentials,
            ipv4_only=options.ipv4_only,
            lmtp=lmtp,
            relay=relay_name,
            auth_soft_bounce=options.auth_soft_bounce,
            max_recipients_per_batch=options.max_recipients_per_batch,
            chunking=options.chunking,
            plaintext_fallback=tls is not None and tls.mode == "opportunistic" and tls.plaintext_fallback,
        )

    def with_dane(self, host: DaneHost, tls: SmtpTlsOptions | None, relay_name: str) -> "SessionSettings":
        """These settings for an MX host with TLSA records: STARTTLS required, no CA check (the
        records decide, after the handshake). A plain context: no session resumption, as the
        records are checked against the chain the server sends, which a resumed handshake has not
        (relays/smtp/resumption.py)."""
        options = (tls or SmtpTlsOptions()).model_copy(update={"mode": "starttls", "cert_reqs": "CERT_NONE"})
        context = client_context(options, f"relay.{relay_name}.tls")
        return dataclasses.replace(self, tls_mode="starttls", tls_context=context, plaintext_fallback=False, dane=host)

    def verified(self, tls: SmtpTlsOptions | None, relay_name: str) -> "SessionSettings":
        """These settings for a require_tls delivery: STARTTLS required, the certificate verified for
        the server's name (with the relay's `ca_certs`, else the system's CAs)."""
        options = (tls or SmtpTlsOptions()).model_copy(update={"mode": "starttls", "cert_reqs": "CERT_REQUIRED"})
        context = client_context(options, f"relay.{relay_name}.tls", new=ResumingContext.default)
        return dataclasses.replace(
            self, tls_mode="starttls", tls_context=context, plaintext_fallback=False, require_tls=True
        )


@dataclass
class Transaction:
    """One reply per recipient, and whether the message data went out (then never retry elsewhere).

    `in_doubt` holds the indexes of recipients whose final reply never came after
    the whole message went out: the server may have delivered to them.
    """

    replies: list[Reply]
    data_sent: bool
    in_doubt: frozenset[int] = frozenset()
    security: HopSecurity | None = None  # how the connection was secured; None: no connection was made


@dataclass(slots=True)
class _TransactionState:
    """One transaction under way: what MAIL and RCPT send, and each recipient's reply so far.

    `results[i]` is None until recipient i is answered; `pending` holds the
    recipients that go to the server (in RCPT order) and `rcpts` their RCPT
    arguments. Both envelope paths, pipelined and stepwise, take and fill it.
    """

    recipients: Sequence[str]
    results: list[Reply | None]
    reused: bool  # the connection served a transaction before: a dead one is StaleSessionError
    mail: list[bytes]  # FROM:<sender> and the MAIL parameters
    pending: list[int]
    rcpts: list[bytes]
    data: bytes = b""  # the message with CRLF line ends (crlf_lines), not yet dot-stuffed
    bdat: bool = False  # the message goes as one BDAT ... LAST chunk (RFC 3030), not DATA

    @classmethod
    def answered(cls, recipients: Sequence[str], reply: Reply, reused: bool) -> Self:
        """A transaction over before it began: `reply` for every recipient."""
        return cls(recipients, [reply] * len(recipients), reused, [], [], [])

    def answer(self, indexes: Iterable[int], reply: Reply) -> None:
        for i in indexes:
            self.results[i] = reply

    def answer_rest(self, reply: Reply) -> None:
        """`reply` for every recipient not answered yet."""
        self.results = [r if r is not None else reply for r in self.results]

    def replies(self) -> list[Reply]:
        return [r for r in self.results if r is not None]


_PLAIN = HopSecurity(encrypted=False)


class _HandshakeFailed(Exception):
    """The TLS handshake of opportunistic STARTTLS failed: the connection is gone (`error` says why)."""

    def __init__(self, error: RelayError) -> None:
        super().__init__(str(error))
        self.error = error


class StaleSessionError(Exception):
    """A reused connection was found dead at the start of a transaction: nothing was sent."""


class SmtpSession:
    """A connection to one server. Not safe for concurrent use: the pool hands it to one delivery at a time."""

    def __init__(self, destination: Destination, settings: SessionSettings) -> None:
        self.destination = destination
        self.settings = settings
        implicit = settings.tls_mode == "implicit"
        self.smtp = aiosmtplib.SMTP(
            hostname=destination.address,
            port=destination.port,
            local_hostname=settings.ehlo_as,
            timeout=settings.command_timeout,
            use_tls=implicit,
            start_tls=False,
            tls_context=settings.tls_context if implicit else None,
            # An IPv4 local address makes the connect use IPv4 addresses only.
            source_address=("0.0.0.0", 0) if settings.ipv4_only else None,  # noqa: S104 - a local bind, not a listener
        )
        self.created = time.monotonic()
        #: When the server last answered (`_after_reading`): a connection heard from recently is alive.
        self.heard = self.created
        self.transactions = 0
        self._broken = False
        self._session_kept = False  # this connection's TLS session is in the context's cache
        self.security = _PLAIN  # set by open()

    @property
    def usable(self) -> bool:
        """Connected and in step with the server (aiosmtplib closes on 421 and on read timeouts)."""
        return not self._broken and self.smtp.is_connected

    async def open(self) -> None:
        """Connect, read the banner, greet, STARTTLS and AUTH as configured. Raises RelayError.

        `security` then says how the connection is secured."""
        try:
            # uvloop runs the handshake in the context the connection was made in, asyncio in the
            # one STARTTLS was sent from: the destination is set around both.
            with resuming_for(*self.destination):
                await self._open(self.settings.tls_mode)
        except _HandshakeFailed as exc:
            if not self.settings.plaintext_fallback:
                raise exc.error from None
            # Opportunistic, and the operator allows clear text after a failed handshake.
            self._broken = False
            await self._open("none")
        self.security = self._secured()
        self.heard = time.monotonic()

    async def _open(self, mode: TlsMode) -> None:
        try:
            async with self._step("[CONNECT]"):
                await self.smtp.connect(timeout=self.settings.connect_timeout)
        except RelayError:
            context = self.settings.tls_context
            if mode == "implicit" and isinstance(context, ResumingContext):
                # The handshake may be what failed (one that offered the kept session, say): the
                # next connection starts afresh, as after a failed STARTTLS.
                context.forget(self.destination)
            raise
        await self._greet()
        if mode == "implicit":
            self._remember_session()
        if mode in ("starttls", "opportunistic"):
            if self.smtp.supports_extension("starttls"):
                plain = self.smtp.transport  # under uvloop a failed handshake leaves it open, unowned
                try:
                    async with self._step("STARTTLS"):
                        await self.smtp.starttls(
                            server_hostname=self.destination.name,
                            tls_context=self.settings.tls_context,
                            timeout=self.settings.command_timeout,
                        )
                except RelayError as exc:
                    if not self.usable:  # the handshake failed: the connection is gone
                        if plain is not None and not plain.is_closing():
                            plain.abort()  # type: ignore[attr-defined]
                        if isinstance(self.settings.tls_context, ResumingContext):
                            self.settings.tls_context.forget(self.destination)  # the next starts afresh
                        error = exc
                        if exc.reply.enhanced_status != "4.7.5":  # lost or timed out mid-handshake
                            detail = f"{exc.reply.message.partition(' ')[2]} ({self.destination.label})"
                            error = RelayError.from_reply(replies.tls_failed("STARTTLS", detail))
                        if mode == "opportunistic":
                            raise _HandshakeFailed(error) from None
                        raise error from None
                    if mode == "starttls":  # refused: our configuration and theirs disagree, so not permanent
                        self._fail(replies.tls_refused(exc.reply.message))
                    # opportunistic: refused, so carry on in plain text
                else:
                    self._check_dane()  # before anything more goes to the server: AUTH's password above all
                    await self._greet()
                    self._remember_session()
            elif self.settings.dane is not None:
                self._fail(replies.dane_failed(self.destination.label, "it does not offer STARTTLS"))
            elif self.settings.require_tls:
                self._fail(replies.tls_required(self.destination.label, "it does not offer STARTTLS"))
            elif mode == "starttls":
                self._fail(replies.not_offered("STARTTLS", "STARTTLS"))
        if self.settings.credentials is not None:
            if not self.smtp.supports_extension("auth"):
                self._fail(replies.not_offered("AUTH", "AUTH"))
            await self._authenticate(*self.settings.credentials)

    def _remember_session(self) -> None:
        """Keep the TLS session of a full handshake for the next connections to this destination
        (relays/smtp/resumption.py). Called once a reply came over TLS, when a TLS 1.3 server
        has sent its ticket, and at QUIT for a ticket that came later."""
        context = self.settings.tls_context
        transport = self.smtp.transport
        if self._session_kept or not isinstance(context, ResumingContext) or transport is None:
            return
        tls = transport.get_extra_info("ssl_object")
        if tls is not None:
            # A resumed connection's session is the one kept already.
            self._session_kept = tls.session_reused or context.remember(self.destination, tls)

    def _check_dane(self) -> None:
        """A server with usable TLSA records must match them, checked as soon as the handshake is
        done: until then it is not authenticated (the context checks no certificate)."""
        dane = self.settings.dane
        if dane is None or not dane.records:
            return
        transport = self.smtp.transport
        tls = transport.get_extra_info("ssl_object") if transport is not None else None
        reason = check(dane, peer_chain(tls)) if tls is not None else "no TLS"
        if reason is not None:
            self.close()
            self._fail(replies.dane_failed(self.destination.label, reason))

    def _secured(self) -> HopSecurity:
        """How this connection is secured: TLS or not, and whether the certificate was verified
        for the server's name (the context both requires a valid chain and checks the name)."""
        transport = self.smtp.transport
        tls = transport.get_extra_info("ssl_object") if transport is not None else None
        if tls is None:
            return _PLAIN
        context = self.settings.tls_context
        verified = context is not None and context.verify_mode == ssl.CERT_REQUIRED and context.check_hostname
        dane = self.settings.dane is not None and bool(self.settings.dane.records)  # open() checked them
        cipher = tls.cipher()
        return HopSecurity(
            encrypted=True,
            tls_version=tls.version(),
            cipher=cipher[0] if cipher else None,
            authenticated="dane" if dane else "ca" if verified else "none",
            resumed=tls.session_reused,
        )

    async def _authenticate(self, username: str, password: str) -> None:
        """AUTH with the first mechanism both sides know (aiosmtplib's order: CRAM-MD5, PLAIN, LOGIN).

        One attempt: the next mechanism only after the server refused this one as such
        (504 unrecognised, 534 too weak; RFC 4954), never after a refused password. aiosmtplib's
        `login()` tries every mechanism whatever the refusal, so a wrong password cost one failed
        login per mechanism, each counted by fail2ban and dovecot's auth penalty. A refused login
        is a configuration problem: with `auth_soft_bounce` (the default, as Postfix's
        smtp_sasl_auth_soft_bounce) it answers 454 4.7.8, so that clients keep their mail.
        """
        methods = {"cram-md5": self.smtp.auth_crammd5, "plain": self.smtp.auth_plain, "login": self.smtp.auth_login}
        usable = [name for name in self.smtp.supported_auth_methods if name in methods]
        offered = " ".join(self.smtp.server_auth_methods).upper() or "none"
        transport = self.smtp.transport
        if self.settings.tls_mode != "none" and (transport is None or transport.get_extra_info("ssl_object") is None):
            # TLS was asked for and the connection is clear text all the same (STARTTLS not
            # offered or refused, or plaintext_fallback after a failed handshake): whoever stripped
            # STARTTLS would read PLAIN's and LOGIN's password. CRAM-MD5 sends a digest only
            # (Postfix's default smtp_sasl_security_options = noplaintext). `tls: {mode: none}`
            # is the operator's explicit choice of clear text.
            usable = [name for name in usable if name == "cram-md5"]
            offered += " over a connection that is not encrypted, where the password would go in clear text"
        if not usable:
            self._fail(replies.no_auth_mechanism(offered))
        for n, name in enumerate(usable):
            try:
                async with self._step("AUTH"):
                    await methods[name](username, password, timeout=self.settings.command_timeout)
                return
            except RelayError as exc:
                reply = exc.reply
                if reply.code in (504, 534) and n + 1 < len(usable) and self.usable:
                    continue
                if reply.code // 100 == 5 and self.settings.auth_soft_bounce:
                    self._fail(replies.auth_refused(reply))
                raise

    async def _greet(self) -> None:
        name = self.settings.ehlo_as.encode("ascii")
        if self.settings.lmtp:
            response = await self._command("LHLO", b"LHLO", name)
            if response.code != 250:
                self._fail(_refusal(response, "LHLO"))
            self.smtp.last_ehlo_response = response
            return
        response = await self._command("EHLO", b"EHLO", name)
        if response.code == 250:
            self.smtp.last_ehlo_response = response
            return
        if response.code not in (500, 502):  # 500/502: no ESMTP here, so HELO
            self._fail(_refusal(response, "EHLO"))
        response = await self._command("HELO", b"HELO", name)
        if response.code != 250:
            self._fail(_refusal(response, "HELO"))
        self.smtp.last_helo_response = response

    async def transaction(self, envelope: Envelope, recipients: Sequence[str], context: DeliveryContext) -> Transaction:
        """MAIL, one RCPT per recipient, DATA and the message; one reply per recipient.

        Raises StaleSessionError when a reused connection turns out dead at
        MAIL; every other failure becomes the replies of the recipients it hit.
        """
        if envelope.require_tls and self.security.authenticated == "none":
            # Never reached through mx, whose require_tls connections verify the server (verified()).
            why = "it is not encrypted" if not self.security.encrypted else "the server's certificate was not verified"
            reply = replies.tls_required(self.destination.label, why)
            return Transaction([reply] * len(recipients), False, security=self.security)
        state = self._prepare(envelope, recipients)
        self.transactions += 1
        data_sent = False
        in_doubt: frozenset[int] = frozenset()
        try:
            if state.pending:
                joined = await self._envelope_with_message(state, context) if self._joins(state) else None
                if joined is not None:
                    data_sent, in_doubt = joined
                else:
                    if self.smtp.supports_extension("pipelining"):
                        accepted = await self._envelope_pipelined(state)
                    else:
                        accepted = await self._envelope_stepwise(state)
                    if accepted:
                        data_sent = True
                        in_doubt = await self._send_data(state, accepted, context)
        except RelayError as exc:
            state.answer_rest(exc.reply)
        return Transaction(state.replies(), data_sent, in_doubt, self.security)

    def _prepare(self, envelope: Envelope, recipients: Sequence[str]) -> "_TransactionState":
        """The transaction's MAIL and RCPT arguments, with the parameters 8-bit data and UTF-8
        addresses need; recipients that cannot go (the server lacks the extension) are answered here."""
        reused = self.transactions > 0
        results: list[Reply | None] = [None] * len(recipients)
        options: list[bytes] = []
        encoding = "ascii"
        if not envelope.message.isascii():
            if not self.smtp.supports_extension("8bitmime"):
                return _TransactionState.answered(recipients, replies.eight_bit_refused(), reused)
            options.append(b"BODY=8BITMIME")
        sender, wire = envelope.sender, list(recipients)
        if not sender.isascii() or not all(r.isascii() for r in recipients):
            if self.smtp.supports_extension("smtputf8"):
                options.append(b"SMTPUTF8")
                encoding = "utf-8"
            else:  # a non-ASCII domain goes as its A-label; only a non-ASCII local part needs SMTPUTF8
                converted = ascii_address(sender)
                if converted is None:
                    return _TransactionState.answered(recipients, replies.utf8_refused(), reused)
                sender = converted
                refused = replies.utf8_refused()
                for i, rcpt in enumerate(recipients):
                    if (converted := ascii_address(rcpt)) is None:
                        results[i] = refused
                    else:
                        wire[i] = converted
        data = crlf_lines(envelope.message)  # once: SIZE= counts it, DATA sends it
        if self.smtp.supports_extension("size"):
            # With the CRLF a last line without one gets (BDAT's chunk, DATA's terminator alike).
            size = len(data) + (0 if not data or data.endswith(b"\r\n") else 2)
            limit = self.smtp.esmtp_extensions["size"].strip()
            if limit.isdigit() and 0 < int(limit) < size:
                return _TransactionState.answered(recipients, replies.size_exceeded(size, int(limit)), reused)
            options.append(b"SIZE=%d" % size)
        pending = [i for i, r in enumerate(results) if r is None]
        return _TransactionState(
            recipients,
            results,
            reused,
            mail=[b"FROM:<" + sender.encode(encoding) + b">", *options],
            pending=pending,
            # `bob@example.org.` goes as RCPT TO:<bob@example.org>, as Postfix rewrites it (servers
            # refuse the dot); results and data_sent keep the address as given.
            rcpts=[b"TO:<" + wire[i].rstrip(".").encode(encoding) + b">" for i in pending],
            data=data,
            bdat=self.settings.chunking and self.smtp.supports_extension("chunking"),
        )

    def _joins(self, state: "_TransactionState") -> bool:
        """Whether the message goes in the envelope's write (`_envelope_with_message`): BDAT and
        PIPELINING offered, SMTP (an LMTP server's reply count depends on the RCPT replies), a
        message of one TLS record at most, a connection new or heard from within JOIN_WITHIN."""
        return (
            state.bdat
            and not self.settings.lmtp
            and len(state.data) <= _ONE_RECORD
            and (not state.reused or time.monotonic() - self.heard < JOIN_WITHIN)
            and self.smtp.supports_extension("pipelining")
        )

    def _envelope(self, state: "_TransactionState") -> bytes:
        """MAIL and every RCPT, pipelined, each with its CRLF."""
        lines = [b" ".join([b"MAIL", *state.mail]), *(b"RCPT " + r for r in state.rcpts)]
        if any(c in line for line in lines for c in (b"\r", b"\n", b"\0")):
            # Never reached with validated addresses: the same guard aiosmtplib keeps for its commands.
            self._fail(replies.invalid_characters("MAIL"))
        return b"".join(line + b"\r\n" for line in lines)

    async def _envelope_with_message(
        self, state: "_TransactionState", context: DeliveryContext
    ) -> tuple[bool, frozenset[int]] | None:
        """MAIL, every RCPT and `BDAT <size> LAST` with the message, in one write (RFC 3030 allows
        BDAT in a pipelined group), then their replies: one round trip and, over TLS, one record
        each way instead of two. Recipients are answered in `state`.

        Returns whether the server may have the message (some RCPT taken, or replies missing)
        and the recipients it may have delivered to without a final reply; None when nothing
        was sent and the message goes in two steps after all (see below)."""
        rcpt_count = len(state.rcpts)
        envelope = self._envelope(state)
        # Everything goes in this write: from here on the server may deliver.
        await context.sending([state.recipients[i] for i in state.pending])
        # That await may have taken up to REDIS_TIMEOUT (a keyed delivery's progress record):
        # a connection that went meanwhile took nothing (a new one, not a delivery in doubt), and
        # one silent for JOIN_WITHIN since is judged as `_joins` judges an idle one.
        if self._live_transport() is None:
            if state.reused:
                raise StaleSessionError
            self._fail(replies.connection_lost("MAIL"))
        if state.reused and time.monotonic() - self.heard >= JOIN_WITHIN:
            return None
        payload = b"".join((envelope, *_bdat_chunk(state.data)))
        rcpt_names: list[Command] = ["RCPT"] * rcpt_count
        names: list[Command] = ["MAIL", *rcpt_names, "[SEND_DATA]"]
        got, lost = await self._exchange(payload, names, with_message=True)
        mail, rcpt_replies, final = got[:1], got[1 : 1 + rcpt_count], got[1 + rcpt_count :]
        if mail and mail[0].code // 100 != 2:
            if final and final[0].code // 100 == 2:
                return self._taken_anyway(state, final[0])
            if state.reused and mail[0].code == 421:
                raise StaleSessionError  # the server is closing: it took nothing of this group
            state.answer_rest(_refusal(mail[0], "MAIL"))  # no transaction: the data went nowhere
            return False, frozenset()
        accepted: list[int] = []
        unknown: list[int] = []  # the connection went before their RCPT reply: maybe taken
        for n, i in enumerate(state.pending):
            if n >= len(rcpt_replies):
                unknown.append(i)
            elif rcpt_replies[n].code // 100 == 2:
                accepted.append(i)
            else:
                state.results[i] = _refusal(rcpt_replies[n], "RCPT")
        if final:
            if accepted:
                state.answer(accepted, _final(final[0], "[SEND_DATA]"))
                if final[0].code // 100 != 2 and self.usable:
                    await self._reset()  # a refused BDAT LAST may leave the transaction open (_send_data)
                return True, frozenset()
            if final[0].code // 100 == 2:
                return self._taken_anyway(state, final[0])
            # No recipient taken: the server refused the chunk (554/503) and has nothing to deliver.
            # Whether that ended the transaction MAIL opened, RFC 3030 does not say (Postfix ends
            # it): RSET, as the two-step path does, or the next MAIL may be refused as nested.
            if self.usable:
                await self._reset()
            return False, frozenset()
        if not accepted and not unknown:  # every recipient refused, then no reply to the chunk
            return False, frozenset()
        # The whole group went, then the replies stopped: the server may have delivered.
        doubt = [*accepted, *unknown]
        state.answer(doubt, lost or replies.connection_lost("[SEND_DATA]", maybe_delivered=True))
        return True, frozenset(doubt)

    def _taken_anyway(self, state: "_TransactionState", final: SMTPResponse) -> tuple[bool, frozenset[int]]:
        """Out of protocol: the envelope refused (MAIL, or every RCPT), then the message answered
        2xx. The server may have queued it, for whom is unknown: all in doubt (a retry elsewhere
        could send a second copy), and a server out of step is dropped."""
        self.close()
        detail = f"{final.code} to the message after the envelope was refused; it may have been delivered"
        state.answer(state.pending, replies.protocol_error("[SEND_DATA]", detail))
        return True, frozenset(state.pending)

    async def _envelope_stepwise(self, state: "_TransactionState") -> list[int]:
        """MAIL, RCPT and DATA one at a time, each waiting for its reply. Returns the indexes of
        the recipients to send the message for (DATA got 354), answering the others in `state`."""
        try:
            response = await self._command("MAIL", b"MAIL", *state.mail)
        except RelayError:
            if state.reused:
                raise StaleSessionError from None
            raise
        if response.code // 100 != 2:
            if state.reused and response.code == 421:
                raise StaleSessionError
            self._fail(_refusal(response, "MAIL"))
        accepted: list[int] = []
        for i, rcpt in zip(state.pending, state.rcpts, strict=True):
            response = await self._command("RCPT", b"RCPT", rcpt)
            if response.code // 100 == 2:
                accepted.append(i)
            else:
                state.results[i] = _refusal(response, "RCPT")
        if not accepted:
            await self._reset()
            return []
        if state.bdat:  # BDAT carries the message itself: no command before it
            return accepted
        response = await self._command("DATA", b"DATA")
        if response.code != 354:
            state.answer(accepted, _refusal(response, "DATA"))
            await self._reset()
            return []
        return accepted

    async def _envelope_pipelined(self, state: "_TransactionState") -> list[int]:
        """MAIL, every RCPT and DATA in one write, then their replies (RFC 2920): one round
        trip instead of two plus one per recipient. Same outcome as `_envelope_stepwise`."""
        rcpt_count = len(state.rcpts)
        rcpt_names: list[Command] = ["RCPT"] * rcpt_count
        # With BDAT the envelope ends at the last RCPT: the message goes once some recipient is taken.
        names: list[Command] = ["MAIL", *rcpt_names, *(() if state.bdat else ("DATA",))]
        got, lost = await self._exchange(self._envelope(state) + (b"" if state.bdat else b"DATA\r\n"), names)
        if state.reused and (not got or got[0].code == 421):
            raise StaleSessionError  # a pooled connection the server had given up on: nothing happened
        if lost is not None and not got:
            self._fail(lost)
        mail, rcpt_replies, data = got[0], got[1 : 1 + rcpt_count], got[1 + rcpt_count :]
        if mail.code // 100 != 2:
            if data and data[0].code == 354:
                await self._end_empty_data()
            self._fail(_refusal(mail, "MAIL"))
        accepted: list[int] = []
        for n, i in enumerate(state.pending):
            if n >= len(rcpt_replies):
                break  # the connection went before this reply came: `lost` answers the rest
            if rcpt_replies[n].code // 100 == 2:
                accepted.append(i)
            else:
                state.results[i] = _refusal(rcpt_replies[n], "RCPT")
        if lost is not None:
            state.answer_rest(lost)
            return []
        if state.bdat:
            if not accepted and self.usable:
                await self._reset()
            return accepted
        if not accepted or data[0].code != 354:
            if data[0].code == 354:
                await self._end_empty_data()  # the server took DATA with no recipient: end it empty
            else:
                state.answer(accepted, _refusal(data[0], "DATA"))
            if self.usable:
                await self._reset()
            return []
        return accepted

    async def _exchange(
        self, payload: bytes, names: Sequence[Command], *, with_message: bool = False
    ) -> tuple[list[SMTPResponse], Reply | None]:
        """Write `payload` (pipelined commands) and read one reply per name in `names`, each
        within `command_timeout`. Returns the replies that came and, if not all did, the reply
        for the rest (a timeout or a lost connection; the connection is then closed).

        `with_message`: the payload ends with the whole message (`_envelope_with_message`): each
        reply is waited for up to the longer of `command_timeout` and `data_timeout`, a failure
        says the message may have been delivered, and replies followed by more than an end of
        the connection are out of step: none is returned.

        Our own reader takes the transport for the exchange (`reading_replies`)."""
        transport = self._live_transport()
        if transport is None:
            return [], replies.connection_lost(names[0])
        lost: Reply | None = None
        settings = self.settings
        last = len(names)
        # With the message, any reply may wait for it to be processed (Postfix holds RCPT's reply
        # until its end-of-data step, milters included, is done): each within the longer timeout.
        timeout = max(settings.command_timeout, settings.data_timeout) if with_message else settings.command_timeout
        with reading_replies(transport, self._after_reading) as reader:
            reader.expect(last)
            try:
                transport.write(payload)
                while (n := len(reader.replies)) < last:
                    await reader.read(n + 1, timeout)
            except TimeoutError:
                lost = self._lost(names[len(reader.replies)], "timeout", "", with_message)
            except ReplyTooLongError as exc:
                lost = self._lost(names[min(len(reader.replies), last - 1)], "too long", exc.message, with_message)
            except (aiosmtplib.SMTPException, OSError):
                lost = self._lost(names[min(len(reader.replies), last - 1)], "lost", "", with_message)
        if lost is not None:
            self.close()
        elif not reader.clean:  # all replies came, then more or an end: closed, so no data
            lost = self._lost(names[-1], "lost", "", with_message)
            if with_message and not reader.closed_after_replies:
                return [], lost  # which reply answered the message is unknown: none is trusted
        return reader.replies[:last], lost

    @staticmethod
    def _lost(name: Command, why: Literal["timeout", "too long", "lost"], detail: str, with_message: bool) -> Reply:
        """The reply for the rest of an exchange that broke off at `name`'s reply."""
        if with_message:  # the whole message went: the server may have delivered it
            if why == "timeout":
                return replies.timed_out(
                    "[SEND_DATA]", "the reply to the message data; the message may have been delivered"
                )
            if why == "too long":
                return replies.reply_too_long("[SEND_DATA]", detail, maybe_delivered=True)
            return replies.connection_lost("[SEND_DATA]", maybe_delivered=True)
        if why == "timeout":
            return replies.timed_out(name, f"the reply to {name}")
        if why == "too long":
            return replies.reply_too_long(name, detail)
        return replies.connection_lost(name)

    def _live_transport(self) -> asyncio.Transport | None:
        """The connection's transport; None (and the connection closed) when it is gone."""
        # uvloop's transports are not asyncio.Transport subclasses, but have its methods.
        transport = cast(asyncio.Transport | None, self.smtp.transport)
        if transport is None or transport.is_closing():
            self.close()
            return None
        return transport

    def _after_reading(self, reader: ReplyReader) -> None:
        """A connection our reader left out of step (replies missing or extra, an error) is
        closed; a 421 marks it broken."""
        if not reader.clean:
            self.close()
        if reader.replies:
            self.heard = time.monotonic()
            if any(r.code == 421 for r in reader.replies):
                self._broken = True

    async def _end_empty_data(self) -> None:
        """DATA was accepted although the transaction cannot go on: a lone "." ends it (RFC 2920)."""
        got, _ = await self._exchange(b".\r\n", ["[SEND_DATA]"])
        if not got:
            self._broken = True

    async def _command(self, step: Command, *args: bytes) -> SMTPResponse:
        async with self._step(step):
            response = await self.smtp.execute_command(*args, timeout=self.settings.command_timeout)
        if response.code == 421:  # the server is closing this connection
            self._broken = True
        return response

    async def _send_data(
        self, state: "_TransactionState", accepted: list[int], context: DeliveryContext
    ) -> frozenset[int]:
        """Write the message (dot-stuffed, then its terminator; or after `BDAT <size> LAST`, as it is)
        and read the replies (LMTP: one per accepted recipient), through our reader
        (`reading_replies`); answers `accepted` in `state`.

        Returns the recipients the server may have delivered to without a
        reply: the whole message went out, then the replies stopped coming.
        `data_timeout` bounds each wait: for the server to take the next
        chunk, and for the replies after the last.
        """
        transport = self._live_transport()
        if transport is None:
            state.answer(accepted, replies.connection_lost("[SEND_DATA]"))
            return frozenset()
        count = len(accepted) if self.settings.lmtp else 1
        failure: Reply | None = None
        whole_sent = False
        if state.bdat:  # the message as it is, its size in the command: nothing to stuff or scan for
            head, body, end = _bdat_chunk(state.data)
        else:
            head = b""
            body, end = stuff_dots(state.data)
        with reading_replies(transport, self._after_reading) as reader:
            reader.expect(count)  # before the data: a reply beyond `count` is refused as it comes
            try:
                view = memoryview(body)
                for offset in range(0, max(len(view), 1), _DATA_CHUNK):  # an empty body still gets its "."
                    chunk = view[offset : offset + _DATA_CHUNK]
                    if offset + _DATA_CHUNK >= len(view):
                        # The final "." goes out with this chunk: from here on the server may deliver.
                        await context.sending([state.recipients[i] for i in accepted])
                        whole_sent = True
                        if len(chunk) <= _ONE_RECORD:
                            # Joined: over TLS each piece written is a record of its own (and a read
                            # for the server); a small message goes as one.
                            transport.write(b"".join((head, chunk, end)))
                        else:
                            transport.writelines([head, chunk, end])  # one system call where the loop can
                    elif head:
                        transport.writelines([head, chunk])
                    else:
                        transport.write(chunk)
                    head = b""
                    await reader.writable(self.settings.data_timeout)
                await reader.read(count, self.settings.data_timeout)
            except TimeoutError:
                failure = self._lost("[SEND_DATA]", "timeout", "", True)
            except ReplyTooLongError as exc:
                failure = self._lost("[SEND_DATA]", "too long", exc.message, whole_sent)
            except (aiosmtplib.SMTPException, OSError):
                failure = self._lost("[SEND_DATA]", "lost", "", True)
        if failure is not None:
            self.close()  # abort, not close: close would still send the buffered rest of the message
        finals = reader.replies
        if not self.settings.lmtp and finals:
            state.answer(accepted, _final(finals[0], "[SEND_DATA]"))
            if state.bdat and finals[0].code // 100 != 2 and self.usable:
                # DATA's final reply ends the transaction (RFC 5321); whether a refused BDAT LAST
                # does, RFC 3030 does not say (Postfix ends it): RSET, or a stricter server
                # refuses the next message's MAIL as nested.
                await self._reset()
            return frozenset()
        # LMTP: replies that came before a failure stand; only the rest get the failure.
        for i, response in zip(accepted, finals, strict=False):
            state.results[i] = _final(response, "[SEND_DATA]")
        missing = accepted[len(finals) :]
        if missing:
            state.answer(missing, failure or replies.protocol_error("[SEND_DATA]", "fewer replies than recipients"))
        return frozenset(missing) if whole_sent else frozenset()

    async def _reset(self) -> None:
        """RSET after a refused transaction, so the connection can serve the next one. Its reply
        answers no recipient, so no RelayError: a connection that fails it is not reused."""
        try:
            response = await self.smtp.execute_command(b"RSET", timeout=self.settings.command_timeout)
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            self.close()  # as in _step: a late reply must never answer the next command
            return
        if response.code != 250:
            self._broken = True

    async def quit(self) -> None:
        """QUIT politely, then close; a server slow to answer QUIT does not hold up a shutdown."""
        # aiosmtplib's quit() closes the transport gracefully and forgets it: over TLS that close
        # waits for the server's close_notify (up to uvloop's 30 s), the socket still open after
        # the pool freed its slot (and lease), and unfinished when a test's loop closed. Dropped
        # at once here, as close() drops every other connection: after 221 nothing is left to send.
        transport = self.smtp.transport
        self._remember_session()
        try:
            if self.smtp.is_connected:
                async with asyncio.timeout(min(self.settings.command_timeout, QUIT_TIMEOUT)):
                    await self.smtp.quit()
        except (aiosmtplib.SMTPException, OSError, TimeoutError):
            pass
        finally:
            self.close()
            if transport is not None:
                transport.abort()  # type: ignore[attr-defined]

    def close(self) -> None:
        """Drop the connection at once: nothing still buffered is sent (after QUIT, nothing is).

        A linger of 0 makes the kernel reset the connection and discard its
        send queue too, so a message we gave up on can never reach its final "."
        """
        self._broken = True
        transport = self.smtp.transport
        if transport is not None:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            transport.abort()  # type: ignore[attr-defined]
        self.smtp.close()

    def _fail(self, reply: Reply) -> NoReturn:
        raise RelayError.from_reply(reply)

    @asynccontextmanager
    async def _step(self, command: Command) -> AsyncIterator[None]:
        """The one place where aiosmtplib, OS, TLS and timeout errors become replies.

        A connection that failed this way is closed: after a timeout a late
        reply could be paired with the next command (aiosmtplib's desync rule).
        """
        try:
            yield
        except aiosmtplib.SMTPResponseException as exc:
            # The server answered: the connection is in step, unless it was the banner, or no
            # reply at all (code -1: aiosmtplib found it malformed or past its MAX_RESPONSE_LENGTH).
            if exc.code < 0 or isinstance(exc, aiosmtplib.SMTPConnectResponseError):
                self.close()
            raise RelayError.from_reply(self._translate(exc, command)) from exc
        except (aiosmtplib.SMTPException, OSError, TimeoutError, ValueError) as exc:
            self.close()
            raise RelayError.from_reply(self._translate(exc, command)) from exc

    def _translate(self, exc: BaseException, command: Command) -> Reply:
        target = self.destination.label
        cause = exc.__cause__
        if isinstance(exc, aiosmtplib.SMTPConnectResponseError):
            return _refusal(SMTPResponse(exc.code, exc.message), "[BANNER]")
        if isinstance(exc, ssl.SSLError) or isinstance(cause, ssl.SSLError):
            reason = getattr(exc if isinstance(exc, ssl.SSLError) else cause, "reason", None) or str(exc)
            return replies.tls_failed(command, f"{reason} ({target})")
        if isinstance(exc, aiosmtplib.SMTPConnectTimeoutError) or (
            command == "[CONNECT]" and isinstance(exc, TimeoutError)
        ):
            return replies.connection_failed(target, "timed out")
        if isinstance(exc, aiosmtplib.SMTPConnectError):
            return replies.connection_failed(target, _os_reason(cause) if isinstance(cause, OSError) else str(exc))
        if isinstance(exc, TimeoutError):
            return replies.timed_out(command, f"the reply to {command}")
        if isinstance(exc, aiosmtplib.SMTPServerDisconnected | ConnectionError):
            return replies.connection_lost(command)
        if isinstance(exc, aiosmtplib.SMTPResponseException) and exc.code < 0:  # not a reply: its own words
            return replies.protocol_error(command, f"{exc.message[:200]}; connection dropped")
        if isinstance(exc, aiosmtplib.SMTPResponseException):
            return _refusal(SMTPResponse(exc.code, exc.message), command)
        if isinstance(exc, OSError):
            return replies.connection_failed(target, _os_reason(exc))
        if isinstance(exc, ValueError):  # aiosmtplib's command-injection guard: never reached with validated input
            return replies.invalid_characters(command)
        return replies.protocol_error(command, str(exc))


def ascii_address(address: str) -> str | None:
    """`address` with its domain as A-labels (IDNA 2008, UTS 46 mapping: `Bücher.example` is
    `xn--bcher-kva.example`), for a server without SMTPUTF8; None when the local part is not ASCII
    or the domain has no A-label form. The null sender and address literals are ASCII already."""
    if address.isascii():
        return address
    local, _, domain = address.rpartition("@")
    if not local.isascii():
        return None
    try:
        return f"{local}@{idna.encode(domain, uts46=True).decode('ascii')}"
    except idna.IDNAError:
        return None


def _os_reason(exc: OSError) -> str:
    # asyncio words a refused connect as "Connect call failed (addr)"; the errno says what happened.
    if exc.errno:
        return os.strerror(exc.errno)
    return str(exc) or type(exc).__name__


def _final(response: SMTPResponse, command: Command) -> Reply:
    """A reply that ends a recipient's delivery, as the server sent it."""
    if response.code // 100 in (2, 4, 5):
        return Reply.parse(response.code, response.message, command)
    return replies.protocol_error(command, f"{response.code} {response.message}"[:200])


def _refusal(response: SMTPResponse, command: Command) -> Reply:
    """The reply of a step that did not succeed. A 2xx or 3xx here is a server
    out of protocol (DATA answered 250, EHLO answered 220): never a delivery."""
    if response.code // 100 in (4, 5):
        return Reply.parse(response.code, response.message, command)
    return replies.protocol_error(command, f"{response.code} {response.message}"[:200])


_LINE_ENDS = re.compile(rb"\r*\n")
_LEADING_DOT = re.compile(rb"(^|\r)\.", re.MULTILINE)


def _crlf_only(message: bytes) -> bool:
    crlf = message.count(b"\r\n")
    return message.count(b"\r") == crlf == message.count(b"\n")


def crlf_lines(message: bytes) -> bytes:
    """The message with CRLF line ends (see encode_data); the message itself when it has them
    already. Its length is what SIZE= declares (RFC 1870: before dot-stuffing)."""
    return message if _crlf_only(message) else _LINE_ENDS.sub(b"\r\n", message)


def encode_data(message: bytes) -> tuple[bytes, bytes]:
    """The message as DATA content: CRLF line ends, dot-stuffed, terminated by `.` (RFC 5321 4.5.2).

    Line ends: an LF, with any CRs right before it, is one line end and becomes CRLF, so
    `X-Test: a\\r\\r\\n` stays one header line and the header/body structure never changes. A lone
    CR (not followed by LF) is not a line end: it is kept inside its line, as Postfix's smtpd
    does (it ends lines at LF only and strips the CRs before it; 3.7 then stored the lone CR as
    a space, tests/relays/test_postfix.py). A dot right after a lone CR is doubled too: a
    receiver that takes a lone CR as a line end must not see `CR . CR LF` as the end of the data
    (SMTP smuggling); a receiver that does not shows one more dot, in a message that was
    malformed anyway.

    Returned as the body and the terminator, written one after the other: appending the
    terminator would copy the whole message. Most messages are already CRLF-only with no
    line starting with ".": then the body is the message itself, not a copy.
    """
    return stuff_dots(crlf_lines(message))


def _bdat_chunk(data: bytes) -> tuple[bytes, bytes, bytes]:
    """`BDAT <size> LAST`, the message as it is, and the CRLF a last line without one gets (as
    DATA's terminator gives it one): nothing to stuff or scan for."""
    end = b"" if data.endswith(b"\r\n") or not data else b"\r\n"
    return b"BDAT %d LAST\r\n" % (len(data) + len(end)), data, end


def stuff_dots(data: bytes) -> tuple[bytes, bytes]:
    """`data` (CRLF line ends) dot-stuffed, and the terminator to write after it (encode_data)."""
    if data.startswith(b".") or b"\n." in data or b"\r." in data:
        data = _LEADING_DOT.sub(rb"\1..", data)
    return data, b".\r\n" if data.endswith(b"\r\n") else b"\r\n.\r\n"
