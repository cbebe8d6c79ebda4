"""Idempotency across a crash and a deadline cut, with the real parts: redis-server, `mailrelay
serve` processes, an SMTP sink that counts every message it takes, kill -9.

A claim is a short lease renewed while the delivery runs, and it records when the data is about
to leave: after a crash, a retry waits seconds (not the deadline plus 30 s), a delivery that never
reached the data is taken over and sent, and one whose data may have left is answered honestly
(possibly delivered, not sent again) instead of being sent a second time.
"""

import asyncio
import contextlib
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from tests.servers.mailrelay import Service, service
from tests.servers.redis import redis_server
from tests.servers.smtp import Script, SmtpServer, smtp_server

BODY = {"sender": "a@example.com", "recipients": ["b@example.net", "c@example.net"], "message": "Subject: x\r\n\r\n"}
DOUBT = "an earlier attempt may have delivered this message; not sent again"


def config(tmp_path: Path, sink_port: int, redis_url: str) -> Path:
    path = tmp_path / "mailrelay.yaml"
    path.write_text(
        f"relay:\n  out: {{type: static, host: 127.0.0.1, port: {sink_port}}}\n"
        f"mailrelay:\n  idempotency: {{backend: redis, redis_url: '{redis_url}'}}\n",
        encoding="utf-8",
    )
    return path


def body(subject: str) -> dict[str, object]:
    return {**BODY, "message": f"Subject: {subject}\r\n\r\nhi\r\n"}


def copies(server: SmtpServer, subject: str) -> int:
    return sum(f"Subject: {subject}".encode() in r.content for r in server.received)


async def until(condition: Callable[[], bool], seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.05)


async def retry_while_409(http: httpx.AsyncClient, url: str, subject: str, key: str, limit: float) -> httpx.Response:
    """Retries the same request with the same key, as a client does, until it gets something else."""
    deadline = time.monotonic() + limit
    while True:
        response = await http.post(f"{url}/relays/out/deliver", json=body(subject), headers={"Idempotency-Key": key})
        if response.status_code != 409 or time.monotonic() > deadline:
            return response
        await asyncio.sleep(0.25)


async def test_kill_9_neither_duplicates_nor_blocks_retries(tmp_path: Path) -> None:
    script = Script(data_delay=60)  # takes the message, never answers the final "." in time
    with redis_server() as redis_url, smtp_server(script) as sink:
        path = config(tmp_path, sink.port, redis_url)
        with service(path) as doomed, service(path) as other:
            async with httpx.AsyncClient(timeout=30) as http:
                # Sent: the sink has the data and has not answered.
                in_doubt = asyncio.ensure_future(post(http, doomed, "sent", "key-sent"))
                await until(lambda: copies(sink, "sent") == 1, 10)
                # Not sent: stuck before the data (RCPT stalls), on a second connection.
                script.rcpt_delay = 60
                stuck = asyncio.ensure_future(post(http, doomed, "stuck", "key-stuck"))
                await asyncio.sleep(1.0)
                doomed.process.kill()
                killed = time.monotonic()
                script.rcpt_delay, script.data_delay = 0, 0  # the next hop recovers
                for task in (in_doubt, stuck):
                    with contextlib.suppress(httpx.TransportError):  # its instance died under it
                        await task
                # The retries go to the other instance, with the same key.
                doubt = await retry_while_409(http, other.url, "sent", "key-sent", limit=25)
                doubt_after = time.monotonic() - killed
                taken = await retry_while_409(http, other.url, "stuck", "key-stuck", limit=25)
                taken_after = time.monotonic() - killed
                again = await post(http, other, "sent", "key-sent")
                # A client that wants the message sent again asks with a new key.
                resend = await post(http, other, "sent", "key-sent-2")
                metrics = (await http.get(f"{other.url}/metrics")).text
    # The message the sink had is never sent again, and the answer says why.
    assert doubt.status_code == 503, doubt.text
    assert doubt_after < 15
    recipients = doubt.json()["recipients"]
    assert [r["possibly_delivered"] for r in recipients] == [True, True]
    assert all(DOUBT in r["reply"]["message"] for r in recipients)
    assert (again.status_code, again.json()) == (503, doubt.json())  # kept: later retries get the same
    # The one that never reached the data is taken over and sent, once.
    assert taken.status_code == 200, taken.text
    assert taken_after < 15
    assert resend.status_code == 200
    assert copies(sink, "sent") == 2  # the first attempt's, and the resend asked for with a new key
    assert copies(sink, "stuck") == 1
    assert 'mailrelay_idempotency_keys_total{outcome="taken_over",relay="out"} 1.0' in metrics
    assert 'mailrelay_idempotency_keys_total{outcome="in_doubt",relay="out"} 2.0' in metrics


async def post(http: httpx.AsyncClient, to: Service, subject: str, key: str, **headers: str) -> httpx.Response:
    return await http.post(
        f"{to.url}/relays/out/deliver", json=body(subject), headers={"Idempotency-Key": key, **headers}
    )


async def test_a_deadline_cut_after_the_data_finishes_in_the_background_and_stores_the_truth(tmp_path: Path) -> None:
    with redis_server() as redis_url, smtp_server(Script(data_delay=2)) as sink:
        with service(config(tmp_path, sink.port, redis_url)) as running:
            async with httpx.AsyncClient(timeout=30) as http:
                cut = await post(http, running, "late", "key-late", **{"X-Delivery-Timeout": "1"})
                busy = await post(http, running, "late", "key-late")
                final = await retry_while_409(http, running.url, "late", "key-late", limit=10)
                metrics = (await http.get(f"{running.url}/metrics")).text
        assert copies(sink, "late") == 1
    assert cut.status_code == 503
    assert [r["possibly_delivered"] for r in cut.json()["recipients"]] == [True, True]
    assert busy.status_code == 409  # still finishing, claim kept
    assert final.status_code == 200, final.text
    assert final.headers["idempotent-replayed"] == "true"
    assert [r["status"] for r in final.json()["recipients"]] == ["delivered", "delivered"]
    assert 'mailrelay_idempotency_keys_total{outcome="background_stored",relay="out"} 1.0' in metrics
    assert 'mailrelay_idempotency_keys_total{outcome="in_use",relay="out"}' in metrics  # the 409s
