"""Batches (`POST /relays/{name}/deliveries`) against a running `mailrelay serve` and a real SMTP sink.

The sink (aiosmtpd in its own thread) answers per recipient, and holds a "gated" recipient's RCPT
until the test opens its gate: that is how the tests see lines answered in the order they finish,
while another is still running, without any timing.
"""

import asyncio
import base64
import json
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
from aiosmtpd.smtp import SMTP

from tests.servers.mailrelay import Service, service

NDJSON = {"Content-Type": "application/x-ndjson"}
KEY = "batch-test-key"
REPLIES = {
    "perm@example.net": "550 5.1.1 no such user",
    "temp@example.net": "451 4.3.0 try later",
}


@dataclass
class GatedSink:
    port: int
    loop: asyncio.AbstractEventLoop
    gates: dict[str, asyncio.Event]
    messages: list[tuple[list[str], bytes]] = field(default_factory=list)

    def open(self, address: str) -> None:
        self.loop.call_soon_threadsafe(self.gates[address].set)

    def count(self, recipient: str) -> int:
        return sum(recipient in rcpts for rcpts, _ in self.messages)


class _Handler:
    def __init__(self, sink: "GatedSink") -> None:
        self.sink = sink

    async def handle_RCPT(self, server: Any, session: Any, envelope: Any, address: str, options: list[str]) -> str:
        gate = self.sink.gates.get(address)
        if gate is not None:
            await gate.wait()
        if address in REPLIES:
            return REPLIES[address]
        envelope.rcpt_tos.append(address)
        return "250 2.1.5 OK"

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self.sink.messages.append((list(envelope.rcpt_tos), envelope.original_content or envelope.content))
        return "250 2.0.0 OK queued"


@contextmanager
def gated_sink(*gated: str) -> Iterator[GatedSink]:
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    state: dict[str, Any] = {}

    async def start() -> None:
        sink = GatedSink(0, loop, {address: asyncio.Event() for address in gated})
        server = await loop.create_server(lambda: SMTP(_Handler(sink), hostname="sink.test"), "127.0.0.1", 0)
        sink.port = server.sockets[0].getsockname()[1]
        state.update(sink=sink, server=server)

    def run() -> None:
        asyncio.set_event_loop(loop)
        loop.run_until_complete(start())
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=run, name="gated-sink", daemon=True)
    thread.start()
    if not ready.wait(10):
        raise RuntimeError("the gated sink did not start")
    sink: GatedSink = state["sink"]
    try:
        yield sink
    finally:
        for gate in sink.gates.values():  # nothing may stay stuck at a gate
            loop.call_soon_threadsafe(gate.set)
        loop.call_soon_threadsafe(state["server"].close)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()


