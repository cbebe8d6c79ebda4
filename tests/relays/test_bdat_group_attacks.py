"""The BDAT group (MAIL, RCPT and `BDAT <n> LAST` with the message in one write) attacked: a server
that holds the envelope's replies until it processed the message, a pooled connection that goes
or idles while the progress is recorded, a server that takes the chunk after refusing the envelope,
replies out of step. The rules: never a false "delivered"; a recipient whose message the server
may have is possibly_delivered; nothing sent is never in doubt."""

import asyncio
import select
from collections.abc import Iterator

import pytest

from relays.base import DeliveryContext
from relays.smtp import session
from schemas.delivery import RecipientResult
from tests.conftest import context, envelope, opened
from tests.relays.test_misbehaving_servers import relay
from tests.relays.test_pipelining import gone_after_the_first, take_bdat_group
from tests.servers import postfix as postfix_server
from tests.servers.raw import Conversation, RawServer, raw_server

#: Postfix's end-of-data step held this long (as a milter or a before-queue filter holds it).
HELD = 2.0


@pytest.fixture(scope="module")
def slow_postfix() -> Iterator[postfix_server.Postfix]:
    # A listener of this module's own: `sleep` in smtpd_end_of_data_restrictions stands for a slow
    # milter. Postfix sends MAIL's reply at once and holds RCPT's until the message is processed.
    with pytest.MonkeyPatch.context() as patch:
        listeners = {**postfix_server.LISTENERS, "slow": (f"{{ smtpd_end_of_data_restrictions = sleep {HELD:g} }}",)}
        patch.setattr(postfix_server, "LISTENERS", listeners)
        with postfix_server.postfix() as pf:
            yield pf


def slow_context(hold: float) -> DeliveryContext:
    """A context whose progress record takes `hold` seconds (a keyed delivery's Redis round trip,
    at most REDIS_TIMEOUT)."""

    async def record() -> None:
        await asyncio.sleep(hold)

    return DeliveryContext(asyncio.get_running_loop().time() + 60, record)


async def one_after_the_other(
    port: int, first: str, second: str, second_context: DeliveryContext | None = None
) -> tuple[RecipientResult, RecipientResult]:
    """Two deliveries, one recipient each, the second on the connection the first gave back."""
    async with opened(relay(port, "command_timeout: 2")) as relays:
        (one,) = await relays["out"].deliver(envelope(first), context())
        (two,) = await relays["out"].deliver(envelope(second), second_context or context())
    return one, two


async def test_rcpt_replies_postfix_holds_until_the_message_is_processed_are_waited_for(
    slow_postfix: postfix_server.Postfix,
) -> None:
    """Postfix answers RCPT of a joined group only after the end-of-data step (milters, filters,
    policy): the RCPT reply is as slow as the message's, so it waits data_timeout, not
    command_timeout (which gave up, dropped the connection, and answered possibly_delivered a
    message Postfix had queued)."""
    port = slow_postfix.ports["slow"]
    async with opened(relay(port, "command_timeout: 1", "data_timeout: 10")) as relays:
        (result,) = await relays["out"].deliver(envelope("bob@mail.test"), context())
    assert (result.status, result.possibly_delivered) == ("delivered", False), result.reply
    assert slow_postfix.received(postfix_server.queue_id(result.reply.message))


