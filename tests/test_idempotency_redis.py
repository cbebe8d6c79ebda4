"""The Redis store against a real redis-server: batched EVALSHA calls, NOSCRIPT after a script
flush (a restart or failover), records that lapse by Redis's clock, and what a stored result costs."""

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
import redis.asyncio as aioredis

from app.idempotency import Claimed, InDoubt, Mismatch, RedisStore, Replay, Running, StoredResponse, StoreUnavailable
from relays.redis_link import REDIS_TIMEOUT
from schemas.config import IdempotencySettings
from tests.servers.process import free_port
from tests.servers.redis import redis_instance, redis_server


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with redis_server() as url:
        yield url


@pytest_asyncio.fixture
async def store(redis_url: str) -> AsyncIterator[RedisStore]:
    opened = RedisStore(IdempotencySettings(backend="redis", redis_url=redis_url, lease=0.3))
    yield opened
    await opened.aclose()


async def test_concurrent_claims_share_writes_and_each_gets_its_own_answer(store: RedisStore) -> None:
    claims = await asyncio.gather(*(store.claim(f"batch-{i}", "f" * 64) for i in range(50)))
    assert all(isinstance(c, Claimed) for c in claims)
    assert len({c.token for c in claims if isinstance(c, Claimed)}) == 50
    again = await asyncio.gather(*(store.claim(f"batch-{i}", "f" * 64) for i in range(50)))
    assert all(isinstance(c, Running) for c in again)
    response = StoredResponse(200, {"X-Smtp-Reply": '250; message="ok"'}, b"{}")
    done = await asyncio.gather(
        *(store.complete(f"batch-{i}", c, "f" * 64, response) for i, c in enumerate(claims) if isinstance(c, Claimed))
    )
    assert done == [True] * 50


async def test_a_script_flush_is_recovered_from(store: RedisStore, redis_url: str) -> None:
    claim = await store.claim("flushed", "a" * 64)
    assert isinstance(claim, Claimed)
    admin = aioredis.Redis.from_url(redis_url)
    await admin.script_flush()  # what a restart or a failover to a fresh replica does
    await admin.aclose()
    assert await store.sending("flushed", claim)
    assert await store.complete("flushed", claim, "a" * 64, StoredResponse(200, {}, b"{}"))
    replay = await store.claim("flushed", "a" * 64)
    assert isinstance(replay, Replay)


async def test_leases_lapse_by_redis_clock_into_a_takeover_or_doubt(store: RedisStore) -> None:
    quiet = await store.claim("quiet", "b" * 64)
    sent = await store.claim("sent", "b" * 64)
    assert isinstance(quiet, Claimed)
    assert isinstance(sent, Claimed)
    assert await store.sending("sent", sent)
    assert isinstance(await store.claim("sent", "b" * 64), Running)
    await asyncio.sleep(0.4)
    taken = await store.claim("quiet", "b" * 64)
    assert isinstance(taken, Claimed)
    assert taken.taken_over
    assert not await store.release("quiet", quiet)  # the lapsed holder can no longer touch it
    assert await store.renew([("quiet", quiet), ("quiet", taken)]) == [False, True]
    assert isinstance(await store.claim("sent", "b" * 64), InDoubt)
    assert isinstance(await store.claim("sent", "b" * 64), InDoubt)  # kept: every repeat gets the same
    assert isinstance(await store.claim("sent", "c" * 64), Mismatch)


async def test_a_record_of_an_earlier_version_is_still_replayed(store: RedisStore, redis_url: str) -> None:
    admin = aioredis.Redis.from_url(redis_url, decode_responses=True)
    response = {"status": 400, "headers": {"X-Smtp-Reply": "550"}, "body": "{}"}
    await admin.set(store.prefix + "old", json.dumps({"state": "done", "fp": "d" * 64, "response": response}))
    await admin.aclose()
    replay = await store.claim("old", "d" * 64)
    assert isinstance(replay, Replay)
    assert replay.response.status == 400


