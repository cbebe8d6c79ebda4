"""Idempotency keys: a repeated request replays the first one's result instead of sending again.

The first request with a key claims it. The claim is a lease of `lease` seconds,
renewed while the delivery runs, so that after a crash a repeat waits seconds,
not the whole deadline. Right before the data leaves, the claim records it: a
repeat that finds a lapsed claim in that state is told the message may have
been delivered and is not sent again (InDoubt); one that finds a lapsed claim
that never got that far takes the key over and sends. A final outcome (and a
transient one in which the data may have left) is stored for `ttl` seconds and
replayed; a transient failure that sent nothing releases the key, so the client
may retry with it.
"""

import asyncio
import hashlib
import itertools
import json
import secrets
import time
import zlib
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from json.encoder import encode_basestring_ascii as _json_str
from typing import Literal, Protocol

from redis.commands.core import AsyncScript
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from relays.redis_link import REDIS_TIMEOUT, Batch, reason, redis_client
from schemas.config import IdempotencySettings
from schemas.delivery import Envelope

#: The header a client sends; printable ASCII, at most this long.
HEADER = "Idempotency-Key"
MAX_KEY_LENGTH = 255


@dataclass(frozen=True)
class StoredResponse:
    """What a repeat gets: the first request's answer."""

    status: int
    headers: dict[str, str]
    body: bytes

    @classmethod
    def loads(cls, data: dict[str, object]) -> "StoredResponse":
        headers = data["headers"]
        assert isinstance(headers, dict)  # noqa: S101 - written by an earlier version's dumps()
        return cls(status=int(str(data["status"])), headers=dict(headers), body=str(data["body"]).encode("utf-8"))


@dataclass(frozen=True, slots=True)
class Claimed:
    """This request runs; `token` proves the claim (a lease) when renewing, completing or releasing it.

    `taken_over`: an earlier claim of the same request had lapsed (its instance died) before its
    data could have left; this one replaces it."""

    token: str
    fingerprint: str
    taken_over: bool = False

    @property
    def head(self) -> str:
        """The start of its running record in Redis: what a compare-and-set matches."""
        return "R" + self.fingerprint + self.token


@dataclass(frozen=True, slots=True)
class Replay:
    response: StoredResponse


@dataclass(frozen=True, slots=True)
class Running:
    """The same request is running now (on this or another instance), its lease renewed."""


@dataclass(frozen=True, slots=True)
class Mismatch:
    """The key was used for a different request."""


@dataclass(frozen=True, slots=True)
class InDoubt:
    """An earlier claim lapsed after it recorded that the data was about to leave: the next hop may
    have the message. Not sent again; kept for `ttl`, so every repeat gets the same answer."""


Claim = Claimed | Replay | Running | Mismatch | InDoubt

#: The store operations, as the metrics name them.
Operation = Literal["claim", "renew", "sending", "complete", "release"]


class StoreUnavailable(Exception):
    """The store cannot be reached: nothing may be delivered, since a repeat could not be recognised."""


class IdempotencyStore(Protocol):
    """Claims are leases of `lease` seconds: the holder renews them while its delivery runs
    (`renew`), records that the data is about to leave (`sending`), then stores the answer
    (`complete`) or frees the key (`release`). Each of these returns False when the claim was no
    longer held (it lapsed and another request took the key), and raises StoreUnavailable.
    `sending` answers or raises within REDIS_TIMEOUT: it holds up the data."""

    settings: IdempotencySettings
    lease: float

    async def claim(self, key: str, fingerprint: str) -> Claim: ...

    async def renew(self, claims: Sequence[tuple[str, Claimed]]) -> list[bool]: ...

    async def sending(self, key: str, claim: Claimed) -> bool: ...

    async def complete(self, key: str, claim: Claimed, fingerprint: str, response: StoredResponse) -> bool: ...

    async def release(self, key: str, claim: Claimed) -> bool: ...

    async def aclose(self) -> None: ...


def fingerprint(relay: str, envelope: Envelope) -> str:
    """What makes two requests "the same": relay, envelope and message as the client sent it
    (`origin` when the message was built or completed here: each build gets its own Date and
    Message-ID, and a repeat must still be recognised)."""
    digest = hashlib.sha256()
    # The bytes of json.dumps([relay, sender, [recipients...]]), which records stored by earlier
    # versions must still match, from json's own string encoder: 0.9 us instead of 4.
    names = ", ".join([_json_str(r) for r in envelope.recipients])
    digest.update(f"[{_json_str(relay)}, {_json_str(envelope.sender)}, [{names}]]".encode())
    digest.update(b"\0")
    digest.update(envelope.message if envelope.origin is None else envelope.origin)
    return digest.hexdigest()


