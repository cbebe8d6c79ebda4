"""Fleet-wide rates and per-key quotas (issue 17 items 2-4): the notation, the GCRA arithmetic
against a real redis-server, and three `mailrelay serve` processes sharing one Redis in front of
a sink that records when each message arrived."""

import asyncio
import hashlib
import json
import re
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest
import pytest_asyncio
import redis.asyncio as aioredis
from prometheus_client import REGISTRY

from relays.base import DeliveryContext
from relays.rates import RETRY_AFTER_FAILURE, KeyQuotas, Limit, RelayRate, SharedLimits, Slot
from schemas.config import FleetSettings, IdempotencySettings, KeyQuota, ServiceSettings
from schemas.rate import Rate, parse_rate
from schemas.reply import Reply
from tests.servers.arrivals import ArrivalSink, arrival_sink
from tests.servers.mailrelay import Service, service
from tests.servers.process import free_port
from tests.servers.redis import RedisInstance, redis_instance, redis_server
from tests.servers.smtp import Script, smtp_server

# -- the notation ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "rate"),
    [
        ("50/s", Rate(50, 1)),
        ("1000/h", Rate(1000, 3600)),
        ("10/m", Rate(10, 60)),
        ("20000/d", Rate(20000, 86400)),
        (" 7 / Minute ", Rate(7, 60)),
        ("3/sec", Rate(3, 1)),
        ("2/hour", Rate(2, 3600)),
        ("1/day", Rate(1, 86400)),
    ],
)
def test_the_notation_is_kumomtas(text: str, rate: Rate) -> None:
    assert parse_rate(text) == rate


@pytest.mark.parametrize("text", ["0/s", "50", "50/", "/s", "50/w", "-1/s", "1.5/s", "50/s/s", "fifty/s"])
def test_a_bad_rate_is_refused_with_the_reason(text: str) -> None:
    with pytest.raises(ValueError, match=r"rate|period"):
        parse_rate(text)


def test_rates_print_in_their_normal_form_and_divide_rounding_up() -> None:
    assert str(parse_rate("50 / second")) == "50/s"
    assert parse_rate("50/s").divided(3) == Rate(17, 1)
    assert parse_rate("1/m").divided(5) == Rate(1, 60)  # never 0: nothing may go without a limit... or at all


def test_a_key_quota_takes_one_rate_per_period() -> None:
    assert KeyQuota(messages=["10/s", "1000/d"]).messages == ["10/s", "1000/d"]
    with pytest.raises(ValueError, match="one rate per period"):
        KeyQuota(messages=["10/s", "20/sec"])


# -- the arithmetic, against a real redis-server -----------------------------------------------------


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    with redis_server() as url:
        yield url


def _limits(url: str | None, what: str = "rate", instances: int = 1) -> SharedLimits:
    return SharedLimits(
        FleetSettings(redis_url=url, expected_instances=instances),
        IdempotencySettings(),
        what=what,
        prefix=f"mailrelay:test:{what}:",
    )


@pytest_asyncio.fixture
async def shared(redis_url: str) -> AsyncIterator[SharedLimits]:
    limits = _limits(redis_url)
    yield limits
    await limits.aclose()


def _key() -> str:
    return f"k{time.monotonic_ns()}"


async def test_gcra_spaces_events_one_interval_apart_and_reserves_the_wait(shared: SharedLimits) -> None:
    key, limit = _key(), [Limit("m", parse_rate("10/s"))]
    first = await shared.check(key, limit, 1.0)
    second = await shared.check(key, limit, 1.0)
    third = await shared.check(key, limit, 1.0)
    assert first.shared
    assert first.allowed
    assert first.wait == 0
    # Each reserved its slot: 100 ms, then 200 ms after the first (less the microseconds between calls).
    assert second.allowed
    assert 0.08 < second.wait <= 0.1
    assert third.allowed
    assert 0.18 < third.wait <= 0.2


