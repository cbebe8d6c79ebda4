"""Backpressure and the delivery deadline, against the service as it runs in production."""

import asyncio
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from fastapi.testclient import TestClient

from tests.servers.mailrelay import service
from tests.servers.smtp import Script, smtp_server

BODY = {"sender": "a@example.com", "recipients": ["b@example.net"], "message": "Subject: x\r\n\r\nhi\r\n"}


def slow_config(tmp_path: Path, limits: str, delay: float = 1.0) -> Path:
    path = tmp_path / "mailrelay.yaml"
    path.write_text(
        f"""\
relay:
  slow:
    type: custom
    factory: tests.scripted:factory
    delay: {delay}
  other:
    type: custom
    factory: tests.scripted:factory
    delay: {delay}
mailrelay:
  limits: {limits}
""",
        encoding="utf-8",
    )
    return path


async def deliver_all(url: str, relays: list[str], headers: dict[str, str] | None = None) -> list[httpx.Response]:
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        return list(
            await asyncio.gather(*(client.post(f"/relays/{r}/deliver", json=BODY, headers=headers) for r in relays))
        )


async def test_a_relay_at_its_bound_makes_the_next_delivery_wait_then_503(tmp_path: Path) -> None:
    config = slow_config(tmp_path, "{max_in_flight_per_relay: 2, queue_timeout: 0.3}")
    with service(config) as running:
        started = time.monotonic()
        responses = await deliver_all(running.url, ["slow"] * 4 + ["other"])
        elapsed = time.monotonic() - started
    statuses = [r.status_code for r in responses]
    # Two run, two wait 0.3 s and are refused; the other relay has its own bound.
    assert sorted(statuses[:4]) == [200, 200, 503, 503]
    assert statuses[4] == 200
    refused = next(r for r in responses if r.status_code == 503)
    assert refused.headers["content-type"] == "application/problem+json"
    assert refused.headers["retry-after"] == "1"
    assert "relay 'slow' already has 2 deliveries in flight" in refused.json()["detail"]
    assert elapsed < 3


async def test_a_delivery_that_gets_a_slot_within_the_wait_runs(tmp_path: Path) -> None:
    config = slow_config(tmp_path, "{max_in_flight: 2, queue_timeout: 5}", delay=0.3)
    with service(config) as running:
        responses = await deliver_all(running.url, ["slow", "other", "slow", "other"])
    assert [r.status_code for r in responses] == [200, 200, 200, 200]


async def test_no_more_wait_than_may_run_so_memory_stays_bounded(tmp_path: Path) -> None:
    config = slow_config(tmp_path, "{max_in_flight: 1, queue_timeout: 5}", delay=0.5)
    with service(config) as running:
        started = time.monotonic()
        responses = await deliver_all(running.url, ["slow", "other", "slow"])
        elapsed = time.monotonic() - started
    # One runs, one waits for it, the third is refused at once instead of queueing.
    assert sorted(r.status_code for r in responses) == [200, 200, 503]
    assert elapsed < 3


async def test_the_global_bound_with_no_wait_refuses_at_once(tmp_path: Path) -> None:
    config = slow_config(tmp_path, "{max_in_flight: 1, queue_timeout: 0}")
    with service(config) as running:
        responses = await deliver_all(running.url, ["slow", "other"])
    assert sorted(r.status_code for r in responses) == [200, 503]
    refused = next(r for r in responses if r.status_code == 503)
    assert "the service already has 1 deliveries in flight" in refused.json()["detail"]


async def test_the_deadline_cuts_a_stalled_delivery_before_the_data_as_not_delivered(tmp_path: Path) -> None:
    with smtp_server(Script(rcpt_delay=5)) as server:
        config = tmp_path / "mailrelay.yaml"
        config.write_text(
            f"relay:\n  out: {{type: static, host: 127.0.0.1, port: {server.port}, command_timeout: 30}}\n"
            "mailrelay: {delivery_deadline: 0.5}\n",
            encoding="utf-8",
        )
        with service(config) as running:
            started = time.monotonic()
            (response,) = await deliver_all(running.url, ["out"])
            elapsed = time.monotonic() - started
    assert response.status_code == 503
    (result,) = response.json()["recipients"]
    assert result["status"] == "transient_failure"
    assert result["possibly_delivered"] is False
    assert result["reply"]["code"] == 451
    assert result["reply"]["enhanced_status"] == "4.4.7"
    assert result["reply"]["command"] == "[DEADLINE]"
    assert "not delivered" in result["reply"]["message"]
    assert elapsed < 3


