"""Attacks on the HTTP front door (issue 14, items 1, 2, 13 and 15), each against a real service on
loopback, each asserting the bound: the connection is closed, memory stays put, /healthz answers fast,
nothing is logged at error level."""

import contextlib
import json
import re
import resource
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from app.main import MailrelayApp, create_app
from tests.conftest import config_from
from tests.servers.mailrelay import Service, service

BODY = json.dumps({"sender": "a@example.com", "recipients": ["b@example.net"], "message": "Subject: x\r\n\r\nhi\r\n"})


def port_of(served: Service) -> int:
    return int(served.url.rsplit(":", 1)[1])


def deliver_request(relay: str) -> bytes:
    return (
        f"POST /relays/{relay}/deliver HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(BODY)}\r\n\r\n{BODY}"
    ).encode()


def healthz_seconds(served: Service) -> float:
    """Seconds /healthz takes from a new connection; it must answer 200 (within 2 s, or fail)."""
    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port_of(served)), timeout=2) as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    return time.monotonic() - started


def rss_bytes(served: Service) -> int:
    status = Path(f"/proc/{served.process.pid}/status").read_text(encoding="ascii")
    match = re.search(r"^VmRSS:\s+(\d+) kB", status, re.MULTILINE)
    assert match, status
    return int(match.group(1)) * 1024


def closed_within(sock: socket.socket, seconds: float) -> bool:
    """True when the peer closes (or resets) `sock` within `seconds`, reading what it sends."""
    sock.settimeout(0.2)
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            if not sock.recv(65536):
                return True
        except TimeoutError:
            continue
        except ConnectionResetError:
            return True
    return False


def assert_clean_log(served: Service) -> str:
    logs = served.logs()
    errors = [line for line in logs.splitlines() if '"level":"error"' in line or " ERROR " in line]
    assert errors == [], errors[:3]
    assert "Traceback" not in logs
    return logs


def metric(served: Service, name: str) -> float:
    with socket.create_connection(("127.0.0.1", port_of(served)), timeout=5) as sock:
        sock.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    total = 0.0
    for line in answer.decode().splitlines():
        if line.startswith(name):
            total += float(line.rsplit(" ", 1)[1])
    return total


@contextlib.contextmanager
def fd_limit(soft: int) -> Iterator[None]:
    """This process's RLIMIT_NOFILE soft limit lowered while inside: a service started here inherits it."""
    old, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (old, hard))


def write_config(tmp_path: Path, settings: str = "{}", relays: str = "  blackhole: {type: blackhole}\n") -> Path:
    config = tmp_path / "mailrelay.yaml"
    config.write_text(f"relay:\n{relays}mailrelay: {settings}\n", encoding="utf-8")
    return config


# Item 1: silent connections, clients that stop reading, the fd limit.


def test_silent_connections_past_the_fd_limit_leave_healthz_fast(tmp_path: Path) -> None:
    # The reproduction: `ulimit -n 256` and 300 connections that never send a byte.
    with contextlib.ExitStack() as stack:
        with fd_limit(256):
            served = stack.enter_context(service(write_config(tmp_path)))
        silent = []
        for _ in range(300):
            sock = stack.enter_context(socket.create_connection(("127.0.0.1", port_of(served)), timeout=2))
            silent.append(sock)
        time.sleep(0.3)  # every one accepted (or shed) by now
        assert healthz_seconds(served) < 1
        assert healthz_seconds(served) < 1
        # A delivery works as well as /healthz.
        with socket.create_connection(("127.0.0.1", port_of(served)), timeout=2) as sock:
            sock.sendall(deliver_request("blackhole"))
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        assert metric(served, 'mailrelay_connections_shed_total{reason="idle_closed"}') >= 300 - 128
        logs = assert_clean_log(served)
    shed_lines = [line for line in logs.splitlines() if "connection limit" in line]
    assert 1 <= len(shed_lines) <= 3, shed_lines  # rate-limited, with the count
    assert re.search(r"\d+ connection", shed_lines[0]), shed_lines[0]


