"""What operators rely on: metrics, JSON logs, the SIGTERM drain, SIGHUP reload, several workers."""

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from starlette.requests import Request

from app.intake import client_ip
from tests.conftest import config_from, post_delivery
from tests.servers.mailrelay import ROOT, Service, service
from tests.servers.process import free_port
from tests.servers.smtp import smtp_server

BODY = {"sender": "a@example.com", "recipients": ["b@example.net"], "message": "Subject: x\r\n\r\nhi\r\n"}


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, keyed by name and sorted labels."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(table: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str) -> float:
    return table.get((name, tuple(sorted(labels.items()))), 0.0)


def test_metrics_count_deliveries_recipients_and_requests(client: TestClient) -> None:
    before = samples(client.get("/metrics").text)
    post_delivery(client, "scripted", ["ok@example.net", "bad@example.net", "later@example.net"])
    post_delivery(client, "scripted", ["ok@example.net"])
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    after = samples(response.text)

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("mailrelay_deliveries_total", relay="scripted", outcome="partial") == 1
    assert delta("mailrelay_deliveries_total", relay="scripted", outcome="delivered") == 1
    assert delta("mailrelay_recipients_total", relay="scripted", reply_class="2xx") == 2
    assert delta("mailrelay_recipients_total", relay="scripted", reply_class="4xx") == 1
    assert delta("mailrelay_recipients_total", relay="scripted", reply_class="5xx") == 1
    assert delta("mailrelay_delivery_duration_seconds_count", relay="scripted") == 2
    assert delta("mailrelay_deliveries_in_flight", relay="scripted") == 0
    # The route's template, never the path: a label per relay name would be unbounded.
    assert delta("mailrelay_http_requests_total", route="/relays/{name}/deliver", method="POST", status="207") == 1
    assert delta("mailrelay_http_requests_total", route="/relays/{name}/deliver", method="POST", status="200") == 1
    assert not any("ok@example.net" in str(key) for key in after)


def test_smtp_connection_metrics(make_client: Callable[[str], TestClient]) -> None:
    with smtp_server() as server:
        client = make_client(f"relay:\n  pooled: {{type: static, host: 127.0.0.1, port: {server.port}}}\n")
        destination = f"127.0.0.1:{server.port}"
        for _ in range(3):
            assert post_delivery(client, "pooled", ["b@example.net"]).status_code == 200
        table = samples(client.get("/metrics").text)
    labels = {"relay": "pooled", "destination": destination}
    assert value(table, "mailrelay_smtp_connections_opened_total", **labels) == 1
    assert value(table, "mailrelay_smtp_connections_reused_total", **labels) == 2
    assert value(table, "mailrelay_smtp_connections", **labels, state="open") == 1
    assert value(table, "mailrelay_smtp_connections", **labels, state="idle") == 1


def test_metrics_can_require_a_key(make_client: Callable[[str], TestClient]) -> None:
    key = "metrics-reader-key-0123"
    import hashlib

    digest = hashlib.sha256(key.encode()).hexdigest()
    client = make_client(
        "relay:\n  a: {type: blackhole}\nmailrelay:\n  auth:\n"
        f"    metrics_requires_key: true\n    keys: [{{name: prom, sha256: '{digest}'}}]\n"
    )
    assert client.get("/metrics").status_code == 401
    assert client.get("/metrics", headers={"Authorization": f"Bearer {key}"}).status_code == 200


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def log_events(running: Service) -> list[dict[str, object]]:
    events = []
    for line in running.logs().splitlines():
        if line.startswith("{"):
            events.append(json.loads(line))
    return events


def test_json_logs_one_line_per_delivery_with_the_request_id(tmp_path: Path) -> None:
    config = write(tmp_path / "mailrelay.yaml", "relay:\n  discard: {type: blackhole}\n")
    with service(config, None, "--log-format", "json") as running, httpx.Client(base_url=running.url) as http:
        given = http.post("/relays/discard/deliver", json=BODY, headers={"X-Request-ID": "req-123"})
        generated = http.post("/relays/discard/deliver", json=BODY, headers={"X-Request-ID": "bad id with spaces"})
        time.sleep(0.2)
        events = log_events(running)
        lines = [line for line in running.logs().splitlines() if line.strip()]
    assert given.headers["x-request-id"] == "req-123"
    assert len(generated.headers["x-request-id"]) == 32
    assert all(line.startswith("{") for line in lines), lines  # every line is JSON, uvicorn's too
    names = [e["event"] for e in events]
    assert "config_loaded" in names
    assert "startup" in names
    deliveries = [e for e in events if e["event"] == "delivery"]
    assert len(deliveries) == 2
    first = deliveries[0]
    assert first["request_id"] == "req-123"
    assert deliveries[1]["request_id"] == generated.headers["x-request-id"]
    assert {k: first[k] for k in ("relay", "key", "sender_domain", "recipients", "codes", "outcome")} == {
        "relay": "discard",
        "key": "anonymous",
        "sender_domain": "example.com",
        "recipients": 1,
        "codes": [250],
        "outcome": "delivered",
    }
    assert isinstance(first["elapsed_ms"], float)
    assert (first["hops"], first["dkim"]) == ([None], None)  # blackhole: no connection, no signing
    assert "b@example.net" not in running.logs()  # no addresses, no content
    assert "Subject" not in running.logs()


SLOW = """\
relay:
  slow:
    type: custom
    factory: tests.scripted:factory
    delay: {delay}
mailrelay:
  shutdown_grace: 10
  drain_delay: 0.5
"""


