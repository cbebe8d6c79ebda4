"""relays/redis_link.py's Batch against a real redis-server: a batch out on its connection when
that connection dies (Redis killed and started again) is sent once more on a new one, its scripts
loaded there (the restarted Redis has none), and every caller gets its own reply."""

import asyncio
import contextlib
import time

import pytest
import redis.asyncio as aioredis

from relays.redis_link import Batch, redis_client
from tests.servers.process import free_port
from tests.servers.redis import redis_instance

pytestmark = pytest.mark.asyncio

#: Holds Redis for about `ARGV[1]` ms (scripts may not sleep), then answers its key's new count.
_SLOW_INCR = """local limit = tonumber(ARGV[1]) / 1000
local start = redis.call('TIME')
while true do
  local now = redis.call('TIME')
  if (now[1] - start[1]) + (now[2] - start[2]) / 1e6 >= limit then break end
end
return redis.call('INCR', KEYS[1])"""


async def test_a_batch_whose_connection_dies_under_it_is_sent_again_on_a_new_one() -> None:
    port = free_port()
    with contextlib.ExitStack() as redis:
        instance = redis.enter_context(redis_instance(port=port))
        client: aioredis.Redis = redis_client(instance.url)
        batch = Batch(client)
        slow = client.register_script(_SLOW_INCR)
        try:
            assert await batch.call(slow, "warm", 0) == 1  # connects (the task path)
            # Out on the connection, Redis busy with it: killed, then started again (no scripts).
            calls = [batch.call(slow, f"k{i}", 300) for i in range(3)]
            await asyncio.sleep(0.1)
            assert batch.out is not None  # sent the fast way (no task), its replies due
            redis.close()
            started = time.monotonic()
            redis.enter_context(redis_instance(port=port))
            # The restarted Redis is empty: each call ran there once, on a new connection.
            assert await asyncio.wait_for(asyncio.gather(*calls), 10) == [1, 1, 1]
            assert time.monotonic() - started < 5
            assert await batch.call(slow, "k0", 0) == 2  # and the link goes on
        finally:
            await batch.aclose()
            await client.aclose()


async def test_calls_waiting_at_aclose_fail_and_no_connection_is_opened_after_it() -> None:
    """aclose() with a batch out and a call gathering behind it (a reload or shutdown while
    renewals and rate checks arrive): both fail, and nothing connects again afterwards (the
    gathering call used to run on a new connection that nobody would ever close)."""
    with redis_instance() as instance:
        client: aioredis.Redis = redis_client(instance.url)
        batch = Batch(client)
        slow = client.register_script(_SLOW_INCR)
        try:
            assert await batch.call(slow, "warm", 0) == 1
            out = batch.call(slow, "a", 200)
            await asyncio.sleep(0.05)
            assert batch.out is not None
            gathering = batch.call(slow, "b", 0)
            await batch.aclose()
            results = await asyncio.gather(out, gathering, return_exceptions=True)
            assert all(isinstance(result, ConnectionError) for result in results), results
            late = batch.call(slow, "c", 0)
            with pytest.raises(ConnectionError):
                await late
            await asyncio.sleep(0.3)
            assert batch.link is None or batch.link.closed()
            assert not batch.sending
        finally:
            await client.aclose()
