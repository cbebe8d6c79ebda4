"""Fleet-wide `max_connection_rate` (issue 17 item 2, its connection part), with real parts.

One redis-server, two `mailrelay serve` processes with the same configuration, and a sink that
records when each connection was accepted. The `conn` relay QUITs after every delivery
(`idle_timeout: 0`), so every delivery opens a connection: per process 5/s would let the fleet open
10 a second; shared, it opens 5. A delivery that would wait for its connection slot longer than
`max_rate_wait` gets a 451 that names the connection rate, and a pooled connection that is reused
takes no slot at all.
"""

import textwrap
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass

import httpx
import pytest

from app.config import parse_config
from schemas.config import ConfigError
from tests.servers.counting import CountingSink, counting_sink
from tests.servers.mailrelay import Service, service
from tests.servers.redis import redis_server

INSTANCES = 2
RATE = 5  # connections a second, fleet-wide
#: Threads per instance; each waits for a connection slot, so together they reserve
#: CLIENTS x INSTANCES / RATE = 3.2 s ahead, well inside max_rate_wait.
CLIENTS = 8


@dataclass
class Fleet:
    sink: CountingSink
    services: list[Service]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    directory = tmp_path_factory.mktemp("fleet-connection-rate")
    with ExitStack() as stack:
        url = stack.enter_context(redis_server())
        sink = stack.enter_context(counting_sink())
        config = directory / "mailrelay.yaml"
        config.write_text(
            textwrap.dedent(
                f"""\
                relay:
                  conn:
                    type: static
                    host: 127.0.0.1
                    port: {sink.port}
                    concurrent_connections: 16
                    idle_timeout: 0
                    max_connection_rate: {RATE}/s
                    max_rate_wait: 10
                  scarce:
                    type: static
                    host: 127.0.0.1
                    port: {sink.port}
                    idle_timeout: 0
                    max_connection_rate: 1/m
                    max_rate_wait: 0.2
                  pooled:
                    type: static
                    host: 127.0.0.1
                    port: {sink.port}
                    concurrent_connections: 1
                    idle_timeout: 30
                    max_connection_rate: 1/m
                    max_rate_wait: 0.2
                mailrelay:
                  fleet: {{redis_url: "{url}", expected_instances: {INSTANCES}}}
                """
            )
        )
        services = [stack.enter_context(service(config)) for _ in range(INSTANCES)]
        yield Fleet(sink, services)


def _message(i: int) -> dict[str, object]:
    return {
        "sender": "alice@example.com",
        "recipients": ["bob@example.net"],
        "message": f"From: alice@example.com\r\nSubject: {i}\r\n\r\nHello\r\n",
    }


def _load(fleet: Fleet, relay: str, seconds: float, clients: int) -> list[int]:
    """`clients` threads per instance posting to `relay` for `seconds`; the answers' statuses."""
    statuses: list[int] = []
    end = time.monotonic() + seconds

    def run(url: str) -> None:
        with httpx.Client(timeout=30) as client:
            i = 0
            while time.monotonic() < end:
                statuses.append(client.post(f"{url}/relays/{relay}/deliver", json=_message(i)).status_code)
                i += 1

    threads = [threading.Thread(target=run, args=(s.url,)) for s in fleet.services for _ in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    return statuses


def _counter(running: Service, name: str, relay: str) -> float:
    for line in httpx.get(f"{running.url}/metrics", timeout=5).text.splitlines():
        if line.startswith(f'{name}{{relay="{relay}"}} '):
            return float(line.split()[-1])
    return 0.0


def test_connection_openings_hold_the_fleet_wide_rate(fleet: Fleet) -> None:
    start = time.monotonic()
    statuses = _load(fleet, "conn", 11, CLIENTS)
    assert statuses
    assert set(statuses) == {200}, statuses[:20]
    # 8 s of steady state after the first 2 (the processes' first connections and script loads).
    window = 8.0
    opened = [t for t in fleet.sink.counts.opened_at if start + 2 <= t < start + 2 + window]
    rate = len(opened) / window
    assert RATE * 0.9 <= rate <= RATE * 1.1, f"{rate:.2f} connections/s at the sink, the fleet-wide limit is {RATE}/s"
    # Both instances offered far more than their share: both waited for connection slots.
    assert all(_counter(s, "mailrelay_rate_waits_total", "conn") > 0 for s in fleet.services)


def test_a_connection_over_max_rate_wait_gets_a_451_naming_the_connection_rate(fleet: Fleet) -> None:
    before = fleet.sink.counts.connections
    first = httpx.post(f"{fleet.services[0].url}/relays/scarce/deliver", json=_message(0), timeout=10)
    assert first.status_code == 200, first.text
    # The other instance: the slot of the next connection is a minute away fleet-wide.
    second = httpx.post(f"{fleet.services[1].url}/relays/scarce/deliver", json=_message(1), timeout=10)
    assert second.status_code == 503, second.text
    reply = second.json()["recipients"][0]["reply"]
    assert (reply["code"], reply["enhanced_status"]) == (451, "4.4.5")
    assert f"connection rate limit 1/m to 127.0.0.1:{fleet.sink.port} reached" in reply["message"]
    assert fleet.sink.counts.connections == before + 1  # nothing was sent for the second
    assert _counter(fleet.services[1], "mailrelay_rate_limited_total", "scarce") == 1.0


def test_a_reused_connection_takes_no_slot(fleet: Fleet) -> None:
    before = fleet.sink.counts.connections
    url = fleet.services[0].url
    for i in range(5):
        answer = httpx.post(f"{url}/relays/pooled/deliver", json=_message(i), timeout=10)
        assert answer.status_code == 200, answer.text
    # One connection (the minute's one slot), reused by the four deliveries after the first.
    assert fleet.sink.counts.connections == before + 1


def _problems(options: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse_config(f"relay:\n  r: {{{options}}}\n", "<test>")
    return [str(p) for p in info.value.problems]


@pytest.mark.parametrize("relay_type", ["static, host: h", "lmtp", "mx"])
def test_the_option_is_checked_and_normalised_for_the_smtp_relays(relay_type: str) -> None:
    loaded = parse_config(f"relay:\n  r: {{type: {relay_type}, max_connection_rate: 10 / Second}}\n", "<t>")
    assert loaded.config.relay["r"].max_connection_rate == "10/s"  # type: ignore[union-attr]
    for bad, reason in [("5/w", "unknown period"), ("0/s", "count of at least 1"), ("fast", "a rate is")]:
        (problem,) = _problems(f"type: {relay_type}, max_connection_rate: {bad}")
        assert problem.startswith("relay.r.max_connection_rate: "), problem
        assert reason in problem, problem


def test_the_option_is_unknown_where_no_connection_is_pooled() -> None:
    loaded = parse_config("relay:\n  r: {type: blackhole, max_connection_rate: 5/s}\n", "<t>")
    assert [(w.path, w.message) for w in loaded.warnings] == [
        ("relay.r.max_connection_rate", "unknown option for type 'blackhole'; ignored")
    ]
