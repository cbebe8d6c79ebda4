"""Idempotency keys: a repeated request replays the first one's result instead of sending again.

The first request with a key claims it; the claim holds while the delivery
runs (and expires, should the instance die). A final outcome is stored for
`ttl` seconds and replayed to repeats of the same request; a transient
failure releases the claim, so the client may retry with the same key.
"""

import asyncio
import hashlib
import json
import secrets
import time
import zlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Protocol

import redis.asyncio as aioredis
from redis.exceptions import RedisError

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

    def dumps(self) -> str:
        return json.dumps({"status": self.status, "headers": self.headers, "body": self.body.decode("utf-8")})

    @classmethod
    def loads(cls, data: dict[str, object]) -> "StoredResponse":
        headers = data["headers"]
        assert isinstance(headers, dict)  # noqa: S101 - written by dumps()
        return cls(status=int(str(data["status"])), headers=dict(headers), body=str(data["body"]).encode("utf-8"))


@dataclass(frozen=True)
class Claimed:
    """This request runs; `token` proves the claim when completing or releasing it."""

    token: str


@dataclass(frozen=True)
class Replay:
    response: StoredResponse


@dataclass(frozen=True)
class Running:
    """The same request is running now (on this or another instance)."""


@dataclass(frozen=True)
class Mismatch:
    """The key was used for a different request."""


Claim = Claimed | Replay | Running | Mismatch


class StoreUnavailable(Exception):
    """The store cannot be reached: nothing may be delivered, since a repeat could not be recognised."""


class IdempotencyStore(Protocol):
    async def claim(self, key: str, fingerprint: str, hold: float) -> Claim: ...

    async def complete(self, key: str, claim: Claimed, fingerprint: str, response: StoredResponse) -> None: ...

    async def release(self, key: str, claim: Claimed) -> None: ...

    async def aclose(self) -> None: ...


def fingerprint(relay: str, envelope: Envelope) -> str:
    """What makes two requests "the same": relay, envelope and message."""
    digest = hashlib.sha256()
    digest.update(json.dumps([relay, envelope.sender, list(envelope.recipients)]).encode("utf-8"))
    digest.update(b"\0")
    digest.update(envelope.message)
    return digest.hexdigest()


def scoped_key(principal: str, key: str) -> str:
    """Keys are per caller: two clients that pick the same key never see each other's results."""
    return hashlib.sha256(f"{principal}\0{key}".encode()).hexdigest()