async def test_sigterm_drains_running_deliveries_then_exits_0(tmp_path: Path) -> None:
    config = write(tmp_path / "mailrelay.yaml", SLOW.format(delay=1.5))
    with service(config, None, "--log-format", "json") as running:
        async with httpx.AsyncClient(base_url=running.url, timeout=30) as http:
            slow = asyncio.create_task(http.post("/relays/slow/deliver", json=BODY))
            await asyncio.sleep(0.4)
            running.process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.2)
            ready = await http.get("/readyz")  # within drain_delay: still served (tests/test_drain.py: the rest)
            finished = await slow
        code = await asyncio.to_thread(running.process.wait, 15)
        events = [e["event"] for e in log_events(running)]
    assert ready.status_code == 503
    assert finished.status_code == 200  # the delivery under way completed
    assert code == 0
    assert events.index("draining") < events.index("drained") < events.index("shutdown")


async def test_sighup_reloads_a_valid_configuration_and_keeps_the_old_one_otherwise(tmp_path: Path) -> None:
    config = write(tmp_path / "mailrelay.yaml", SLOW.format(delay=1.0))
    with service(config, None, "--log-format", "json") as running:
        async with httpx.AsyncClient(base_url=running.url, timeout=30) as http:
            in_flight = asyncio.create_task(http.post("/relays/slow/deliver", json=BODY))
            await asyncio.sleep(0.3)
            write(config, SLOW.format(delay=1.0) + "  max_recipients: 7\n" + "relay:\n  added: {type: blackhole}\n")
            # A YAML document with `relay:` twice keeps the last: only `added` is configured now.
            running.process.send_signal(signal.SIGHUP)
            names = await _relay_names_once_changed(http, {"slow"})
            assert names == {"added"}
            assert (await in_flight).status_code == 200  # finished on the old relays
            assert (await http.post("/relays/added/deliver", json=BODY)).status_code == 200

            write(config, "relay:\n  broken: {type: static}\n")
            running.process.send_signal(signal.SIGHUP)
            await asyncio.sleep(1.0)
            assert {r["name"] for r in (await http.get("/relays")).json()["relays"]} == {"added"}
            metrics = samples((await http.get("/metrics")).text)
        events = log_events(running)
    reloads = [e for e in events if e["event"] == "config_reload"]
    assert [e["result"] for e in reloads] == ["success", "failure"]
    assert "relay.broken.host" in str(reloads[1]["message"])
    assert value(metrics, "mailrelay_config_reloads_total", result="success") == 1
    assert value(metrics, "mailrelay_config_reloads_total", result="failure") == 1


async def _relay_names_once_changed(http: httpx.AsyncClient, old: set[str]) -> set[str]:
    for _ in range(50):
        names = {r["name"] for r in (await http.get("/relays")).json()["relays"]}
        if names != old:
            return names
        await asyncio.sleep(0.1)
    raise AssertionError("the configuration was not reloaded within 5 s")


def test_workers_share_the_port_and_their_metrics(tmp_path: Path) -> None:
    config = write(tmp_path / "mailrelay.yaml", "relay:\n  discard: {type: blackhole}\n")
    port = free_port()
    log = (tmp_path / "workers.log").open("wb")
    process = subprocess.Popen(  # noqa: S603
        [sys.executable, "-m", "app", "serve", "--workers", "2", "--port", str(port), "--config", str(config)],
        cwd=ROOT,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert process.poll() is None, (tmp_path / "workers.log").read_text()
            assert time.monotonic() < deadline
            time.sleep(0.1)
        for _ in range(40):
            with httpx.Client(base_url=url) as http:  # a new connection each time: any worker may answer
                response = http.post("/relays/discard/deliver", json=BODY)
                assert response.status_code == 200
        # A delivery is counted before it is answered: whichever worker answers reports
        # every worker's deliveries at once.
        for _ in range(6):
            with httpx.Client(base_url=url) as http:
                table = samples(http.get("/metrics").text)
                assert value(table, "mailrelay_deliveries_total", relay="discard", outcome="delivered") == 40
        process.send_signal(signal.SIGTERM)
        assert process.wait(20) == 0
    finally:
        if process.poll() is None:
            process.kill()
        log.close()
    lines = (tmp_path / "workers.log").read_text().splitlines()
    events = [json.loads(line)["event"] for line in lines if line.startswith("{")]
    assert events.count("draining") == 2  # each worker drained


def _request(peer: str, forwarded: list[str]) -> Request:
    headers = [(b"x-forwarded-for", v.encode()) for v in forwarded]
    return Request({"type": "http", "method": "POST", "path": "/", "headers": headers, "client": (peer, 4000)})


def test_the_client_ip_comes_from_x_forwarded_for_only_through_trusted_proxies() -> None:
    trusting = config_from("relay:\n  a: {type: blackhole}\nmailrelay: {trusted_proxies: [10.0.0.0/8, '::1/128']}\n")
    settings = trusting.mailrelay
    assert client_ip(_request("10.1.1.1", ["198.51.100.7, 10.2.2.2"]), settings) == "198.51.100.7"
    assert client_ip(_request("10.1.1.1", ["203.0.113.9, 198.51.100.7"]), settings) == "198.51.100.7"
    assert client_ip(_request("10.1.1.1", []), settings) == "10.1.1.1"
    # From an untrusted peer the header is the client's own claim: ignored.
    assert client_ip(_request("192.0.2.1", ["198.51.100.7"]), settings) == "192.0.2.1"
    default = config_from("relay:\n  a: {type: blackhole}\n").mailrelay
    assert client_ip(_request("10.1.1.1", ["198.51.100.7"]), default) == "10.1.1.1"
