"""Fleet-wide connection limits (`fleet_connections`): one lease in Redis per open connection.

Each destination of a relay has a sorted set `mailrelay:lease:<relay>:<host:port>` whose
members are leases (`<instance>:<n>`) scored by when they expire, by Redis's clock. An instance
takes a lease before it opens a connection (a Lua script: drop the expired ones, count, add
when under the limit) and gives it back when the connection is closed. One task per instance
renews all of its leases every RENEW_EVERY seconds in one round trip, so a crashed instance's
leases expire by themselves within LEASE_TTL. An instance refused a lease marks itself in the
set's companion `...:wanted` (expiring too); pools that see others waiting close their idle
connections, and connections beyond a fair share as they come back, so one instance's idle pool
cannot starve the others.

Redis unreachable (an error or no answer within REDIS_TIMEOUT): every limit falls back to
ceil(concurrent_connections / expected_instances) per instance, logged once per switch and
counted; the renewal task asks again every RENEW_EVERY seconds and switches back.
"""

import asyncio
import logging
import math
import secrets
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from redis.exceptions import RedisError

from relays.instruments import FLEET_FALLBACKS, FLEET_LEASES, FLEET_LOCAL_LIMITS
from relays.redis_link import Batch, redis_client
from schemas.config import ConfigError, ServiceSettings

if TYPE_CHECKING:
    import redis.asyncio as aioredis
    from redis.commands.core import AsyncScript

logger = logging.getLogger("mailrelay")

#: Seconds a lease lives unless renewed: the most a crashed instance's connections keep counting.
LEASE_TTL = 10.0
#: Seconds between renewals (many per LEASE_TTL, so a slow round trip loses nothing); it is also
#: how soon a pool holding leases hears that another instance waits.
RENEW_EVERY = 1.0
#: Seconds an instance's "waiting" mark lives; each refused take (every POLL_EVERY) writes it
#: again, and the pool clears it when none of its deliveries waits any more.
WANT_TTL = 2.0
#: Seconds between a waiting pool's attempts to take a lease (one attempt per pool, not per delivery).
POLL_EVERY = 0.05
#: An idle connection holding a lease is kept at most this long (or idle_timeout, if shorter).
LEASE_IDLE = 2.0
#: Each lease call gives up after this long; then the local limits apply.
REDIS_TIMEOUT = 1.0
#: Prefix of every key; the idempotency store and the rate limits use their own.
KEY_PREFIX = "mailrelay:lease:"

_NOW = """local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
"""
# KEYS: leases, wanted. ARGV: limit (0: only mark this instance as waiting), lease, ttl ms,
# instance, want ttl ms. Returns {1 taken / 0 not, instances other than this one waiting}.
_TAKE = (
    _NOW
    + """redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local got = 0
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[1]) then
  redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[2])
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
  redis.call('ZREM', KEYS[2], ARGV[4])
  got = 1
else
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[5]), ARGV[4])
  redis.call('PEXPIRE', KEYS[2], ARGV[5])
end
local others = redis.call('ZCARD', KEYS[2])
if redis.call('ZSCORE', KEYS[2], ARGV[4]) then others = others - 1 end
return {got, others}"""
)
# KEYS: leases, wanted (pairs). ARGV: ttl ms, instance, then per pair: n, its n leases.
# Returns per pair {instances other than this one waiting, {leases that had expired}}.
_RENEW = (
    _NOW
    + """local ttl = tonumber(ARGV[1])
local out = {}
local a = 3
for i = 1, #KEYS, 2 do
  local n = tonumber(ARGV[a])
  a = a + 1
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
  local lost = {}
  for j = 1, n do
    local lease = ARGV[a]
    a = a + 1
    if redis.call('ZSCORE', KEYS[i], lease) then
      redis.call('ZADD', KEYS[i], 'XX', now + ttl, lease)
    else
      lost[#lost + 1] = lease
    end
  end
  if #lost < n then redis.call('PEXPIRE', KEYS[i], ttl) end
  redis.call('ZREMRANGEBYSCORE', KEYS[i + 1], '-inf', now)
  local others = redis.call('ZCARD', KEYS[i + 1])
  if redis.call('ZSCORE', KEYS[i + 1], ARGV[2]) then others = others - 1 end
  out[#out + 1] = {others, lost}
end
return out"""
)
# KEYS: a sorted set. ARGV: a member (a lease; an instance's waiting mark).
_RELEASE = "return redis.call('ZREM', KEYS[1], ARGV[1])"

_UNAVAILABLE = (RedisError, OSError, TimeoutError)