async def test_gcra_refuses_past_the_longest_wait_and_takes_nothing(shared: SharedLimits) -> None:
    key, limit = _key(), [Limit("m", parse_rate("10/s"))]
    await shared.check(key, limit, 0.0)
    refused = await shared.check(key, limit, 0.05)
    assert not refused.allowed
    assert 0.08 < refused.wait <= 0.1
    # Nothing was reserved by the refusal: the next one still gets the second slot.
    again = await shared.check(key, limit, 1.0)
    assert again.allowed
    assert 0.08 < again.wait <= 0.1


async def test_a_quota_allows_its_whole_burst_then_says_when_and_what_is_left(shared: SharedLimits) -> None:
    key, limit = _key(), [Limit("messages-m", parse_rate("3/m"), burst=3)]
    taken = [await shared.check(key, limit, 0.0) for _ in range(3)]
    assert [o.allowed for o in taken] == [True, True, True]
    assert [o.states[0].remaining for o in taken] == [2, 1, 0]
    assert 59 < taken[-1].states[0].reset <= 60  # full again a whole period after three
    over = await shared.check(key, limit, 0.0)
    assert not over.allowed
    assert 19 < over.wait <= 20
    assert over.states[0].remaining == 0


async def test_the_limits_of_a_set_are_taken_together_or_not_at_all(shared: SharedLimits) -> None:
    key = _key()
    messages, recipients = parse_rate("10/m"), parse_rate("5/m")
    ok = await shared.check(key, [Limit("m", messages, 10), Limit("r", recipients, 5, cost=4)], 0.0)
    assert ok.allowed
    assert [s.remaining for s in ok.states] == [9, 1]
    refused = await shared.check(key, [Limit("m", messages, 10), Limit("r", recipients, 5, cost=4)], 0.0)
    assert not refused.allowed
    # The message limit kept its 9: the refusal took nothing from it.
    peek = await shared.check(key, [Limit("m", messages, 10), Limit("r", recipients, 5)], 0.0, peek=True)
    assert not peek.allowed
    assert [s.remaining for s in peek.states] == [9, 1]


async def test_a_set_expires_in_redis_once_it_is_full_again(shared: SharedLimits, redis_url: str) -> None:
    key = _key()
    await shared.check(key, [Limit("m", parse_rate("10/s"))], 0.0)
    client = aioredis.Redis.from_url(redis_url)
    try:
        ttl = await client.pttl(f"mailrelay:test:rate:{key}")
    finally:
        await client.aclose()
    assert 0 < ttl <= 1100  # the set is full again 100 ms later; kept 1 s more at most


def _sample(name: str, labels: dict[str, str]) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def test_unreachable_redis_falls_back_to_the_local_part_logged_and_counted_once(
    caplog: pytest.LogCaptureFixture,
) -> None:
    limits = _limits(f"redis://127.0.0.1:{free_port()}/0", what="rate", instances=3)
    before = _sample("mailrelay_rate_fallbacks_total", {"limit": "rate"})
    try:
        with caplog.at_level("WARNING", logger="mailrelay"):
            key, limit = _key(), [Limit("m", parse_rate("30/s"))]
            outcomes = [await limits.check(key, limit, 1.0) for _ in range(3)]
    finally:
        await limits.aclose()
    assert not any(o.shared for o in outcomes)
    # 30/s shared by 3 instances: 10/s here, one every 100 ms.
    assert [o.allowed for o in outcomes] == [True, True, True]
    assert 0.09 < outcomes[1].wait <= 0.1
    assert 0.19 < outcomes[2].wait <= 0.2
    assert _sample("mailrelay_rate_fallbacks_total", {"limit": "rate"}) == before + 1
    assert sum("Redis unreachable" in r.getMessage() for r in caplog.records) == 1


async def test_a_relay_over_its_rate_gets_a_transient_reply_that_names_the_limit(redis_url: str) -> None:
    settings = ServiceSettings(fleet=FleetSettings(redis_url=redis_url))
    rate = RelayRate.for_relay(settings, f"out{time.monotonic_ns()}", "1/m", max_wait=5)
    try:
        context = DeliveryContext(asyncio.get_running_loop().time() + 30)
        assert await rate.admit("smtp.example.net:25", context) is None
        reply = await rate.admit("smtp.example.net:25", context)
    finally:
        await rate.aclose()
    assert reply is not None
    assert (reply.code, reply.enhanced_status) == (451, "4.4.5")
    assert reply.message.startswith("4.4.5 rate limit 1/m to smtp.example.net:25 reached")


