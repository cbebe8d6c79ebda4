"""A connection given back to the pool goes to the delivery that has waited longest for one, not to
one that asked after it. A real aiosmtpd server, one connection allowed."""

import asyncio

from relays.base import DeliveryContext
from relays.static import StaticRelay
from tests.conftest import context, envelope, opened
from tests.relays.test_misbehaving_servers import relay
from tests.servers.smtp import smtp_server


async def test_a_released_connection_goes_to_the_delivery_waiting_longest() -> None:
    holding = asyncio.Event()
    go_on = asyncio.Event()

    async def hold() -> None:  # the first delivery's step before its data leaves
        holding.set()
        await go_on.wait()

    with smtp_server() as server:
        async with opened(relay(server.port, "concurrent_connections: 1")) as relays:
            out = relays["out"]
            assert isinstance(out, StaticRelay)
            loop = asyncio.get_running_loop()

            async def first_then_third() -> None:
                # As a batch's worker does: its next delivery asks for a connection right after the
                # last one gave it back, before the delivery already waiting has run.
                await out.deliver(envelope("first@example.net"), DeliveryContext(loop.time() + 30, hold))
                await out.deliver(envelope("third@example.net"), context())

            worker = asyncio.create_task(first_then_third())
            await asyncio.wait_for(holding.wait(), 10)  # first holds the only connection
            second = asyncio.create_task(out.deliver(envelope("second@example.net"), context()))
            for _ in range(100):  # until second waits for the connection
                await asyncio.sleep(0)
            go_on.set()
            await asyncio.wait_for(asyncio.gather(worker, second), 20)
    # Before: first, third, second (second woken to find the connection taken, and queued again).
    assert [r.recipients for r in server.received] == [
        ["first@example.net"],
        ["second@example.net"],
        ["third@example.net"],
    ]
    assert server.connection_count == 1
