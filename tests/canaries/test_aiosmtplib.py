"""Canaries for the aiosmtplib internals the SMTP session uses: each fails naming the internal.

aiosmtplib has no public API for pipelining or for reading the replies to the message
data as they come, so relays/smtp/ reaches past it in the places listed in
relays/smtp/session.py's module docstring. pyproject.toml bounds aiosmtplib above at the
version these pass with; when one fails after an upgrade, the message says what moved.
"""

import asyncio
import errno
import socket
import ssl
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, cast

import aiosmtplib
import pytest
from aiosmtplib import SMTPResponse

from relays.smtp.reader import ReplyReader, reading_replies
from tests.canaries import LOOPS
from tests.servers.process import free_port
from tests.servers.raw import Conversation, RawServer, raw_server
from tests.servers.smtp import smtp_server, tls_material

VERSION = f"aiosmtplib {aiosmtplib.__version__}"
TRANSPORT = (
    "SMTP.transport (read by relays/smtp/session.py _live_transport and close(): the connection's "
    "asyncio transport, the TLS one after STARTTLS, None once closed)"
)
SWAP = (
    "the transport's protocol, aiosmtplib's SMTPProtocol, swapped out by relays/smtp/reader.py "
    "reading_replies() for pipelined commands and the message data, and back (it must read the "
    "next command's reply as if nothing happened)"
)
EHLO = (
    "SMTP.last_ehlo_response (set by relays/smtp/session.py _greet after its own EHLO or LHLO: "
    "it fills what supports_extension() and login() read)"
)
HELO = (
    "SMTP.last_helo_response (set by relays/smtp/session.py _greet after its own HELO, so that "
    "starttls() and login() do not greet again)"
)
CONNECT_CAUSE = (
    "SMTPConnectError.__cause__ (relays/smtp/session.py _translate reads the OSError's errno for the reply's reason)"
)

Test = Callable[[], Coroutine[Any, Any, None]]


@asynccontextmanager
async def connected(port: int, host: str = "127.0.0.1") -> AsyncIterator[aiosmtplib.SMTP]:
    """A client made as relays/smtp/session.py makes it (no automatic STARTTLS), closed afterwards."""
    smtp = aiosmtplib.SMTP(hostname=host, port=port, timeout=5, start_tls=False)
    await smtp.connect()
    try:
        yield smtp
    finally:
        smtp.close()


def run(loop_factory: Callable[[], asyncio.AbstractEventLoop], test: Test) -> None:
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(test())


async def exchange_through_our_reader(smtp: aiosmtplib.SMTP, payload: bytes, count: int) -> list[SMTPResponse]:
    """What the session does: our reader on SMTP.transport for a pipelined group, then back."""
    # uvloop's transports are not asyncio.Transport subclasses, but have its methods (as in the session).
    transport = cast(asyncio.Transport | None, smtp.transport)
    assert transport is not None, f"{VERSION}: {TRANSPORT} is None on a live connection"
    judged: list[ReplyReader] = []
    with reading_replies(transport, judged.append) as reader:
        reader.expect(count)
        transport.write(payload)
        await reader.read(count, 5)
    assert judged == [reader]
    assert reader.clean, f"{VERSION}: {SWAP}: replies left over or an error: {reader.replies}"
    assert transport.get_protocol() is smtp.protocol, f"{VERSION}: {SWAP}: not given back"
    return reader.replies


@pytest.mark.parametrize("loop_factory", LOOPS.values(), ids=LOOPS.keys())
def test_smtp_transport_is_the_connections_transport(loop_factory: Callable[[], asyncio.AbstractEventLoop]) -> None:
    async def test() -> None:
        with smtp_server() as server:
            async with connected(server.port) as smtp:
                transport = smtp.transport
                assert transport is not None, f"{VERSION}: {TRANSPORT} is None after connect()"
                for method in ("write", "writelines", "is_closing", "abort", "get_protocol", "set_protocol"):
                    assert callable(getattr(transport, method, None)), f"{VERSION}: {TRANSPORT} has no {method}()"
                assert not transport.is_closing(), f"{VERSION}: {TRANSPORT} is closing after connect()"
                sock = transport.get_extra_info("socket")
                assert sock is not None, f"{VERSION}: {TRANSPORT} gives no socket"
                assert sock.family == socket.AF_INET, f"{VERSION}: {TRANSPORT}'s socket is {sock!r}"
                assert isinstance(transport.get_protocol(), asyncio.BaseProtocol), f"{VERSION}: {SWAP}"
                smtp.close()
                assert smtp.transport is None, f"{VERSION}: {TRANSPORT} is still set after close()"

    run(loop_factory, test)


@pytest.mark.parametrize("loop_factory", LOOPS.values(), ids=LOOPS.keys())
def test_the_protocol_reads_replies_again_after_our_reader(
    loop_factory: Callable[[], asyncio.AbstractEventLoop],
) -> None:
    async def test() -> None:
        with smtp_server(pipelining=True) as server:
            async with connected(server.port) as smtp:
                assert (await smtp.execute_command(b"EHLO", b"canary.test")).code == 250
                got = await exchange_through_our_reader(smtp, b"NOOP\r\nNOOP\r\n", 2)
                assert [r.code for r in got] == [250, 250]
                after = await smtp.execute_command(b"NOOP")
                assert after.code == 250, f"{VERSION}: {SWAP}: the next command got {after}"
                assert smtp.is_connected, f"{VERSION}: {SWAP}: the connection is no longer connected"
                await smtp.quit()

    run(loop_factory, test)