def test_past_the_connection_limit_with_none_idle_a_newcomer_gets_a_clean_503(tmp_path: Path) -> None:
    relays = '  slow: {type: pipe, args: [/bin/sh, -c, "sleep 1; cat >/dev/null"]}\n'
    with service(write_config(tmp_path, "{max_connections: 2}", relays)) as served, contextlib.ExitStack() as stack:
        busy = [stack.enter_context(socket.create_connection(("127.0.0.1", port_of(served)), timeout=5)) for _ in "ab"]
        for sock in busy:
            sock.sendall(deliver_request("slow"))
        time.sleep(0.3)  # both deliveries under way: no connection is idle
        with socket.create_connection(("127.0.0.1", port_of(served)), timeout=2) as sock:
            answer = b""
            with contextlib.suppress(ConnectionResetError):
                while chunk := sock.recv(65536):
                    answer += chunk
        assert answer.startswith(b"HTTP/1.1 503"), answer[:200]
        assert b"application/problem+json" in answer
        for sock in busy:  # the deliveries under way were not disturbed
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        assert metric(served, 'mailrelay_connections_shed_total{reason="refused"}') == 1
        assert_clean_log(served)


def test_a_silent_connection_is_closed_after_the_timeout(tmp_path: Path) -> None:
    with (
        service(write_config(tmp_path, "{body_timeout: 0.5}")) as served,
        socket.create_connection(("127.0.0.1", port_of(served)), timeout=2) as sock,
    ):
        started = time.monotonic()
        assert closed_within(sock, 5), "a connection that never sent a byte was held"
        assert time.monotonic() - started >= 0.4
        assert_clean_log(served)


def test_a_client_that_stops_reading_is_dropped(tmp_path: Path) -> None:
    requests = 300  # 300 x the OpenAPI document: more than every buffer on the way
    with service(write_config(tmp_path, "{send_timeout: 0.5}")) as served:
        sock = socket.socket()
        with sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.settimeout(5)
            sock.connect(("127.0.0.1", port_of(served)))
            with contextlib.suppress(OSError):
                sock.sendall(b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n" * requests)
            time.sleep(2)  # not reading: the service's send timeout (0.5 s) runs out
            assert healthz_seconds(served) < 1
            received = b""
            sock.settimeout(2)
            with contextlib.suppress(TimeoutError, ConnectionResetError):
                while chunk := sock.recv(65536):
                    received += chunk
        answered = received.count(b"HTTP/1.1 200")
        assert answered < requests, "the service waited for a client that did not read"
        assert metric(served, 'mailrelay_connections_shed_total{reason="send_timeout"}') == 1
        assert_clean_log(served)


# Item 2: pipelined request heads.


def test_an_endless_pipelined_header_is_cut_off_at_the_head_limit(tmp_path: Path) -> None:
    with service(write_config(tmp_path)) as served:
        before = rss_bytes(served)
        sock = socket.socket()
        sent = 0
        with sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 65536)
            sock.settimeout(1)
            sock.connect(("127.0.0.1", port_of(served)))
            # Answers the client never reads: the last one stays half written while the next head streams in.
            sock.sendall(b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n" * 200)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Endless: ")
            line = b"a" * 65536
            started = time.monotonic()
            healthz: list[float] = []
            closed = False
            try:
                while time.monotonic() - started < 4:
                    sock.sendall(line)
                    sent += len(line)
                    if sent % (1024 * 1024) == 0:
                        healthz.append(healthz_seconds(served))
            except (BrokenPipeError, ConnectionResetError):
                closed = True
            except TimeoutError:  # the service stopped reading: it must have closed as well
                closed = closed_within(sock, 2)
            growth = rss_bytes(served) - before
        assert closed, f"{sent} bytes of one header line were taken in {time.monotonic() - started:.1f} s"
        # What the kernel's buffers hold besides: the head limit is about 115 KB.
        assert sent < 8 * 1024 * 1024, f"{sent} bytes of one header line were taken in"
        assert growth < 8 * 1024 * 1024, f"RSS grew by {growth} bytes"
        assert all(seconds < 1 for seconds in healthz), healthz
        assert healthz_seconds(served) < 1
        assert_clean_log(served)


