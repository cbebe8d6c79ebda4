"""A burst to a destination with `max_connection_rate`: a delivery waiting for its connection's
slot takes a connection that comes back to the pool meanwhile, instead of waiting out the slot
and opening one more (the rate is there to open fewer connections, not to hold mail)."""

import asyncio
import contextlib
import re
import time
from collections.abc import Callable, Iterator

import pytest

from relays.static import StaticRelay
from tests.conftest import context, envelope, opened
from tests.relays.test_misbehaving_servers import relay
from tests.servers.redis import redis_server
from tests.servers.smtp import Script, smtp_server


async def test_a_burst_under_a_connection_rate_shares_the_connection_that_came_back() -> None:
    with smtp_server() as server:
        config = relay(server.port, "concurrent_connections: 4", "max_connection_rate: 1/s", "max_rate_wait: 10")
        async with opened(config) as relays:
            out = relays["out"]
            assert isinstance(out, StaticRelay)
            started = time.monotonic()
            results = await asyncio.gather(*(out.deliver(envelope(f"r{i}@example.net"), context()) for i in range(4)))
            took = time.monotonic() - started
            assert out.pool.open_count <= 1  # the slots reserved for the others went back
    assert [r.status for (r,) in results] == ["delivered"] * 4
    # Before: one connection a second, each delivery waiting for its own (3 s, 4 connections).
    assert server.connection_count == 1
    assert took < 1.0


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with redis_server() as url:
        yield url


async def _until(condition: Callable[[], bool]) -> None:
    async with asyncio.timeout(10):
        while not condition():  # noqa: ASYNC110 - a server thread's count, a pool's: no event to wait on
            await asyncio.sleep(0.01)


@pytest.mark.parametrize("fleet", ["none", "rate", "rate and leases"])
async def test_a_wait_for_a_connection_slot_cut_off_gives_the_rate_slot_back(redis_url: str, fleet: str) -> None:
    """A delivery waiting for its connection's slot is cancelled (its client went away, a shutdown):
    it opened nothing, so the slot it reserved goes back, as a handed-over one's does. Kept, the
    next delivery's slot was a whole interval further (beyond max_rate_wait here: 451 at once
    while the only connection was about to come back)."""
    name = f"cut{len(fleet)}"
    options = ["concurrent_connections: 4", "max_connection_rate: 1/m", "max_rate_wait: 90"]
    if fleet == "rate and leases":
        options.append("fleet_connections: true")
    with smtp_server(Script(rcpt_delay=0.5)) as server:  # the first delivery holds its connection
        config = relay(server.port, *options).replace("  out:", f"  {name}:")
        if fleet != "none":
            config += f"mailrelay:\n  fleet: {{redis_url: '{redis_url}'}}\n"
        async with opened(config) as relays:
            out = relays[name]
            assert isinstance(out, StaticRelay)
            first = asyncio.create_task(out.deliver(envelope("a@example.net"), context()))
            await _until(lambda: server.connection_count == 1)
            waiting = asyncio.create_task(out.deliver(envelope("b@example.net"), context()))
            await _until(lambda: len(out.pool._rate_waiters) == 1)  # its slot 60 s away, a pool slot reserved
            assert out.pool.open_count == 2
            waiting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waiting
            assert out.pool.open_count == 1
            # 60 s away again, within max_rate_wait: it waits, and takes the first one's connection.
            (third,) = await out.deliver(envelope("c@example.net"), context())
            (done,) = await first
            assert out.pool.open_count == 1  # the connection, idle
            assert not out.pool._rate_waiters
            if (gate := out.pool._gate) is not None:
                assert len(gate.leases) == 1  # the cut wait's lease went back
            assert (gate is not None) == (fleet == "rate and leases")
    assert done.status == "delivered"
    assert third.status == "delivered", third.reply.message
    assert server.connection_count == 1


async def test_a_wait_for_a_message_slot_cut_off_gives_the_slot_back() -> None:
    """The same for `max_message_rate`: a delivery cut off while it waits for its message's slot sent
    nothing, and the slot goes back; kept, the next message's slot was an interval further."""
    with smtp_server() as server:
        config = relay(server.port, "max_message_rate: 1/m", "max_rate_wait: 90")
        async with opened(config) as relays:
            out = relays["out"]
            assert isinstance(out, StaticRelay)
            (first,) = await out.deliver(envelope("a@example.net"), context())
            waiting = asyncio.create_task(out.deliver(envelope("b@example.net"), context()))
            await asyncio.sleep(0.1)  # waiting for its slot, 60 s away
            waiting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await waiting
            # A deadline of 1 s: refused at once, and the reply says when the next slot is.
            (third,) = await out.deliver(envelope("c@example.net"), context(1.0))
    assert first.status == "delivered"
    assert third.reply.code == 451
    found = re.search(r"next slot in ([0-9.]+) s", third.reply.message)
    assert found is not None, third.reply.message
    assert float(found.group(1)) <= 60.0  # 120 when the cut wait kept its slot
    assert len(server.received) == 1