class LeaseGate:
    """One pool's side of the fleet-wide limit of its destination: the leases it holds, the
    connections it opened without one (while Redis did not answer), whether others wait."""

    def __init__(self, fleet: "FleetLeases", relay: str, destination: str, size: int, metrics_destination: str) -> None:
        self.fleet = fleet
        self.size = size
        self.key = f"{KEY_PREFIX}{relay}:{destination}"
        self.wanted_key = self.key + ":wanted"
        self.local_limit = math.ceil(size / fleet.expected_instances)
        self.leases: list[str] = []
        #: Connections open without a lease (opened under the local limits); closed first.
        self.unleased = 0
        #: Other instances waiting for a lease of this destination, as Redis last said.
        self.others = 0
        #: Whether Redis holds this instance's waiting mark for the destination.
        self.marked = False
        #: Set by the pool: called when it should close connections (others wait, leases lost, Redis back).
        self.on_news: Callable[[], None] = _nothing
        self._gauge = FLEET_LEASES.labels(relay, metrics_destination)

    def limit(self) -> int:
        """The most connections this pool may have open now."""
        return self.size if self.fleet.available else self.local_limit

    async def take(self) -> bool | None:
        """A lease for one more connection: True (held), False (every one is taken, or this pool
        holds its share while others wait; this instance is marked as waiting), None (Redis does
        not answer: the local limit applies)."""
        fleet = self.fleet
        if not fleet.available:
            return None
        # Holding its share while others wait: only say that this instance waits too.
        limit = 0 if self.others and len(self.leases) >= self.share() else self.size
        # Not in `leases` until Redis says so: a connection closing meanwhile must not give it back.
        lease = fleet.new_lease()
        try:
            got, others = await fleet.call(
                fleet.take_script,
                [self.key, self.wanted_key],
                [limit, lease, fleet.ttl_ms, fleet.instance, fleet.want_ttl_ms],
            )
        except _UNAVAILABLE as exc:
            fleet.unavailable(exc)
            return None
        except BaseException:  # cancelled (a deadline): Redis may have granted it
            fleet.release(self.key, lease)
            raise
        self.others = int(others)
        if int(got) != 1:
            self.marked = True
            return False
        self.marked = False
        self.leases.append(lease)
        self._gauge.inc()
        fleet.holding(self)
        return True

    def opened_unleased(self) -> None:
        self.unleased += 1
        self.fleet.holding(self)

    def closed_one(self) -> None:
        """A connection of this pool is closed: an unleased one counts first, else a lease goes back."""
        if self.unleased:
            self.unleased -= 1
        elif self.leases:
            self.release(self.leases[-1])
        if not self.leases and not self.unleased:
            self.fleet.idle(self)

    def share(self) -> int:
        """This instance's fair share while others wait: the limit split between them and it."""
        return math.ceil(self.size / (1 + self.others))

    def surplus(self) -> bool:
        """Whether a connection coming back to the pool should be closed rather than kept: one
        opened without a lease once Redis answers again, or one beyond the fair share while
        other instances wait."""
        if not self.fleet.available:
            return False
        return self.unleased > 0 or (self.others > 0 and len(self.leases) > self.share())

    def unwanted_idle(self) -> bool:
        """Whether idle connections should go: others wait for a lease, or they hold none."""
        return self.fleet.available and (self.unleased > 0 or self.others > 0)

    def release(self, lease: str) -> None:
        self._forget(lease)
        self.fleet.release(self.key, lease)

    def unwant(self) -> None:
        """None of the pool's deliveries waits any more: other instances need not yield to it."""
        if self.marked:
            self.marked = False
            self.fleet.release(self.wanted_key, self.fleet.instance)

    def lost(self, leases: list[str]) -> None:
        """Leases Redis no longer had (they expired while it did not answer): their connections
        count as unleased."""
        for lease in leases:
            if lease in self.leases:
                self._forget(lease)
                self.unleased += 1

    def _forget(self, lease: str) -> None:
        self.leases.remove(lease)
        self._gauge.dec()


def _nothing() -> None:
    pass