def test_a_head_whose_last_piece_comes_in_one_read_is_held_to_the_limit(tmp_path: Path) -> None:
    """The head just under the limit, then the rest of it (past the limit) in one read: the piece
    that completes a head was never counted, so a head one socket read over the limit was served."""
    from app.http_protocol import head_limit

    limit = head_limit(100)  # the default max_recipients
    line = b"X-Pad: " + b"a" * 990 + b"\r\n"
    first = b"GET /healthz HTTP/1.1\r\nHost: x\r\n" + line * ((limit - 2000) // len(line))
    rest = line * 60 + b"\r\n"
    assert len(first) < limit < len(first) + len(rest)
    with service(write_config(tmp_path)) as served, socket.create_connection(("127.0.0.1", port_of(served))) as sock:
        sock.settimeout(5)
        sock.sendall(first)
        time.sleep(0.3)  # read and counted: under the limit
        sock.sendall(rest)
        answer = sock.recv(65536)
        assert answer.startswith(b"HTTP/1.1 431"), answer[:80]
        assert_clean_log(served)


def test_endless_trailers_after_a_chunked_body_are_cut_off(tmp_path: Path) -> None:
    """Review: trailers (header lines after a chunked body's last chunk) were appended to the
    running request's headers without any limit: 210 MB in 1.4 s, RSS +240 MB."""
    with service(write_config(tmp_path)) as served:
        before = rss_bytes(served)
        sent = 0
        closed = False
        with socket.create_connection(("127.0.0.1", port_of(served)), timeout=1) as sock:
            sock.sendall(
                b"POST /relays/blackhole/deliver HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                b"Transfer-Encoding: chunked\r\n\r\n1\r\n{\r\n0\r\n"
            )
            trailer = b"X-T: " + b"a" * 8000 + b"\r\n"
            started = time.monotonic()
            try:
                while time.monotonic() - started < 4:
                    sock.sendall(trailer * 8)
                    sent += len(trailer) * 8
            except (BrokenPipeError, ConnectionResetError):
                closed = True
            except TimeoutError:
                closed = closed_within(sock, 2)
            growth = rss_bytes(served) - before
        assert closed, f"{sent} bytes of trailers were taken in {time.monotonic() - started:.1f} s"
        assert sent < 8 * 1024 * 1024, f"{sent} bytes of trailers were taken in"
        assert growth < 8 * 1024 * 1024, f"RSS grew by {growth} bytes"
        assert healthz_seconds(served) < 1
        assert_clean_log(served)


def test_a_pipelined_head_trickling_in_is_timed_too(tmp_path: Path) -> None:
    with service(write_config(tmp_path, "{body_timeout: 0.5}")) as served:
        sock = socket.socket()
        with sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            sock.settimeout(1)
            sock.connect(("127.0.0.1", port_of(served)))
            sock.sendall(b"GET /openapi.json HTTP/1.1\r\nHost: x\r\n\r\n" * 200)
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
            started = time.monotonic()
            closed = False
            try:
                while time.monotonic() - started < 5:  # a byte every 0.1 s: slowloris
                    sock.sendall(b"a")
                    time.sleep(0.1)
            except (BrokenPipeError, ConnectionResetError):
                closed = True
            held = time.monotonic() - started
        assert closed, "a pipelined head trickling in was held for 5 s"
        assert held < 3, held
        assert healthz_seconds(served) < 1
        assert_clean_log(served)


# Item 13: no client can make the service log an error or a traceback.


def test_clients_cannot_make_the_service_log_errors(tmp_path: Path) -> None:
    relays = (
        "  blackhole: {type: blackhole}\n"
        '  slow: {type: pipe, args: [/bin/sh, -c, "sleep 0.3; cat >/dev/null"]}\n'
        # Leaves a child holding its pipes: the output is drained for a second, then given up.
        '  held: {type: pipe, args: [/bin/sh, -c, "cat >/dev/null; (sleep 2 &); exit 0"]}\n'
    )
    with service(write_config(tmp_path, relays=relays)) as served:
        port = port_of(served)
        # Pipelined requests, then a close (and a reset) while the first is still being delivered.
        for reset in (False, True):
            with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
                sock.sendall(deliver_request("slow") * 3)
                time.sleep(0.05)
                if reset:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
        # Malformed request lines, many of them: at most a rate-limited warning with the peer.
        for _ in range(30):
            with socket.create_connection(("127.0.0.1", port), timeout=2) as sock:
                sock.sendall(b"GARBAGE\x01 / HTTP/9\r\n\r\n")
                assert sock.recv(65536).startswith(b"HTTP/1.1 400")
        # A command that keeps its pipes open.
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(deliver_request("held"))
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
        time.sleep(0.6)  # the slow deliveries end, and write to connections that are gone
        assert healthz_seconds(served) < 1
        logs = assert_clean_log(served)
    assert "_GatheringFuture" not in logs
    invalid = [line for line in logs.splitlines() if "invalid http request" in line.lower()]
    assert 1 <= len(invalid) <= 2, invalid
    assert "127.0.0.1" in invalid[0]


# Item 15: /docs and /redoc load no third-party script.


def test_the_api_pages_load_no_third_party_script() -> None:
    with TestClient(create_app_for("relay:\n  b: {type: blackhole}\n")) as client:
        for page in ("/docs", "/redoc"):
            response = client.get(page)
            assert response.status_code == 200
            html = response.text
            assert not re.search(r"""(src|href)\s*=\s*["']?(https?:)?//""", html), html
            assert "'self'" in response.headers["content-security-policy"]
            for asset in re.findall(r"""(?:src|href)\s*=\s*["']([^"']+)["']""", html):
                assert client.get(asset).status_code == 200, asset
        assert client.get("/openapi.json").status_code == 200


def test_the_api_pages_can_be_turned_off() -> None:
    with TestClient(create_app_for("relay:\n  b: {type: blackhole}\nmailrelay: {api_docs: false}\n")) as client:
        assert client.get("/docs").status_code == 404
        assert client.get("/redoc").status_code == 404
        assert client.get("/openapi.json").status_code == 200


def create_app_for(text: str) -> MailrelayApp:
    return create_app(config_from(text))


@pytest.fixture(autouse=True)
def _no_leftover_rlimit() -> Iterator[None]:
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    yield
    assert resource.getrlimit(resource.RLIMIT_NOFILE) == before


def test_connections_that_ask_for_an_upgrade_do_not_use_up_the_connection_limit(tmp_path: Path) -> None:
    # A connection handed to another protocol (a WebSocket) would leave the count it held.
    with service(write_config(tmp_path, "{max_connections: 4}")) as served:
        for _ in range(10):
            with socket.create_connection(("127.0.0.1", port_of(served)), timeout=2) as sock:
                sock.sendall(
                    b"GET /healthz HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                    b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n"
                )
                sock.recv(65536)
        time.sleep(0.2)
        assert healthz_seconds(served) < 1
        assert metric(served, "mailrelay_connections_shed_total") == 0
        assert_clean_log(served)


def test_a_pipelined_head_whose_end_straddles_two_reads_is_not_refused(tmp_path: Path) -> None:
    """rv10: a head that began after a message ended in the same read kept no tail, so when its
    blank line straddled that read and the next, the next read (the rest of the terminator plus
    a body larger than the head limit) was counted whole as head: a legitimate request got 431."""
    from app.http_protocol import head_limit

    limit = head_limit(100)
    body = b"a" * (limit + 10_000)
    first = b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n"
    second = b"POST /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
    with service(write_config(tmp_path)) as served, socket.create_connection(("127.0.0.1", port_of(served))) as sock:
        sock.settimeout(2)
        sock.sendall(first + second[:-1])  # the second head ends "\r\n\r": its last "\n" comes next
        time.sleep(0.3)
        # The service stopped while the rest is sent, so that it comes in one read, as it can.
        served.process.send_signal(signal.SIGSTOP)
        try:
            sock.sendall(second[-1:] + body)
            time.sleep(0.2)
        finally:
            served.process.send_signal(signal.SIGCONT)
        answers = b""
        with contextlib.suppress(OSError):
            while answers.count(b"HTTP/1.1 ") < 2 and (chunk := sock.recv(65536)):
                answers += chunk
        assert answers.startswith(b"HTTP/1.1 200"), answers[:80]
        assert b"HTTP/1.1 431" not in answers, answers[:400]