async def test_a_stored_result_is_the_record_earlier_versions_wrote(store: RedisStore, redis_url: str) -> None:
    """The head is built without json.dumps (its cost per delivery): the same bytes, so that other
    versions of the fleet (a rolling upgrade) replay it."""
    claim = await store.claim("format", "e" * 64)
    assert isinstance(claim, Claimed)
    headers = {"X-Smtp-Reply": '250 2.0.0 "ok" \\ \u00e9t\u00e9 \U0001f600', "Retry-After": "5"}
    assert await store.complete("format", claim, "e" * 64, StoredResponse(250, headers, b'{"a": 1}'))
    admin = aioredis.Redis.from_url(redis_url, decode_responses=True)
    stored = await admin.get(store.prefix + "format")
    await admin.aclose()
    assert stored == "D" + "e" * 64 + json.dumps([250, headers], separators=(",", ":")) + '\n{"a": 1}'
    replay = await store.claim("format", "e" * 64)
    assert isinstance(replay, Replay)
    assert replay.response == StoredResponse(250, headers, b'{"a": 1}')


async def test_what_a_stored_result_costs_in_redis(store: RedisStore, redis_url: str) -> None:
    """The sizing figure in the docs: MEMORY USAGE of a typical stored result (one recipient,
    the answer's JSON and headers), with the key's prefix and its TTL."""
    from app.delivery import format_smtp_reply
    from schemas.delivery import DeliveryResult, RecipientResult
    from schemas.reply import Reply

    reply = Reply.parse(250, "2.0.0 Ok: queued as 4Xk2sJ0Qz1z9", "[SEND_DATA]")
    result = DeliveryResult(
        relay="out",
        message_id="<20261130.1234@app.example.com>",
        elapsed_ms=12.345,
        recipients=[RecipientResult(recipient="someone@example.net", reply=reply, host="mx.example.net:25")],
    )
    key = "k" * 64  # scoped keys are sha256 hex
    claim = await store.claim(key, "e" * 64)
    assert isinstance(claim, Claimed)
    headers = {"X-Smtp-Reply": format_smtp_reply(reply)}
    assert await store.complete(key, claim, "e" * 64, StoredResponse(200, headers, result.model_dump_json().encode()))
    admin = aioredis.Redis.from_url(redis_url)
    used = await admin.memory_usage(store.prefix + key)
    await admin.aclose()
    assert used is not None
    # 648 bytes on redis-server 7.0.15 (2026-11-30; 776 with the answer escaped inside JSON): the docs' figure.
    assert used < 1024, used


async def test_the_documented_acl_is_enough(redis_url: str) -> None:
    """The docs' ACL for the store's user: its key prefix, and only the commands it runs (the
    scripts' own GET, SET, DEL and TIME are checked too)."""
    admin = aioredis.Redis.from_url(redis_url)
    await admin.execute_command(  # type: ignore[no-untyped-call]
        "ACL", "SETUSER", "mailrelay", "on", ">acl-test-password", "resetkeys", "~mailrelay:idempotency:*",
        "resetchannels", "-@all", "+evalsha", "+script|load", "+get", "+set", "+del", "+time", "+ping",
    )  # fmt: skip
    await admin.script_flush()  # so that the first call loads its script, as after a restart
    await admin.aclose()
    url = redis_url.replace("redis://", "redis://mailrelay:acl-test-password@")
    store = RedisStore(IdempotencySettings(backend="redis", redis_url=url))
    try:
        claim = await store.claim("acl", "a" * 64)
        assert isinstance(claim, Claimed)
        assert await store.sending("acl", claim)
        assert await store.renew([("acl", claim)]) == [True]
        assert await store.complete("acl", claim, "a" * 64, StoredResponse(200, {}, b"{}"))
        assert isinstance(await store.claim("acl", "a" * 64), Replay)
        other = await store.claim("acl-2", "a" * 64)
        assert isinstance(other, Claimed)
        assert await store.release("acl-2", other)
    finally:
        await store.aclose()