@pytest.mark.parametrize("read_next", [False, True], ids=["gone-while-recording", "idle-past-join-within"])
async def test_a_pooled_connection_stale_after_the_progress_record_moves_to_a_new_one(
    read_next: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A progress record may take REDIS_TIMEOUT. The server closed the pooled connection meanwhile
    (nothing was written: it was answered possibly_delivered, a copy nobody sent); or the connection
    was silent past JOIN_WITHIN by then (judged when the message leaves, not before the record), so
    the envelope goes first and a dead one is found at MAIL, before the message left (as
    test_a_connection_idle_past_join_within_sends_the_envelope_first). Either way: a new
    connection, once."""
    if read_next:
        monkeypatch.setattr(session, "JOIN_WITHIN", 0.3)
    connections: list[list[str]] = []
    with raw_server(gone_after_the_first(connections, read_next=read_next)) as server:
        first, second = await one_after_the_other(
            server.port, "bob@example.net", "carol@example.net", slow_context(0.6)
        )
    assert not server.errors, server.errors
    assert (first.status, second.status) == ("delivered", "delivered"), second.reply
    assert not second.possibly_delivered
    assert second.reply.message.endswith("queued as Q2")
    assert len(connections) == 2


@pytest.mark.parametrize(
    "envelope_replies",
    [
        pytest.param(("250 2.1.0 ok", "450 4.2.0 greylisted"), id="rcpt-refused"),
        pytest.param(("451 4.3.0 try later", "503 5.5.1 need MAIL"), id="mail-refused"),
    ],
)
async def test_a_chunk_taken_after_a_refused_envelope_is_in_doubt(envelope_replies: tuple[str, str]) -> None:
    """Out of protocol: the server refused the envelope, then answered the message 250. It may
    have queued it: answered as a temporary refusal with data not sent, the next MX host or the
    client's retry sends a second copy."""

    def server_side(conv: Conversation, server: RawServer) -> None:
        take_bdat_group(conv, 1)
        conv.send(*envelope_replies, "250 2.0.0 queued as X1")
        conv.expect("QUIT", "221 bye")

    with raw_server(server_side) as server:
        async with opened(relay(server.port, "command_timeout: 2")) as relays:
            (result,) = await relays["out"].deliver(envelope("bob@example.net"), context())
    assert not server.errors, server.errors
    assert result.status != "delivered"
    assert result.possibly_delivered, result.reply


@pytest.mark.parametrize(
    "replies",
    [
        # Four replies to three commands: the extra 250 came first and the chunk was refused.
        pytest.param(b"250 2.1.0 ok\r\n250 2.1.0 again\r\n250 2.1.5 ok\r\n554 5.6.0 refused\r\n", id="one-more"),
        # The group's replies, then the start of one more (a clean end right after the last one is
        # no such thing: test_replies_split_byte_by_byte_and_an_end_right_after_the_last_still_deliver).
        pytest.param(b"250 2.1.0 ok\r\n250 2.1.5 ok\r\n250 2.0.0 queued as P1\r\n250-2.0.0 and", id="part-of-one"),
    ],
)
async def test_more_than_the_group_s_replies_in_the_same_read_leave_the_final_in_doubt(replies: bytes) -> None:
    """Which reply answered the message is unknown: never "delivered" then. In one write, so that
    it comes in one read (what comes later cannot be waited for: the replies stand then)."""

    def server_side(conv: Conversation, server: RawServer) -> None:
        take_bdat_group(conv, 1)
        conv.sock.sendall(replies)  # then gone

    with raw_server(server_side) as server:
        async with opened(relay(server.port, "command_timeout: 2")) as relays:
            (result,) = await relays["out"].deliver(envelope("bob@example.net"), context())
    assert not server.errors, server.errors
    assert result.status != "delivered", result.reply
    assert result.possibly_delivered


async def test_lmtp_never_joins_the_message_to_the_envelope() -> None:
    """LMTP answers the message once per accepted recipient: its reply count is unknown before
    the RCPT replies, so the message goes after them even when CHUNKING and PIPELINING are offered."""
    seen: list[str] = []

    def server_side(conv: Conversation, server: RawServer) -> None:
        conv.send("220 raw.test LMTP")
        conv.expect("LHLO", "250-raw.test\r\n250-PIPELINING\r\n250-CHUNKING\r\n250 8BITMIME")
        seen.extend([conv.command(), conv.command(), conv.command()])
        conv.send("250 2.1.0 ok", "250 2.1.5 ok", "550 5.1.1 no such user")
        verb, size, last = conv.command().split()
        seen.append(f"{verb} {last}")
        conv.stream.read(int(size))
        conv.send("250 2.0.0 bob delivered")
        conv.expect("QUIT", "221 bye")

    with raw_server(server_side) as server:
        async with opened(relay(server.port, "command_timeout: 2", kind="lmtp")) as relays:
            bob, ghost = await relays["out"].deliver(envelope("bob@example.net", "ghost@example.net"), context())
    assert not server.errors, server.errors
    assert seen == ["MAIL FROM:<alice@example.com>", "RCPT TO:<bob@example.net>", "RCPT TO:<ghost@example.net>",
                    "BDAT LAST"]  # fmt: skip
    assert (bob.status, ghost.status) == ("delivered", "permanent_failure")


async def test_a_pooled_connection_after_a_refused_group_is_reset_before_the_next_message() -> None:
    """Every recipient refused, then the chunk (554): the transaction MAIL opened may still be open
    (RFC 3030 does not say a refused BDAT LAST ends it; Postfix ends it, a stricter server need not),
    and the next message's MAIL would get 503 "nested MAIL": a permanent failure for a good
    message. RSET first, as the two-step path does after a refused envelope."""
    after: list[str] = []

    def server_side(conv: Conversation, server: RawServer) -> None:
        take_bdat_group(conv, 1)
        conv.send("250 2.1.0 sender ok", "550 5.1.1 no such user", "554 5.5.1 no valid recipients")
        line = conv.command()
        after.append(line)
        if line == "RSET":
            conv.send("250 2.0.0 reset")
            take_bdat_group(conv, 1, greet=False)
            conv.send("250 2.1.0 ok", "250 2.1.5 ok", "250 2.0.0 queued as R1")
        else:  # still in the first transaction: MAIL is out of sequence
            conv.command()  # RCPT
            conv.stream.read(int(conv.command().split()[1]))  # BDAT <n> LAST and its n bytes
            conv.send("503 5.5.1 Error: nested MAIL command", "503 5.5.1 need MAIL", "503 5.5.1 need MAIL")
        conv.expect("QUIT", "221 bye")

    with raw_server(server_side) as server:
        ghost, bob = await one_after_the_other(server.port, "ghost@example.net", "bob@example.net")
    assert not server.errors, server.errors
    assert (ghost.status, ghost.reply.code) == ("permanent_failure", 550)
    assert (bob.status, bob.reply.message) == ("delivered", "2.0.0 queued as R1"), bob.reply
    assert after == ["RSET"]


async def test_replies_split_byte_by_byte_and_an_end_right_after_the_last_still_deliver() -> None:
    """Replies come in pieces (one byte a write), and the server closes right after the last: the
    replies stand (an end is not a reply out of step)."""

    def server_side(conv: Conversation, server: RawServer) -> None:
        take_bdat_group(conv, 2)
        for byte in b"250 2.1.0 ok\r\n250-2.1.5 bob\r\n250 2.1.5 ok\r\n550 5.1.1 no\r\n250 2.0.0 queued as S1\r\n":
            conv.sock.sendall(bytes([byte]))
        # then gone at once: the end may come in the same read as the last reply

    with raw_server(server_side) as server:
        async with opened(relay(server.port, "command_timeout: 2")) as relays:
            bob, ghost = await relays["out"].deliver(envelope("bob@example.net", "ghost@example.net"), context())
    assert not server.errors, server.errors
    assert (bob.status, bob.reply.message, bob.possibly_delivered) == ("delivered", "2.0.0 queued as S1", False)
    assert (ghost.status, ghost.reply.code, ghost.possibly_delivered) == ("permanent_failure", 550, False)


async def test_a_reply_too_long_in_the_group_leaves_the_message_in_doubt_and_the_connection_dropped() -> None:
    def server_side(conv: Conversation, server: RawServer) -> None:
        take_bdat_group(conv, 1)
        conv.send("250 2.1.0 ok", "250 2.1.5 ok")
        conv.sock.sendall(b"250-" + b"x" * 70_000 + b"\r\n")  # past MAX_REPLY_BYTES, never ended

    with raw_server(server_side) as server:
        async with opened(relay(server.port, "command_timeout: 2")) as relays:
            (result,) = await relays["out"].deliver(envelope("bob@example.net"), context())
            assert relays["out"].pool.idle_count == 0  # type: ignore[attr-defined]  # dropped, not pooled
    assert not server.errors, server.errors
    assert (result.status, result.possibly_delivered, result.reply.command) == (
        "transient_failure",
        True,
        "[SEND_DATA]",
    )
    assert "may have been delivered" in result.reply.message


async def test_a_421_to_mail_on_a_pooled_connection_moves_the_message_to_a_new_one_once() -> None:
    """The server closing (421 to MAIL) took nothing of the group: a new connection, one copy."""
    connections: list[int] = []

    def server_side(conv: Conversation, server: RawServer) -> None:
        connections.append(1)
        take_bdat_group(conv, 1)
        conv.send("250 2.1.0 ok", "250 2.1.5 ok", f"250 2.0.0 queued as C{len(connections)}")
        if len(connections) == 1:
            take_bdat_group(conv, 1, greet=False)
            conv.send("421 4.3.2 shutting down")
            return
        conv.expect("QUIT", "221 bye")

    with raw_server(server_side) as server:
        first, second = await one_after_the_other(server.port, "bob@example.net", "carol@example.net")
    assert not server.errors, server.errors
    assert (first.reply.message, second.reply.message) == ("2.0.0 queued as C1", "2.0.0 queued as C2")
    assert not second.possibly_delivered
    assert len(connections) == 2


@pytest.mark.parametrize(("size", "joined"), [(16 * 1024, True), (16 * 1024 + 1, False)])
async def test_a_message_at_and_just_over_one_record_arrives_whole_either_way(size: int, joined: bool) -> None:
    """16 KiB (one TLS record's most) goes in the envelope's write, a byte more in two steps; the
    server gets the message byte for byte in both."""
    head = b"From: alice@example.com\r\nSubject: edge\r\n\r\n"
    message = head + b"x" * (size - len(head) - 2) + b"\r\n"
    seen: list[tuple[bool, bytes]] = []

    def server_side(conv: Conversation, server: RawServer) -> None:
        conv.send("220 raw.test ESMTP")
        conv.expect("EHLO", "250-raw.test\r\n250-PIPELINING\r\n250-CHUNKING\r\n250 8BITMIME")
        conv.command(), conv.command()  # MAIL, RCPT
        # Joined: the message (more than the stream's 8 KiB buffer) is still on the socket.
        together = bool(select.select([conv.sock], [], [], 0.5)[0])
        conv.send("250 2.1.0 ok", "250 2.1.5 ok")
        seen.append((together, conv.stream.read(int(conv.command().split()[1]))))
        conv.send("250 2.0.0 queued")
        conv.expect("QUIT", "221 bye")

    with raw_server(server_side) as server:
        async with opened(relay(server.port, "command_timeout: 2")) as relays:
            (result,) = await relays["out"].deliver(envelope("bob@example.net", message=message), context())
    assert not server.errors, server.errors
    assert result.status == "delivered", result.reply
    assert seen == [(joined, message)]


@pytest.mark.parametrize("chunking", [True, False])
async def test_size_counts_the_crlf_a_last_line_without_one_gets(chunking: bool) -> None:
    """SIZE= (RFC 1870) is what goes: a message whose last line has no CRLF gets one (BDAT's
    chunk and DATA's terminator alike), and SIZE counted two bytes fewer than the server took."""
    seen: list[tuple[str, bytes]] = []
    offer = "250-raw.test\r\n250-PIPELINING\r\n" + ("250-CHUNKING\r\n" if chunking else "") + "250 SIZE 1000000"

    def server_side(conv: Conversation, server: RawServer) -> None:
        conv.send("220 raw.test ESMTP")
        conv.expect("EHLO", offer)
        mail, _rcpt, last = conv.command(), conv.command(), conv.command()
        if chunking:
            data = conv.stream.read(int(last.split()[1]))
        else:
            conv.send("250 2.1.0 ok", "250 2.1.5 ok", "354 go ahead")
            data = b"".join(iter(conv.stream.readline, b".\r\n"))  # no line starts with a dot here
        seen.append((mail, data))
        if chunking:
            conv.send("250 2.1.0 ok", "250 2.1.5 ok")
        conv.send("250 2.0.0 queued")
        conv.expect("QUIT", "221 bye")

    message = b"From: alice@example.com\r\nSubject: no end\r\n\r\nno line end"
    with raw_server(server_side) as server:
        async with opened(relay(server.port, "command_timeout: 2")) as relays:
            (result,) = await relays["out"].deliver(envelope("bob@example.net", message=message), context())
    assert not server.errors, server.errors
    assert result.status == "delivered", result.reply
    ((mail, data),) = seen
    assert data == message + b"\r\n"
    assert mail.endswith(f" SIZE={len(data)}")


@pytest.mark.parametrize("size", [1024, 20_000], ids=["joined", "two-steps"])
async def test_a_pooled_connection_after_a_refused_message_is_reset_before_the_next(size: int) -> None:
    """A recipient taken, then `BDAT LAST` refused (554 after the content checks): whether that
    ended the transaction, RFC 3030 does not say (DATA's final reply does, RFC 5321). RSET before
    the connection serves the next message, whose MAIL a strict server would refuse as nested."""
    after: list[str] = []
    message = b"Subject: big\r\n\r\n" + b"x" * (size - 18) + b"\r\n"

    def take(conv: Conversation, greet: bool) -> None:
        if size <= session._ONE_RECORD:
            take_bdat_group(conv, 1, greet=greet)
            conv.send("250 2.1.0 ok", "250 2.1.5 ok")
            return
        if greet:
            conv.send("220 raw.test ESMTP")
            conv.expect("EHLO", "250-raw.test\r\n250-PIPELINING\r\n250-CHUNKING\r\n250 8BITMIME")
        conv.command(), conv.command()
        conv.send("250 2.1.0 ok", "250 2.1.5 ok")
        conv.stream.read(int(conv.command().split()[1]))

    def server_side(conv: Conversation, server: RawServer) -> None:
        take(conv, True)
        conv.send("554 5.7.1 content refused")
        line = conv.command()
        after.append(line)
        if line == "RSET":
            conv.send("250 2.0.0 reset")
            take(conv, False)
            conv.send("250 2.0.0 queued as R2")
        else:  # still in the first transaction: MAIL is out of sequence, and the server is done
            conv.send("503 5.5.1 Error: nested MAIL command")
            return
        conv.expect("QUIT", "221 bye")

    with raw_server(server_side) as server:
        async with opened(relay(server.port, "command_timeout: 2")) as relays:
            (refused,) = await relays["out"].deliver(envelope("bob@example.net", message=message), context())
            (bob,) = await relays["out"].deliver(envelope("bob@example.net", message=message), context())
    assert not server.errors, server.errors
    assert (refused.status, refused.reply.code) == ("permanent_failure", 554)
    assert (bob.status, bob.reply.message) == ("delivered", "2.0.0 queued as R2"), bob.reply
    assert after == ["RSET"]
