"""Attacks on the service's shared limits: a slow destination, metric labels, secrets shown back (issue 14)."""

import asyncio
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import httpx
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, generate_latest, multiprocess
from prometheus_client.parser import text_string_to_metric_families

from app.workers import retire_worker_files
from relays.base import DeliveryContext
from schemas.delivery import Envelope, RecipientResult
from schemas.reply import Reply
from tests.conftest import post_delivery
from tests.servers.http import Answer, http_server
from tests.servers.mailrelay import ROOT, service
from tests.servers.process import free_port
from tests.servers.raw import Conversation, RawServer, raw_server
from tests.servers.smtp import smtp_server

BODY = {"sender": "a@example.com", "recipients": ["b@example.net"], "message": "Subject: x\r\n\r\nhi\r\n"}


async def test_a_tarpit_destination_leaves_every_other_relay_at_full_speed(tmp_path: Path) -> None:
    """Deliveries waiting for a tarpit's two connections once held every in-flight slot, and
    blackhole and a healthy static relay got 503 overloaded. Now at most `max_waiting` wait;
    the rest get an honest transient 451 4.4.5 at once, and the other relays go on."""
    release = threading.Event()

    def tarpit(conversation: Conversation, server: RawServer) -> None:
        release.wait(8)  # accepts, never greets: bounded, and freed when the test ends

    attackers = 24
    with raw_server(tarpit) as slow, smtp_server() as healthy:
        config = tmp_path / "mailrelay.yaml"
        config.write_text(
            "mailrelay:\n"
            "  limits: {max_in_flight: 12, queue_timeout: 1}\n"
            "relay:\n"
            "  discard: {type: blackhole}\n"
            f"  healthy: {{type: static, host: 127.0.0.1, port: {healthy.port}}}\n"
            f"  tarpit: {{type: static, host: 127.0.0.1, port: {slow.port}, concurrent_connections: 2,\n"
            "           max_waiting: 2, connect_timeout: 30, command_timeout: 30}\n",
            encoding="utf-8",
        )
        with service(config) as running:
            limits = httpx.Limits(max_connections=attackers + 8)
            async with httpx.AsyncClient(base_url=running.url, timeout=15, limits=limits) as http:
                try:
                    attack = [
                        asyncio.create_task(
                            http.post("/relays/tarpit/deliver", json=BODY, headers={"X-Delivery-Timeout": "4"})
                        )
                        for _ in range(attackers)
                    ]
                    # The refusals come at once; the four others run into the tarpit for 4 s.
                    await asyncio.wait(attack, timeout=1.5)
                    assert slow.connections == 2
                    # Now, not at the end: when the deadline cuts a connecting delivery, a waiting
                    # one may take its slot while the tarpit (which never reads) still counts the
                    # cut connection as open (3 "at once" in CI, once).
                    at_once = slow.most_at_once
                    for path, body in (
                        ("/relays/discard/deliver", BODY),
                        ("/relays/healthy/deliver", BODY),
                    ):
                        started = time.monotonic()
                        answer = await http.post(path, json=body)
                        assert answer.status_code == 200, (path, answer.text)
                        assert time.monotonic() - started < 1
                    started = time.monotonic()
                    assert (await http.get("/healthz")).status_code == 200
                    assert time.monotonic() - started < 1
                    refused = [t.result() for t in attack if t.done()]
                finally:
                    release.set()
                    answers = await asyncio.gather(*attack)
    # Two connecting and two waiting; every other delivery to the tarpit was refused at once.
    assert len(refused) == attackers - 4
    for answer in refused:
        assert answer.status_code == 503
        assert "Retry-After" in answer.headers
        (recipient,) = answer.json()["recipients"]
        assert recipient["status"] == "transient_failure"
        assert recipient["possibly_delivered"] is False
        reply = recipient["reply"]
        assert (reply["code"], reply["enhanced_status"]) == (451, "4.4.5")
        assert f"waiting for 127.0.0.1:{slow.port}" in reply["message"]
    assert all(a.status_code == 503 for a in answers)
    assert at_once <= 2


def relay_series(text: str, relay: str) -> set[tuple[str, tuple[tuple[str, str], ...]]]:
    return {
        (s.name, tuple(sorted(s.labels.items())))
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.labels.get("relay") == relay
    }


def test_mx_destinations_add_no_metric_series(make_client: Callable[[str], TestClient]) -> None:
    """Every mail host the mx relay reached once added series forever, named in the open
    /metrics. Now deliveries to ever more destinations leave the set of series as it was."""
    ports = [free_port() for _ in range(25)]  # nothing listens there: each is a quick 451 4.4.1
    forced = ", ".join(f"d{i}.attacker.test: '127.0.0.1:{port}'" for i, port in enumerate(ports))
    client = make_client(f"relay:\n  spread:\n    type: mx\n    force_mx: {{{forced}}}\n")
    assert post_delivery(client, "spread", ["x@d0.attacker.test"]).status_code == 503
    first = relay_series(client.get("/metrics").text, "spread")
    assert any(name.startswith("mailrelay_smtp_connections") for name, _ in first)
    recipients = [f"x@d{i}.attacker.test" for i in range(1, len(ports))]
    assert post_delivery(client, "spread", recipients).status_code == 503
    text = client.get("/metrics").text
    assert relay_series(text, "spread") == first
    assert "attacker.test" not in text
    assert not any(f":{port}" in text for port in ports)