async def test_quota_headers_follow_the_ratelimit_draft(redis_url: str) -> None:
    quotas = KeyQuotas(_limits(redis_url, what="quota"))
    quota = KeyQuota(messages=["2/m"], recipients=["100/h"])
    name = _key()
    try:
        first = await quotas.take(name, quota, 3)
        await quotas.take(name, quota, 1)
        over = await quotas.take(name, quota, 1)
    finally:
        await quotas.limits.aclose()
    assert first.allowed
    assert first.headers["RateLimit-Policy"] == '"messages-m";q=2;w=60, "recipients-h";q=100;w=3600'
    assert first.headers["RateLimit"] == '"messages-m";r=1;t=30, "recipients-h";r=97;t=108'
    assert not over.allowed
    assert over.retry_after == 30
    assert quotas.never_fits(quota, 100) is None
    assert quotas.never_fits(quota, 101) == "100/h"
    assert over.headers["RateLimit"].startswith('"messages-m";r=0;t=60, "recipients-h";r=96;')


@pytest.mark.parametrize("shared_by", ["redis", "local"])
async def test_quota_given_back_returns_what_was_taken_and_never_more(redis_url: str, shared_by: str) -> None:
    quotas = KeyQuotas(_limits(redis_url if shared_by == "redis" else None, what="quota"))
    quota = KeyQuota(messages=["2/m"], recipients=["100/h"])
    name = _key()
    try:
        taken = await quotas.take(name, quota, 3)
        assert taken.shared == (shared_by == "redis")
        back = await quotas.give_back(name, quota, 3, shared=taken.shared)
        beyond = await quotas.give_back(name, quota, 3, shared=taken.shared)  # never taken: nothing more than full
        two = [await quotas.take(name, quota, 1) for _ in range(3)]
    finally:
        await quotas.limits.aclose()
    assert back.headers["RateLimit"] == '"messages-m";r=2;t=0, "recipients-h";r=100;t=0'
    assert beyond.headers == back.headers
    assert [t.allowed for t in two] == [True, True, False]


async def test_a_quota_is_given_back_where_it_was_taken(tmp_path: Path) -> None:
    """A message taken from this instance's part while Redis did not answer, and not sent after all
    (refused, a replay), was given back to Redis once it answered again: the fleet's quota got one
    message more than it had lost, and the key sent 3 messages in a minute under 2/m."""
    port, quota, name = free_port(), KeyQuota(messages=["2/m"]), _key()
    aof = ("--appendonly", "yes", "--appendfsync", "always", "--dir", str(tmp_path))  # restarted on its data
    quotas = KeyQuotas(_limits(f"redis://127.0.0.1:{port}/0", what="quota", instances=3))
    try:
        with redis_instance(*aof, port=port):
            assert [(await quotas.take(name, quota, 1)).allowed for _ in range(2)] == [True, True]
        local = await quotas.take(name, quota, 1)  # Redis stopped: this instance's part, 1/m
        assert local.allowed
        with redis_instance(*aof, port=port):
            await asyncio.sleep(RETRY_AFTER_FAILURE)  # Redis is asked again
            await quotas.give_back(name, quota, 1, shared=local.shared)
            third = await quotas.take(name, quota, 1)
    finally:
        await quotas.limits.aclose()
    assert not third.allowed