def scoped_key(principal: str, key: str) -> str:
    """Keys are per caller: two clients that pick the same key never see each other's results."""
    return hashlib.sha256(f"{principal}\0{key}".encode()).hexdigest()


def key_problem(value: str) -> str | None:
    """The problem with a client's key, or None."""
    if not 1 <= len(value) <= MAX_KEY_LENGTH:
        return f"must be 1 to {MAX_KEY_LENGTH} characters"
    if not (value.isascii() and value.isprintable()):  # " " to "~"
        return "must be printable ASCII"
    return None


#: What one entry costs beyond the bytes counted (key, fingerprint, token, body, headers): the
#: objects around them and its slot in the dict (tracemalloc, 2026-11-30: 300 to 400 bytes).
ENTRY_OVERHEAD = 400
#: Smaller answers are kept as they are: zlib would save a hundred bytes for 6 us.
_COMPRESS_FROM = 1024


@dataclass(slots=True)
class _Entry:
    fingerprint: str
    expires: float
    token: str | None  # set while running
    #: Running: the lease's end, and whether the data may have left.
    until: float = 0.0
    sent: bool = False
    #: No result, but the data may have left: answered InDoubt.
    doubt: bool = False
    #: A finished result: status, headers, and the body, zlib-compressed when `compressed`.
    status: int = 0
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    compressed: bool = False
    size: int = 0

    def response(self) -> StoredResponse:
        body = zlib.decompress(self.body) if self.compressed else self.body
        return StoredResponse(self.status, dict(self.headers), body)


class MemoryStore:
    """One instance's store: an insertion-ordered dict, bounded by `max_entries` and `max_bytes`.

    Finished results are kept compressed; when room is needed the oldest finished (or
    lapsed) entries go first, running claims never (they are bounded by the in-flight
    limits, and forgetting one would let a repeat run while the first still does).
    Claims are leases as in Redis, so both stores answer alike.
    """

    def __init__(self, settings: IdempotencySettings) -> None:
        self.settings = settings
        self.ttl = settings.ttl
        self.lease = settings.lease
        self.max_entries = settings.max_entries
        self.max_bytes = settings.max_bytes
        self.bytes = 0
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    async def claim(self, key: str, fingerprint: str) -> Claim:
        now = time.monotonic()
        entry = self._entries.get(key)
        if entry is not None and entry.expires <= now:
            self._forget(key)
            entry = None
        taken_over = False
        if entry is not None:
            if entry.fingerprint != fingerprint:
                return Mismatch()
            if entry.doubt:
                return InDoubt()
            if entry.token is None:
                return Replay(entry.response())
            if entry.until > now:
                return Running()
            if entry.sent:
                entry.token, entry.doubt = None, True
                return InDoubt()
            self._forget(key)
            taken_over = True
        token = secrets.token_hex(16)
        # Counted: what it holds (key, fingerprint, token), plus the objects around them.
        size = ENTRY_OVERHEAD + len(key) + len(fingerprint) + 32
        entry = _Entry(fingerprint, now + self.ttl, token, until=now + self.lease, size=size)
        self._make_room(now, entry.size)
        self._entries[key] = entry
        self.bytes += entry.size
        return Claimed(token, fingerprint, taken_over)

    def _held(self, key: str, claim: Claimed) -> _Entry | None:
        entry = self._entries.get(key)
        return entry if entry is not None and entry.token == claim.token else None

    async def renew(self, claims: Sequence[tuple[str, Claimed]]) -> list[bool]:
        until = time.monotonic() + self.lease
        held = [self._held(key, claim) for key, claim in claims]
        for entry in held:
            if entry is not None:
                entry.until = until
        return [entry is not None for entry in held]

    async def sending(self, key: str, claim: Claimed) -> bool:
        entry = self._held(key, claim)
        if entry is None:
            return False
        entry.sent, entry.until = True, time.monotonic() + self.lease
        return True

    async def complete(self, key: str, claim: Claimed, fingerprint: str, response: StoredResponse) -> bool:
        if self._held(key, claim) is None:
            return False  # the claim lapsed and someone else holds the key now
        self._forget(key)
        body, compressed = response.body, len(response.body) >= _COMPRESS_FROM
        if compressed:
            body = zlib.compress(body, 1)  # level 1: 23 KB of JSON -> 0.8 KB in 27 us (6: 0.8 KB in 93 us)
        size = ENTRY_OVERHEAD + len(key) + len(fingerprint) + len(body)
        for name, value in response.headers.items():
            size += len(name) + len(value)
        headers = tuple(response.headers.items())
        done = _Entry(
            fingerprint,
            time.monotonic() + self.ttl,
            None,
            status=response.status,
            headers=headers,
            body=body,
            compressed=compressed,
            size=size,
        )
        # A result larger than the whole store is kept all the same, alone (everything finished
        # makes room): a repeat must replay it, never send again. The bound is then max_bytes
        # plus one result, which max_recipients and max_message_size bound.
        self._make_room(time.monotonic(), done.size)
        self._entries[key] = done
        self.bytes += done.size
        return True

    async def release(self, key: str, claim: Claimed) -> bool:
        if self._held(key, claim) is None:
            return False
        self._forget(key)
        return True

    def _forget(self, key: str) -> None:
        self.bytes -= self._entries.pop(key).size

    def _make_room(self, now: float, size: int) -> None:
        """Room for one more entry of `size` bytes: the oldest finished, lapsed or expired entries go
        first (a finished result moves to the end when it is stored); running claims stay. They are
        at most the deliveries in flight, so the store passes its bounds only by that much."""
        if len(self._entries) < self.max_entries and self.bytes + size <= self.max_bytes:
            return
        doomed = []
        entries, freed = len(self._entries), 0
        for key, entry in self._entries.items():
            if entries < self.max_entries and self.bytes - freed + size <= self.max_bytes:
                break
            if entry.token is None or entry.until <= now or entry.expires <= now:
                doomed.append(key)
                entries -= 1
                freed += entry.size
        for key in doomed:
            self._forget(key)

    async def aclose(self) -> None:
        self._entries.clear()
        self.bytes = 0


