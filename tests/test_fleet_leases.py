"""Fleet-wide connection limits (issue 17 item 1, with its parts of items 4 and 5), with real parts.

One redis-server, three `mailrelay serve` processes with the same configuration (a `static`
relay with `concurrent_connections: 4` and `fleet_connections: true`), a sink that counts the
connections it has at once, and 32 concurrent clients spread over the instances. Per process
they would open 3 x 4 = 12 connections; the fleet opens at most 4. A `kill -9` of an instance
holding all four leases frees them within the lease's lifetime; with Redis stopped each
instance keeps to ceil(4 / 3) = 2, and the leases apply again once it is back.
"""

import contextlib
import re
import signal
import textwrap
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from relays.context import RelayContext
from relays.registry import build_relay
from relays.smtp.leases import LEASE_TTL, RENEW_EVERY
from schemas.config import ConfigError, ServiceSettings
from schemas.relay_options import StaticOptions
from tests.servers.counting import CountingSink, counting_sink
from tests.servers.mailrelay import Service, service
from tests.servers.process import free_port
from tests.servers.redis import redis_instance

LIMIT = 4
INSTANCES = 3
CLIENTS = 32
#: Seconds the sink holds each message: connections stay busy, so the clients contend for them.
HOLD = 0.1


class Fleet:
    """The module's servers; Redis can be stopped and started again on its port."""

    def __init__(self, sink: CountingSink, config: Path, redis_port: int) -> None:
        self.sink, self.config, self.redis_port = sink, config, redis_port
        self.instances: list[Service] = []
        self._redis = contextlib.ExitStack()

    def start_redis(self) -> None:
        self._redis.enter_context(redis_instance(port=self.redis_port))

    def stop_redis(self) -> None:
        self._redis.close()


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    directory = tmp_path_factory.mktemp("fleet")
    redis_port = free_port()
    with counting_sink(HOLD) as sink, contextlib.ExitStack() as stack:
        config = directory / "mailrelay.yaml"
        config.write_text(
            textwrap.dedent(f"""\
                relay:
                  out:
                    type: static
                    host: 127.0.0.1
                    port: {sink.port}
                    concurrent_connections: {LIMIT}
                    fleet_connections: true
                    idle_timeout: 5
                mailrelay:
                  fleet:
                    redis_url: redis://127.0.0.1:{redis_port}/0
                    expected_instances: {INSTANCES}
                """)
        )
        state = Fleet(sink, config, redis_port)
        state.start_redis()
        stack.callback(state.stop_redis)
        state.instances = [stack.enter_context(service(config)) for _ in range(INSTANCES)]
        yield state


def _body(n: int) -> dict[str, object]:
    message = f"Message-ID: <fleet-{n}@test>\r\nSubject: fleet {n}\r\n\r\nhello\r\n"
    return {"sender": "a@example.com", "recipients": [f"r{n}@example.net"], "message": message}


def _deliver(url: str, n: int) -> int:
    try:
        response = httpx.post(f"{url}/relays/out/deliver", json=_body(n), timeout=60)
    except httpx.TransportError:
        return 0
    return response.status_code


def _burst(urls: list[str], count: int = CLIENTS) -> list[int]:
    """`count` concurrent deliveries, spread over `urls`; their HTTP statuses."""
    with ThreadPoolExecutor(count) as pool:
        return list(pool.map(lambda n: _deliver(urls[n % len(urls)], n), range(count)))


def _metric(url: str, name: str) -> float:
    """The sum of a metric's samples on one instance (0 when it has none)."""
    text = httpx.get(f"{url}/metrics", timeout=5).text
    pattern = re.compile(rf"^{re.escape(name)}(?:{{[^}}]*}})? ([0-9.e+-]+)$", re.MULTILINE)
    return sum(float(value) for value in pattern.findall(text))


def _eventually(check: Callable[[], bool], seconds: float) -> bool:
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        if check():
            return True
        time.sleep(0.1)
    return check()


