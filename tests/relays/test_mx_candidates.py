"""`mx`: which addresses a delivery tries, in what order, how many, and what it says when none worked.

A zone of its own (tests/servers/dns.py answers SERVFAIL under servfail.test) and aiosmtpd
servers on 127.0.0.x, all on the MX port.
"""

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager

import pytest

from relays.mx import MAX_ATTEMPTS
from tests.conftest import context, envelope, opened
from tests.servers.dns import DnsServer, dns_server
from tests.servers.process import free_port
from tests.servers.smtp import Script, SmtpServer, smtp_server

ZONE = """
many.test.           300 IN MX 10 a.many.test.
many.test.           300 IN MX 20 b.many.test.
a.many.test.         300 IN A 127.0.0.11
a.many.test.         300 IN A 127.0.0.12
a.many.test.         300 IN A 127.0.0.13
b.many.test.         300 IN A 127.0.0.14
b.many.test.         300 IN A 127.0.0.15
b.many.test.         300 IN A 127.0.0.16
flaky.test.          300 IN MX 10 mx.servfail.test.
flaky.test.          300 IN MX 20 mx.flaky.test.
mx.flaky.test.       300 IN A 127.0.0.17
broken.test.         300 IN MX 10 mx.servfail.test.
broken.test.         300 IN MX 20 gone.broken.test.
gone.broken.test.    300 IN TXT "no address"
"""

BUSY = Script(mail_reply="451 4.3.2 Busy")


@pytest.fixture(scope="module")
def shared_dns() -> Iterator[DnsServer]:
    with dns_server(ZONE) as server:
        yield server


@pytest.fixture
def dns(shared_dns: DnsServer) -> DnsServer:
    shared_dns.queries.clear()
    return shared_dns


def mx_config(dns: DnsServer, port: int) -> str:
    return (
        f"relay:\n  out:\n    type: mx\n    port: {port}\n    ehlo_as: relay.example.test\n    ipv4_only: true\n"
        "    allow_internal_destinations: true\n"
        f"mailrelay:\n  dns_nameservers: ['{dns.nameserver}']\n"
    )


@contextmanager
def servers(scripts: dict[str, Script | None]) -> Iterator[tuple[int, dict[str, SmtpServer]]]:
    with ExitStack() as stack:
        port = free_port()
        yield port, {host: stack.enter_context(smtp_server(s, host=host, port=port)) for host, s in scripts.items()}


async def test_addresses_in_order_across_hosts_and_at_most_max_attempts(dns: DnsServer) -> None:
    hosts = [f"127.0.0.{n}" for n in range(11, 17)]
    with servers(dict.fromkeys(hosts, BUSY)) as (port, started):
        async with opened(mx_config(dns, port)) as relays:
            (result,) = await relays["out"].deliver(envelope("bob@many.test"), context())
    assert MAX_ATTEMPTS == 5
    assert [started[h].connection_count for h in hosts] == [1, 1, 1, 1, 1, 0]
    assert (result.status, result.reply.code, result.reply.command) == ("transient_failure", 451, "MAIL")
    assert result.host == f"b.many.test:{port}"  # the last one tried answers


async def test_backups_are_not_looked_up_while_the_first_answers(dns: DnsServer) -> None:
    with servers({"127.0.0.11": None}) as (port, started):
        async with opened(mx_config(dns, port)) as relays:
            (result,) = await relays["out"].deliver(envelope("bob@many.test"), context())
    assert (result.status, result.host) == ("delivered", f"a.many.test:{port}")
    assert started["127.0.0.11"].connection_count == 1
    assert dns.queries[("a.many.test", "A")] == 1
    assert dns.queries[("b.many.test", "A")] == 0


async def test_a_host_whose_lookup_fails_is_skipped(dns: DnsServer) -> None:
    with servers({"127.0.0.17": None}) as (port, _):
        async with opened(mx_config(dns, port)) as relays:
            (result,) = await relays["out"].deliver(envelope("bob@flaky.test"), context())
    assert (result.status, result.host) == ("delivered", f"mx.flaky.test:{port}")
    assert dns.queries[("mx.servfail.test", "A")] >= 1


async def test_a_failed_lookup_is_the_reply_when_no_host_has_an_address(dns: DnsServer) -> None:
    async with opened(mx_config(dns, free_port())) as relays:
        (result,) = await relays["out"].deliver(envelope("bob@broken.test"), context())
    assert (result.status, result.reply.code, result.reply.enhanced_status) == ("transient_failure", 451, "4.4.3")
    assert result.reply.command == "[DNS]"
    assert result.reply.message.startswith("4.4.3 DNS lookup for mx.servfail.test failed")
    assert result.host is None
    assert dns.queries[("gone.broken.test", "A")] == 1  # looked up after the failure, and had no address
