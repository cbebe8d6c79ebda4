"""The pool's count of open connections stays true when a delivery of several transactions is
cut off (its deadline cancels it): each connection frees its slot once, so the pool never opens
more than concurrent_connections. A real aiosmtpd server."""

import asyncio
import contextlib

from relays.base import DeliveryContext
from relays.static import StaticRelay
from tests.conftest import context, envelope, opened
from tests.relays.test_misbehaving_servers import relay
from tests.servers.smtp import smtp_server


async def test_a_batched_delivery_cut_off_on_a_reused_connection_frees_its_slot_once() -> None:
    stalled = asyncio.Event()

    async def stall() -> None:  # the service's step before data leaves, here never ending
        stalled.set()
        await asyncio.sleep(60)

    with smtp_server() as server:
        config = relay(server.port, "concurrent_connections: 1", "max_recipients_per_batch: 1")
        async with opened(config) as relays:
            out = relays["out"]
            assert isinstance(out, StaticRelay)
            (warm,) = await out.deliver(envelope("warm@example.net"), context())  # its connection stays idle
            assert warm.status == "delivered"
            cut = DeliveryContext(asyncio.get_running_loop().time() + 60, before_sending=stall)
            task = asyncio.create_task(out.deliver(envelope("a@example.net", "b@example.net"), cut))
            await asyncio.wait_for(stalled.wait(), 10)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            assert out.pool.open_count == 0  # -1 before: the cut connection was counted closed twice
            # Two deliveries at once with one connection allowed: one waits, so they share it.
            first, second = await asyncio.gather(
                out.deliver(envelope("c@example.net"), context()), out.deliver(envelope("d@example.net"), context())
            )
            assert out.pool.open_count <= 1
    assert [first[0].status, second[0].status] == ["delivered", "delivered"]
    # warm's connection (cut), then one for c and d, never two at once.
    assert server.connection_count == 2
