"""The Redis plumbing the fleet shares: the idempotency store (app/idempotency.py), the fleet-wide
connection leases (relays/smtp/leases.py) and the rates and quotas (relays/rates.py).

One client builder (plain, TLS, unix and Sentinel URLs), one bound on every call, and `Batch`,
which sends the Lua scripts' calls of concurrent deliveries in one write.
"""

import asyncio
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import redis.asyncio as aioredis
from hiredis import Reader, pack_command
from redis._parsers.base import BaseParser
from redis.asyncio.connection import AbstractConnection, Connection, UnixDomainSocketConnection
from redis.asyncio.sentinel import Sentinel
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from schemas.config import parse_sentinel_url

#: Every Redis call gives up after this long (connect, send, reply): the bound on what a claim,
#: the progress record before the data leaves, or a completion can add to a delivery.
REDIS_TIMEOUT = 2.0


#: One command of a batch: the script, its keys, its arguments, and the caller's future.
_Call = tuple[AsyncScript, tuple[str, ...], tuple[str | int | bytes, ...], "asyncio.Future[Any]"]
#: Batches out at once (one: they share the batches' connection), and the most commands in one.
_BATCHES_OUT = 1
_BATCH_MAX = 256


class Batch:
    """The store's commands, sent in batches (group commit): one batch is out at a time, and the
    commands issued meanwhile leave together in one write when its replies are in, their replies
    read in order (a pipeline without its per-call machinery). Concurrent deliveries share a write
    and a read: on loopback a write costs the client 50-70 us of CPU whatever it holds. Each
    command is still one round trip for its caller. Bounds: a batch holds at most _BATCH_MAX
    commands, and waits at most REDIS_TIMEOUT (connect, then its replies); what waits is at most
    the claims in flight (the deliveries' limits) and their renewals. A connection the server
    closed is tried once more (a restart, a failover).

    On a connected link of our own (the common case) a batch is written from a callback and
    answered from the link's data_received, with one timer for its bound: no task, future or
    timeout context per batch (each costs loop iterations: 2026-12-01, 1 KiB c8 keyed). Connecting,
    a lost connection, NOSCRIPT and redis-py's connections (TLS, Sentinel) take a task."""

    def __init__(self, client: "aioredis.Redis") -> None:
        self.client = client
        self.pending: list[_Call] = []
        self.connection: AbstractConnection | None = None
        self.link: _Link | None = None
        # redis:// and unix:// (no TLS, no Sentinel): our own link, a third of the client CPU per
        # reply of redis-py's read path. TLS and Sentinel keep redis-py's connection (its
        # certificates, its master lookup).
        pool = client.connection_pool
        self.fast = pool.connection_class in (Connection, UnixDomainSocketConnection) and not (
            pool.connection_kwargs.get("credential_provider")
        )
        #: The task that sends a batch the slow way (connecting, recovering), or None.
        self.sending: set[asyncio.Task[None]] = set()
        #: The batch out on the link, sent the fast way, when it was written (loop time), and the
        #: watchdog that bounds its wait: armed for the first batch's bound and re-armed for the
        #: batch out when it fires, not one timer per batch (call_later and cancel: 2 us).
        self.out: list[_Call] | None = None
        self._out_at = 0.0
        self._timer: asyncio.TimerHandle | None = None
        #: Set by aclose(): every call fails at once, nothing connects again.
        self.closed = False

    def call(self, script: AsyncScript, keys: str | Sequence[str], *args: str | int | bytes) -> "asyncio.Future[Any]":
        """EVALSHA of `script` with `keys` (one key, or several) and `args`; its reply, or the
        exception that stands for it, comes in the future."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Any] = loop.create_future()
        if self.closed:
            future.set_exception(ConnectionError("closed"))
            return future
        if not self.pending and self.out is None and not self.sending:
            loop.call_soon(self._flush)
        # While a batch is out, the next one gathers; it leaves when that one's replies are in.
        self.pending.append((script, (keys,) if isinstance(keys, str) else tuple(keys), args, future))
        return future

    def _flush(self) -> None:
        if self.closed or not self.pending or self.out is not None or len(self.sending) >= _BATCHES_OUT:
            return
        batch, self.pending = self.pending[:_BATCH_MAX], self.pending[_BATCH_MAX:]
        link = self.link
        if link is None or link.closed():  # connect first (or redis-py's connection): a task
            task = asyncio.get_running_loop().create_task(self._send(batch))
            self.sending.add(task)
            task.add_done_callback(self._sent)
            return
        replies: list[object] = []
        self.out = batch
        loop = batch[0][3].get_loop()  # no getpid() as get_running_loop
        self._out_at = loop.time()
        if self._timer is None:
            self._timer = loop.call_at(self._out_at + REDIS_TIMEOUT, self._watch)
        # What _pack([_command(call) ...]) gives, in one comprehension: no call per command.
        packed = b"".join([pack_command(("EVALSHA", s.sha, len(k), *k, *a)) for s, k, a, _ in batch])  # type: ignore[arg-type]
        link.send(packed, len(batch), replies, partial(self._answered, batch, replies))

    def _answered(self, batch: list[_Call], replies: list[object], exc: Exception | None) -> None:
        """The fast way's end: every reply is in, or the link failed (`exc`) after `replies`; the link
        says whether an error reply came (`errors`: the rare case, checked for NOSCRIPT)."""
        self.out = None
        if self.closed:  # aclose() failed it: no recovery on a new connection
            _fail(batch, exc or ConnectionError("closed"))
            return
        link = self.link
        errors = link is None or link.errors
        if exc is None and not (errors and any(isinstance(reply, NoScriptError) for reply in replies)):
            _answer(batch, replies)
            if self.pending:
                # In two iterations: the callers just woken run, then what they issue joins the
                # batch (as the task path did). After one, batches were smaller: 0.83-0.90 writes
                # per keyed delivery instead of 0.62-0.66 (in-process 1 KiB c8, cProfile counts),
                # and a write is the dearest part of a call.
                loop = batch[0][3].get_loop()
                loop.call_soon(loop.call_soon, self._flush)
            return
        task = asyncio.get_running_loop().create_task(self._recover(batch, replies, exc))
        self.sending.add(task)
        task.add_done_callback(self._sent)

    def _watch(self) -> None:
        """The watchdog: a batch out for REDIS_TIMEOUT fails, and its connection goes (a late reply
        must not answer the next batch); a younger one is watched until its own bound."""
        self._timer = None
        link = self.link
        if self.out is None or link is None:
            return  # nothing out: the next batch arms it again
        due = self._out_at + REDIS_TIMEOUT
        loop = asyncio.get_running_loop()
        if loop.time() < due:
            self._timer = loop.call_at(due, self._watch)
            return
        self.link = None
        link.fail(RedisTimeoutError(f"no reply from Redis in {REDIS_TIMEOUT} s"))
        link.close()

    def _sent(self, task: "asyncio.Task[None]") -> None:
        self.sending.discard(task)
        self._flush()

    async def _send(self, batch: list[_Call]) -> None:
        try:
            replies = await self._replies(batch)
            await self._load_missing(batch, replies)
        except BaseException:  # cancelled (shutdown): no answer will come
            _fail(batch, ConnectionError("cancelled"))
            raise
        _answer(batch, replies)

    async def _recover(self, batch: list[_Call], replies: list[object], exc: Exception | None) -> None:
        """The rest of a batch whose link failed under it (`exc`), or whose scripts were missing."""
        try:
            if isinstance(exc, RedisConnectionError):  # lost: once more on a new connection, as _replies
                self._drop()
                replies += await self._replies(batch[len(replies) :], retry=False)
            elif exc is not None:  # timed out: the rest is unknown
                replies += [exc] * (len(batch) - len(replies))
            await self._load_missing(batch, replies)
        except BaseException:
            _fail(batch, ConnectionError("cancelled"))
            raise
        _answer(batch, replies)

    async def _load_missing(self, batch: list[_Call], replies: list[object]) -> None:
        missing = [i for i, reply in enumerate(replies) if isinstance(reply, NoScriptError)]
        if missing:  # Redis restarted or failed over to a server without the scripts: load them
            again = [batch[i] for i in missing]
            for i, reply in zip(missing, await self._replies(again, load={c[0] for c in again}), strict=True):
                replies[i] = reply

    async def _replies(
        self, batch: list[_Call], load: set[AsyncScript] | None = None, retry: bool = True
    ) -> list[object]:
        """Each call's reply, or the exception that stands for it; `load`: scripts to load first
        (SCRIPT LOAD, in the same write); `retry`: once more on a new connection when it was lost."""
        replies: list[object] = []
        loads: list[tuple[object, ...]] = [("SCRIPT", "LOAD", script.script) for script in load or ()]
        commands = loads + [_command(call) for call in batch]
        try:
            try:
                await self._exchange(commands, replies)
            except RedisConnectionError:
                if not retry:
                    raise
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
        packed = _pack(commands)
        if self.fast:
            await self._exchange_link(packed, len(commands), replies)
            return
        connection = self.connection
        if connection is None:  # connected on first use; through Sentinel, to the master it names
            connection = self.connection = self.client.connection_pool.make_connection()  # type: ignore[no-untyped-call]
        try:
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

    async def _exchange_link(self, packed: bytes, count: int, replies: list[object]) -> None:
        """_exchange on our own link: connect (and AUTH, SELECT) within REDIS_TIMEOUT, then the
        batch's replies within REDIS_TIMEOUT of the write (the whole batch, not each reply)."""
        link = self.link
        try:
            if link is None or link.closed():
                self.link = None
                kwargs = self.client.connection_pool.connection_kwargs
                async with asyncio.timeout(REDIS_TIMEOUT):
                    link = await _Link.open(kwargs)
                self.link = link
            async with asyncio.timeout(REDIS_TIMEOUT):
                await link.exchange(packed, count, replies)
        except TimeoutError as exc:
            self._drop()
            raise RedisTimeoutError(f"no reply from Redis in {REDIS_TIMEOUT} s") from exc
        except BaseException:
            self._drop()  # the next batch connects again
            raise

    async def aclose(self) -> None:
        """Closes the batches' connection (the client's pool is the caller's to close): the batch
        out, the calls gathering behind it and any later call fail with ConnectionError, and
        nothing connects again."""
        self.closed = True
        closed = ConnectionError("closed")
        if self.link is not None:  # a batch out fails now, not sent again on a new connection
            self.link.fail(closed)
        pending, self.pending = self.pending, []
        _fail(pending, closed)
        for task in list(self.sending):  # connecting or recovering: its calls fail (_send, _recover)
            task.cancel()
        if self.sending:
            await asyncio.gather(*self.sending, return_exceptions=True)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._drop()
        if self.connection is not None:
            await self.connection.disconnect()

    def _drop(self) -> None:
        if self.link is not None:
            self.link.close()
            self.link = None