async def test_with_aof_a_restarted_redis_keeps_claims_and_results(tmp_path: Path) -> None:
    """What the docs ask for: appendonly (fsync always here). A restart without it forgets the
    running claims, and a repeat of a delivery in flight would be sent again."""
    port = free_port()
    aof = ("--appendonly", "yes", "--appendfsync", "always", "--dir", str(tmp_path))
    fingerprint = "f" * 64
    with redis_instance(*aof, port=port) as first:
        store = RedisStore(IdempotencySettings(backend="redis", redis_url=first.url))
        running = await store.claim("running", fingerprint)
        done = await store.claim("done", fingerprint)
        assert isinstance(running, Claimed)
        assert isinstance(done, Claimed)
        assert await store.sending("running", running)
        assert await store.complete("done", done, fingerprint, StoredResponse(200, {}, b"{}"))
        first.process.kill()  # no shutdown save: only the append-only file
        first.process.wait()
    with redis_instance(*aof, port=port):
        assert isinstance(await store.claim("running", fingerprint), Running)
        assert isinstance(await store.claim("done", fingerprint), Replay)
        assert await store.renew([("running", running)]) == [True]  # its holder goes on
    await store.aclose()


async def test_a_redis_that_stops_answering_fails_the_batch_in_time_and_its_late_replies_go_nowhere() -> None:
    """Batch's own connection: a wait is bounded by REDIS_TIMEOUT, and a batch that gave up drops
    its connection, so the replies the server sends later cannot answer the next batch."""
    with redis_instance() as instance:
        store = RedisStore(IdempotencySettings(backend="redis", redis_url=instance.url))
        assert isinstance(await store.claim("before", "f" * 64), Claimed)
        instance.process.send_signal(signal.SIGSTOP)
        try:
            started = time.monotonic()
            with pytest.raises(StoreUnavailable, match="TimeoutError"):
                await store.claim("stalled", "f" * 64)
            assert REDIS_TIMEOUT <= time.monotonic() - started < REDIS_TIMEOUT + 1.5
        finally:
            instance.process.send_signal(signal.SIGCONT)
        # The stalled claim may or may not have run (its connection was reset under it): either
        # way a repeat gets its own answer, on a new connection.
        assert isinstance(await store.claim("stalled", "f" * 64), Running | Claimed)
        assert isinstance(await store.claim("after", "f" * 64), Claimed)
        await store.aclose()


async def test_the_progress_record_is_bounded_from_its_own_call_even_behind_a_stalled_batch() -> None:
    """sending() holds up the data: the store answers or fails it within REDIS_TIMEOUT of the call
    (the core has no timeout of its own around it), also when it waits behind a batch out to a
    Redis that stopped answering (that batch's bound, then its own, would take longer)."""
    with redis_instance() as instance:
        store = RedisStore(IdempotencySettings(backend="redis", redis_url=instance.url))
        claim = await store.claim("progress", "f" * 64)
        assert isinstance(claim, Claimed)
        instance.process.send_signal(signal.SIGSTOP)
        try:
            stalled = asyncio.ensure_future(store.claim("stalled", "f" * 64))  # the batch out
            await asyncio.sleep(REDIS_TIMEOUT / 2)
            started = time.monotonic()
            with pytest.raises(StoreUnavailable, match="TimeoutError"):
                await store.sending("progress", claim)
            assert REDIS_TIMEOUT - 0.1 <= time.monotonic() - started < REDIS_TIMEOUT + 0.4
            with pytest.raises(StoreUnavailable):
                await stalled
        finally:
            instance.process.send_signal(signal.SIGCONT)
        await store.aclose()


async def test_a_password_and_a_database_in_the_url_are_used() -> None:
    with redis_instance() as instance:
        admin = aioredis.Redis.from_url(instance.url, socket_timeout=5)
        await admin.config_set("requirepass", "s3cret")  # after start: the fixture pings without it
        await admin.aclose()
        url = f"redis://:s3cret@127.0.0.1:{instance.port}/3"
        store = RedisStore(IdempotencySettings(backend="redis", redis_url=url))
        assert isinstance(await store.claim("k", "f" * 64), Claimed)
        await store.aclose()
        admin = aioredis.Redis.from_url(url, socket_timeout=5)
        assert await admin.dbsize() == 1  # in database 3
        await admin.aclose()
        wrong = RedisStore(IdempotencySettings(backend="redis", redis_url=url.replace("s3cret", "wrong")))
        with pytest.raises(StoreUnavailable, match="AuthenticationError"):
            await wrong.claim("k", "f" * 64)
        await wrong.aclose()