def test_the_fleet_opens_at_most_the_limit(fleet: Fleet) -> None:
    counts = fleet.sink.counts
    counts.reset_peak()
    before = counts.messages
    statuses = _burst([instance.url for instance in fleet.instances])
    assert statuses == [200] * CLIENTS
    assert counts.messages - before == CLIENTS
    assert counts.peak <= LIMIT  # 3 x 4 = 12 without the fleet-wide limit
    waits = sum(_metric(i.url, "mailrelay_fleet_lease_wait_seconds_count") for i in fleet.instances)
    assert waits > 0  # some deliveries found every lease taken, and waited


def test_redis_stopped_local_limits_then_leases_again(fleet: Fleet) -> None:
    counts = fleet.sink.counts
    urls = [instance.url for instance in fleet.instances]
    # Connections open at the switch are kept until they come back to their pool (idle ones: until
    # the instance notices, within a renewal): the bound below is the one that holds after it.
    assert _eventually(lambda: counts.current == 0, 10)
    fleet.stop_redis()
    try:
        counts.reset_peak()
        before = counts.messages
        assert _burst(urls) == [200] * CLIENTS  # nothing refused for Redis's sake
        assert counts.messages - before == CLIENTS
        # Each instance keeps to ceil(4 / 3) = 2 connections.
        assert counts.peak <= INSTANCES * -(-LIMIT // INSTANCES)
        for url in urls:
            assert _metric(url, "mailrelay_fleet_fallbacks_total") >= 1
            assert _metric(url, "mailrelay_fleet_local_limits") == 1
    finally:
        fleet.start_redis()
    # Back: each instance sees it at its next renewal, and closes the connections it opened without a lease.
    assert _eventually(
        lambda: all(_metric(url, "mailrelay_fleet_local_limits") == 0 for url in urls), 5 * RENEW_EVERY + 5
    )
    assert _eventually(lambda: counts.current == 0, 10)
    counts.reset_peak()
    before = counts.messages
    assert _burst(urls) == [200] * CLIENTS
    assert counts.messages - before == CLIENTS
    assert counts.peak <= LIMIT
    assert "fleet_fallback" in fleet.instances[0].logs()


def test_a_killed_instance_frees_its_leases(fleet: Fleet) -> None:
    counts, sink = fleet.sink.counts, fleet.sink
    assert _eventually(lambda: counts.current == 0, 10)  # the other tests' idle connections are gone
    with service(fleet.config) as doomed:
        sink.data_delay = 5.0  # its connections are busy when it dies
        try:
            with ThreadPoolExecutor(2 * LIMIT) as pool:
                stuck = [pool.submit(_deliver, doomed.url, n) for n in range(2 * LIMIT)]
                assert _eventually(lambda: counts.current == LIMIT, 20)  # it holds every lease
                doomed.process.send_signal(signal.SIGKILL)
                killed_at = time.monotonic()
                results = [future.result() for future in stuck]
                assert all(status != 200 for status in results), (results, time.monotonic() - killed_at)
        finally:
            sink.data_delay = HOLD
        assert _eventually(lambda: counts.current == 0, 10)  # the sink saw its connections go
        opened = len(counts.opened_at)
        counts.reset_peak()
        before = counts.messages
        statuses = _burst([instance.url for instance in fleet.instances], 16)
    assert statuses == [200] * 16
    assert counts.messages - before == 16
    assert counts.peak == LIMIT  # the freed capacity is used, and no more
    first = counts.opened_at[opened]
    # The dead instance's leases expired by themselves: no renewal since the kill.
    assert first - killed_at <= LEASE_TTL + 5


def test_the_option_needs_a_redis() -> None:
    options = StaticOptions.model_validate({"type": "static", "host": "127.0.0.1", "fleet_connections": True})
    with pytest.raises(ConfigError) as info:
        build_relay("out", options, RelayContext.from_settings(ServiceSettings()))
    assert [p.path for p in info.value.problems] == ["relay.out.fleet_connections"]