def _command(call: _Call) -> tuple[object, ...]:
    script, keys, args, _ = call
    return ("EVALSHA", script.sha, len(keys), *keys, *args)


def _pack(commands: list[tuple[object, ...]]) -> bytes:
    # hiredis packs a command in 0.7 us, redis-py's Python encoder in 5 us.
    return b"".join([pack_command(command) for command in commands])  # type: ignore[arg-type]  # its stub says one item


def _answer(batch: list[_Call], replies: list[object]) -> None:
    for call, reply in zip(batch, replies, strict=True):
        future = call[3]
        if future.done():
            continue  # its caller gave up (a timeout)
        if isinstance(reply, Exception):
            future.set_exception(reply)
        else:
            future.set_result(reply)


class _Link(asyncio.Protocol):
    """A plain connection to Redis for Batch: data_received feeds a hiredis Reader and appends the
    batch's replies in order, then calls the batch's callback; one batch is out at a time (Batch's
    bound), instead of redis-py's per-reply read layers. Replies are str (decode_responses, as the
    client)."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        # Error replies come back as ResponseError objects; _reply gives them redis-py's classes.
        self.reader = Reader(replyError=ResponseError, encoding="utf-8")
        self.replies: list[object] = []
        self.expected = 0
        self.on_done: Callable[[Exception | None], None] | None = None
        self.lost = False
        #: An error reply (NOSCRIPT, a script's error) is among the batch's replies: the rare case,
        #: so that the common one answers each call without a check per reply.
        self.errors = False

    @classmethod
    async def open(cls, kwargs: dict[str, Any]) -> "_Link":
        loop = asyncio.get_running_loop()
        if kwargs.get("path"):
            _, link = await loop.create_unix_connection(cls, kwargs["path"])
        else:
            _, link = await loop.create_connection(cls, kwargs.get("host", "localhost"), kwargs.get("port", 6379))
        # The client's own handshake, the part our URLs can ask for: AUTH, then SELECT.
        hello: list[tuple[object, ...]] = []
        if kwargs.get("password") is not None:
            user = kwargs.get("username")
            hello.append(("AUTH", user, kwargs["password"]) if user else ("AUTH", kwargs["password"]))
        if kwargs.get("db"):
            hello.append(("SELECT", kwargs["db"]))
        if hello:
            replies: list[object] = []
            try:
                await link.exchange(_pack(hello), len(hello), replies)
            except BaseException:
                link.close()
                raise
            for reply in replies:
                if isinstance(reply, Exception):
                    link.close()
                    raise reply
        return link

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a stream transport: create_connection's

    def closed(self) -> bool:
        return self.lost or self.transport is None or self.transport.is_closing()

    def close(self) -> None:
        self.lost = True
        if self.transport is not None:
            self.transport.abort()  # replies still due would belong to a batch that gave up

    def send(
        self, packed: bytes, count: int, replies: list[object], on_done: Callable[[Exception | None], None]
    ) -> None:
        """Writes `packed`; `on_done(None)` when `count` more replies are in `replies`, or
        `on_done(exc)` when the link fails first. Called once, from the event loop."""
        if self.closed() or self.transport is None:
            raise RedisConnectionError("Connection closed by server.")
        self.replies, self.expected, self.on_done = replies, len(replies) + count, on_done
        self.errors = False
        self.transport.write(packed)

    def exchange(self, packed: bytes, count: int, replies: list[object]) -> "asyncio.Future[None]":
        """`send`, with a future that is done when the replies are in."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def finished(exc: Exception | None) -> None:
            if done.done():
                return
            if exc is None:
                done.set_result(None)
            else:
                done.set_exception(exc)

        self.send(packed, count, replies, finished)
        return done

    def data_received(self, data: bytes) -> None:
        reader = self.reader
        reader.feed(data)
        replies, expected, gets = self.replies, self.expected, reader.gets
        try:
            while (reply := gets()) is not False:
                if self.on_done is None or len(replies) >= expected:
                    raise RedisConnectionError("a reply nobody asked for")  # out of step: drop it
                if isinstance(reply, ResponseError):
                    self.errors = True
                    reply = _reply(reply)
                replies.append(reply)
                if len(replies) == expected:
                    break
            else:
                return
        except Exception as exc:  # a protocol error: nothing after it can be trusted
            self.fail(exc if isinstance(exc, RedisConnectionError) else RedisConnectionError(str(exc)))
            self.close()
            return
        on_done, self.on_done = self.on_done, None
        on_done(None)
        # Replies beyond the batch's, in the same read, are out of step (no batch asked for them).
        if self.reader.has_data():
            self.fail(RedisConnectionError("a reply nobody asked for"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.fail(RedisConnectionError("Connection closed by server."))

    def fail(self, exc: Exception) -> None:
        """The batch out, if any, ends with `exc`."""
        if self.on_done is not None:
            on_done, self.on_done = self.on_done, None
            on_done(exc)


def _reply(reply: object) -> object:
    """An error reply as redis-py's exception for it (NoScriptError for NOSCRIPT...)."""
    if isinstance(reply, ResponseError):
        return BaseParser.parse_error(str(reply))  # type: ignore[no-untyped-call]
    return reply


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
