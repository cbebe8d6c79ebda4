"""Attacks on request intake against the real service: recipient floods, many large bodies at once,
an idempotency store filled with large results, invisible characters in client fields."""

import base64
import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from tests.servers.mailrelay import Service, service

MiB = 1024 * 1024


def status_kib(pid: int, field: str) -> int:
    """A field of /proc/<pid>/status in KiB (VmRSS: resident now; VmHWM: the peak so far)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} in /proc/{pid}/status")


@contextmanager
def health_watch(url: str) -> Iterator[list[float]]:
    """/healthz asked over and over, from a connection of its own, while the block runs; yields
    the list of the answers' times (a request that failed counts as 99 s)."""
    times: list[float] = []
    done = threading.Event()

    def poll() -> None:
        with httpx.Client(timeout=10) as client:
            while not done.is_set():
                started = time.monotonic()
                try:
                    ok = client.get(f"{url}/healthz").status_code == 200
                except httpx.HTTPError:
                    ok = False
                times.append(time.monotonic() - started if ok else 99.0)
                time.sleep(0.02)

    thread = threading.Thread(target=poll)
    thread.start()
    try:
        yield times
    finally:
        done.set()
        thread.join(timeout=15)


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "mailrelay.yaml"
    path.write_text(text, encoding="utf-8")
    return path


def test_a_recipient_flood_is_refused_before_it_is_parsed(tmp_path: Path) -> None:
    """Item 5: 5 million recipients in a 40 MB body (the JSON limit allows 150 MB at the default
    message size). Refused 422 without holding the loop, and without the parser's gigabyte."""
    config = write_config(tmp_path, "relay:\n  b: {type: blackhole}\nmailrelay: {max_recipients: 100}\n")
    body = b'{"sender": "a@example.com", "message": "Subject: x\\r\\n\\r\\nhi\\r\\n", "recipients": ['
    body += b",".join([b'"a@b.c"'] * 5_000_000) + b"]}"
    with service(config) as running:
        assert httpx.get(f"{running.url}/healthz").status_code == 200
        idle = status_kib(running.process.pid, "VmRSS")
        with health_watch(running.url) as health:
            started = time.monotonic()
            response = httpx.post(
                f"{running.url}/relays/b/deliver",
                content=body,
                headers={"Content-Type": "application/json"},
                timeout=60,
            )
            took = time.monotonic() - started
            time.sleep(0.2)  # a few more /healthz after the answer
        peak = status_kib(running.process.pid, "VmHWM")
    assert response.status_code == 422, response.text[:500]
    assert response.json()["errors"][0]["loc"] in ("body", "recipients")
    assert took < 5, f"the refusal took {took:.1f} s"
    assert health
    assert max(health) < 1.0, f"/healthz took up to {max(health):.2f} s during the flood"
    # The body, and one copy while its chunks are joined; nothing per recipient.
    assert (peak - idle) * 1024 < 2 * len(body) + 32 * MiB, f"peak {peak} KiB, idle {idle} KiB"


def test_concurrent_large_bodies_stay_within_the_body_budget(tmp_path: Path) -> None:
    """Item 6: 24 JSON messages of 1.9 MB at once, with a body budget of 8 MB. Each request holds
    its body and its decoded message (2 x 1.9 MB) until it is answered, so two run at a time; the
    others wait for the budget up to queue_timeout, then get 503. Peak memory: idle + the budget
    + three times one body (the request being parsed: the joined body, the parser's copy, the text)."""
    budget = 8_000_000
    config = write_config(
        tmp_path,
        "relay:\n"
        "  slow: {type: pipe, args: [/bin/sh, -c, 'cat >/dev/null; sleep 0.2']}\n"
        "mailrelay:\n"
        "  max_message_size: 2000000\n"
        f"  limits: {{body_budget: {budget}, queue_timeout: 1}}\n",
    )
    message = "Subject: big\r\n\r\n" + ("x" * 998 + "\r\n") * 1900
    body = json.dumps({"sender": "a@example.com", "recipients": ["b@example.net"], "message": message}).encode()
    json_form = {"Content-Type": "application/json"}
    with service(config) as running:
        assert httpx.post(f"{running.url}/relays/slow/deliver", content=body, headers=json_form).status_code == 200
        time.sleep(0.2)
        idle = status_kib(running.process.pid, "VmRSS")

        def post(_: int) -> httpx.Response:
            return httpx.post(f"{running.url}/relays/slow/deliver", content=body, headers=json_form, timeout=30)

        with ThreadPoolExecutor(24) as pool:
            responses = list(pool.map(post, range(24)))
        peak = status_kib(running.process.pid, "VmHWM")
    statuses = sorted(r.status_code for r in responses)
    assert set(statuses) <= {200, 503}, statuses
    assert statuses.count(200) >= 4, statuses
    for refused in (r for r in responses if r.status_code == 503):
        assert refused.headers["content-type"] == "application/problem+json"
        assert refused.headers["retry-after"] == "1"
        assert "body budget" in refused.json()["detail"]
    formula = budget + 3 * len(body)
    assert (peak - idle) * 1024 < formula + 4 * MiB, f"peak {peak} KiB, idle {idle} KiB, statuses {statuses}"