# The Redis records, one string per key (no JSON to parse inside Redis; the first byte says what):
#   running  "R" fingerprint(64) token(32) sent("0"|"1") lease-end(ms, Redis's clock)
#   in doubt "U" fingerprint(64)
#   done     "D" fingerprint(64) [status, headers](JSON) "\n" body (the answer's JSON as it is: not
#            escaped inside another JSON string, which cost a tenth more)
# Every record lives for `ttl` from its claim (a running one too: its lease is inside, so a lapsed
# claim still says how far it got). Lease ends use Redis's own clock (TIME), never the instances'.
# Records of earlier versions (JSON, "{") are read as before.
_NOW = "local t = redis.call('TIME') local now = t[1] * 1000 + math.floor(t[2] / 1000) "
#: KEYS[1]; ARGV: fingerprint, token, lease ms, ttl ms.
_CLAIM = (
    _NOW
    + """local v = redis.call('GET', KEYS[1])
local taken = 0
if v then
  local kind = string.sub(v, 1, 1)
  if kind == '{' then return {'legacy', v} end
  if string.sub(v, 2, 65) ~= ARGV[1] then return {'mismatch'} end
  if kind == 'D' then return {'done', string.sub(v, 66)} end
  if kind == 'U' then return {'doubt'} end
  if tonumber(string.sub(v, 99)) > now then return {'running'} end
  if string.sub(v, 98, 98) == '1' then
    redis.call('SET', KEYS[1], 'U' .. ARGV[1], 'KEEPTTL')
    return {'doubt'}
  end
  taken = 1
end
redis.call('SET', KEYS[1], 'R' .. ARGV[1] .. ARGV[2] .. '0' .. string.format('%d', now + ARGV[3]), 'PX', ARGV[4])
return {'claimed', taken}"""
)
#: KEYS[1]; ARGV: the running record's head ("R" fingerprint token), lease ms, sent ("1", or "" to keep it).
_RENEW = (
    _NOW
    + """local v = redis.call('GET', KEYS[1])
if not v or string.sub(v, 1, 97) ~= ARGV[1] then return 0 end
local sent = ARGV[3]
if sent == '' then sent = string.sub(v, 98, 98) end
redis.call('SET', KEYS[1], ARGV[1] .. sent .. string.format('%d', now + ARGV[2]), 'KEEPTTL')
return 1"""
)
#: Compare-and-set and compare-and-delete: only the holder of a claim may complete or release it.
_COMPLETE = """local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 1, 97) == ARGV[1] then redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) return 1 end
return 0"""
_RELEASE = """local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 1, 97) == ARGV[1] then redis.call('DEL', KEYS[1]) return 1 end
return 0"""


