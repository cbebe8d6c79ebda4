"""PIPELINING (RFC 2920): MAIL, RCPT and DATA in one write, their replies read in order.

The raw server reads every command of the group before it answers any: a client
that waited for each reply would stall until command_timeout.
"""

import asyncio
import time
from collections.abc import Callable

import pytest

from relays.smtp import session
from tests.conftest import context, envelope, opened
from tests.relays.test_misbehaving_servers import relay
from tests.servers.raw import Conversation, RawServer, raw_server

EHLO_PIPELINING = "250-raw.test\r\n250-PIPELINING\r\n250 8BITMIME"


def take_group(conv: Conversation, recipients: int) -> list[str]:
    """Greet, then read MAIL, the RCPTs and DATA without answering any of them."""
    conv.send("220 raw.test ESMTP")
    conv.expect("EHLO", EHLO_PIPELINING)
    return [conv.command() for _ in range(recipients + 2)]


async def test_the_envelope_goes_in_one_write_and_replies_are_read_in_order() -> None:
    seen: list[list[str]] = []

    def server_side(conv: Conversation, server: RawServer) -> None:
        seen.append(take_group(conv, 2))
        conv.send("250 2.1.0 sender ok", "250 2.1.5 bob ok", "550 5.1.1 no such user", "354 go ahead")
        server.data_received.append(conv.read_data())
        conv.send("250 2.0.0 queued as P1")
        conv.expect("QUIT", "221 bye")

    with raw_server(server_side) as server:
        async with opened(relay(server.port, "command_timeout: 2")) as relays:
            bob, ghost = await relays["out"].deliver(envelope("bob@example.net", "ghost@example.net"), context())
    assert not server.errors, server.errors
    assert seen == [
        ["MAIL FROM:<alice@example.com>", "RCPT TO:<bob@example.net>", "RCPT TO:<ghost@example.net>", "DATA"]
    ]
    assert (bob.status, bob.reply.message, bob.reply.command) == ("delivered", "2.0.0 queued as P1", "[SEND_DATA]")
    assert (ghost.status, ghost.reply.code, ghost.reply.command) == ("permanent_failure", 550, "RCPT")
    assert server.data_received[0][1]  # the whole message, with its final "."


async def test_a_refused_sender_with_data_accepted_anyway_ends_with_a_lone_dot() -> None:
    after_group: list[str] = []

    def server_side(conv: Conversation, server: RawServer) -> None:
        take_group(conv, 1)
        # Out of protocol: DATA accepted although MAIL was refused. RFC 2920: the client ends it with ".".
        conv.send("553 5.7.1 sender refused", "503 5.5.1 no sender", "354 go ahead")
        after_group.append(conv.command())
        conv.send("554 5.5.1 no valid recipients")
        after_group.append(conv.command())
        conv.send("221 bye")

    with raw_server(server_side) as server:
        async with opened(relay(server.port, "command_timeout: 2")) as relays:
            (result,) = await relays["out"].deliver(envelope("bob@example.net"), context())
    assert not server.errors, server.errors
    assert (result.status, result.reply.code, result.reply.command) == ("permanent_failure", 553, "MAIL")
    assert after_group == [".", "QUIT"]  # no message content went out


async def test_a_connection_lost_in_the_middle_of_the_replies_delivers_nothing() -> None:
    def server_side(conv: Conversation, server: RawServer) -> None:
        take_group(conv, 2)
        conv.send("250 2.1.0 sender ok", "250 2.1.5 bob ok")  # then gone before the rest

    with raw_server(server_side) as server:
        async with opened(relay(server.port, "command_timeout: 2")) as relays:
            results = await relays["out"].deliver(envelope("bob@example.net", "carol@example.net"), context())
    assert not server.errors, server.errors
    assert [r.status for r in results] == ["transient_failure"] * 2
    assert [(r.reply.enhanced_status, r.reply.command) for r in results] == [("4.4.2", "RCPT")] * 2
    assert not any(r.possibly_delivered for r in results)
    assert server.data_received == []


