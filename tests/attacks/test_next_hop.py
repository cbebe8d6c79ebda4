"""Attacks from the next hop's side: what a hostile SMTP server or DNS zone can make `mx` and `static` do.

Real servers on 127.0.0.1 (tests/servers/raw.py, tests/servers/dns.py); every flood is bounded in
bytes and stops when the client drops the connection.
"""

import asyncio
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import pytest

from relays.smtp.reader import MAX_REPLY_BYTES
from schemas.delivery import RecipientResult
from schemas.reply import MAX_TEXT, TRUNCATED
from tests.conftest import context, envelope, opened
from tests.servers.dns import DnsServer, dns_server
from tests.servers.process import free_port
from tests.servers.raw import Conversation, RawServer, raw_server
from tests.servers.smtp import smtp_server

#: What a hostile next hop sends as one reply: 20 MB of continuation lines.
FLOOD_BYTES = 20 * 1024 * 1024
#: How much the relay's process may grow while it reads the flood: a few replies' worth, not the flood.
RSS_GROWTH_LIMIT = 16 * 1024 * 1024


def static(port: int) -> str:
    return f"relay:\n  out:\n    type: static\n    host: 127.0.0.1\n    port: {port}\n    command_timeout: 5\n"


def _rss() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@contextmanager
def peak_rss() -> Iterator[list[int]]:
    """The process's RSS growth over the block, sampled every few milliseconds: [peak - start]."""
    start = _rss()
    peak = [start]
    done = threading.Event()

    def sample() -> None:
        while not done.wait(0.002):
            peak[0] = max(peak[0], _rss())

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    growth = [0]
    try:
        yield growth
    finally:
        done.set()
        thread.join(5)
        growth[0] = max(peak[0], _rss()) - start


def flood(conv: Conversation, server: RawServer, final: str = "250 2.0.0 ok") -> None:
    """Send FLOOD_BYTES of `250-xy` lines, then `final`; stops when the client drops the connection.
    Records the bytes it got out in `server.data_received` (as (bytes, finished))."""
    chunk = b"250-xy\r\n" * 8192
    sent = 0
    try:
        while sent < FLOOD_BYTES:
            conv.sock.sendall(chunk)
            sent += len(chunk)
        conv.send(final)
        conv.command()  # until the client goes
    except OSError:
        server.data_received.append((sent, False))
        return
    server.data_received.append((sent, True))


def ehlo_flood(conv: Conversation, server: RawServer) -> None:
    conv.send("220 raw.test ESMTP")
    conv.command()  # EHLO
    flood(conv, server)


def data_flood(conv: Conversation, server: RawServer) -> None:
    conv.greet_and_take_envelope(1)
    conv.expect("DATA", "354 go ahead")
    conv.read_data()
    flood(conv, server)


async def _deliver_against(
    handler: Callable[[Conversation, RawServer], None],
) -> tuple[RecipientResult, int, RawServer]:
    with raw_server(handler) as server:
        async with opened(static(server.port)) as relays:
            with peak_rss() as growth:
                (result,) = await relays["out"].deliver(envelope("bob@example.net"), context(30))
        for _ in range(500):  # the server's thread notes how far it got once its send fails
            if server.data_received:
                break
            await asyncio.sleep(0.01)
    return result, growth[0], server


async def test_an_endless_ehlo_reply_is_cut_off_with_bounded_memory() -> None:
    result, growth, server = await _deliver_against(ehlo_flood)
    assert result.status == "transient_failure"
    assert result.reply.command == "EHLO"
    assert len(result.reply.message) <= MAX_TEXT + len(TRUNCATED)
    assert growth < RSS_GROWTH_LIMIT
    ((sent, finished),) = server.data_received
    assert not finished  # the connection was dropped before the flood ended
    assert sent < FLOOD_BYTES


async def test_an_endless_reply_after_the_data_is_cut_off_and_possibly_delivered() -> None:
    result, growth, server = await _deliver_against(data_flood)
    assert result.status == "transient_failure"
    assert result.possibly_delivered
    assert (result.reply.code, result.reply.command) == (451, "[SEND_DATA]")
    assert "may have been delivered" in result.reply.message
    assert len(result.reply.message) <= MAX_TEXT + len(TRUNCATED)
    assert growth < RSS_GROWTH_LIMIT
    ((sent, finished),) = server.data_received
    assert not finished
    assert sent < FLOOD_BYTES