def test_a_trickled_body_holds_the_budget_no_longer_than_the_deadline(tmp_path: Path) -> None:
    """Item 6 (review): a client declaring a large body and sending a byte now and then (never
    silent for body_timeout) held its share of the budget for ever; now for at most the delivery
    deadline (plus one body_timeout): then 408, and other deliveries go through again."""
    config = write_config(
        tmp_path,
        "relay:\n  bh: {type: blackhole}\n"
        "mailrelay:\n  body_timeout: 2\n  delivery_deadline: 1.5\n"
        "  limits: {body_budget: 65536, queue_timeout: 0.2}\n",
    )
    small = {"sender": "a@example.com", "recipients": ["b@example.net"], "message": "Subject: x\r\n\r\nhi\r\n"}
    with service(config) as running:
        host, port = running.url.removeprefix("http://").rsplit(":", 1)
        with socket.create_connection((host, int(port))) as slow:
            slow.sendall(
                b"POST /relays/bh/deliver HTTP/1.1\r\nHost: x\r\nContent-Type: message/rfc822\r\n"
                b"X-Envelope-Sender: \r\nX-Envelope-Recipient: Yg==\r\nContent-Length: 65536\r\n\r\n"
            )
            slow.sendall(b"x")
            time.sleep(0.3)
            held = httpx.post(f"{running.url}/relays/bh/deliver", json=small)
            answer = b""
            for _ in range(20):  # a byte every 0.25 s for at most 5 s, until the service answers
                slow.sendall(b"x")
                slow.settimeout(0.25)
                try:
                    answer = slow.recv(4096)
                except TimeoutError:
                    continue
                slow.settimeout(2)
                while not answer.endswith(b"}"):  # the problem document may come in a second read
                    more = slow.recv(4096)
                    if not more:
                        break
                    answer += more
                break
            after = httpx.post(f"{running.url}/relays/bh/deliver", json=small)
    assert held.status_code == 503, held.text  # the trickle holds the whole budget meanwhile
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert b"delivery deadline" in answer
    assert after.status_code == 200, after.text


def test_the_idempotency_store_is_bounded_in_bytes(tmp_path: Path) -> None:
    """Item 7: 600 keyed deliveries, 100 recipients each (an answer of 23 KB), with max_bytes
    256 KiB: about 200 results fit. Memory does not grow with them (before: 600 x 23 KB = 14 MB);
    the oldest results are forgotten first."""
    config = write_config(
        tmp_path,
        f"relay:\n  b: {{type: blackhole}}\nmailrelay:\n  max_recipients: 100\n  idempotency: {{max_bytes: {256 * 1024}}}\n",
    )
    recipients = [f"recipient-{i:03d}@example.net" for i in range(100)]

    def body(i: int) -> dict[str, object]:
        return {"sender": "a@example.com", "recipients": recipients, "message": f"Subject: {i}\r\n\r\nhi\r\n"}

    with service(config) as running, httpx.Client(base_url=running.url, timeout=30) as client:
        for i in range(20):  # warm up: the allocator's arenas, the first stored results
            client.post("/relays/b/deliver", json=body(i), headers={"Idempotency-Key": f"warm-{i}"})
        before = status_kib(running.process.pid, "VmRSS")
        for i in range(600):
            assert (
                client.post("/relays/b/deliver", json=body(i), headers={"Idempotency-Key": f"k-{i}"}).status_code == 200
            )
        after = status_kib(running.process.pid, "VmRSS")
        first = client.post("/relays/b/deliver", json=body(0), headers={"Idempotency-Key": "k-0"})
        last = client.post("/relays/b/deliver", json=body(599), headers={"Idempotency-Key": "k-599"})
    assert "idempotent-replayed" not in first.headers  # forgotten: the oldest went first
    assert last.headers["idempotent-replayed"] == "true"
    assert last.json()["recipients"][99]["recipient"] == recipients[99]
    assert (after - before) * 1024 < 4 * MiB, f"{before} KiB -> {after} KiB"


@pytest.mark.parametrize("char", ["\u2028", "\u2029", "\u00ad", "\u200b", "\u2066", "\U000e0041"])
@pytest.mark.parametrize("field", ["host", "ehlo", "protocol", "auth"])
def test_client_fields_refuse_separators_and_invisible_characters(running_pipe: Service, field: str, char: str) -> None:
    """Item 14: such characters would reach a pipe command's arguments (and pass the leading-dash rule)."""
    body = {
        "sender": "a@example.com",
        "recipients": ["b@example.net"],
        "message": "Subject: x\r\n\r\nhi\r\n",
        "client": {field: f"{char}-oops"},
    }
    response = httpx.post(f"{running_pipe.url}/relays/p/deliver", json=body)
    assert response.status_code == 422, response.text
    assert [e["loc"] for e in response.json()["errors"]] == [f"client.{field}"]


def test_x_ehlo_refuses_a_soft_hyphen(running_pipe: Service) -> None:
    """Item 14, raw form: a header is Latin-1, where U+00AD (a format character) is one byte."""
    headers = [
        (b"Content-Type", b"message/rfc822"),
        (b"X-Envelope-Sender", base64.b64encode(b"a@example.com")),
        (b"X-Envelope-Recipient", base64.b64encode(b"b@example.net")),
        (b"X-Ehlo", b"\xad-oops.example.com"),
    ]
    response = httpx.post(f"{running_pipe.url}/relays/p/deliver", content=b"Subject: x\r\n\r\nhi\r\n", headers=headers)
    assert response.status_code == 422, response.text
    assert [e["loc"] for e in response.json()["errors"]] == ["X-Ehlo"]


@pytest.fixture(scope="module")
def running_pipe(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """A `pipe` relay whose command would get the client's EHLO name as an argument."""
    config = write_config(
        tmp_path_factory.mktemp("pipe"),
        "relay:\n  p: {type: pipe, args: [/bin/true, '{client_ehlo}', '{client_host}']}\n",
    )
    with service(config) as running:
        yield running
