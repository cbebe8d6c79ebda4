"""A burst to a destination with `max_connection_rate`: a delivery waiting for its connection's
slot takes a connection that comes back to the pool meanwhile, instead of waiting out the slot
and opening one more (the rate is there to open fewer connections, not to hold mail)."""

import asyncio
import time

from relays.static import StaticRelay
from tests.conftest import context, envelope, opened
from tests.relays.test_misbehaving_servers import relay
from tests.servers.smtp import smtp_server


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