async def test_size_without_a_limit_is_declared_and_an_advertised_limit_refuses_before_mail() -> None:
    seen: list[list[str]] = []
    body = b"Subject: s\r\n\r\n" + b"x" * 200 + b"\r\n"

    def server_side(conv: Conversation, server: RawServer) -> None:
        conv.send("220 raw.test ESMTP")
        conv.expect("EHLO", "250-raw.test\r\n250-PIPELINING\r\n250 SIZE")
        seen.append([conv.command() for _ in range(3)])
        conv.send("250 2.1.0 ok", "250 2.1.5 ok", "354 go ahead")
        server.data_received.append(conv.read_data())
        conv.send("250 2.0.0 queued as S1")
        conv.expect("QUIT", "221 bye")

    def limited(conv: Conversation, server: RawServer) -> None:
        conv.send("220 raw.test ESMTP")
        conv.expect("EHLO", "250-raw.test\r\n250-PIPELINING\r\n250 SIZE 100")
        seen.append([conv.command()])  # QUIT: no MAIL, no DATA
        conv.send("221 bye")

    with raw_server(server_side) as server:
        async with opened(relay(server.port, "command_timeout: 2")) as relays:
            (sent,) = await relays["out"].deliver(envelope("bob@example.net", message=body), context())
    assert not server.errors, server.errors
    with raw_server(limited) as small:
        async with opened(relay(small.port, "command_timeout: 2")) as relays:
            (refused,) = await relays["out"].deliver(envelope("bob@example.net", message=body), context())
    assert not small.errors, small.errors
    assert seen == [[f"MAIL FROM:<alice@example.com> SIZE={len(body)}", "RCPT TO:<bob@example.net>", "DATA"], ["QUIT"]]
    assert sent.status == "delivered"
    assert (refused.status, refused.reply.code, refused.reply.enhanced_status) == ("permanent_failure", 552, "5.3.4")
    assert refused.reply.command == "MAIL"


EHLO_CHUNKING = "250-raw.test\r\n250-PIPELINING\r\n250-CHUNKING\r\n250 8BITMIME"


def take_bdat_group(conv: Conversation, recipients: int, *, greet: bool = True) -> tuple[list[str], bytes]:
    """Read MAIL, the RCPTs, `BDAT <n> LAST` and its n bytes, answering none of them."""
    if greet:
        conv.send("220 raw.test ESMTP")
        conv.expect("EHLO", EHLO_CHUNKING)
    lines = [conv.command() for _ in range(recipients + 2)]
    verb, size, last = lines[-1].split()
    assert (verb, last) == ("BDAT", "LAST"), lines
    return lines, conv.stream.read(int(size))


def gone_after_the_first(connections: list[list[str]], *, read_next: bool) -> Callable[[Conversation, RawServer], None]:
    """A server that takes one joined group per connection and answers it (queued as Q<n>); its
    first connection then goes without a word: after reading the next command (`read_next`, a
    dead connection found at MAIL) or after 0.2 s."""

    def server_side(conv: Conversation, server: RawServer) -> None:
        seen: list[str] = []
        connections.append(seen)
        lines, _ = take_bdat_group(conv, 1)
        seen += lines
        conv.send("250 2.1.0 ok", "250 2.1.5 ok", f"250 2.0.0 queued as Q{len(connections)}")
        if len(connections) == 1:
            if read_next:
                seen.append(conv.command())
            else:
                time.sleep(0.2)
            return
        conv.expect("QUIT", "221 bye")

    return server_side


