"""Rates shared by the fleet: GCRA in one Lua script, with a local fallback when Redis is unreachable.

GCRA (the generic cell rate algorithm) keeps one number per limit: the theoretical arrival time
(TAT) of the next event. An event of cost c at `now` moves it to max(TAT, now) + c x interval and
conforms when that is at most `burst x interval` ahead of now. The script *reserves*: a caller
that may wait gets its slot in the future and the wait (never more than it may wait), so the
fleet's events leave exactly one interval apart, without retries; a caller that would wait too
long reserves nothing and learns how long it would have had to wait (Retry-After).

Each limit set (a relay's destination, an API key's quotas) is one Redis hash under a prefix of
its own (`mailrelay:rate:`, `mailrelay:quota:`), one field per limit, expiring when its limits
are back to full (so the key set is bounded by what was used within the longest period). Times
are Redis's own clock (TIME), never the instances'.

Redis unreachable: every instance enforces the limits divided by `fleet.expected_instances` in
its own memory (rounded up), logged once per transition and counted; Redis is tried again once
a second. Nothing goes out without some limit.
"""

import asyncio
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from redis.exceptions import RedisError

from relays import replies
from relays.base import DeliveryContext
from relays.instruments import RATE_FALLBACK_ACTIVE, RATE_FALLBACKS, RATE_LIMITED, RATE_WAIT_SECONDS, RATE_WAITS, child
from relays.redis_link import REDIS_TIMEOUT, Batch, reason, redis_client
from schemas.config import FleetSettings, IdempotencySettings, KeyQuota, ServiceSettings
from schemas.rate import Rate, parse_rate
from schemas.relay_options import SmtpOptions
from schemas.reply import Reply

__all__ = [
    "KeyQuotas",
    "Limit",
    "Outcome",
    "QuotaAnswer",
    "Rate",
    "RelayRate",
    "RelayRates",
    "SharedLimits",
    "State",
    "parse_rate",
]

logger = logging.getLogger("mailrelay")

#: KEYS[1]: the hash of one limit set. ARGV[1]: the most microseconds the caller may wait;
#: ARGV[2]: "1" to only read the state (nothing is taken). Then per limit: field, interval (us),
#: burst (events at once), cost (events; negative gives them back, never beyond a full limit).
#: Answers {allowed 0|1, wait us, remaining1, reset1 us, ...}.
_GCRA = """local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local maxwait = tonumber(ARGV[1])
local peek = ARGV[2] == '1'
local n = (#ARGV - 2) / 4
local wait = 0
local tats = {}
local news = {}
for i = 1, n do
  local b = 2 + (i - 1) * 4
  local interval = tonumber(ARGV[b + 2])
  local tolerance = interval * tonumber(ARGV[b + 3])
  local tat = tonumber(redis.call('HGET', KEYS[1], ARGV[b + 1]) or now)
  if tat < now then tat = now end
  local new = tat + interval * tonumber(ARGV[b + 4])
  if new < now then new = now end
  local w = new - tolerance - now
  if w > wait then wait = w end
  tats[i] = tat
  news[i] = new
end
local allowed = 1
if peek or wait > maxwait then allowed = 0 end
local out = {allowed, math.floor(wait)}
local longest = 0
for i = 1, n do
  local b = 2 + (i - 1) * 4
  local interval = tonumber(ARGV[b + 2])
  local tolerance = interval * tonumber(ARGV[b + 3])
  local tat = tats[i]
  if allowed == 1 then
    tat = news[i]
    redis.call('HSET', KEYS[1], ARGV[b + 1], string.format('%d', tat))
  end
  if tat - now > longest then longest = tat - now end
  local remaining = math.floor((tolerance - (tat - now)) / interval)
  if remaining < 0 then remaining = 0 end
  out[#out + 1] = remaining
  out[#out + 1] = math.floor(tat - now)
end
if allowed == 1 then redis.call('PEXPIRE', KEYS[1], math.floor(longest / 1000) + 1000) end
return out"""