async def test_the_deadline_after_the_data_went_out_says_possibly_delivered(tmp_path: Path) -> None:
    with smtp_server(Script(data_delay=5)) as server:
        config = tmp_path / "mailrelay.yaml"
        config.write_text(
            f"relay:\n  out: {{type: static, host: 127.0.0.1, port: {server.port}, data_timeout: 30}}\n",
            encoding="utf-8",
        )
        with service(config) as running:
            started = time.monotonic()
            (response,) = await deliver_all(running.url, ["out"], headers={"X-Delivery-Timeout": "0.6"})
            elapsed = time.monotonic() - started
        # The server did get the whole message: the client must not assume it was lost.
        assert len(server.received) == 1
    assert response.status_code == 503
    assert response.headers["retry-after"] == "60"
    (result,) = response.json()["recipients"]
    assert result["possibly_delivered"] is True
    assert result["reply"]["enhanced_status"] == "4.4.7"
    assert "may have been delivered" in result["reply"]["message"]
    assert "(0.6 s)" in result["reply"]["message"]  # the deadline in force, the header's
    assert elapsed < 3


def test_the_deadline_header_can_only_lower_the_service_deadline(make_client: Callable[[str], TestClient]) -> None:
    client = make_client(
        "relay:\n  slow: {type: custom, factory: 'tests.scripted:factory', delay: 0.5}\n"
        "mailrelay: {delivery_deadline: 0.2}\n"
    )
    response = client.post("/relays/slow/deliver", json=BODY, headers={"X-Delivery-Timeout": "60"})
    assert response.status_code == 503
    assert "(0.2 s)" in response.json()["recipients"][0]["reply"]["message"]


def test_a_custom_relay_cut_off_by_the_deadline_says_what_may_have_been_delivered(
    make_client: Callable[[str], TestClient],
) -> None:
    client = make_client(
        "relay:\n"
        "  told: {type: custom, factory: 'tests.scripted:factory', stall_after_data: 30}\n"
        "  silent: {type: custom, factory: 'tests.scripted:factory', delay: 30}\n"
        "  old: {type: custom, factory: 'tests.scripted:one_argument_factory', delay: 30}\n"
    )
    maybe = {}
    for relay in ("told", "silent", "old"):
        response = client.post(f"/relays/{relay}/deliver", json=BODY, headers={"X-Delivery-Timeout": "0.2"})
        assert response.status_code == 503
        maybe[relay] = [r["possibly_delivered"] for r in response.json()["recipients"]]
    # `told` said the data went out; `silent` did not; `old` (deliver(envelope)) cannot say, so maybe.
    assert maybe == {"told": [True], "silent": [False], "old": [True]}


def test_an_invalid_deadline_header_is_422(client: TestClient) -> None:
    for value in ("soon", "0", "-1", "nan", "inf", ""):
        response = client.post("/relays/blackhole/deliver", json=BODY, headers={"X-Delivery-Timeout": value})
        assert response.status_code == 422, value
        assert response.json()["errors"] == [
            {"loc": "X-Delivery-Timeout", "message": "must be a number of seconds greater than 0"}
        ]


async def test_a_connection_lost_after_the_data_is_possibly_delivered(tmp_path: Path) -> None:
    with smtp_server(Script(drop_in_data=True)) as server:
        config = tmp_path / "mailrelay.yaml"
        config.write_text(f"relay:\n  out: {{type: static, host: 127.0.0.1, port: {server.port}}}\n", encoding="utf-8")
        with service(config) as running:
            (response,) = await deliver_all(running.url, ["out"])
    (result,) = response.json()["recipients"]
    assert result["status"] == "transient_failure"
    assert result["possibly_delivered"] is True
