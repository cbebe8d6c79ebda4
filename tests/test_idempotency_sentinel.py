"""Redis that stays up: the idempotency store through Sentinel (a master, a replica, three
sentinels, all real), a `mailrelay serve` under keyed load, and the master killed (SIGKILL).
Keyed requests recover without a restart; results stored before the failover are replayed."""

import asyncio
import re
import signal
import time
from pathlib import Path

import httpx

from tests.servers.mailrelay import service
from tests.servers.sentinel import redis_sentinel
from tests.servers.smtp import smtp_server


def body(n: int) -> dict[str, object]:
    return {"sender": "a@example.com", "recipients": ["b@example.net"], "message": f"Subject: m{n}\r\n\r\nhi\r\n"}


async def deliver_until_final(http: httpx.AsyncClient, url: str, n: int) -> tuple[int, list[int]]:
    """A client's retry loop: the same key and body until a final answer (30 s at most)."""
    statuses: list[int] = []
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        response = await http.post(f"{url}/relays/out/deliver", json=body(n), headers={"Idempotency-Key": f"k{n}"})
        statuses.append(response.status_code)
        if response.status_code == 200:
            return n, statuses
        await asyncio.sleep(0.2)
    return n, statuses


async def test_a_sentinel_failover_under_keyed_load_recovers_without_a_restart(tmp_path: Path) -> None:
    with redis_sentinel() as redis, smtp_server() as sink:
        config = tmp_path / "mailrelay.yaml"
        config.write_text(
            f"relay:\n  out: {{type: static, host: 127.0.0.1, port: {sink.port}}}\n"
            f"mailrelay:\n  idempotency: {{backend: redis, redis_url: '{redis.url}'}}\n",
            encoding="utf-8",
        )
        with service(config) as running:
            async with httpx.AsyncClient(timeout=30) as http:
                first = await deliver_until_final(http, running.url, 0)
                await asyncio.sleep(0.5)  # replicated (asynchronously) before the master dies
                old_master = redis.master
                results = []
                killed_at = 0.0
                for n in range(1, 80):
                    if n == 20:
                        redis.processes[old_master].send_signal(signal.SIGKILL)
                        killed_at = time.monotonic()
                    results.append(await deliver_until_final(http, running.url, n))
                    # Recovered soon, or failed here (not 30 s for each request left).
                    assert n < 20 or results[-1][1][-1] == 200, results[-1]
                    await asyncio.sleep(0.05)
                recovered_after = time.monotonic() - killed_at
                replay = await http.post(
                    f"{running.url}/relays/out/deliver", json=body(0), headers={"Idempotency-Key": "k0"}
                )
                metrics = (await http.get(f"{running.url}/metrics")).text
            new_master = redis.current_master()
        received = [m.content for m in sink.received]
    assert first[1] == [200]
    assert new_master != old_master
    # Every request got its final answer through the client's retries, on the same instance.
    assert all(statuses[-1] == 200 for _, statuses in results), results
    assert recovered_after < 60
    # Each message reached the sink once. A SIGKILLed master may take its last writes with it
    # (replication is asynchronous): at most the one request in flight then could be sent twice.
    copies = [sum(f"Subject: m{n}\r\n".encode() in r for r in received) for n in range(80)]
    assert all(c >= 1 for c in copies)
    assert sum(c - 1 for c in copies) <= 1, copies
    # Stored before the failover, replayed after it (from the promoted replica).
    assert replay.status_code == 200
    assert replay.headers["idempotent-replayed"] == "true"
    # The failover's refusals were counted as such.
    refused = re.search(r'mailrelay_deliveries_refused_total\{reason="store_unavailable",relay="out"\} (\S+)', metrics)
    errors = re.search(r'mailrelay_idempotency_store_errors_total\{operation="claim"\} (\S+)', metrics)
    retried = sum(len(statuses) > 1 for _, statuses in results)
    if retried:
        assert refused is not None
        assert errors is not None