def collect(directory: Path) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry, path=str(directory))  # type: ignore[no-untyped-call]
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(generate_latest(registry).decode())
        for s in family.samples
    }


def test_metric_files_of_dead_workers_do_not_pile_up(tmp_path: Path) -> None:
    """With --workers, each replaced worker left its metric files behind for good. Now a dead
    worker's counts are folded into one file per type and its own files are removed:
    the directory stays the same size, and no total goes backwards."""
    directory = tmp_path / "metrics"
    directory.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory)}
    worker = (
        "from app.metrics import DELIVERIES, DURATION, IN_FLIGHT\n"
        "DELIVERIES.labels('r', 'delivered').inc()\n"
        "DURATION.labels('r').observe(0.003)\n"
        "IN_FLIGHT.labels('r').inc()\n"
    )
    for n in range(1, 5):
        process = subprocess.run([sys.executable, "-c", worker], cwd=ROOT, env=env, check=True, timeout=30)  # noqa: S603
        pids = {p.name.rsplit("_", 1)[1].removesuffix(".db") for p in directory.glob("*.db")} - {"retired"}
        (pid,) = pids
        retire_worker_files(int(pid), str(directory))
        assert sorted(p.name for p in directory.iterdir()) == ["counter_retired.db", "histogram_retired.db"]
        values = collect(directory)
        assert values[("mailrelay_deliveries_total", (("outcome", "delivered"), ("relay", "r")))] == n
        assert values[("mailrelay_delivery_duration_seconds_count", (("relay", "r"),))] == n
        assert values[("mailrelay_delivery_duration_seconds_bucket", (("le", "0.005"), ("relay", "r")))] == n
        assert ("mailrelay_deliveries_in_flight", (("relay", "r"),)) not in values or (
            values[("mailrelay_deliveries_in_flight", (("relay", "r"),))] == 0
        )
        assert process.returncode == 0


class PluginRelay:
    """A custom relay whose factory (the class) declares one option safe to show."""

    PUBLIC_OPTIONS: ClassVar[tuple[str, ...]] = ("region",)

    def __init__(self, options: dict[str, Any]) -> None:
        self.options = options

    async def deliver(self, envelope: Envelope, context: DeliveryContext) -> list[RecipientResult]:
        reply = Reply.parse(250, "2.0.0 Accepted", "[HTTP]")
        return [RecipientResult(recipient=r, reply=reply) for r in envelope.recipients]

    async def aclose(self) -> None:
        return None


SECRETS = (
    "hop-user",
    "pw@rt-secret",
    "rt-secret",
    "tok-secret-1",
    "q-secret-2",
    "key-secret-1",
    "pwd-secret-1",
    "ak-secret-1",
    "pipe-secret-1",
    "pipe-secret-2",
    "pipe-secret-3",
)


def test_no_secret_is_shown_by_get_relays_check_config_or_the_logs(tmp_path: Path) -> None:
    """GET /relays showed most of a URL password holding "@", query tokens, a custom relay's
    key/pwd/access_key and a pipe's --password=; check-config printed the URL password whole;
    httpx logged the URL with both. Now none of them is shown anywhere."""
    query = "token=tok-secret-1&x=q-secret-2"
    with http_server({f"/deliver?{query}": Answer(200)}) as hop:
        config = tmp_path / "mailrelay.yaml"
        config.write_text(
            "relay:\n"
            f"  hop: {{type: http, url: 'http://hop-user:pw@rt-secret@127.0.0.1:{hop.port}/deliver?{query}'}}\n"
            "  plugin:\n"
            "    type: custom\n"
            "    factory: tests.attacks.test_limits:PluginRelay\n"
            "    region: eu-west\n"
            "    key: key-secret-1\n"
            "    pwd: pwd-secret-1\n"
            "    access_key: ak-secret-1\n"
            "  archive:\n"
            "    type: pipe\n"
            "    args: [/bin/cat, --password=pipe-secret-1, --token, pipe-secret-2, -p, pipe-secret-3, '{recipient}']\n",
            encoding="utf-8",
        )
        with service(config) as running, httpx.Client(base_url=running.url) as http:
            shown = http.get("/relays")
            delivered = http.post("/relays/hop/deliver", json=BODY)
            logs = running.logs()
        checked = subprocess.run(  # noqa: S603
            [sys.executable, "-m", "app", "check-config", str(config)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=False,
            timeout=60,
        )
    assert delivered.status_code == 200, delivered.text
    assert hop.requests  # the password still reaches the next hop, as Basic auth
    assert checked.returncode == 0, checked.stderr
    for where, text in (("GET /relays", shown.text), ("logs", logs), ("check-config", checked.stdout + checked.stderr)):
        for secret in SECRETS:
            assert secret not in text, (where, secret, text)
    relays = {r["name"]: r["options"] for r in shown.json()["relays"]}
    assert relays["hop"]["url"] == f"http://***@127.0.0.1:{hop.port}/deliver?token=***&x=***"
    assert relays["plugin"] == {
        "type": "custom",
        "factory": "tests.attacks.test_limits:PluginRelay",
        "region": "eu-west",
        "key": "***",
        "pwd": "***",
        "access_key": "***",
        "dkim": [],  # the service's own options of every relay are shown, not masked
        "add_missing_headers": False,
    }
    assert relays["archive"]["args"] == ["/bin/cat", "--password=***", "--token", "***", "-p", "***", "{recipient}"]
    assert f"hop: http: HTTP POST to http://***@127.0.0.1:{hop.port}/deliver?token=***&x=***" in checked.stdout
