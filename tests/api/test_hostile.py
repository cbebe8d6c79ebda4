"""Hostile clients: oversized or endless requests, injection attempts, huge envelopes."""

import base64
import contextlib
import json
import socket
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.conftest import SCRIPTED_YAML, config_from
from tests.servers.mailrelay import Service, service
from tests.servers.smtp import smtp_server

BODY = {"sender": "a@example.com", "recipients": ["b@example.net"], "message": "Subject: x\r\n\r\nhi\r\n"}


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    config = tmp_path_factory.mktemp("hostile") / "mailrelay.yaml"
    config.write_text("relay:\n  blackhole: {type: blackhole}\nmailrelay: {body_timeout: 0.5}\n", encoding="utf-8")
    with service(config) as served:
        yield served


def exchange(served: Service, request: bytes, *, pause_after: float = 0.0, read_timeout: float = 10) -> bytes:
    """Send raw bytes, then read the whole answer (until the server closes or stops talking)."""
    port = int(served.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=read_timeout) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(request)  # may be refused mid-send; the answer is still readable
        time.sleep(pause_after)
        answer = b""
        try:
            while chunk := sock.recv(65536):
                answer += chunk
        except (TimeoutError, ConnectionResetError):
            pass
        return answer


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


def test_a_huge_header_line_is_refused_with_431(running: Service) -> None:
    answer = exchange(running, b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 2_000_000 + b"\r\n\r\n")
    assert status_of(answer) == 431
    assert b"application/problem+json" in answer


def test_too_many_headers_are_refused_with_431(running: Service) -> None:
    answer = exchange(running, b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * 100_000 + b"\r\n")
    assert status_of(answer) == 431