async def test_a_long_reply_under_the_byte_bound_is_truncated_in_the_result() -> None:
    text = "2.0.0 queued " + "x" * (MAX_REPLY_BYTES // 2)

    def long_final(conv: Conversation, server: RawServer) -> None:
        conv.greet_and_take_envelope(1)
        conv.expect("DATA", "354 go ahead")
        conv.read_data()
        conv.send(f"250 {text}")
        conv.expect("QUIT", "221 bye")

    with raw_server(long_final) as server:
        async with opened(static(server.port)) as relays:
            (result,) = await relays["out"].deliver(envelope("bob@example.net"), context(30))
    assert not server.errors, server.errors
    assert result.status == "delivered"
    assert result.reply.message == text[:MAX_TEXT] + TRUNCATED
    assert result.reply.enhanced_status == "2.0.0"


#: A hostile zone: a thousand MX hosts that all fail (SERVFAIL), one MX that points at loopback,
#: one domain whose own address is private (implicit MX), and a public-looking one to force.
HOSTILE_ZONE = (
    "".join(f"wide.test. 300 IN MX {i} h{i}.servfail.test.\n" for i in range(1000))
    + """
evil.test.        300 IN MX 10 mx.evil.test.
mx.evil.test.     300 IN A 127.0.0.5
implicit.test.    300 IN A 10.1.2.3
"""
)


@pytest.fixture(scope="module")
def hostile_dns() -> Iterator[DnsServer]:
    with dns_server(HOSTILE_ZONE) as server:
        yield server


@pytest.fixture
def dns(hostile_dns: DnsServer) -> DnsServer:
    hostile_dns.queries.clear()
    return hostile_dns


def mx(dns: DnsServer, port: int, *extra: str) -> str:
    lines = "".join(f"    {e}\n" for e in extra)
    return (
        f"relay:\n  out:\n    type: mx\n    port: {port}\n    ehlo_as: relay.example.test\n    command_timeout: 5\n"
        f"{lines}mailrelay:\n  dns_nameservers: ['{dns.nameserver}']\n"
    )


async def test_a_thousand_failing_mx_hosts_cost_a_handful_of_queries_once(dns: DnsServer) -> None:
    async with opened(mx(dns, free_port())) as relays:
        (first,) = await relays["out"].deliver(envelope("bob@wide.test"), context(30))
        asked = sum(dns.queries.values())
        (second,) = await relays["out"].deliver(envelope("carol@wide.test"), context(30))
    # One MX query, the MTA-STS record (_mta-sts TXT), then A and AAAA for at most mx_address_limit
    # (5) hosts: not 2001 queries.
    assert asked <= 1 + 1 + 5 * 2
    assert sum(dns.queries.values()) == asked  # the SERVFAILs are remembered: the next delivery asks nothing
    for result in (first, second):
        assert (result.reply.code, result.reply.enhanced_status) == (451, "4.4.3")
        assert result.reply.command == "[DNS]"


@pytest.mark.parametrize(
    "recipient",
    [
        # address literals
        "bob@[127.0.0.5]",
        "bob@[::ffff:127.0.0.5]",
        "bob@[IPv6:::1]",
        "bob@[10.0.0.1]",
        "bob@[0.0.0.0]",
        # an MX host, and a domain without MX, that resolve to internal addresses
        "bob@evil.test",
        "bob@implicit.test",
    ],
)
async def test_internal_destinations_are_refused(dns: DnsServer, recipient: str) -> None:
    with smtp_server(host="127.0.0.5") as server:
        async with opened(mx(dns, server.port)) as relays:
            (result,) = await relays["out"].deliver(envelope(recipient), context(30))
    assert result.status == "permanent_failure"
    assert (result.reply.code, result.reply.enhanced_status, result.reply.command) == (550, "5.7.1", "[ROUTE]")
    assert server.connections == []


async def test_the_option_and_force_mx_still_reach_internal_servers(dns: DnsServer) -> None:
    with smtp_server(host="127.0.0.5") as server:
        async with opened(mx(dns, server.port, "allow_internal_destinations: true")) as relays:
            (literal,) = await relays["out"].deliver(envelope("bob@[127.0.0.5]"), context(30))
            (resolved,) = await relays["out"].deliver(envelope("bob@evil.test"), context(30))
        forced = mx(dns, 25, f"force_mx: {{forced.test: '127.0.0.5:{server.port}'}}")
        async with opened(forced) as relays:
            (by_force,) = await relays["out"].deliver(envelope("bob@forced.test"), context(30))
    assert [r.status for r in (literal, resolved, by_force)] == ["delivered"] * 3
    assert len(server.received) == 3


@pytest.mark.parametrize("recipient", ["bob@forced.test.", "bob@FORCED.Test.", "bob@forced.test"])
async def test_a_trailing_dot_does_not_bypass_force_mx(dns: DnsServer, recipient: str) -> None:
    with smtp_server() as server:
        async with opened(mx(dns, 25, f"force_mx: {{Forced.Test.: '127.0.0.1:{server.port}'}}")) as relays:
            (result,) = await relays["out"].deliver(envelope(recipient), context(30))
    assert (result.status, result.host) == ("delivered", f"127.0.0.1:{server.port}")
    assert result.recipient == recipient  # the result names the address as given...
    assert server.received[0].recipients == [recipient.rstrip(".")]  # ...the next hop gets it without the dot
    assert sum(dns.queries.values()) == 0