class FleetLeases:
    """The leases of one configuration's relays in one process: their Redis client, scripts
    (registered once, run by EVALSHA), the renewal task, and whether Redis answers."""

    def __init__(self, settings: ServiceSettings) -> None:
        url = settings.fleet.redis_url or settings.idempotency.redis_url
        if url is None:
            raise ValueError("no Redis URL")
        self.client: aioredis.Redis = redis_client(url)  # the one builder (Sentinel URLs included)
        self.expected_instances = settings.fleet.expected_instances
        self.instance = secrets.token_hex(6)
        self.ttl_ms = round(LEASE_TTL * 1000)
        self.want_ttl_ms = round(WANT_TTL * 1000)
        self.available = True
        self.take_script: AsyncScript = self.client.register_script(_TAKE)
        self.renew_script: AsyncScript = self.client.register_script(_RENEW)
        self.release_script: AsyncScript = self.client.register_script(_RELEASE)
        # Calls issued in one event-loop iteration leave in one write, on a connection of their
        # own that loads missing scripts itself (a Redis restarted or failed over has none).
        self._batch = Batch(self.client)
        #: What the renewal task asks while it holds nothing: whether Redis answers again.
        self.probe_key = KEY_PREFIX + "probe"
        self._serial = 0
        #: Gates holding leases or unleased connections: what the renewal task looks after.
        self._active: set[LeaseGate] = set()
        self._renewer: asyncio.Task[None] | None = None
        self._releases: set[asyncio.Task[None]] = set()
        self._users = 0
        self.closed = False

    @classmethod
    def for_relay(cls, settings: ServiceSettings, relay: str) -> "FleetLeases":
        try:
            return cls(settings)
        except ValueError:
            raise ConfigError.at(
                f"relay.{relay}.fleet_connections",
                "needs a Redis: mailrelay.fleet.redis_url (or mailrelay.idempotency.redis_url)",
            ) from None

    def gate(self, relay: str, destination: str, size: int, metrics_destination: str) -> LeaseGate:
        return LeaseGate(self, relay, destination, size, metrics_destination)

    def attach(self) -> None:
        """A relay uses these leases; it calls detach() when it closes."""
        self._users += 1

    async def detach(self) -> None:
        self._users -= 1
        if self._users <= 0:
            await self.aclose()

    def new_lease(self) -> str:
        self._serial += 1
        return f"{self.instance}:{self._serial}"

    async def call(self, script: "AsyncScript", keys: list[str], args: list[Any]) -> Any:
        async with asyncio.timeout(REDIS_TIMEOUT):
            return await self._batch.call(script, keys, *args)

    def holding(self, gate: LeaseGate) -> None:
        self._active.add(gate)
        if self._renewer is None and not self.closed:
            self._renewer = asyncio.get_running_loop().create_task(self._renew())

    def idle(self, gate: LeaseGate) -> None:
        self._active.discard(gate)

    def release(self, key: str, lease: str) -> None:
        """Give a lease back, without making the caller wait; one that is not given back
        (Redis down, shut down) expires within LEASE_TTL."""
        if self.closed or not self.available:
            return
        task = asyncio.get_running_loop().create_task(self._release(key, lease))
        self._releases.add(task)
        task.add_done_callback(self._releases.discard)

    async def _release(self, key: str, lease: str) -> None:
        try:
            await self.call(self.release_script, [key], [lease])
        except _UNAVAILABLE as exc:
            self.unavailable(exc)

    def unavailable(self, exc: BaseException) -> None:
        if not self.available:
            return
        self.available = False
        FLEET_FALLBACKS.inc()
        FLEET_LOCAL_LIMITS.set(1)
        logger.warning(
            "the fleet's Redis does not answer (%s); fleet-wide connection limits are local now: "
            "concurrent_connections / %d per instance",
            f"{type(exc).__name__}: {exc}"[:300],
            self.expected_instances,
            extra={"event": "fleet_fallback"},
        )
        for gate in list(self._active):  # connections beyond the local limit go
            gate.on_news()
        if self._renewer is None and not self.closed:  # it asks again, and switches back
            self._renewer = asyncio.get_running_loop().create_task(self._renew())

    async def _renew(self) -> None:
        """Every RENEW_EVERY seconds, all leases in one round trip; also how Redis is found back."""
        try:
            while self._active or not self.available:
                await asyncio.sleep(RENEW_EVERY)
                await self.renew()
        finally:
            self._renewer = None

    async def renew(self) -> None:
        by_key: dict[str, list[LeaseGate]] = {}
        for gate in self._active:
            by_key.setdefault(gate.key, []).append(gate)
        keys: list[str] = []
        args: list[Any] = [self.ttl_ms, self.instance]
        for key, gates in by_key.items():
            leases = [lease for gate in gates for lease in gate.leases]
            keys += [key, key + ":wanted"]
            args += [len(leases), *leases]
        try:
            if keys:
                answers = await self.call(self.renew_script, keys, args)
            else:  # nothing held: only whether Redis answers again
                await self.call(self.release_script, [self.probe_key], [self.instance])
                answers = []
        except _UNAVAILABLE as exc:
            self.unavailable(exc)
            return
        back = not self.available
        if back:
            self.available = True
            FLEET_LOCAL_LIMITS.set(0)
            logger.info(
                "the fleet's Redis answers again; fleet-wide connection limits apply",
                extra={"event": "fleet_fallback_end"},
            )
        for (others, lost), gates in zip(answers, by_key.values(), strict=True):
            for gate in gates:
                gate.others = int(others)
                gate.lost([str(lease) for lease in lost])
                if back or gate.unwanted_idle():
                    gate.on_news()

    async def aclose(self) -> None:
        self.closed = True
        if self._renewer is not None:
            self._renewer.cancel()
            await asyncio.gather(self._renewer, return_exceptions=True)
        if self._releases:
            await asyncio.gather(*self._releases, return_exceptions=True)
        try:
            async with asyncio.timeout(REDIS_TIMEOUT):
                await self._batch.aclose()
                await self.client.aclose()
        except _UNAVAILABLE:
            pass
