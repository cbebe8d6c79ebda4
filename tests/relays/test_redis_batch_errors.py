"""relays/redis_link.py's fast path reads error replies only when the link saw one (`_Link.errors`):
a batch mixing a reply, NOSCRIPT and a script's own error, on a connected link, against a real
redis-server: each caller gets its own answer, the missing script is loaded and run once."""

import asyncio

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from relays.redis_link import Batch, redis_client
from tests.servers.redis import redis_instance

pytestmark = pytest.mark.asyncio


async def test_a_batch_with_noscript_and_an_error_reply_in_the_middle_answers_each_call() -> None:
    with redis_instance() as instance:
        client: aioredis.Redis = redis_client(instance.url)
        batch = Batch(client)
        incr = client.register_script("return redis.call('INCR', KEYS[1])")
        boom = client.register_script("return redis.error_reply('boom')")
        try:
            assert await batch.call(incr, "warm") == 1  # connects: later batches go the fast way
            await client.script_flush()  # incr is gone from Redis: its calls get NOSCRIPT
            calls = [batch.call(incr, "a"), batch.call(boom, "b"), batch.call(incr, "a"), batch.call(incr, "c")]
            await asyncio.sleep(0)
            assert batch.link is not None  # out on the link, no task
            assert batch.out is not None
            replies = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 5)
            assert [replies[0], replies[2], replies[3]] == [1, 2, 1], replies
            assert isinstance(replies[1], ResponseError), replies
            assert "boom" in str(replies[1])
            assert await client.get("a") == "2"  # each ran once
            # And the link goes on, with no error left over from the last batch.
            assert await batch.call(incr, "a") == 3
        finally:
            await batch.aclose()
            await client.aclose()