#: A shorter wait is not slept: a loop iteration for less than the timers' own jitter (the next
#: slot is still reserved in Redis, so the rate stays exact over any longer stretch).
_LEAST_SLEEP = 0.0005
#: Redis is tried again this long after it failed (the local limits apply meanwhile).
RETRY_AFTER_FAILURE = 1.0
#: Limit sets kept in memory for the local fallback; past it the oldest go (a forgotten set
#: starts full again: at most one burst more, for sets idle long enough to be the oldest).
LOCAL_MAX_SETS = 10_000


@dataclass(frozen=True, slots=True)
class Limit:
    """One limit of a set: `rate`, up to `burst` events at once, this event costing `cost`."""

    field: str
    rate: Rate
    burst: int = 1
    cost: int = 1


@dataclass(frozen=True, slots=True)
class State:
    """What is left of one limit: events that could go now, and seconds until it is full again."""

    remaining: int
    reset: float


@dataclass(frozen=True, slots=True)
class Outcome:
    """`allowed`: go after `wait` seconds (the slot is reserved). Refused: `wait` is how long it
    would have had to wait. `shared`: decided by Redis (False: by the local fallback)."""

    allowed: bool
    wait: float
    states: tuple[State, ...]
    shared: bool


class _Local:
    """The same arithmetic in this process's memory, on the monotonic clock."""

    def __init__(self) -> None:
        self._sets: OrderedDict[str, dict[str, float]] = OrderedDict()

    def check(self, key: str, limits: Sequence[Limit], max_wait: float, peek: bool) -> Outcome:
        now = time.monotonic()
        fields = self._sets.get(key)
        if fields is None:
            fields = {}
            if not peek:
                if len(self._sets) >= LOCAL_MAX_SETS:
                    self._sets.popitem(last=False)
                self._sets[key] = fields
        else:
            self._sets.move_to_end(key)
        wait = 0.0
        tats: list[float] = []
        news: list[float] = []
        for limit in limits:
            interval = limit.rate.interval
            tat = max(fields.get(limit.field, now), now)
            new = max(tat + interval * limit.cost, now)
            wait = max(wait, new - interval * limit.burst - now)
            tats.append(tat)
            news.append(new)
        allowed = not peek and wait <= max_wait
        states = []
        for limit, tat, new in zip(limits, tats, news, strict=True):
            interval = limit.rate.interval
            if allowed:
                fields[limit.field] = tat = new
            remaining = max(0, math.floor((interval * limit.burst - (tat - now)) / interval + 1e-9))
            states.append(State(remaining, tat - now))
        return Outcome(allowed, max(0.0, wait), tuple(states), shared=False)