async def test_a_connection_slot_is_given_back_where_it_was_reserved(tmp_path: Path) -> None:
    """The pool's rate slot given back (a connection came back meanwhile, or the wait was cut):
    reserved from this instance's part while Redis did not answer and given back to Redis once it
    answered, the fleet's rate let one more connection open than 2/m."""
    port, target = free_port(), "smtp.example.net:25"
    aof = ("--appendonly", "yes", "--appendfsync", "always", "--dir", str(tmp_path))  # restarted on its data
    url = f"redis://127.0.0.1:{port}/0"
    rate = RelayRate(_limits(url), "out", "2/m", 60, connections=True)
    other = RelayRate(_limits(url), "out", "2/m", 0, connections=True)  # another instance: takes no wait
    context = DeliveryContext(asyncio.get_running_loop().time() + 300)
    try:
        with redis_instance(*aof, port=port):
            assert await rate.reserve(target, context) == Slot(0.0, shared=True)  # a connection opens
        local = await rate.reserve(target, context)  # Redis stopped: this instance's part
        assert local == Slot(0.0, shared=False)
        with redis_instance(*aof, port=port):
            await asyncio.sleep(RETRY_AFTER_FAILURE)  # Redis is asked again
            await rate.give_back(target, shared=local.shared)  # not used: a connection came back
            refused = await other.reserve(target, context)
    finally:
        await rate.limits.aclose()
        await other.limits.aclose()
    assert isinstance(refused, Reply)  # the next slot is 30 s after the first connection


# -- three instances, one Redis, one sink ------------------------------------------------------

SENDER, METERED, RETRYING, CUT = "s" * 32, "m" * 32, "r" * 32, "c" * 32


def _sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


@dataclass
class Fleet:
    redis: RedisInstance
    sink: ArrivalSink
    services: list[Service]
    stack: ExitStack
    port: int
    restarts: list[ExitStack] = field(default_factory=list)

    def stop_redis(self) -> None:
        self.restarts[-1].close()

    def start_redis(self) -> None:
        stack = ExitStack()
        self.redis = stack.enter_context(redis_instance(port=self.port))
        self.restarts.append(stack)


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    directory = tmp_path_factory.mktemp("fleet-rates")
    with ExitStack() as stack:
        port = free_port()
        first = ExitStack()
        restarts = [first]

        def close_redis() -> None:
            for started in reversed(restarts):
                started.close()

        stack.callback(close_redis)
        instance = first.enter_context(redis_instance(port=port))
        sink = stack.enter_context(arrival_sink())
        slow = stack.enter_context(smtp_server(Script(data_delay=1.0)))  # replies a second after the "."
        config = directory / "mailrelay.yaml"
        config.write_text(
            f"""relay:
  out:
    type: static
    host: 127.0.0.1
    port: {sink.port}
    max_message_rate: 50/s
    max_rate_wait: 10
    concurrent_connections: 16
  quick: {{type: blackhole}}
  slow: {{type: static, host: 127.0.0.1, port: {slow.port}}}
mailrelay:
  fleet: {{redis_url: "{instance.url}", expected_instances: 3}}
  auth:
    keys:
      - {{name: sender, sha256: {_sha(SENDER)}}}
      - name: metered
        sha256: {_sha(METERED)}
        quota: {{messages: [5/m], recipients: [100/h]}}
      - name: retrying
        sha256: {_sha(RETRYING)}
        quota: {{messages: [3/m]}}
      - name: cut
        sha256: {_sha(CUT)}
        quota: {{messages: [3/m]}}
"""
        )
        services = [stack.enter_context(service(config)) for _ in range(3)]
        running = Fleet(instance, sink, services, stack, port, restarts)
        yield running


def _message(i: int) -> dict[str, object]:
    return {
        "sender": "alice@example.com",
        "recipients": ["bob@example.net"],
        "message": f"From: alice@example.com\r\nSubject: {i}\r\n\r\nHello\r\n",
    }