def test_a_head_that_never_ends_gets_408_and_the_connection_closed(running: Service) -> None:
    started = time.monotonic()
    answer = exchange(running, b"POST /relays/blackhole/deliver HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    assert status_of(answer) == 408
    assert time.monotonic() - started < 5


def test_a_body_that_never_finishes_gets_408_and_nothing_is_delivered(running: Service) -> None:
    started = time.monotonic()
    head = (
        b"POST /relays/blackhole/deliver HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000\r\n\r\n"
    )
    answer = exchange(running, head + b'{"sender": "a@example.com", ')
    assert status_of(answer) == 408
    assert b"stopped arriving" in answer
    assert time.monotonic() - started < 5
    # Counted as what the client got, not as the disconnect the application then saw.
    metrics = exchange(running, b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").decode()
    assert any(
        line.startswith("mailrelay_http_requests_total{")
        and "/relays/{name}/deliver" in line
        and 'status="408"' in line
        for line in metrics.splitlines()
    )


def test_a_slow_but_moving_body_is_not_cut_off(running: Service) -> None:
    # body_timeout is 0.5 s of silence, not 0.5 s in all: a byte every 0.2 s for 1.4 s is fine.
    body = json.dumps(BODY).encode()
    head = (
        b"POST /relays/blackhole/deliver HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
    )
    port = int(running.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(head)
        pieces = [body[i : i + len(body) // 7 + 1] for i in range(0, len(body), len(body) // 7 + 1)]
        for piece in pieces:
            time.sleep(0.2)
            sock.sendall(piece)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert status_of(answer) == 200, answer[:300]


def test_a_head_sent_a_byte_at_a_time_gets_408_all_the_same(running: Service) -> None:
    # Slowloris: the head must be complete body_timeout (0.5 s) after its first byte,
    # however often a byte comes.
    port = int(running.url.rsplit(":", 1)[1])
    started = time.monotonic()
    answer = b""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            for byte in b"POST /relays/blackhole/deliver HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
                sock.sendall(bytes([byte]))
                time.sleep(0.1)
                if time.monotonic() - started > 3:
                    break
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                answer += chunk
    assert status_of(answer) == 408
    assert time.monotonic() - started < 2


def test_a_pipelined_request_whose_body_stalls_gets_408(running: Service) -> None:
    # The second request's head comes with the first: it is queued behind it, and its
    # body is watched too once it is read.
    body = json.dumps(BODY).encode()
    first = (
        b"POST /relays/blackhole/deliver HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    second = (
        b"POST /relays/blackhole/deliver HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: 1000\r\n\r\n" + body[:10]
    )
    started = time.monotonic()
    answer = exchange(running, first + second)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    assert b"HTTP/1.1 408" in answer
    assert b"stopped arriving" in answer
    assert time.monotonic() - started < 5


def test_oversized_headers_on_a_kept_alive_connection_still_get_431(running: Service) -> None:
    port = int(running.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        first = sock.recv(65536)
        assert first.startswith(b"HTTP/1.1 200")
        answer = b""
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 200_000 + b"\r\n\r\n")
        with contextlib.suppress(ConnectionResetError):
            while chunk := sock.recv(65536):
                answer += chunk
    assert status_of(answer) == 431


def test_the_service_still_serves_after_hostile_clients(running: Service) -> None:
    answer = exchange(running, b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert status_of(answer) == 200
    logs = running.logs()
    assert "Traceback" not in logs
    # Nothing a client did is the service's error.
    assert not [line for line in logs.splitlines() if '"level":"error"' in line], logs[-2000:]


@pytest.mark.parametrize(
    "address",
    [
        "b@example.net\r\nRCPT TO:<evil@example.org>",
        "b@example.net\nDATA",
        "b@example.net\x00",
        "b@example.net\rX",
        "<b@example.net>",
        "b@example.net> NOTIFY=NEVER",
        "b @example.net",
    ],
)
def test_injection_attempts_in_addresses_are_422_in_both_forms(client: TestClient, address: str) -> None:
    response = client.post("/relays/scripted/deliver", json={**BODY, "recipients": [address]})
    assert response.status_code == 422
    raw = client.post(
        "/relays/scripted/deliver",
        content=b"Subject: x\r\n\r\nhi\r\n",
        headers={
            "Content-Type": "message/rfc822",
            "X-Envelope-Sender": base64.b64encode(b"a@example.com").decode(),
            "X-Envelope-Recipient": base64.b64encode(address.encode()).decode(),
        },
    )
    assert raw.status_code == 422


@pytest.mark.parametrize("ehlo", ["client.example\r\nMAIL FROM:<x@y>", "a\x00b", "a\nb"])
def test_injection_attempts_in_the_ehlo_are_422(client: TestClient, ehlo: str) -> None:
    response = client.post("/relays/scripted/deliver", json={**BODY, "client": {"ehlo": ehlo}})
    assert response.status_code == 422


def test_invalid_utf8_in_a_base64_address_is_422(client: TestClient) -> None:
    response = client.post(
        "/relays/scripted/deliver",
        content=b"Subject: x\r\n\r\nhi\r\n",
        headers={
            "Content-Type": "message/rfc822",
            "X-Envelope-Sender": base64.b64encode(b"\xff\xfe@example.com").decode(),
            "X-Envelope-Recipient": base64.b64encode(b"b@\xc3(.example").decode(),
        },
    )
    assert response.status_code == 422
    errors = {e["loc"]: e["message"] for e in response.json()["errors"]}
    assert errors == {
        "X-Envelope-Sender": "decoded value is not UTF-8",
        "X-Envelope-Recipient[0]": "decoded value is not UTF-8",
    }


def test_duplicate_recipients_each_get_a_result_in_order(make_client: Callable[[str], TestClient]) -> None:
    with smtp_server() as server:
        client = make_client(f"relay:\n  out: {{type: static, host: 127.0.0.1, port: {server.port}}}\n")
        recipients = ["b@example.net", "c@example.net", "b@example.net", "B@example.net"]
        response = client.post("/relays/out/deliver", json={**BODY, "recipients": recipients})
        (received,) = server.received
    assert response.status_code == 200
    assert [r["recipient"] for r in response.json()["recipients"]] == recipients
    assert received.recipients == recipients  # passed on as given: the next hop decides about duplicates


def test_ten_thousand_recipients_over_the_limit_are_refused_before_anything_is_sent(
    make_client: Callable[[str], TestClient],
) -> None:
    client = make_client("relay:\n  b: {type: blackhole}\n")
    recipients = [f"user{i}@example.net" for i in range(10_000)]
    response = client.post("/relays/b/deliver", json={**BODY, "recipients": recipients})
    assert response.status_code == 422
    assert response.json()["errors"] == [{"loc": "recipients", "message": "10000 recipients; the limit is 100"}]
    # With a small message limit the body itself is too large: 413, saying why.
    small = make_client("relay:\n  b: {type: blackhole}\nmailrelay: {max_message_size: 1000, max_recipients: 5}\n")
    response = small.post("/relays/b/deliver", json={**BODY, "recipients": recipients})
    assert response.status_code == 413
    assert "request body is larger than" in response.json()["detail"]


def test_ten_thousand_recipients_within_the_limit_are_delivered_in_both_forms(
    make_client: Callable[[str], TestClient],
) -> None:
    client = make_client("relay:\n  b: {type: blackhole}\nmailrelay: {max_recipients: 10000}\n")
    recipients = [f"user{i}@example.net" for i in range(10_000)]
    response = client.post("/relays/b/deliver", json={**BODY, "recipients": recipients})
    assert response.status_code == 200
    assert [r["recipient"] for r in response.json()["recipients"]] == recipients
    raw = client.post(
        "/relays/b/deliver",
        content=b"Subject: x\r\n\r\nhi\r\n",
        headers=[
            ("Content-Type", "message/rfc822"),
            ("X-Envelope-Sender", ""),
            *(("X-Envelope-Recipient", base64.b64encode(r.encode()).decode()) for r in recipients),
        ],
    )
    assert raw.status_code == 200
    assert len(raw.json()["recipients"]) == 10_000


_ANY_HEADER = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=80)
_FUZZ_CLIENT: dict[str, TestClient] = {}


def _fuzz_client() -> TestClient:
    # One app for every example: hypothesis runs hundreds.
    if "client" not in _FUZZ_CLIENT:
        from app.main import create_app

        client = TestClient(create_app(config_from(SCRIPTED_YAML)), raise_server_exceptions=False)
        client.__enter__()
        _FUZZ_CLIENT["client"] = client
    return _FUZZ_CLIENT["client"]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    authorization=st.none() | _ANY_HEADER,
    deadline=st.none() | _ANY_HEADER,
    key=st.none() | _ANY_HEADER,
    ehlo=st.none() | _ANY_HEADER,
)
def test_request_headers_never_answer_500(
    authorization: str | None, deadline: str | None, key: str | None, ehlo: str | None
) -> None:
    headers = {"Content-Type": "application/json"}
    for name, value in (
        ("Authorization", authorization),
        ("X-Delivery-Timeout", deadline),
        ("Idempotency-Key", key),
        ("X-Ehlo", ehlo),
    ):
        if value is not None:
            headers[name] = value
    response = _fuzz_client().post("/relays/blackhole/deliver", content=json.dumps(BODY).encode(), headers=headers)
    assert response.status_code in (200, 409, 422), response.text
    if response.status_code == 422:
        assert response.headers["content-type"] == "application/problem+json"


def teardown_module() -> None:
    client = _FUZZ_CLIENT.pop("client", None)
    if client is not None:
        client.__exit__(None, None, None)


def test_secrets_never_reach_responses_or_logs(tmp_path: Path) -> None:
    key = "operator-api-key-0123456789"
    password = "smtp-password-do-not-log"
    redis_password = "redis-password-do-not-log"
    config = tmp_path / "mailrelay.yaml"
    config.write_text(
        f"""\
relay:
  out:
    type: static
    host: 127.0.0.1
    port: 1
    credentials: {{username: relay-user, password: {password}}}
  piped:
    type: pipe
    args: [/bin/true]
    env: {{TOKEN: {password}}}
mailrelay:
  idempotency: {{backend: redis, redis_url: "redis://:{redis_password}@127.0.0.1:1/0"}}
""",
        encoding="utf-8",
    )
    with service(config, {"MAILRELAY_API_KEYS": key}, "--log-level", "debug") as served:
        import httpx

        auth = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=served.url, timeout=30) as http:
            answers = [
                http.get("/relays", headers=auth),
                http.get("/relays/out", headers=auth),
                http.get("/openapi.json"),
                http.post("/relays/out/deliver", json=BODY, headers=auth),
                http.post("/relays/out/deliver", json=BODY, headers={**auth, "Idempotency-Key": "k"}),
                http.post("/relays/out/deliver", json=BODY, headers={"Authorization": f"Bearer {key}x"}),
                http.get("/relays", headers={"Authorization": f"Bearer {password}"}),
            ]
        logs = served.logs()
    assert [a.status_code for a in answers] == [200, 200, 200, 503, 503, 401, 401]
    seen = logs + "".join(a.text + str(a.headers) for a in answers)
    for secret in (key, password, redis_password):
        assert secret not in seen
    assert "***" in answers[0].text