class SharedLimits:
    """Limit sets shared by every instance that uses the same Redis (`fleet.redis_url`, else
    `idempotency.redis_url`); without one, each instance's own (divided by expected_instances).

    `check()` is one round trip (EVALSHA of a script registered once; concurrent checks share a
    write, relays/redis_link.py's Batch) and never raises for Redis trouble: the local limits
    answer then. `what` names the limits in logs and metrics ("rate", "quota")."""

    def __init__(self, fleet: FleetSettings, store: IdempotencySettings, *, what: str, prefix: str) -> None:
        self.what = what
        self.prefix = prefix
        self.instances = fleet.expected_instances
        url = fleet.redis_url or store.redis_url
        self._local = _Local()
        self._client = None
        self._batch: Any = None
        self._script: Any = None
        if url:
            self._client = redis_client(url)
            self._batch = Batch(self._client)
            self._script = self._client.register_script(_GCRA)
        self._failed_at: float | None = None  # set while the local limits stand in for Redis

    @property
    def shared(self) -> bool:
        return self._client is not None

    async def check(
        self, key: str, limits: Sequence[Limit], max_wait: float, *, peek: bool = False, shared: bool | None = None
    ) -> Outcome:
        """Take one event of every limit in the set `key`, all or none: allowed when the caller
        has to wait at most `max_wait` seconds for it (then it is reserved). `peek`: only read.
        `shared`: a give-back (negative costs) goes where the events were taken (the outcome's
        `shared`): Redis (True; only read when it does not answer now) or the local limits (False)."""
        if self._batch is not None and shared is not False:
            failed = self._failed_at
            now = time.monotonic()
            if failed is None or now - failed >= RETRY_AFTER_FAILURE:
                try:
                    outcome = await self._shared(key, limits, max_wait, peek)
                except (RedisError, OSError, TimeoutError) as exc:
                    self._fell_back(exc, now)
                else:
                    if failed is not None:
                        self._failed_at = None
                        RATE_FALLBACK_ACTIVE.labels(self.what).set(0)
                        logger.warning(
                            "fleet-wide %s limits: Redis answers again; shared limits resumed",
                            self.what,
                            extra={"event": "fleet_limits_shared"},
                        )
                    return outcome
            # Taken from the fleet's state, which does not answer: given to this instance's part, it
            # would be a message more than the quota (the fleet's state keeps it until it refills).
            peek = peek or shared is True
        local = [
            Limit(
                limit.field,
                limit.rate.divided(self.instances),
                min(limit.burst, limit.rate.divided(self.instances).limit),
                limit.cost,
            )
            for limit in limits
        ]
        return self._local.check(key, local, max_wait, peek)

    async def _shared(self, key: str, limits: Sequence[Limit], max_wait: float, peek: bool) -> Outcome:
        args: list[str | int] = [max(0, round(max_wait * 1e6)), "1" if peek else "0"]
        for limit in limits:
            # At least 1 us: the script divides by it (a rate above 1,000,000/s is that rate).
            args += [limit.field, max(1, round(limit.rate.interval * 1e6)), limit.burst, limit.cost]
        async with asyncio.timeout(REDIS_TIMEOUT):
            reply = await self._batch.call(self._script, self.prefix + key, *args)
        states = tuple(State(int(reply[i]), int(reply[i + 1]) / 1e6) for i in range(2, len(reply), 2))
        return Outcome(int(reply[0]) == 1, max(0, int(reply[1])) / 1e6, states, shared=True)

    def _fell_back(self, exc: BaseException, now: float) -> None:
        if self._failed_at is None:
            RATE_FALLBACKS.labels(self.what).inc()
            RATE_FALLBACK_ACTIVE.labels(self.what).set(1)
            logger.warning(
                "fleet-wide %s limits: Redis unreachable (%s); each instance now enforces its part "
                "(the fleet's limits / expected_instances %d) until it answers again",
                self.what,
                reason(exc),
                self.instances,
                extra={"event": "fleet_limits_local"},
            )
        self._failed_at = now

    async def aclose(self) -> None:
        if self._client is None:
            return
        client, self._client = self._client, None
        batch, self._batch = self._batch, None
        try:
            async with asyncio.timeout(REDIS_TIMEOUT):
                if batch is not None:
                    await batch.aclose()
                await client.aclose()
        except (RedisError, OSError, TimeoutError):
            pass