def key_problem(value: str) -> str | None:
    """The problem with a client's key, or None."""
    if not 1 <= len(value) <= MAX_KEY_LENGTH:
        return f"must be 1 to {MAX_KEY_LENGTH} characters"
    if not all(" " <= c <= "~" for c in value):
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
    expired) entries go first, running claims never (they are bounded by the in-flight
    limits, and forgetting one would let a repeat run while the first still does).
    """

    def __init__(self, settings: IdempotencySettings) -> None:
        self.ttl = settings.ttl
        self.max_entries = settings.max_entries
        self.max_bytes = settings.max_bytes
        self.bytes = 0
        self._entries: OrderedDict[str, _Entry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    async def claim(self, key: str, fingerprint: str, hold: float) -> Claim:
        now = time.monotonic()
        entry = self._entries.get(key)
        if entry is not None and entry.expires <= now:
            self._forget(key)
            entry = None
        if entry is not None:
            if entry.fingerprint != fingerprint:
                return Mismatch()
            return Running() if entry.token is not None else Replay(entry.response())
        token = secrets.token_hex(16)
        # Counted: what it holds (key, fingerprint, token), plus the objects around them.
        entry = _Entry(fingerprint, now + hold, token, size=ENTRY_OVERHEAD + len(key) + len(fingerprint) + 32)
        self._make_room(now, entry.size)
        self._entries[key] = entry
        self.bytes += entry.size
        return Claimed(token)

    async def complete(self, key: str, claim: Claimed, fingerprint: str, response: StoredResponse) -> None:
        entry = self._entries.get(key)
        if entry is None or entry.token != claim.token:
            return  # the claim expired and someone else holds the key now
        self._forget(key)
        body, compressed = response.body, len(response.body) >= _COMPRESS_FROM
        if compressed:
            body = zlib.compress(body, 1)  # level 1: 23 KB of JSON -> 0.8 KB in 27 us (6: 0.8 KB in 93 us)
        size = ENTRY_OVERHEAD + len(key) + len(fingerprint) + len(body)
        for name, value in response.headers.items():
            size += len(name) + len(value)
        headers = tuple(response.headers.items())
        done = _Entry(fingerprint, time.monotonic() + self.ttl, None, response.status, headers, body, compressed, size)
        # A result larger than the whole store is kept all the same, alone (everything finished
        # makes room): a repeat must replay it, never send again. The bound is then max_bytes
        # plus one result, which max_recipients and max_message_size bound.
        self._make_room(time.monotonic(), done.size)
        self._entries[key] = done
        self.bytes += done.size

    async def release(self, key: str, claim: Claimed) -> None:
        entry = self._entries.get(key)
        if entry is not None and entry.token == claim.token:
            self._forget(key)

    def _forget(self, key: str) -> None:
        self.bytes -= self._entries.pop(key).size

    def _make_room(self, now: float, size: int) -> None:
        """Room for one more entry of `size` bytes: the oldest finished or expired entries go first (a
        finished result moves to the end when it is stored); running claims stay. They are at most
        the deliveries in flight, so the store passes its bounds only by that much."""
        if len(self._entries) < self.max_entries and self.bytes + size <= self.max_bytes:
            return
        doomed = []
        entries, freed = len(self._entries), 0
        for key, entry in self._entries.items():
            if entries < self.max_entries and self.bytes - freed + size <= self.max_bytes:
                break
            if entry.token is None or entry.expires <= now:
                doomed.append(key)
                entries -= 1
                freed += entry.size
        for key in doomed:
            self._forget(key)

    async def aclose(self) -> None:
        self._entries.clear()
        self.bytes = 0


# Compare-and-set and compare-and-delete: only the holder of a claim may complete or release it.
_COMPLETE = "if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3]) return 1 end return 0"
_RELEASE = "if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0"
_REDIS_TIMEOUT = 2.0


class RedisStore:
    """Shared by every instance: claims with SET NX PX, results stored with a TTL."""

    def __init__(self, settings: IdempotencySettings) -> None:
        assert settings.redis_url is not None  # noqa: S101 - the settings model requires it
        self.ttl_ms = settings.ttl * 1000
        self.prefix = settings.key_prefix
        self.client = aioredis.Redis.from_url(
            settings.redis_url,
            socket_timeout=_REDIS_TIMEOUT,
            socket_connect_timeout=_REDIS_TIMEOUT,
            decode_responses=True,
        )

    async def claim(self, key: str, fingerprint: str, hold: float) -> Claim:
        token = secrets.token_hex(16)
        running = _running_value(token, fingerprint)
        try:
            # Twice at most: the key may expire between the failed SET and the GET.
            for _ in range(2):
                if await self.client.set(self.prefix + key, running, nx=True, px=max(1, int(hold * 1000))):
                    return Claimed(token)
                current = await self.client.get(self.prefix + key)
                if current is not None:
                    return _outcome(json.loads(current), fingerprint)
        except (RedisError, OSError, ValueError) as exc:
            raise StoreUnavailable(_reason(exc)) from None
        raise StoreUnavailable("the key kept changing while it was claimed")

    async def complete(self, key: str, claim: Claimed, fingerprint: str, response: StoredResponse) -> None:
        stored = json.dumps({"state": "done", "fp": fingerprint, "response": json.loads(response.dumps())})
        try:
            await self.client.eval(
                _COMPLETE, 1, self.prefix + key, _running_value(claim.token, fingerprint), stored, self.ttl_ms
            )
        except (RedisError, OSError) as exc:
            raise StoreUnavailable(_reason(exc)) from None

    async def release(self, key: str, claim: Claimed) -> None:
        # The running value holds the fingerprint too; match the token alone with a prefix-free compare.
        try:
            current = await self.client.get(self.prefix + key)
            if current is not None and json.loads(current).get("token") == claim.token:
                await self.client.eval(_RELEASE, 1, self.prefix + key, current)
        except (RedisError, OSError, ValueError) as exc:
            raise StoreUnavailable(_reason(exc)) from None

    async def aclose(self) -> None:
        await self.client.aclose()


def _running_value(token: str, fingerprint: str) -> str:
    return json.dumps({"state": "running", "fp": fingerprint, "token": token})


def _outcome(record: dict[str, object], fingerprint: str) -> Claim:
    if record.get("fp") != fingerprint:
        return Mismatch()
    response = record.get("response")
    if record.get("state") == "done" and isinstance(response, dict):
        return Replay(StoredResponse.loads(response))
    return Running()


def _reason(exc: BaseException) -> str:
    # redis-py names the host and port in its messages, never the URL's password.
    return f"{type(exc).__name__}: {exc}"[:300]


def open_store(settings: IdempotencySettings) -> IdempotencyStore:
    if settings.backend == "redis":
        return RedisStore(settings)
    return MemoryStore(settings)


async def close_quietly(store: IdempotencyStore) -> None:
    try:
        async with asyncio.timeout(_REDIS_TIMEOUT):
            await store.aclose()
    except (RedisError, OSError, TimeoutError):
        pass