@pytest.mark.parametrize("loop_factory", LOOPS.values(), ids=LOOPS.keys())
def test_after_starttls_the_transport_is_the_tls_one_and_can_be_swapped(
    loop_factory: Callable[[], asyncio.AbstractEventLoop], tmp_path: Path
) -> None:
    async def test() -> None:
        with tls_material(tmp_path) as tls, smtp_server(tls=tls) as server:
            async with connected(server.port) as smtp:
                assert (await smtp.execute_command(b"EHLO", b"canary.test")).code == 250
                context = ssl.create_default_context(cafile=str(tls.ca_file))
                await smtp.starttls(server_hostname="localhost", tls_context=context)
                transport = smtp.transport
                assert transport is not None, f"{VERSION}: {TRANSPORT} is None after starttls()"
                assert transport.get_extra_info("sslcontext") is not None, (
                    f"{VERSION}: {TRANSPORT} is still the plain transport after starttls()"
                )
                assert (await smtp.execute_command(b"EHLO", b"canary.test")).code == 250
                got = await exchange_through_our_reader(smtp, b"NOOP\r\n", 1)
                assert [r.code for r in got] == [250]
                assert (await smtp.execute_command(b"NOOP")).code == 250, f"{VERSION}: {SWAP} (over TLS)"
                await smtp.quit()

    run(loop_factory, test)


def test_last_ehlo_response_feeds_supports_extension_and_login() -> None:
    smtp = aiosmtplib.SMTP()
    try:
        smtp.last_ehlo_response = SMTPResponse(250, "mx.test\nPIPELINING\n8BITMIME\nSMTPUTF8\nAUTH PLAIN LOGIN")
    except AttributeError:
        pytest.fail(f"{VERSION}: {EHLO} can no longer be set")
    offered = [smtp.supports_extension(e) for e in ("pipelining", "8bitmime", "smtputf8", "auth", "starttls")]
    assert offered == [True, True, True, True, False], f"{VERSION}: {EHLO}: supports_extension() no longer reads it"
    assert set(smtp.supported_auth_methods) == {"plain", "login"}, f"{VERSION}: {EHLO}: login() would not see AUTH"
    assert not smtp.is_ehlo_or_helo_needed, f"{VERSION}: {EHLO}: aiosmtplib would greet again"


def answer_until_quit(conv: Conversation, seen: list[str]) -> None:
    """Record every command's verb and accept it (AUTH with 235), until QUIT."""
    while verb := conv.command().split(" ")[0].upper():
        seen.append(verb)
        if verb == "QUIT":
            conv.send("221 bye")
            return
        conv.send("235 2.7.0 ok" if verb == "AUTH" else "250 ok")


def test_a_set_ehlo_response_keeps_login_from_greeting_again() -> None:
    seen: list[str] = []

    def server_side(conv: Conversation, server: RawServer) -> None:
        conv.send("220 raw.test ESMTP")
        conv.expect("EHLO", "250-raw.test\r\n250 AUTH PLAIN")
        answer_until_quit(conv, seen)

    async def test() -> None:
        with raw_server(server_side) as server:
            async with connected(server.port) as smtp:
                smtp.last_ehlo_response = await smtp.execute_command(b"EHLO", b"canary.test")
                try:
                    await smtp.login("user", "pass")
                except aiosmtplib.SMTPException as exc:
                    pytest.fail(f"{VERSION}: {EHLO}: login() refused: {exc}")
                await smtp.quit()
        assert seen == ["AUTH", "QUIT"], f"{VERSION}: {EHLO}: after our EHLO, login() sent {seen}"
        assert not server.errors, server.errors

    run(LOOPS["uvloop"], test)


def test_a_set_helo_response_keeps_aiosmtplib_from_greeting_again() -> None:
    seen: list[str] = []

    def server_side(conv: Conversation, server: RawServer) -> None:
        conv.send("220 raw.test SMTP")
        conv.expect("HELO", "250 raw.test")
        answer_until_quit(conv, seen)

    async def test() -> None:
        with raw_server(server_side) as server:
            async with connected(server.port) as smtp:
                try:
                    smtp.last_helo_response = await smtp.execute_command(b"HELO", b"canary.test")
                except AttributeError:
                    pytest.fail(f"{VERSION}: {HELO} can no longer be set")
                await smtp.mail("a@example.test")  # greets first when it thinks no one has
                await smtp.quit()
        assert seen == ["MAIL", "QUIT"], f"{VERSION}: {HELO}: after our HELO, aiosmtplib sent {seen}"
        assert not server.errors, server.errors

    run(LOOPS["uvloop"], test)


def test_a_refused_connect_carries_the_os_error() -> None:
    async def test() -> None:
        smtp = aiosmtplib.SMTP(hostname="127.0.0.1", port=free_port(), timeout=5, start_tls=False)
        with pytest.raises(aiosmtplib.SMTPConnectError) as caught:
            await smtp.connect()
        cause = caught.value.__cause__
        assert isinstance(cause, OSError), f"{VERSION}: {CONNECT_CAUSE} is {cause!r}"
        assert cause.errno == errno.ECONNREFUSED, f"{VERSION}: {CONNECT_CAUSE} has errno {cause.errno}"

    run(LOOPS["uvloop"], test)
