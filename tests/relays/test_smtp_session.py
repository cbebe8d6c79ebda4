"""The SMTP session's transaction against servers written line by line, and its reply reader on a real socket."""

import asyncio
import contextlib
from collections.abc import Callable

import aiosmtplib
import pytest

from relays.smtp.reader import MAX_REPLY_BYTES, ReplyReader
from tests.conftest import context, envelope, opened
from tests.relays.test_misbehaving_servers import relay
from tests.servers.raw import Conversation, RawServer, raw_server

EHLO = "250-raw.test\r\n250 8BITMIME"
EHLO_PIPELINING = "250-raw.test\r\n250-PIPELINING\r\n250 8BITMIME"


def refuse_every_rcpt_then(rset_reply: str, *, pipelining: bool) -> Callable[[Conversation, RawServer], None]:
    """Refuses the one recipient of each transaction; answers RSET with `rset_reply`."""

    def server_side(conv: Conversation, server: RawServer) -> None:
        conv.send("220 raw.test ESMTP")
        conv.expect("EHLO", EHLO_PIPELINING if pipelining else EHLO)
        while (command := conv.command()).startswith("MAIL"):
            conv.send("250 2.1.0 ok")
            conv.expect("RCPT", "550 5.1.1 no such user")
            if pipelining:
                conv.expect("DATA", "554 5.5.1 no valid recipients")
            conv.expect("RSET", rset_reply)
            if not rset_reply.startswith("250"):
                return
        assert command.startswith("QUIT"), command
        conv.send("221 bye")

    return server_side


@pytest.mark.parametrize("pipelining", [False, True], ids=["stepwise", "pipelined"])
@pytest.mark.parametrize(("rset_reply", "connections"), [("250 2.0.0 ok", 1), ("500 5.5.1 what", 2)])
async def test_a_refused_transaction_is_reset_and_the_connection_kept_only_if_rset_succeeds(
    pipelining: bool, rset_reply: str, connections: int
) -> None:
    with raw_server(refuse_every_rcpt_then(rset_reply, pipelining=pipelining)) as server:
        async with opened(relay(server.port, "command_timeout: 2")) as relays:
            first = await relays["out"].deliver(envelope("ghost@example.net"), context())
            second = await relays["out"].deliver(envelope("ghost@example.net"), context())
    assert [r.reply.code for r in first + second] == [550, 550]
    assert [r.reply.command for r in first + second] == ["RCPT", "RCPT"]
    assert server.connections == connections
    assert not server.errors, server.errors


async def test_extra_replies_after_the_data_give_every_recipient_the_first_and_close_the_connection() -> None:
    def server_side(conv: Conversation, server: RawServer) -> None:
        first = server.connections == 1
        conv.greet_and_take_envelope(2 if first else 1)
        conv.expect("DATA", "354 go")
        server.data_received.append(conv.read_data())
        if first:
            conv.send("250 2.0.0 queued as A", "250 2.0.0 queued as B")  # one too many for SMTP
            with contextlib.suppress(ConnectionResetError):  # the client drops the connection
                conv.command()
        else:
            conv.send("250 2.0.0 queued as C")
            conv.expect("QUIT", "221 bye")

    with raw_server(server_side) as server:
        async with opened(relay(server.port, "command_timeout: 2")) as relays:
            results = await relays["out"].deliver(envelope("a@example.net", "b@example.net"), context())
            again = await relays["out"].deliver(envelope("c@example.net"), context())
    assert [r.reply.message for r in results] == ["2.0.0 queued as A", "2.0.0 queued as A"]
    assert again[0].reply.message == "2.0.0 queued as C"
    assert server.connections == 2  # out of step: never reused
    assert not server.errors, server.errors


async def read_from(payload: bytes, count: int) -> tuple[ReplyReader, BaseException | None]:
    """A ReplyReader on a real connection to a server that sends `payload`, read until `count`
    replies came or it raised (what the session sees)."""

    def server_side(conv: Conversation, server: RawServer) -> None:
        conv.sock.sendall(payload)
        conv.command()  # holds the connection open until the client closes it

    error: BaseException | None = None
    with raw_server(server_side) as server:
        transport, reader = await asyncio.get_running_loop().create_connection(ReplyReader, "127.0.0.1", server.port)
        reader.expect(count)
        try:
            await reader.read(count, 2)
        except Exception as exc:
            error = exc
        finally:
            transport.close()
    return reader, error


async def test_the_reader_joins_multiline_replies_and_keeps_each_in_order() -> None:
    reader, error = await read_from(b"250-first\r\n250-second\r\n250 last\r\n354 go ahead\r\n", 2)
    assert error is None
    assert [(r.code, r.message) for r in reader.replies] == [(250, "first\nsecond\nlast"), (354, "go ahead")]
    assert reader.clean


@pytest.mark.parametrize(
    ("payload", "problem"),
    [
        (b"250 ok\r\nhello there\r\n", "malformed reply line"),
        (b"250-" + b"x" * (MAX_REPLY_BYTES + 10), "reply too long"),
    ],
    ids=["malformed", "too-long"],
)
async def test_the_reader_refuses_what_is_not_smtp(payload: bytes, problem: str) -> None:
    reader, error = await read_from(payload, 2)
    assert isinstance(error, aiosmtplib.SMTPResponseException)
    assert problem in error.message
    assert not reader.clean
