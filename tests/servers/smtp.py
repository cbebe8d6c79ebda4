"""aiosmtpd SMTP/LMTP servers in their own thread, with replies scripted as data."""

import asyncio
import ssl
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trustme
from aiosmtpd.lmtp import LMTP
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword


@dataclass
class Received:
    sender: str
    recipients: list[str]
    content: bytes
    mail_options: list[str]
    tls: bool
    login: bytes | None


@dataclass
class Script:
    """How the server answers. Recipient keys are lower-case addresses."""

    rcpt: dict[str, str] = field(default_factory=dict)  # address -> "550 5.1.1 ..." at RCPT
    lmtp_data: dict[str, str] = field(default_factory=dict)  # LMTP: address -> its reply after the data
    mail_reply: str | None = None  # e.g. "451 4.3.0 busy" at MAIL
    data_reply: str | None = None  # the reply after the message data
    rcpt_delay: float = 0.0  # seconds to stall before answering RCPT
    drop_in_data: bool = False  # close the connection after receiving the data, before replying
    data_delay: float = 0.0  # seconds to stall after receiving the data, before replying


class _Handler:
    def __init__(self, script: Script, received: list[Received]) -> None:
        self.script = script
        self.received = received

    async def handle_MAIL(self, server: Any, session: Any, envelope: Any, address: str, options: list[str]) -> str:
        if self.script.mail_reply:
            return self.script.mail_reply
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 2.1.0 OK"

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, options: list[str]) -> str:
        if self.script.rcpt_delay:
            await asyncio.sleep(self.script.rcpt_delay)
        reply = self.script.rcpt.get(address.lower())
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.received.append(
            Received(
                sender=envelope.mail_from,
                recipients=list(envelope.rcpt_tos),
                content=envelope.original_content or envelope.content,
                mail_options=list(envelope.mail_options),
                tls=server.transport.get_extra_info("ssl_object") is not None,
                login=getattr(session.auth_data, "login", None),
            )
        )
        if self.script.data_delay:
            await asyncio.sleep(self.script.data_delay)
        if self.script.drop_in_data:
            server.transport.abort()
            return "250 2.0.0 never seen"
        if isinstance(server, LMTP):
            lines = [self.script.lmtp_data.get(r.lower(), f"250 2.0.0 <{r}> delivered") for r in envelope.rcpt_tos]
            return "\r\n".join(lines)
        return self.script.data_reply or "250 2.0.0 OK queued as TEST"


class _PipeliningHandler(_Handler):
    """Offers PIPELINING, as Postfix, Exim and dovecot do; aiosmtpd reads pipelined commands line by line."""

    async def handle_EHLO(
        self, server: Any, session: Any, envelope: Any, hostname: str, responses: list[str]
    ) -> list[str]:
        session.host_name = hostname
        return [*responses[:-1], "250-PIPELINING", responses[-1]]


def _authenticate(server: Any, session: Any, envelope: Any, mechanism: str, auth_data: Any) -> AuthResult:
    ok = isinstance(auth_data, LoginPassword) and (auth_data.login, auth_data.password) == (
        b"relay-user",
        b"relay-pass",
    )
    return AuthResult(success=ok, handled=False, auth_data=auth_data if ok else None)


@dataclass
class SmtpServer:
    host: str
    port: int
    script: Script
    received: list[Received]
    connections: list[int]  # one entry per connection made

    @property
    def connection_count(self) -> int:
        return len(self.connections)


@dataclass
class Tls:
    """A test CA and a server certificate for 127.0.0.1, localhost and *.example.test."""

    ca_file: Path
    server_context: ssl.SSLContext


@contextmanager
def tls_material(directory: Path) -> Iterator[Tls]:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost", "mx1.example.test", "smtp.example.test")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(context)
    ca_file = directory / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    yield Tls(ca_file=ca_file, server_context=context)


@contextmanager
def smtp_server(
    script: Script | None = None,
    *,
    lmtp: bool = False,
    host: str = "127.0.0.1",
    port: int = 0,
    tls: Tls | None = None,
    implicit_tls: bool = False,
    auth: bool = False,
    smtputf8: bool = False,
    pipelining: bool = False,
) -> Iterator[SmtpServer]:
    """An aiosmtpd server on `host` and `port` (0: a free one), in its own thread and event loop.

    With `pipelining` it offers PIPELINING.
    With `tls` it offers STARTTLS, or with `implicit_tls` speaks TLS from the start (SMTPS).
    """
    script = script or Script()
    received: list[Received] = []
    connections: list[int] = []
    handler = (_PipeliningHandler if pipelining else _Handler)(script, received)
    protocol_class = LMTP if lmtp else SMTP
    transports: list[asyncio.Transport] = []

    class Counting(protocol_class):  # type: ignore[misc, valid-type]
        def connection_made(self, transport: asyncio.Transport) -> None:
            connections.append(1)
            transports.append(transport)
            super().connection_made(transport)

    kwargs: dict[str, Any] = {"hostname": "test.example", "ident": "test ESMTP"}
    if tls is not None and not implicit_tls:
        kwargs.update(tls_context=tls.server_context, require_starttls=False)
    if auth:
        kwargs.update(authenticator=_authenticate, auth_require_tls=False)
    if smtputf8:
        kwargs.update(enable_SMTPUTF8=True)

    server_ssl = tls.server_context if tls is not None and implicit_tls else None
    with serving(lambda: Counting(handler, **kwargs), host, port, "aiosmtpd", server_ssl, transports) as bound:
        yield SmtpServer(host=host, port=bound, script=script, received=received, connections=connections)


@contextmanager
def serving(
    factory: Callable[[], asyncio.Protocol],
    host: str,
    port: int,
    name: str,
    ssl_context: ssl.SSLContext | None = None,
    transports: list[asyncio.Transport] | None = None,
) -> Iterator[int]:
    """A server of `factory`'s protocol on `host` and `port` (0: a free one, read from the bound
    socket: no race) in its own thread and event loop; yields the port. At the end the `transports`
    its protocols registered are aborted and every task of that loop is cancelled."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    state: dict[str, Any] = {}

    async def start() -> None:
        server = await loop.create_server(factory, host, port, ssl=ssl_context)
        state["server"] = server
        state["port"] = server.sockets[0].getsockname()[1]

    def run() -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_until_complete(start())
        except BaseException as exc:  # reported to the test below
            state["error"] = exc
            ready.set()
            return
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    if not ready.wait(10) or "error" in state:
        raise RuntimeError(f"{name} did not start: {state.get('error')}")
    try:
        yield state["port"]
    finally:

        async def shutdown() -> None:
            state["server"].close()
            for transport in transports or ():
                transport.abort()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await state["server"].wait_closed()

        asyncio.run_coroutine_threadsafe(shutdown(), loop).result(10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
