"""`mx` against a real DNS server (dnslib, counting queries) and aiosmtpd servers on 127.0.0.x."""

import asyncio
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import pytest

from tests.conftest import context, envelope, opened
from tests.servers.dns import DnsServer, dns_server
from tests.servers.process import free_port
from tests.servers.smtp import Script, SmtpServer, smtp_server


@pytest.fixture(scope="module")
def shared_dns() -> Iterator[DnsServer]:
    # One server for the module (stopping one takes a second); each test starts with zero counts.
    with dns_server() as server:
        yield server


@pytest.fixture
def dns(shared_dns: DnsServer) -> DnsServer:
    shared_dns.queries.clear()
    return shared_dns


def mx(dns: DnsServer, port: int, *extra: str) -> str:
    lines = [f"    {e}" for e in extra]
    return (
        "\n".join(
            [
                "relay:",
                "  out:",
                "    type: mx",
                f"    port: {port}",
                "    ehlo_as: relay.example.test",
                "    allow_internal_destinations: true",
                *lines,
            ]
        )
        + f"\nmailrelay:\n  dns_nameservers: ['{dns.nameserver}']\n"
    )


@contextmanager
def servers(*specs: tuple[str, Script | None]) -> Iterator[tuple[int, dict[str, SmtpServer]]]:
    """aiosmtpd servers on the given 127.0.0.x addresses, all on one port (the MX port)."""
    with ExitStack() as stack:
        port = free_port()
        started = {host: stack.enter_context(smtp_server(script, host=host, port=port)) for host, script in specs}
        yield port, started


async def test_preferred_exchanger_down_falls_back_to_the_next(dns: DnsServer) -> None:
    with servers(("127.0.0.3", None)) as (port, started):  # mx1 (127.0.0.2) is down
        async with opened(mx(dns, port)) as relays:
            (result,) = await relays["out"].deliver(envelope("bob@example.test"), context())
    assert result.status == "delivered"
    assert result.host == f"mx2.example.test:{port}"
    assert started["127.0.0.3"].received[0].recipients == ["bob@example.test"]


async def test_a_4xx_moves_on_and_a_5xx_does_not(dns: DnsServer) -> None:
    busy = Script(mail_reply="421 4.3.2 Too busy")
    refusing = Script(rcpt={"bob@example.test": "550 5.1.1 No such user"})
    with servers(("127.0.0.2", busy), ("127.0.0.3", None)) as (first_port, _):
        async with opened(mx(dns, first_port)) as relays:
            (moved,) = await relays["out"].deliver(envelope("bob@example.test"), context())
    with servers(("127.0.0.2", refusing), ("127.0.0.3", None)) as (port, started):
        async with opened(mx(dns, port)) as relays:
            (final,) = await relays["out"].deliver(envelope("bob@example.test"), context())
        assert started["127.0.0.3"].connection_count == 0
    assert (moved.status, moved.host) == ("delivered", f"mx2.example.test:{first_port}")
    assert (final.status, final.reply.code, final.host) == ("permanent_failure", 550, f"mx1.example.test:{port}")


async def test_implicit_mx_uses_the_domain_address(dns: DnsServer) -> None:
    with servers(("127.0.0.6", None)) as (port, _):
        async with opened(mx(dns, port)) as relays:
            (result,) = await relays["out"].deliver(envelope("bob@nomx.test"), context())
    assert (result.status, result.host) == ("delivered", f"nomx.test:{port}")


async def test_dns_outcomes(dns: DnsServer) -> None:
    async with opened(mx(dns, free_port())) as relays:
        null, nxdomain, servfail, no_domain, no_address = await relays["out"].deliver(
            envelope("a@nullmx.test", "a@nowhere.test", "a@servfail.test", "postmaster", "a@noaddr.test"), context()
        )
    assert (null.reply.code, null.reply.enhanced_status, null.status) == (556, "5.1.10", "permanent_failure")
    assert (nxdomain.reply.code, nxdomain.reply.enhanced_status) == (550, "5.1.2")
    assert (servfail.reply.code, servfail.reply.enhanced_status, servfail.status) == (451, "4.4.3", "transient_failure")
    assert "SERVFAIL" in servfail.reply.message
    assert (no_domain.reply.code, no_domain.reply.enhanced_status) == (550, "5.1.3")
    assert no_address.status == "transient_failure"  # an MX host with no address may be a passing DNS problem
    assert dns.queries[("nullmx.test", "A")] == 0  # a null MX is never connected to


async def test_three_domains_in_one_envelope(dns: DnsServer) -> None:
    other = Script(rcpt={"gone@other.test": "550 5.1.1 No such user"})
    third = Script(mail_reply="451 4.3.0 Greylisted")
    with servers(("127.0.0.2", None), ("127.0.0.4", other), ("127.0.0.5", third)) as (port, started):
        async with opened(mx(dns, port)) as relays:
            recipients = ["a@example.test", "gone@other.test", "c@third.test", "b@EXAMPLE.test", "ok@other.test"]
            results = await relays["out"].deliver(envelope(*recipients), context())
    assert [r.recipient for r in results] == recipients
    assert [(r.status, r.host) for r in results] == [
        ("delivered", f"mx1.example.test:{port}"),
        ("permanent_failure", f"mx.other.test:{port}"),
        ("transient_failure", f"mx.third.test:{port}"),
        ("delivered", f"mx1.example.test:{port}"),
        ("delivered", f"mx.other.test:{port}"),
    ]
    # one transaction per domain, recipients grouped case-insensitively
    assert started["127.0.0.2"].received[0].recipients == ["a@example.test", "b@EXAMPLE.test"]
    assert started["127.0.0.4"].received[0].recipients == ["ok@other.test"]


async def test_concurrent_deliveries_share_one_lookup(dns: DnsServer) -> None:
    with servers(("127.0.0.2", None)) as (port, started):
        async with opened(mx(dns, port, "concurrent_connections: 10")) as relays:
            results = await asyncio.gather(
                *(relays["out"].deliver(envelope(f"r{i}@example.test"), context()) for i in range(50))
            )
            assert all(r[0].status == "delivered" for r in results)
            (again,) = await relays["out"].deliver(envelope("later@example.test"), context())
    assert again.status == "delivered"
    assert dns.queries[("example.test", "MX")] == 1
    assert dns.queries[("mx1.example.test", "A")] == 1
    assert len(started["127.0.0.2"].received) == 51


async def test_force_mx_skips_dns(dns: DnsServer) -> None:
    with smtp_server() as server:
        config = mx(dns, 25, f"override_mx: {{example.test: '127.0.0.1:{server.port}'}}")
        async with opened(config) as relays:
            (result,) = await relays["out"].deliver(envelope("bob@Example.TEST"), context())
    assert (result.status, result.host) == ("delivered", f"127.0.0.1:{server.port}")
    assert sum(dns.queries.values()) == 0


async def test_ipv4_only_never_asks_for_aaaa(dns: DnsServer) -> None:
    with servers(("127.0.0.6", None)) as (port, _):
        async with opened(mx(dns, port, "ipv4_only: true")) as relays:
            (result,) = await relays["out"].deliver(envelope("bob@nomx.test"), context())
    assert result.status == "delivered"
    assert dns.queries[("nomx.test", "AAAA")] == 0