class RelayRate:
    """A relay's `max_message_rate`, checked right before a message goes to a destination; or, with
    `connections`, its `max_connection_rate`, checked right before a pool opens a connection.

    The connection rate is a limit set of its own (`<relay>:<target>:conn`), not a second field of
    the message rate's hash: the two are taken at different times, and the script's PEXPIRE, set
    from the limits of the call, would cut short the other field's state (a 1/h message rate
    forgotten after a 10/s connection check)."""

    def __init__(
        self, limits: SharedLimits, relay: str, spec: str, max_wait: float, *, connections: bool = False
    ) -> None:
        self.limits = limits
        self.relay = relay
        self.spec = spec
        self.rate = parse_rate(spec)
        self.max_wait = max_wait
        self._limit = (Limit("c" if connections else "m", self.rate),)
        self._suffix = ":conn" if connections else ""
        self._refusal = replies.connection_rate_limited if connections else replies.rate_limited
        self._giving_back: set[asyncio.Task[None]] = set()

    @classmethod
    def for_relay(cls, settings: ServiceSettings, relay: str, spec: str, max_wait: float) -> "RelayRate":
        """A relay's rate with its own client (one connection, opened on first use): relays with a
        rate are few, and each closes what it opened."""
        limits = SharedLimits(settings.fleet, settings.idempotency, what="rate", prefix="mailrelay:rate:")
        return cls(limits, relay, spec, max_wait)

    async def admit(self, target: str, context: DeliveryContext) -> Reply | None:
        """Waits for this message's slot to `target` and returns None; or, when that would take
        longer than `max_rate_wait` or the time left before the deadline, returns the 451 reply
        that names the limit (no slot taken)."""
        reserved = await self.reserve(target, context)
        if isinstance(reserved, Reply):
            return reserved
        if reserved.wait:
            try:
                await asyncio.sleep(reserved.wait)
            except BaseException:  # cut off (its deadline, its client gone) before it sent: the slot goes back
                self.give_back_later(target, reserved.shared)
                raise
        return None

    async def reserve(self, target: str, context: DeliveryContext) -> "Reply | Slot":
        """`admit` without its wait: the slot reserved now (its wait 0 when too short to sleep),
        or the 451 reply (no slot taken)."""
        budget = min(self.max_wait, context.remaining())
        outcome = await self.limits.check(f"{self.relay}:{target}{self._suffix}", self._limit, budget)
        if not outcome.allowed:
            child(RATE_LIMITED, self.relay).inc()
            return self._refusal(self.spec, target, outcome.wait)
        if outcome.wait < _LEAST_SLEEP:
            return Slot(0.0, outcome.shared)
        child(RATE_WAITS, self.relay).inc()
        child(RATE_WAIT_SECONDS, self.relay).inc(outcome.wait)
        return Slot(outcome.wait, outcome.shared)

    async def give_back(self, target: str, *, shared: bool) -> None:
        """A slot `reserve` took and that was not used (the fleet's next one comes sooner), to
        where it was taken (its `shared`)."""
        back = (Limit(self._limit[0].field, self.rate, 1, -1),)
        await self.limits.check(f"{self.relay}:{target}{self._suffix}", back, 0.0, shared=shared)

    def give_back_later(self, target: str, shared: bool) -> None:
        """`give_back` in a task of its own: for a delivery cancelled while it waited, which does not
        wait for Redis. Kept, the next slot was a whole interval further for nothing. `settled` waits for it."""
        task = asyncio.get_running_loop().create_task(self.give_back(target, shared=shared))
        self._giving_back.add(task)
        task.add_done_callback(self._giving_back.discard)

    async def settled(self) -> None:
        """The slots given back in the background are back."""
        if self._giving_back:
            await asyncio.gather(*self._giving_back, return_exceptions=True)

    async def aclose(self) -> None:
        await self.settled()
        await self.limits.aclose()


class Slot(NamedTuple):
    """A slot `RelayRate.reserve` took: `wait` seconds away; `shared`: in Redis (False: in this
    instance's part, while Redis did not answer), where a give-back must go."""

    wait: float
    shared: bool


@dataclass(frozen=True, slots=True)
class RelayRates:
    """An SMTP relay's `max_message_rate` and `max_connection_rate` (each None when not set), on one
    SharedLimits: one Redis client per relay however many rates it has, closed by `aclose`."""

    message: RelayRate | None
    connection: RelayRate | None

    @classmethod
    def for_relay(cls, settings: ServiceSettings, relay: str, options: SmtpOptions) -> "RelayRates":
        message, connection = options.max_message_rate, options.max_connection_rate
        if message is None and connection is None:
            return cls(None, None)
        limits = SharedLimits(settings.fleet, settings.idempotency, what="rate", prefix="mailrelay:rate:")
        wait = options.max_rate_wait
        return cls(
            RelayRate(limits, relay, message, wait) if message else None,
            RelayRate(limits, relay, connection, wait, connections=True) if connection else None,
        )

    async def aclose(self) -> None:
        rates = [rate for rate in (self.message, self.connection) if rate is not None]
        for rate in rates:
            await rate.settled()
        if rates:  # one SharedLimits for both
            await rates[0].limits.aclose()


