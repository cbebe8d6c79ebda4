"""The Redis plumbing the fleet shares: the idempotency store (app/idempotency.py), the fleet-wide
connection leases (relays/smtp/leases.py) and the rates and quotas (relays/rates.py).

One client builder (plain, TLS, unix and Sentinel URLs), one bound on every call, and `Batch`,
which sends the Lua scripts' calls of concurrent deliveries in one write.
"""

import asyncio
from collections.abc import Sequence
from typing import Any

import redis.asyncio as aioredis
from hiredis import pack_command
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.sentinel import Sentinel
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError

from schemas.config import parse_sentinel_url

#: Every Redis call gives up after this long (connect, send, reply): the bound on what a claim,
#: the progress record before the data leaves, or a completion can add to a delivery.
REDIS_TIMEOUT = 2.0


#: One command of a batch: the script, its key, its arguments, and the caller's future.
_Call = tuple[AsyncScript, str, tuple[str | int, ...], "asyncio.Future[Any]"]
#: Batches out at once (one: they share the batches' connection), and the most commands in one.
_BATCHES_OUT = 1
_BATCH_MAX = 256


class Batch:
    """The store's commands, sent in batches (group commit): one batch is out at a time, and the
    commands issued meanwhile leave together in one write when its replies are in, their replies
    read in order (a pipeline without its per-call machinery). Concurrent deliveries share a write
    and a read: on loopback a write costs the client 50-70 us of CPU whatever it holds. Each
    command is still one round trip for its caller. Bounds: a batch holds at most _BATCH_MAX
    commands, and waits at most REDIS_TIMEOUT (connect, then each read: redis-py's socket
    timeouts); what waits is at most the claims in flight (the deliveries' limits) and their
    renewals. A connection the server closed is tried once more (a restart, a failover)."""

    def __init__(self, client: "aioredis.Redis") -> None:
        self.client = client
        self.pending: list[_Call] = []
        self.connection: AbstractConnection | None = None
        self.sending: set[asyncio.Task[None]] = set()

    def call(self, script: AsyncScript, key: str, *args: str | int) -> "asyncio.Future[Any]":
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if not self.pending and not self.sending:
            loop.call_soon(self._flush)
        # While a batch is out, the next one gathers; it leaves when that one's replies are in.
        self.pending.append((script, key, args, future))
        return future

    def _flush(self) -> None:
        if not self.pending or len(self.sending) >= _BATCHES_OUT:
            return
        batch, self.pending = self.pending[:_BATCH_MAX], self.pending[_BATCH_MAX:]
        task = asyncio.get_running_loop().create_task(self._send(batch))
        self.sending.add(task)
        task.add_done_callback(self._sent)

    def _sent(self, task: "asyncio.Task[None]") -> None:
        self.sending.discard(task)
        self._flush()

    async def _send(self, batch: list[_Call]) -> None:
        try:
            replies = await self._replies(batch)
            missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
            if missing:  # Redis restarted or failed over to a server without the scripts: load them
                again = [batch[i] for i in missing]
                for i, reply in zip(missing, await self._replies(again, load={c[0] for c in again}), strict=True):
                    replies[i] = reply
        except BaseException:  # cancelled (shutdown): no answer will come
            _fail(batch, ConnectionError("cancelled"))
            raise
        for (*_, future), reply in zip(batch, replies, strict=True):
            if future.done():
                continue  # its caller gave up (a timeout)
            if isinstance(reply, Exception):
                future.set_exception(reply)
            else:
                future.set_result(reply)

    async def _replies(self, batch: list[_Call], load: set[AsyncScript] | None = None) -> list[object]:
        """Each call's reply, or the exception that stands for it; `load`: scripts to load first
        (SCRIPT LOAD, in the same write)."""
        replies: list[object] = []
        loads: list[tuple[object, ...]] = [("SCRIPT", "LOAD", script.script) for script in load or ()]
        commands = loads + [("EVALSHA", script.sha, 1, key, *args) for script, key, args, _ in batch]
        try:
            try:
                await self._exchange(commands, replies)
            except RedisConnectionError:
                # A connection the server had closed (a restart, a failover, an idle timeout) fails
                # at once: once more on a new one, for what got no reply. Running a script twice is
                # harmless: each compares before it sets, and a repeated claim finds itself running.
                await self._exchange(commands[len(replies) :], replies)
        except Exception as exc:  # lost or timed out: the rest is unknown
            replies += [exc] * (len(commands) - len(replies))
        return replies[len(loads) :]

    async def _exchange(self, commands: list[tuple[object, ...]], replies: list[object]) -> None:
        """One write of the commands, then their replies in order, into `replies` (an error reply
        as its exception). On the batches' own connection (one batch is out at a time): a pool's
        checkout and return cost more than the write (a lock, a probe read, observability events)."""
        connection = self.connection
        if connection is None:  # connected on first use; through Sentinel, to the master it names
            connection = self.connection = self.client.connection_pool.make_connection()  # type: ignore[no-untyped-call]
        try:
            # hiredis packs a command in 0.7 us, redis-py's Python encoder in 5 us.
            packed = b"".join([pack_command(command) for command in commands])  # type: ignore[arg-type]  # its stub says one item
            if not connection.is_connected:
                # connect(), not the reconnect inside send: through Sentinel it asks for the master.
                await connection.connect()
            await connection.send_packed_command(packed)
            for _ in commands:
                try:
                    replies.append(await connection.read_response())
                except ResponseError as exc:  # NOSCRIPT, or a script's error: the connection is fine
                    replies.append(exc)
        except BaseException:
            await connection.disconnect()  # the next batch connects again
            raise


def _fail(batch: Sequence[tuple[object, object, object, "asyncio.Future[Any]"]], exc: Exception) -> None:
    for *_, future in batch:
        if not future.done():
            future.set_exception(exc)


def redis_client(url: str) -> "aioredis.Redis":
    """The client for `url` (the forms `redis_url` takes); hiredis parses the replies (a dependency).

    Through Sentinel, every new connection asks the sentinels for the master: after a failover a
    connection to the old master fails (or, demoted, answers READONLY and is dropped), the
    requests in flight on it are refused 503, and the next ones reach the new master."""
    if url.startswith("redis+sentinel://"):
        where = parse_sentinel_url(url)
        sentinel = Sentinel(  # type: ignore[no-untyped-call]
            where.sentinels,
            socket_timeout=REDIS_TIMEOUT,
            sentinel_kwargs={"socket_timeout": REDIS_TIMEOUT, "socket_connect_timeout": REDIS_TIMEOUT},
        )
        client: aioredis.Redis = sentinel.master_for(
            where.service,
            socket_timeout=REDIS_TIMEOUT,
            socket_connect_timeout=REDIS_TIMEOUT,
            decode_responses=True,
            password=where.password,
            db=where.db,
        )
        return client
    return aioredis.Redis.from_url(
        url,
        socket_timeout=REDIS_TIMEOUT,
        socket_connect_timeout=REDIS_TIMEOUT,
        decode_responses=True,
    )


def reason(exc: BaseException) -> str:
    """An exception of redis-py, in words for a log line."""
    # redis-py names the host and port in its messages, never the URL's password.
    return f"{type(exc).__name__}: {exc}"[:300]