async def test_a_small_message_goes_in_the_envelope_s_write_with_bdat() -> None:
    """MAIL, RCPT and BDAT LAST with the message in one group (RFC 3030): one round trip. The
    server answers nothing before it has the message: a client that waits for the RCPT replies
    first stalls until command_timeout."""
    seen: list[tuple[list[str], bytes]] = []

    def server_side(conv: Conversation, server: RawServer) -> None:
        seen.append(take_bdat_group(conv, 2))
        conv.send("250 2.1.0 sender ok", "250 2.1.5 bob ok", "550 5.1.1 no such user", "250 2.0.0 queued as B1")
        conv.expect("QUIT", "221 bye")

    message = b"From: alice@example.com\r\nSubject: one write\r\n\r\nHello\r\n"
    with raw_server(server_side) as server:
        async with opened(relay(server.port, "command_timeout: 2")) as relays:
            bob, ghost = await relays["out"].deliver(
                envelope("bob@example.net", "ghost@example.net", message=message), context()
            )
    assert not server.errors, server.errors
    assert seen == [
        (["MAIL FROM:<alice@example.com>", "RCPT TO:<bob@example.net>", "RCPT TO:<ghost@example.net>",
          f"BDAT {len(message)} LAST"], message)
    ]  # fmt: skip
    assert (bob.status, bob.reply.message, bob.reply.command) == ("delivered", "2.0.0 queued as B1", "[SEND_DATA]")
    assert (ghost.status, ghost.reply.code, ghost.reply.command) == ("permanent_failure", 550, "RCPT")
    assert not bob.possibly_delivered
    assert not ghost.possibly_delivered


async def test_no_reply_after_the_joined_group_may_have_delivered() -> None:
    """The message went with the envelope, then the connection did: the server may have it."""

    def server_side(conv: Conversation, server: RawServer) -> None:
        take_bdat_group(conv, 2)  # then gone without a reply

    with raw_server(server_side) as server:
        async with opened(relay(server.port, "command_timeout: 2")) as relays:
            results = await relays["out"].deliver(envelope("bob@example.net", "carol@example.net"), context())
    assert not server.errors, server.errors
    assert [(r.status, r.possibly_delivered, r.reply.command) for r in results] == [
        ("transient_failure", True, "[SEND_DATA]")
    ] * 2
    assert all("may have been delivered" in r.reply.message for r in results)


async def test_every_recipient_refused_in_the_joined_group_delivers_nothing() -> None:
    after: list[str] = []

    def server_side(conv: Conversation, server: RawServer) -> None:
        take_bdat_group(conv, 1)
        conv.send("250 2.1.0 sender ok", "550 5.1.1 no such user", "554 5.5.1 no valid recipients")
        after.append(conv.expect("RSET", "250 2.0.0 ok"))
        after.append(conv.expect("QUIT", "221 bye"))

    with raw_server(server_side) as server:
        async with opened(relay(server.port, "command_timeout: 2")) as relays:
            (ghost,) = await relays["out"].deliver(envelope("ghost@example.net"), context())
    assert not server.errors, server.errors
    assert (ghost.status, ghost.reply.code, ghost.reply.command) == ("permanent_failure", 550, "RCPT")
    assert not ghost.possibly_delivered
    # RFC 3030 does not say a refused BDAT LAST ends the transaction: the connection is reset
    # before it is reused (tests/relays/test_bdat_group_attacks.py).
    assert after == ["RSET", "QUIT"]


async def test_a_connection_idle_past_join_within_sends_the_envelope_first(monkeypatch: pytest.MonkeyPatch) -> None:
    """A pooled connection not heard from for JOIN_WITHIN seconds may be dead without the client
    knowing (a middlebox dropped it): the envelope goes first, so a dead one is found at MAIL,
    before the message left, and the delivery moves to a new connection instead of ending in doubt."""
    monkeypatch.setattr(session, "JOIN_WITHIN", 0.2)
    connections: list[list[str]] = []
    # The next transaction's MAIL, after the idle time: then gone.
    with raw_server(gone_after_the_first(connections, read_next=True)) as server:
        async with opened(relay(server.port, "command_timeout: 2")) as relays:
            (first,) = await relays["out"].deliver(envelope("bob@example.net"), context())
            await asyncio.sleep(0.3)
            (second,) = await relays["out"].deliver(envelope("bob@example.net"), context())
    assert not server.errors, server.errors
    assert (first.status, second.status) == ("delivered", "delivered")
    assert not second.possibly_delivered
    assert connections[0][-1].startswith("MAIL FROM:<alice@example.com>")  # alone, not with the message
    assert len(connections) == 2  # the second message went on a new connection, once