def _load(fleet: Fleet, seconds: float, clients: int) -> list[int]:
    """`clients` threads sending through the `out` relay, spread over the instances, for `seconds`."""
    statuses: list[int] = []
    end = time.monotonic() + seconds

    def run(n: int) -> None:
        url = fleet.services[n % len(fleet.services)].url
        with httpx.Client(headers={"Authorization": f"Bearer {SENDER}"}, timeout=30) as client:
            i = 0
            while time.monotonic() < end:
                answer = client.post(f"{url}/relays/out/deliver", json=_message(i))
                statuses.append(answer.status_code)
                i += 1

    threads = [threading.Thread(target=run, args=(n,)) for n in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return statuses


def _metric(fleet: Fleet, name: str, labels: str) -> list[float]:
    values = []
    for running in fleet.services:
        text = httpx.get(f"{running.url}/metrics", timeout=5).text
        found = re.search(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} (\S+)$", text, re.M)
        values.append(float(found[1]) if found else 0.0)
    return values


def test_a_fleet_wide_rate_holds_across_three_instances(fleet: Fleet) -> None:
    start = time.monotonic()
    statuses = _load(fleet, 13, clients=30)
    assert statuses
    assert set(statuses) == {200}, statuses[:20]
    # 10 s of steady state, after the first second (the instances' pools opening).
    rate = fleet.sink.rate(start + 2, 10)
    assert 45 <= rate <= 55, f"{rate:.1f} messages/s at the sink, the fleet-wide limit is 50/s"
    # Three instances offered ~3 x 30 / latency: every one of them waited for slots.
    assert all(v > 0 for v in _metric(fleet, "mailrelay_rate_waits_total", 'relay="out"'))


def test_a_key_over_its_quota_gets_429_on_every_instance(fleet: Fleet) -> None:
    headers = {"Authorization": f"Bearer {METERED}"}
    policy = '"messages-m";q=5;w=60, "recipients-h";q=100;w=3600'
    for n in range(5):
        answer = httpx.post(
            f"{fleet.services[n % 3].url}/relays/quick/deliver", json=_message(n), headers=headers, timeout=10
        )
        assert answer.status_code == 200
        assert answer.headers["RateLimit-Policy"] == policy
        assert answer.headers["RateLimit"].startswith(f'"messages-m";r={4 - n};t=')
    for running in fleet.services:
        answer = httpx.post(f"{running.url}/relays/quick/deliver", json=_message(9), headers=headers, timeout=10)
        assert answer.status_code == 429
        assert answer.headers["Content-Type"] == "application/problem+json"
        assert "over its quota" in answer.json()["detail"]
        assert 1 <= int(answer.headers["Retry-After"]) <= 12  # one message comes back every 12 s
        assert answer.headers["RateLimit-Policy"] == policy
        assert answer.headers["RateLimit"].startswith('"messages-m";r=0;t=')
    # An answer that took nothing says where the key stands too.
    unknown = httpx.post(f"{fleet.services[0].url}/relays/nowhere/deliver", json=_message(0), headers=headers)
    assert unknown.status_code == 404
    assert unknown.headers["RateLimit"].startswith('"messages-m";r=0;')
    # A key without a quota gets no such headers.
    free = httpx.post(
        f"{fleet.services[0].url}/relays/quick/deliver",
        json=_message(0),
        headers={"Authorization": f"Bearer {SENDER}"},
    )
    assert free.status_code == 200
    assert "RateLimit" not in free.headers
    assert _metric(fleet, "mailrelay_quota_refusals_total", 'key="metered"') == [1.0, 1.0, 1.0]
    # A batch: each line takes from the quota, so each is answered 429 with its retry_after.
    body = "".join(json.dumps(_message(i)) + "\n" for i in range(2))
    batch = httpx.post(
        f"{fleet.services[1].url}/relays/quick/deliveries",
        content=body,
        headers={**headers, "Content-Type": "application/x-ndjson"},
        timeout=10,
    )
    assert batch.status_code == 200
    assert batch.headers["RateLimit-Policy"] == policy
    lines = [json.loads(line) for line in batch.text.splitlines()]
    assert [(line["status"], 1 <= line["retry_after"] <= 12) for line in lines[:2]] == [(429, True)] * 2
    assert lines[-1]["done"]


def test_a_request_that_sends_nothing_gives_its_quota_back(fleet: Fleet) -> None:
    """A replay of an idempotency key, a key refused (another request's) and a batch line replayed
    send nothing: the message they took from the key's quota goes back, and RateLimit says so."""
    url = fleet.services[0].url  # the idempotency store is each instance's own here
    auth = {"Authorization": f"Bearer {RETRYING}"}

    def post(message: int, key: str | None = None) -> httpx.Response:
        headers = {**auth, **({"Idempotency-Key": key} if key else {})}
        return httpx.post(f"{url}/relays/quick/deliver", json=_message(message), headers=headers, timeout=10)

    def left(answer: httpx.Response) -> str:
        return answer.headers["RateLimit"].split(";")[1]

    first = post(1, "order-1")
    assert (first.status_code, left(first)) == (200, "r=2")
    replay = post(1, "order-1")
    assert (replay.status_code, replay.headers.get("Idempotent-Replayed"), left(replay)) == (200, "true", "r=2")
    mismatch = post(2, "order-1")  # the key of another request: refused, nothing sent
    assert (mismatch.status_code, left(mismatch)) == (422, "r=2")
    # A batch: the replayed line gives back, the new one takes.
    lines = [{**_message(1), "idempotency_key": "order-1"}, _message(3)]
    batch = httpx.post(
        f"{url}/relays/quick/deliveries",
        content="".join(json.dumps(line) + "\n" for line in lines),
        headers={**auth, "Content-Type": "application/x-ndjson"},
        timeout=10,
    )
    assert sorted(json.loads(line).get("status", 0) for line in batch.text.splitlines()) == [0, 200, 200]
    assert (post(4).status_code, post(5).status_code) == (200, 429)  # 3 messages sent: 1, 3 and 4


def test_a_message_that_may_have_left_keeps_what_it_took_from_the_quota(fleet: Fleet) -> None:
    """Cut by its deadline after the final "." (503, possibly delivered): charged, keyed or not. Its
    repeats (409 while it finishes in the background, then the replay of its true outcome) take
    nothing more, and give back nothing of what it took."""
    url = fleet.services[1].url  # the idempotency store is each instance's own here

    def post(key: str | None = None) -> httpx.Response:
        headers = {"Authorization": f"Bearer {CUT}", "X-Delivery-Timeout": "0.3"}
        if key:
            headers["Idempotency-Key"] = key
        return httpx.post(f"{url}/relays/slow/deliver", json=_message(1), headers=headers, timeout=10)

    def left(answer: httpx.Response) -> str:
        return answer.headers["RateLimit"].split(";")[1]

    cut = post("late-1")
    assert (cut.status_code, left(cut)) == (503, "r=2")
    assert [r["possibly_delivered"] for r in cut.json()["recipients"]] == [True]
    running = post("late-1")  # the first finishes in the background: 409, nothing sent
    assert (running.status_code, left(running)) == (409, "r=2")
    plain = post()
    assert (plain.status_code, left(plain)) == (503, "r=1")
    assert [r["possibly_delivered"] for r in plain.json()["recipients"]] == [True]
    end = time.monotonic() + 10
    while (replay := post("late-1")).status_code == 409 and time.monotonic() < end:
        time.sleep(0.1)
    assert (replay.status_code, replay.headers.get("Idempotent-Replayed"), left(replay)) == (200, "true", "r=1")


def test_redis_stopped_local_limits_apply_and_shared_ones_resume(fleet: Fleet) -> None:
    fleet.stop_redis()
    start = time.monotonic()
    statuses = _load(fleet, 6, clients=30)
    assert statuses
    assert set(statuses) == {200}, statuses[:20]
    # Each instance keeps to 50/3 -> 17/s: at most 51/s together, never unlimited.
    rate = fleet.sink.rate(start + 1, 5)
    assert 40 <= rate <= 51 * 1.1, f"{rate:.1f} messages/s at the sink under the local fallback"
    assert _metric(fleet, "mailrelay_rate_fallback_active", 'limit="rate"') == [1.0, 1.0, 1.0]
    assert _metric(fleet, "mailrelay_rate_fallbacks_total", 'limit="rate"') == [1.0, 1.0, 1.0]

    fleet.start_redis()
    time.sleep(1.2)  # the fallback tries Redis again once a second
    _load(fleet, 2, clients=6)
    assert _metric(fleet, "mailrelay_rate_fallback_active", 'limit="rate"') == [0.0, 0.0, 0.0]
    for running in fleet.services:
        logs = running.logs()
        assert logs.count("Redis unreachable") == 1, logs[-2000:]
        assert "shared limits resumed" in logs
