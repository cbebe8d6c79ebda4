"""`max_connection_rate` inside one process, against a real redis-server and aiosmtpd: a refused or
cut-off wait for a connection slot gives the pool's slot (and a fleet lease) back, and `mx` keeps
one rate per MX host. The fleet-wide rate itself: tests/test_fleet_connection_rate.py."""

import asyncio
import contextlib
from collections.abc import Iterator

import pytest

from relays.mx import MxRelay
from relays.static import StaticRelay
from tests.conftest import context, envelope, opened
from tests.servers.dns import DnsServer, dns_server
from tests.servers.process import free_port
from tests.servers.redis import redis_server
from tests.servers.smtp import smtp_server


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with redis_server() as url:
        yield url


def _static(port: int, redis_url: str, name: str, *extra: str) -> str:
    lines = "".join(f"    {e}\n" for e in extra)
    return (
        f"relay:\n  {name}:\n    type: static\n    host: 127.0.0.1\n    port: {port}\n    idle_timeout: 0\n{lines}"
        f"mailrelay:\n  fleet: {{redis_url: '{redis_url}'}}\n"
    )


@pytest.mark.parametrize("fleet", [False, True])
async def test_a_refused_slot_gives_the_connection_slot_back(redis_url: str, fleet: bool) -> None:
    name = f"refused{int(fleet)}"
    with smtp_server() as server:
        config = _static(
            server.port,
            redis_url,
            name,
            "concurrent_connections: 1",
            "max_connection_rate: 1/m",
            "max_rate_wait: 0.1",
            f"fleet_connections: {str(fleet).lower()}",
        )
        async with opened(config) as relays:
            out = relays[name]
            assert isinstance(out, StaticRelay)
            (first,) = await out.deliver(envelope("a@example.net"), context())
            assert first.status == "delivered"
            for _ in range(3):  # each refusal gives its slot back: the pool of 1 never stays full
                (refused,) = await out.deliver(envelope("b@example.net"), context())
                assert refused.reply.code == 451
                assert refused.reply.message.startswith(
                    f"4.4.5 connection rate limit 1/m to 127.0.0.1:{server.port} reached"
                )
            await asyncio.sleep(0.05)  # the first connection's QUIT
            assert out.pool.open_count == 0
            if fleet:
                assert out.pool._gate is not None
                assert out.pool._gate.limit() == 1
    assert server.connection_count == 1


async def test_a_wait_cut_by_the_deadline_gives_the_connection_slot_back(redis_url: str) -> None:
    with smtp_server() as server:
        config = _static(
            server.port, redis_url, "cut", "concurrent_connections: 1", "max_connection_rate: 2/s", "max_rate_wait: 5"
        )
        async with opened(config) as relays:
            out = relays["cut"]
            assert isinstance(out, StaticRelay)
            (first,) = await out.deliver(envelope("a@example.net"), context())
            assert first.status == "delivered"
            await asyncio.sleep(0.05)
            task = asyncio.create_task(out.deliver(envelope("b@example.net"), context()))
            await asyncio.sleep(0.1)  # waiting for the next slot, ~0.4 s away
            assert out.pool.open_count == 1
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            assert out.pool.open_count == 0
            # A deadline shorter than the wait: refused at once, not after the deadline.
            (short,) = await out.deliver(envelope("c@example.net"), context(0.05))
            assert short.reply.code == 451
    assert server.connection_count == 1


@pytest.fixture(scope="module")
def dns() -> Iterator[DnsServer]:
    with dns_server() as server:
        yield server


async def test_mx_keeps_one_connection_rate_per_mx_host(redis_url: str, dns: DnsServer) -> None:
    with smtp_server() as server:
        config = (
            "relay:\n  mxout:\n    type: mx\n    allow_internal_destinations: true\n    idle_timeout: 0\n"
            "    max_connection_rate: 1/m\n    max_rate_wait: 0.1\n"
            f"    override_mx: {{example.test: '127.0.0.1:{server.port}'}}\n"
            f"mailrelay:\n  dns_nameservers: ['{dns.nameserver}']\n  fleet: {{redis_url: '{redis_url}'}}\n"
        )
        async with opened(config) as relays:
            out = relays["mxout"]
            assert isinstance(out, MxRelay)
            (first,) = await out.deliver(envelope("bob@example.test"), context())
            (second,) = await out.deliver(envelope("carol@example.test"), context())
    assert first.status == "delivered"
    assert (second.reply.code, second.reply.enhanced_status) == (451, "4.4.5")
    assert second.reply.message.startswith("4.4.5 connection rate limit 1/m to 127.0.0.1 reached")
    assert server.connection_count == 1


async def test_redis_unreachable_the_connection_rate_is_this_instances_part() -> None:
    # 20/s for a fleet of 2, Redis unreachable: this instance opens 10 a second, one every 100 ms.
    dead = f"redis://127.0.0.1:{free_port()}/0"
    with smtp_server() as server:
        config = _static(server.port, dead, "local", "max_connection_rate: 20/s").replace(
            "fleet: {", "fleet: {expected_instances: 2, "
        )
        async with opened(config) as relays:
            out = relays["local"]
            loop = asyncio.get_running_loop()
            start = loop.time()
            for i in range(6):
                (result,) = await out.deliver(envelope(f"r{i}@example.net"), context())
                assert result.status == "delivered"
            elapsed = loop.time() - start
    assert 0.45 <= elapsed < 1.0, f"6 connections in {elapsed:.2f} s: the local part is 10/s"
    assert server.connection_count == 6