def _config(path: Path, port: int, extra: str = "") -> Path:
    path.write_text(f"relay:\n  out: {{type: static, host: 127.0.0.1, port: {port}}}\n{extra}", encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def sink() -> Iterator[GatedSink]:
    with gated_sink("gate@example.net", "hold@example.net", "stall@example.net", "queue@example.net") as running:
        yield running


@pytest.fixture(scope="module")
def relay(sink: GatedSink, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """The service with the default batch settings (concurrency 16)."""
    with service(_config(tmp_path_factory.mktemp("batch") / "mailrelay.yaml", sink.port)) as running:
        yield running


@pytest.fixture(scope="module")
def small(sink: GatedSink, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    """Small bounds, one delivery at a time per batch, and an API key."""
    extra = "mailrelay:\n  batch: {concurrency: 1, max_lines: 3, max_line_bytes: 2048}\n"
    config = _config(tmp_path_factory.mktemp("small") / "mailrelay.yaml", sink.port, extra)
    with service(config, {"MAILRELAY_API_KEYS": "batch-secret-key-0001"}) as running:
        yield running


def line(*recipients: str, key: str | None = None, subject: str = "batch") -> bytes:
    body: dict[str, Any] = {
        "sender": "app@example.com",
        "recipients": list(recipients),
        "message": f"From: app@example.com\r\nSubject: {subject}\r\n\r\n{'x' * 900}\r\n",
    }
    if key:
        body["idempotency_key"] = key
    return json.dumps(body).encode()


def expected_status(recipients: tuple[str, ...]) -> int:
    if recipients == ("perm@example.net",):
        return 400
    if recipients == ("temp@example.net",):
        return 503
    return 207 if len(recipients) > 1 else 200


def test_a_batch_of_100_streams_each_result_as_it_finishes(relay: Service, sink: GatedSink) -> None:
    """Line 0 is held at the sink until 98 other lines were answered; a malformed line and an
    invalid one are answered 422 while the others go on; every outcome is that of /deliver."""
    kinds: list[tuple[str, ...]] = [
        ("ok@example.net",),
        ("perm@example.net",),
        ("temp@example.net",),
        ("ok@example.net", "perm@example.net"),
    ]
    lines: list[bytes] = []
    expected: dict[int, int] = {}
    for index in range(100):
        if index == 0:
            recipients: tuple[str, ...] = ("gate@example.net",)
        else:
            recipients = kinds[index % 4]
        lines.append(line(*recipients, subject=f"line {index}"))
        expected[index] = 200 if index == 0 else expected_status(recipients)
    lines[37] = b'{"sender": "app@example.com", "recipients": ['  # not JSON
    lines[61] = json.dumps({"sender": "app@example.com", "recipients": ["a\r\nRSET@x"], "message": "x"}).encode()
    expected[37] = expected[61] = 422
    # The compose form in a line: the message is built as /deliver builds it; Bcc only in the envelope.
    content = {"from": "app@example.com", "to": ["ok@example.net"], "bcc": ["hidden@example.net"]}
    lines[50] = json.dumps({"content": {**content, "subject": "line 50", "text": "composed"}}).encode()
    expected[50] = 200
    before = len(sink.messages)

    answers: list[dict[str, Any]] = []
    with (
        httpx.Client(base_url=relay.url, timeout=30) as client,
        client.stream("POST", "/relays/out/deliveries", content=b"\n".join(lines) + b"\n", headers=NDJSON) as answer,
    ):
        assert answer.status_code == 200
        assert answer.headers["content-type"] == "application/x-ndjson"
        stream = answer.iter_lines()
        while len(answers) < 99:
            answers.append(json.loads(next(stream)))
        # Every line but the gated one has been answered while it still runs: streamed, in completion order.
        assert 0 not in {a["index"] for a in answers}
        sink.open("gate@example.net")
        rest = [json.loads(text) for text in stream if text]

    assert [a["index"] for a in rest[:1]] == [0]
    done = rest[-1]
    answers += rest[:-1]
    assert sorted(a["index"] for a in answers) == list(range(100))
    assert {a["index"]: a["status"] for a in answers} == expected
    assert done == {"done": True, "answered": 100, "statuses": done["statuses"]}
    assert sum(done["statuses"].values()) == 100

    by_index = {a["index"]: a for a in answers}
    assert by_index[37]["problem"]["status"] == 422
    assert by_index[37]["problem"]["errors"][0]["loc"] == "line"
    assert by_index[61]["problem"]["errors"][0]["loc"] == "recipients[0]"
    assert by_index[0]["result"]["recipients"][0]["status"] == "delivered"
    assert by_index[2]["result"]["recipients"][0]["reply"]["code"] == 451
    assert by_index[2]["retry_after"] == 60
    assert by_index[3]["result"]["status"] == "partial"
    assert by_index[1]["result"]["recipients"][0]["reply"]["message"] == "5.1.1 no such user"
    # What reached the sink: one message per line with a delivered recipient, nothing more.
    delivered = sum(1 for a in answers if a["status"] in (200, 207))
    assert len(sink.messages) - before == delivered
    [(composed_to, composed)] = [m for m in sink.messages[before:] if b"Subject: line 50" in m[1]]
    assert composed_to == ["ok@example.net", "hidden@example.net"]
    assert b"hidden@example.net" not in composed
    assert by_index[50]["result"]["message_id"]
    subjects = sorted(int(m.split(b"Subject: line ")[1].split(b"\r\n")[0]) for _, m in sink.messages[before:])
    assert subjects == sorted(i for i, a in by_index.items() if a["status"] in (200, 207))


def test_concurrent_batches_share_the_concurrency_within_the_relays_waiting_bound(
    relay: Service, sink: GatedSink
) -> None:
    """8 batches at once on a relay with the default 5 connections and max_waiting 100: with 16
    deliveries each, 128 ran and 123 waited for a connection, and the pool failed those past 100 at
    once (451 4.4.5) where 8 single requests would all have been delivered. Batches to one relay now
    share `concurrency` (each at least one), so every line is delivered once the sink moves on."""
    batches, per_batch = 8, 20
    before = sink.count("queue@example.net")
    answered = threading.Event()
    results: list[list[dict[str, Any]]] = [[] for _ in range(batches)]

    def post(number: int) -> None:
        body = b"\n".join(line("queue@example.net", subject=f"queued {number}") for _ in range(per_batch)) + b"\n"
        with (
            httpx.Client(base_url=relay.url, timeout=60) as client,
            client.stream("POST", "/relays/out/deliveries", content=body, headers=NDJSON) as answer,
        ):
            for text in answer.iter_lines():
                if text:
                    results[number].append(json.loads(text))
                    answered.set()

    threads = [threading.Thread(target=post, args=(n,)) for n in range(batches)]
    for thread in threads:
        thread.start()
    # Every delivery is held at the sink's RCPT: nothing is answered before the gate opens, unless it
    # was refused without being tried (before, about 30 lines were answered 451 within milliseconds).
    answered.wait(3)
    sink.open("queue@example.net")
    for thread in threads:
        thread.join(60)
    statuses = Counter(a["status"] for answers in results for a in answers if "index" in a)
    failed = {a["result"]["recipients"][0]["reply"]["message"] for r in results for a in r if a.get("status") == 503}
    assert statuses == {200: batches * per_batch}, failed
    assert sink.count("queue@example.net") - before == batches * per_batch


def _post(service: Service, body: bytes, headers: dict[str, str] | None = None) -> httpx.Response:
    auth = {"Authorization": "Bearer batch-secret-key-0001"}
    return httpx.post(
        f"{service.url}/relays/out/deliveries", content=body, headers={**NDJSON, **auth, **(headers or {})}, timeout=30
    )


def _lines(response: httpx.Response) -> list[dict[str, Any]]:
    return [json.loads(text) for text in response.text.splitlines() if text]


def test_lines_past_max_lines_and_longer_than_max_line_bytes(small: Service) -> None:
    long = line("ok@example.net", subject="y" * 3000)
    body = b"\n".join([line("ok@example.net"), long, b"", line("ok@example.net"), line("ok@example.net"), b"x"])
    answers = _lines(_post(small, body))
    done = answers.pop()
    # Line 2 is blank (no answer); line 4 is the fourth delivery line, past max_lines 3: not read on.
    assert {a["index"]: a["status"] for a in answers} == {0: 200, 1: 413, 3: 200, 4: 413}
    by_index = {a["index"]: a for a in answers}
    assert "longer than 2048 bytes" in by_index[1]["problem"]["detail"]
    assert "more than 3 lines" in by_index[4]["problem"]["detail"]
    assert done["answered"] == 4


def test_the_whole_request_is_refused_before_any_line(small: Service) -> None:
    body = line("ok@example.net")
    unauthenticated = httpx.post(f"{small.url}/relays/out/deliveries", content=body, headers=NDJSON, timeout=10)
    assert unauthenticated.status_code == 401
    assert unauthenticated.headers["content-type"] == "application/problem+json"
    assert _post(small, body, {"Content-Type": "application/json"}).status_code == 415
    keyed = _post(small, body, {"Idempotency-Key": "k"})
    assert keyed.status_code == 422
    assert keyed.json()["errors"][0]["loc"] == "Idempotency-Key"
    assert _post(small, body, {"X-Delivery-Timeout": "soon"}).status_code == 422
    missing = httpx.post(
        f"{small.url}/relays/nope/deliveries",
        content=body,
        headers={**NDJSON, "Authorization": "Bearer batch-secret-key-0001"},
        timeout=10,
    )
    assert missing.status_code == 404


def test_a_keyed_line_is_replayed_by_a_repeated_batch(small: Service, sink: GatedSink) -> None:
    body = line("ok@example.net", key=f"{KEY}-replay", subject="keyed replay") + b"\n"
    first, second = _lines(_post(small, body)), _lines(_post(small, body))
    assert first[0]["status"] == second[0]["status"] == 200
    assert "replayed" not in first[0]
    assert second[0]["replayed"] is True
    assert second[0]["result"] == first[0]["result"]
    assert sum(b"keyed replay" in m for _, m in sink.messages) == 1


def test_a_keyed_line_replayed_by_deliver_has_its_smtp_reply_header(small: Service, sink: GatedSink) -> None:
    """A batch line's answer is made without X-Smtp-Reply (its result line has no headers), but a keyed
    one is stored for any later request with its key: /deliver replays it with the header."""
    key = f"{KEY}-to-deliver"
    body = line("ok@example.net", key=key, subject="keyed then deliver")
    [first, _done] = _lines(_post(small, body + b"\n"))
    assert first["status"] == 200
    request = {k: v for k, v in json.loads(body).items() if k != "idempotency_key"}
    replay = httpx.post(
        f"{small.url}/relays/out/deliver",
        json=request,
        headers={"Authorization": "Bearer batch-secret-key-0001", "Idempotency-Key": key},
        timeout=10,
    )
    assert replay.status_code == 200
    assert replay.json() == first["result"]
    assert replay.headers["X-Smtp-Reply"].startswith("250; message=")
    assert sum(b"keyed then deliver" in m for _, m in sink.messages) == 1


def test_a_line_whose_key_is_null_has_no_key(relay: Service, sink: GatedSink) -> None:
    # `"idempotency_key": null` is the field's default said out loud: delivered unkeyed. It was a 500 line
    # (pydantic applied the key's max_length to None and raised a TypeError, not a validation error).
    message = base64.b64encode(b"From: app@example.com\r\nSubject: null key\r\n\r\nx\r\n").decode()
    body = json.dumps(
        {
            "sender": "app@example.com",
            "recipients": ["ok@example.net"],
            "message_base64": message,
            "idempotency_key": None,
        }
    ).encode()
    answers = _lines(_post(relay, body + b"\n" + body.replace(b"null}", b'"x" }') + b"\n"))
    done = answers.pop()
    assert done["statuses"] == {"200": 2}, answers
    assert sum(b"null key" in m for _, m in sink.messages) == 2


def test_a_client_that_leaves_lets_running_deliveries_finish_and_starts_no_more(
    small: Service, sink: GatedSink
) -> None:
    """concurrency 1: line 0 runs (held at the sink), line 1 waits for room. The client leaves;
    line 0 still completes and its keyed result is stored; line 1 is never started."""
    held = line("hold@example.net", key=f"{KEY}-held", subject="held line")
    waiting = line("ok@example.net", key=f"{KEY}-waiting", subject="waiting line")
    body = held + b"\n" + waiting + b"\n"
    with (
        httpx.Client(base_url=small.url, timeout=30) as client,
        client.stream(
            "POST",
            "/relays/out/deliveries",
            content=body,
            headers={**NDJSON, "Authorization": "Bearer batch-secret-key-0001"},
        ) as answer,
    ):
        assert answer.status_code == 200  # the head comes at once; the client leaves without a line
    sink.open("hold@example.net")
    # The repeat: line 0 was finished and stored after the client left, line 1 was never sent.
    answers = {a["index"]: a for a in _lines(_post(small, body)) if "index" in a}
    for _ in range(100):  # until line 0's delivery, which the repeat waits for, has stored its result
        if answers[0]["status"] != 409:
            break
        time.sleep(0.1)
        answers = {a["index"]: a for a in _lines(_post(small, body)) if "index" in a}
    assert answers[0]["status"] == 200
    assert answers[0]["replayed"] is True
    assert answers[1]["status"] == 200
    assert "replayed" not in answers[1]
    assert sum(b"held line" in m for _, m in sink.messages) == 1
    assert sum(b"waiting line" in m for _, m in sink.messages) == 1


def test_a_body_that_comes_in_small_pieces_is_read_as_it_comes(relay: Service, sink: GatedSink) -> None:
    # Lines split across many body chunks, read by the workers as they need lines; blank lines count.
    lines = [line("ok@example.net", subject=f"piece {i}") for i in range(20)]
    body = b"\n".join(lines[:10]) + b"\n\n" + b"\n".join(lines[10:]) + b"\n"

    def pieces() -> Iterator[bytes]:
        for start in range(0, len(body), 700):
            time.sleep(0.005)
            yield body[start : start + 700]

    answers = _lines(httpx.post(f"{relay.url}/relays/out/deliveries", content=pieces(), headers=NDJSON, timeout=30))
    done = answers.pop()
    assert done["statuses"] == {"200": 20}
    assert sorted(a["index"] for a in answers) == [*range(10), *range(11, 21)]
    assert all(sum(f"piece {i}\r".encode() in m for _, m in sink.messages) == 1 for i in range(20))


def test_x_delivery_timeout_bounds_each_delivery_of_the_batch(relay: Service) -> None:
    """The header is each delivery's deadline (from its start), not the batch's: the stalled line is
    cut (503, 4.4.7) while the others are answered as usual."""
    body = b"\n".join([line("stall@example.net"), line("ok@example.net"), line("ok@example.net")])
    response = httpx.post(
        f"{relay.url}/relays/out/deliveries", content=body, headers={**NDJSON, "X-Delivery-Timeout": "1"}, timeout=30
    )
    answers = {a["index"]: a for a in _lines(response) if "index" in a}
    assert {i: a["status"] for i, a in answers.items()} == {0: 503, 1: 200, 2: 200}
    assert answers[0]["result"]["recipients"][0]["reply"]["enhanced_status"] == "4.4.7"
    assert [a["index"] for a in _lines(response) if "index" in a][-1] == 0  # answered last, as it finished


def test_waiting_workers_keep_to_a_share_that_shrank(tmp_path: Path) -> None:
    """A batch's workers waiting for its next chunk when another batch starts on the relay take no
    more lines than the batch's new share: past it, deliveries went over the relay's capacity and
    failed at once (451 4.4.5 too many waiting). Found by review (R7)."""
    with gated_sink("share@example.net") as sink:
        config = tmp_path / "mailrelay.yaml"
        config.write_text(
            f"relay:\n  out: {{type: static, host: 127.0.0.1, port: {sink.port}, concurrent_connections: 1, "
            "max_waiting: 1}\nmailrelay:\n  batch: {concurrency: 2}\n",
            encoding="utf-8",
        )
        with service(config) as relay:
            second_chunk = threading.Event()
            answers: dict[str, list[dict[str, Any]]] = {"a": [], "b": []}

            def a_body() -> Iterator[bytes]:
                yield b"".join(line("ok@example.net", subject=f"a-first {i}") + b"\n" for i in range(2))
                second_chunk.wait(20)
                yield b"".join(line("share@example.net", subject=f"a-second {i}") + b"\n" for i in range(2))

            def post(name: str, body: Any) -> None:
                reply = httpx.post(f"{relay.url}/relays/out/deliveries", content=body, headers=NDJSON, timeout=60)
                answers[name].extend(json.loads(text) for text in reply.text.splitlines() if text)

            a = threading.Thread(target=post, args=("a", a_body()))
            a.start()
            for _ in range(200):  # A's first two lines delivered: its two workers wait for the next chunk
                if sum(b"a-first" in message for _, message in sink.messages) == 2:
                    break
                time.sleep(0.05)
            time.sleep(0.3)
            b = threading.Thread(target=post, args=("b", line("share@example.net", subject="b") + b"\n"))
            b.start()
            time.sleep(0.8)  # B's line holds the only connection at the gate: A's share is now 1
            second_chunk.set()
            time.sleep(1.0)
            sink.open("share@example.net")
            a.join(30)
            b.join(30)
    statuses = Counter(answer.get("status") for answer in answers["a"] if "index" in answer)
    assert statuses == {200: 4}, (statuses, answers)
    assert [answer.get("status") for answer in answers["b"] if "index" in answer] == [200]