@dataclass(frozen=True, slots=True)
class QuotaAnswer:
    """A key's quota check: `allowed`, else `retry_after` seconds; `headers`: RateLimit-Policy and
    RateLimit (IETF httpapi ratelimit-headers draft, -08 and later syntax) for every answer."""

    allowed: bool
    retry_after: int
    headers: dict[str, str]
    #: Decided by Redis (False: by this instance's part): where a give-back must go.
    shared: bool = True


#: The period words in policy names (`"messages-s"`, `"recipients-d"`).
_UNIT = {1: "s", 60: "m", 3600: "h", 86400: "d"}


class KeyQuotas:
    """API keys' quotas (`auth.keys[].quota`), fleet-wide: one limit set per key name under
    `mailrelay:quota:`, every quota of the key taken together (all or none), each with a burst of
    its whole count (a quota of 1000/d may be spent at once, then comes back at 1000 a day)."""

    def __init__(self, limits: SharedLimits) -> None:
        self.limits = limits

    @staticmethod
    def _limits(quota: KeyQuota, recipients: int) -> list[Limit]:
        limits = []
        for unit, specs, cost in (("messages", quota.messages, 1), ("recipients", quota.recipients, recipients)):
            for spec in specs:
                rate = parse_rate(spec)
                limits.append(Limit(f"{unit}-{_UNIT[rate.period]}", rate, rate.limit, cost))
        return limits

    @staticmethod
    def never_fits(quota: KeyQuota, recipients: int) -> str | None:
        """The recipients quota that one message to `recipients` recipients exceeds on its own
        (it would be refused for ever, whatever Retry-After said), or None."""
        for spec in quota.recipients:
            if recipients > parse_rate(spec).limit:
                return spec
        return None

    async def take(self, name: str, quota: KeyQuota, recipients: int) -> QuotaAnswer:
        """One message to `recipients` recipients, if the key's quotas have room now."""
        return await self._check(name, quota, recipients, peek=False)

    async def state(self, name: str, quota: KeyQuota) -> QuotaAnswer:
        """The headers for an answer that took nothing (an error before the check)."""
        return await self._check(name, quota, 1, peek=True)

    async def give_back(self, name: str, quota: KeyQuota, recipients: int, *, shared: bool) -> QuotaAnswer:
        """Returns what `take` took for a message that was not sent after all (a replay, a
        refusal) to where it took it (`shared`: its answer's), and the headers of the quotas'
        state after it."""
        return await self._check(name, quota, recipients, peek=False, sign=-1, shared=shared)

    async def _check(
        self, name: str, quota: KeyQuota, recipients: int, *, peek: bool, sign: int = 1, shared: bool | None = None
    ) -> QuotaAnswer:
        limits = self._limits(quota, max(1, recipients))
        if sign < 0:
            limits = [Limit(lim.field, lim.rate, lim.burst, -lim.cost) for lim in limits]
        outcome = await self.limits.check(name, limits, 0.0, peek=peek, shared=shared)
        if not outcome.shared:  # the local fallback: this instance's part of each quota
            limits = [
                Limit(lim.field, lim.rate.divided(self.limits.instances), lim.rate.divided(self.limits.instances).limit)
                for lim in limits
            ]
        policy = ", ".join(f'"{lim.field}";q={lim.rate.limit};w={lim.rate.period}' for lim in limits)
        state = ", ".join(
            f'"{lim.field}";r={s.remaining};t={math.ceil(s.reset - 1e-6)}'
            for lim, s in zip(limits, outcome.states, strict=True)
        )
        headers = {"RateLimit-Policy": policy, "RateLimit": state}
        allowed = outcome.allowed or peek
        return QuotaAnswer(allowed, 0 if allowed else max(1, math.ceil(outcome.wait)), headers, outcome.shared)