class RedisStore:
    """Shared by every instance: one Lua script per operation (one round trip each), registered
    once and run by EVALSHA (loaded again on NOSCRIPT, after a Redis restart or failover), the
    commands of concurrent deliveries batched into shared writes (`Batch`)."""

    def __init__(self, settings: IdempotencySettings) -> None:
        self.settings = settings
        self.ttl_ms = settings.ttl * 1000
        self.lease = settings.lease
        self.lease_ms = max(1, round(settings.lease * 1000))
        self.prefix = settings.key_prefix
        assert settings.redis_url is not None  # noqa: S101 - the settings model requires it
        self.client = redis_client(settings.redis_url)
        self._batch = Batch(self.client)
        self._claim = self.client.register_script(_CLAIM)
        self._renew = self.client.register_script(_RENEW)
        self._complete = self.client.register_script(_COMPLETE)
        self._release = self.client.register_script(_RELEASE)
        # A claim's token (32 hex digits, as the records' layout wants): this store's random prefix
        # and a counter, unique as a random token is, without a getrandom call per claim.
        self._token_prefix = secrets.token_hex(8)
        self._tokens = itertools.count()

    async def claim(self, key: str, fingerprint: str) -> Claim:
        token = "%s%016x" % (self._token_prefix, next(self._tokens))  # noqa: UP031 - the fastest form
        try:
            reply = await self._batch.call(
                self._claim, self.prefix + key, fingerprint, token, self.lease_ms, self.ttl_ms
            )
            kind = reply[0]
            if kind == "claimed":
                return Claimed(token, fingerprint, taken_over=int(reply[1]) == 1)
            if kind == "running":
                return Running()
            if kind == "mismatch":
                return Mismatch()
            if kind == "doubt":
                return InDoubt()
            if kind == "done":
                head, _, body = reply[1].partition("\n")
                status, headers = json.loads(head)
                return Replay(StoredResponse(int(status), dict(headers), body.encode()))
            return _legacy(json.loads(reply[1]), fingerprint)
        except (RedisError, OSError, ValueError, TypeError, KeyError, IndexError) as exc:
            raise StoreUnavailable(reason(exc)) from None

    async def renew(self, claims: Sequence[tuple[str, Claimed]]) -> list[bool]:
        """Every claim in one batch (one write)."""
        calls = [
            self._batch.call(self._renew, self.prefix + key, claim.head, self.lease_ms, "") for key, claim in claims
        ]
        try:
            replies = await asyncio.gather(*calls)
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(reason(exc)) from None
        return [int(r) == 1 for r in replies]

    async def sending(self, key: str, claim: Claimed) -> bool:
        # _compare_and_set's body, here and in complete: one coroutine less on every delivery.
        reply = self._batch.call(self._renew, self.prefix + key, claim.head, self.lease_ms, "1")
        # The bound (REDIS_TIMEOUT, connecting included) as one timer that fails the reply's
        # future: asyncio.timeout around the await cost 5 us more per keyed delivery (in-process,
        # DeliveryCore at c8, memory store: 28.7 -> 23.8 us over unkeyed without it).
        loop = reply.get_loop()  # get_running_loop() would call getpid()
        timer = loop.call_at(loop.time() + REDIS_TIMEOUT, _expire, reply)
        try:
            done = await reply
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(reason(exc)) from None
        finally:
            timer.cancel()
        return int(done) == 1

    async def complete(self, key: str, claim: Claimed, fingerprint: str, response: StoredResponse) -> bool:
        # json.dumps([status, headers], separators=(",", ":")) without its encoder object per call.
        fields = ",".join([f"{_json_str(name)}:{_json_str(value)}" for name, value in response.headers.items()])
        head = f"[{response.status:d},{{{fields}}}]"
        # Bytes: the answer's own, not decoded here and encoded again when the command is packed.
        stored = f"D{fingerprint}{head}\n".encode() + response.body
        try:
            done = await self._batch.call(self._complete, self.prefix + key, claim.head, stored, self.ttl_ms)
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(reason(exc)) from None
        return int(done) == 1

    async def release(self, key: str, claim: Claimed) -> bool:
        return await self._compare_and_set(self._release, key, claim.head)

    async def _compare_and_set(self, script: AsyncScript, key: str, *args: str | int) -> bool:
        try:
            done = await self._batch.call(script, self.prefix + key, *args)
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(reason(exc)) from None
        return int(done) == 1

    async def aclose(self) -> None:
        await self._batch.aclose()
        await self.client.aclose()


def _expire(reply: "asyncio.Future[object]") -> None:
    if not reply.done():  # the batch answers it later, or never: _answer skips a done future
        reply.set_exception(RedisTimeoutError(f"no reply from Redis in {REDIS_TIMEOUT} s"))


def _legacy(record: dict[str, object], fingerprint: str) -> Claim:
    """A record written by an earlier version (JSON): its results are still replayed."""
    if record.get("fp") != fingerprint:
        return Mismatch()
    response = record.get("response")
    if record.get("state") == "done" and isinstance(response, dict):
        return Replay(StoredResponse.loads(response))
    return Running()


def open_store(settings: IdempotencySettings) -> IdempotencyStore:
    if settings.backend == "redis":
        return RedisStore(settings)
    return MemoryStore(settings)


async def close_quietly(store: IdempotencyStore) -> None:
    try:
        async with asyncio.timeout(REDIS_TIMEOUT):
            await store.aclose()
    except (RedisError, OSError, TimeoutError):
        pass
