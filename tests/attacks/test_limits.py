"""Attacks on the service's shared limits: a slow destination, metric labels, secrets shown back (issue 14)."""

import asyncio
import threading
import time
from pathlib import Path

import httpx

from tests.servers.mailrelay import service
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
    assert slow.most_at_once <= 2
