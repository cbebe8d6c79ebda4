"""The drain a load balancer sees (issue 16, items 1 and 2), with real processes.

After SIGTERM `/readyz` is 503 for `drain_delay` while deliveries are still served (each answer
with `Connection: close`); then the listener closes, new deliveries are refused and the running
ones get `shutdown_grace`; one still running then is answered like a deadline cut (451 4.4.7,
possibly_delivered), never uvicorn's bare 500; the process exits within drain_delay +
shutdown_grace + about a second. The rolling restart runs behind HAProxy configured as
docs/deployment.md says (its configuration is read from there), and nginx -t checks the nginx one.
"""

import asyncio
import collections
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from email import message_from_bytes
from pathlib import Path

import httpx
import pytest

from tests.servers.haproxy import haproxy
from tests.servers.mailrelay import ROOT
from tests.servers.process import free_port, require_program, traversable_tmpdir
from tests.servers.process import stop as stop_process
from tests.servers.smtp import Received, Script, smtp_server

DOCS = ROOT / "docs" / "deployment.md"
#: Slack over drain_delay + shutdown_grace for the process to answer, close and exit (the issue's bound).
EXIT_SLACK = 1.0
SERVE = (sys.executable, "-m", "app", "serve")


def _message(message_id: str) -> str:
    return f"Message-ID: <{message_id}>\r\nSubject: drain\r\n\r\nhello\r\n"


def _body(message_id: str = "m@test") -> dict[str, object]:
    return {"sender": "a@example.com", "recipients": ["b@example.net"], "message": _message(message_id)}


class Instance:
    """`mailrelay serve` on a fixed port (a restart comes back where the balancer expects it)."""

    def __init__(self, config: Path, port: int, *args: str) -> None:
        self.config, self.port, self.args = config, port, args
        self.url = f"http://127.0.0.1:{port}"
        self.log_path = config.parent / f"mailrelay-{port}.log"
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, workers: int = 1) -> None:
        """Started, and ready: `workers` processes have said their application started."""
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        with self.log_path.open("ab") as log:
            self.process = subprocess.Popen(  # noqa: S603
                [*SERVE, "--port", str(self.port), "--config", str(self.config), "--log-format", "json", *self.args],
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + 30
        while True:
            assert self.process.poll() is None, f"mailrelay exited: {self.logs()[-3000:]}"
            started = self.logs()[offset:].count("Application startup complete.")
            try:
                if started >= workers and httpx.get(f"{self.url}/readyz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, f"mailrelay not ready within 30 s: {self.logs()[-3000:]}"
            time.sleep(0.05)

    def sigterm(self) -> float:
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        return time.monotonic()

    def wait(self, timeout: float) -> int:
        assert self.process is not None
        return self.process.wait(timeout)

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def events(self) -> list[dict[str, object]]:
        lines = [json.loads(line) for line in self.logs().splitlines() if line.startswith("{")]
        return [line for line in lines if isinstance(line, dict)]


def _request(port: int, head: bytes, body: bytes, *, pause_after: int | None = None, pause: float = 0) -> bytes:
    """One HTTP/1.1 request on a new connection; with `pause_after`, the body stops there for
    `pause` seconds. Returns the whole response (the server closes the connection)."""
    with socket.create_connection(("127.0.0.1", port), timeout=15) as sock:
        sock.sendall(head)
        if pause_after is None:
            sock.sendall(body)
        else:
            sock.sendall(body[:pause_after])
            time.sleep(pause)
            sock.sendall(body[pause_after:])
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def _post_head(length: int, *, close: bool = False) -> bytes:
    connection = b"connection: close\r\n" if close else b""
    return (
        b"POST /relays/discard/deliver HTTP/1.1\r\nhost: t\r\ncontent-type: application/json\r\n"
        + connection
        + f"content-length: {length}\r\n\r\n".encode()
    )


def _status_and_headers(response: bytes) -> tuple[int, dict[str, str]]:
    head = response.split(b"\r\n\r\n", 1)[0].decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in head[1:])
    return int(head[0].split()[1]), {k.lower(): v for k, v in headers.items()}


TIMELINE = """\
relay:
  discard: {type: blackhole}
mailrelay:
  drain_delay: 1.5
  shutdown_grace: 3.0
"""


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_readyz_503_while_deliveries_are_served_then_refused_then_exit(tmp_path: Path, workers: int) -> None:
    config = tmp_path / "mailrelay.yaml"
    config.write_text(TIMELINE)
    instance = Instance(config, free_port(), "--workers", str(workers))
    instance.start(workers)
    drain_delay, grace = 1.5, 3.0
    try:
        body = json.dumps(_body()).encode()
        with httpx.Client(base_url=instance.url, timeout=10) as kept:  # one keep-alive connection
            assert kept.post("/relays/discard/deliver", json=_body()).status_code == 200
            # A request that starts before drain_delay ends and completes its body after it.
            late: dict[str, bytes] = {}
            started = instance.sigterm()
            first_503 = None
            while time.monotonic() - started < 1.0:
                if httpx.get(f"{instance.url}/readyz", timeout=1).status_code == 503:
                    first_503 = time.monotonic() - started
                    break
                time.sleep(0.02)
            assert first_503 is not None, "/readyz still 200 one second after SIGTERM"
            # With several workers every one of them says so (each new connection may reach another).
            assert {httpx.get(f"{instance.url}/readyz", timeout=1).status_code for _ in range(6)} == {503}
            served = [httpx.post(f"{instance.url}/relays/discard/deliver", json=_body(), timeout=5) for _ in range(3)]
            on_kept = kept.post("/relays/discard/deliver", json=_body())
            during = time.monotonic() - started
            wait = max(0.0, started + drain_delay - 0.4 - time.monotonic())
            time.sleep(wait)
            pending = threading.Thread(
                target=lambda: late.update(
                    response=_request(instance.port, _post_head(len(body)), body, pause_after=10, pause=1.3)
                )
            )
            pending.start()
            time.sleep(drain_delay + 0.4 - (time.monotonic() - started))
            try:
                after = httpx.post(f"{instance.url}/relays/discard/deliver", json=_body(), timeout=5).status_code
            except httpx.ConnectError:
                after = 0  # the listener is closed: a balancer retries this elsewhere
            pending.join(10)
        code = instance.wait(drain_delay + grace + EXIT_SLACK + 5)
        exited = time.monotonic() - started
    finally:
        instance.kill()
    assert during < drain_delay, "the deliveries during the drain delay took too long to test anything"
    assert [r.status_code for r in served] == [200, 200, 200], [r.text for r in served]
    assert on_kept.status_code == 200
    assert on_kept.headers["connection"] == "close"  # the client reconnects, through its balancer
    status, headers = _status_and_headers(late["response"])
    assert status == 503, late["response"]
    assert headers["content-type"] == "application/problem+json"
    assert headers["connection"] == "close"
    assert b"shutting down" in late["response"]
    assert after == 0  # the port is closed (by every worker, and the supervisor's copy too)
    assert code == 0, instance.logs()[-3000:]
    assert exited <= drain_delay + grace + EXIT_SLACK, f"exited {exited:.2f} s after SIGTERM"
    print(f"\nworkers={workers}: readyz 503 after {first_503:.3f} s, exit after {exited:.2f} s")  # noqa: T201
    if os.environ.get("DRAIN_DEBUG"):
        print(instance.logs())  # noqa: T201


def test_sigint_drains_without_the_delay(tmp_path: Path) -> None:
    """Ctrl+C: nothing balances a terminal, so no drain delay (the default 5 s here); the port
    closes at once and the process exits."""
    config = tmp_path / "mailrelay.yaml"
    config.write_text("relay:\n  discard: {type: blackhole}\n")
    instance = Instance(config, free_port())
    instance.start()
    try:
        assert instance.process is not None
        instance.process.send_signal(signal.SIGINT)
        started = time.monotonic()
        code = instance.wait(10)
        exited = time.monotonic() - started
    finally:
        instance.kill()
    assert code == 0
    assert exited < EXIT_SLACK, f"exited {exited:.2f} s after SIGINT"
    assert [e["event"] for e in instance.events() if e["event"] in ("draining", "drained")] == ["draining", "drained"]


STUCK = """\
relay:
  next:
    type: static
    host: 127.0.0.1
    port: {port}
mailrelay:
  drain_delay: {drain_delay}
  shutdown_grace: {grace}
"""


@pytest.mark.parametrize("how", ["grace_ends", "second_sigterm", "after_reload"])
def test_a_delivery_still_running_when_the_grace_ends_is_answered_451_possibly_delivered(
    tmp_path: Path, how: str
) -> None:
    """The next hop took the message data and never answers the final ".": when the grace runs out
    (or a second SIGTERM says not to wait) the client gets a deadline-cut answer naming the
    shutdown, not uvicorn's bare 500. `after_reload`: the delivery runs on a configuration that a
    SIGHUP replaced (whose relays it keeps for that configuration's own 10 s grace): cut too."""
    drain_delay, grace = (5.0, 30.0) if how == "second_sigterm" else (0.5, 1.5)
    # The second SIGTERM comes 0.3 s after the first: the cut then, not 35 s later.
    cut_at = 0.3 if how == "second_sigterm" else drain_delay + grace
    with smtp_server(Script(data_delay=60)) as sink:
        config = tmp_path / "mailrelay.yaml"
        old_grace = 10.0 if how == "after_reload" else grace
        config.write_text(STUCK.format(port=sink.port, drain_delay=drain_delay, grace=old_grace))
        instance = Instance(config, free_port())
        instance.start()
        try:
            answer: dict[str, httpx.Response] = {}
            stuck = threading.Thread(
                target=lambda: answer.update(
                    response=httpx.post(f"{instance.url}/relays/next/deliver", json=_body("stuck@test"), timeout=30)
                )
            )
            stuck.start()
            deadline = time.monotonic() + 10
            while not sink.received:
                assert time.monotonic() < deadline, "the sink never got the message"
                time.sleep(0.02)
            if how == "after_reload":
                config.write_text(STUCK.format(port=sink.port, drain_delay=drain_delay, grace=grace))
                assert instance.process is not None
                instance.process.send_signal(signal.SIGHUP)
                while '"result":"success"' not in instance.logs():
                    assert time.monotonic() < deadline, "no reload"
                    time.sleep(0.02)
            started = instance.sigterm()
            if how == "second_sigterm":
                time.sleep(cut_at)
                instance.sigterm()
            stuck.join(cut_at + EXIT_SLACK + 10)
            answered = time.monotonic() - started
            code = instance.wait(10)
            exited = time.monotonic() - started
        finally:
            instance.kill()
    response = answer["response"]
    assert response.status_code == 503, response.text
    assert response.headers["content-type"] == "application/json"
    result = response.json()
    [recipient] = result["recipients"]
    assert recipient["reply"]["code"] == 451
    assert recipient["reply"]["enhanced_status"] == "4.4.7"
    assert "shut down" in recipient["reply"]["message"]
    assert recipient["possibly_delivered"] is True
    assert response.headers["x-smtp-reply"].startswith("451")
    assert cut_at - 0.2 <= answered <= cut_at + EXIT_SLACK
    assert code == 0
    assert exited <= cut_at + EXIT_SLACK, f"exited {exited:.2f} s after SIGTERM"
    print(f"\ncut answered {answered:.2f} s after SIGTERM, exit after {exited:.2f} s")  # noqa: T201


# The rolling restart, behind the documented HAProxy configuration.

ROLLING = """\
relay:
  sink:
    type: static
    host: 127.0.0.1
    port: {port}
mailrelay:
  drain_delay: {drain_delay}
  shutdown_grace: 2
"""


def _docs_block(language: str) -> str:
    """The first ```<language> block of docs/deployment.md."""
    match = re.search(rf"^```{language}\n(.*?)^```", DOCS.read_text(), re.MULTILINE | re.DOTALL)
    assert match, f"no ```{language} block in {DOCS}"
    return match.group(1)


def _haproxy_sections(bind: str, servers: dict[str, int]) -> str:
    """The documented configuration from `defaults` on, listening on `bind`, with our servers."""
    text = _docs_block("haproxy")
    text = text[text.index("\ndefaults") + 1 :]
    lines: list[str] = []
    for line in text.splitlines():
        words = line.split()
        if words[:1] == ["bind"]:
            line = f"    bind {bind}"
        elif words[:1] == ["server"]:
            if lines[-1].split()[:1] == ["server"]:
                continue
            lines.extend(f"    server {name} 127.0.0.1:{port} check" for name, port in servers.items())
            continue
        lines.append(line)
    return "\n".join(lines) + "\n"


def _backend_name(sections: str) -> str:
    match = re.search(r"^backend (\S+)", sections, re.MULTILINE)
    assert match
    return match.group(1)


async def _send_steadily(url: str, stop: asyncio.Event, outcomes: list[tuple[str, str]]) -> None:
    """One of the client's workers: deliveries one after another through the balancer, each with
    its own Message-ID; an outcome is ("ok", id) or (what went wrong, id)."""
    async with httpx.AsyncClient(base_url=url, timeout=30) as client:
        while not stop.is_set():
            message_id = f"{os.urandom(8).hex()}@rolling.test"
            try:
                response = await client.post("/relays/sink/deliver", json=_body(message_id))
            except httpx.HTTPError as exc:
                outcomes.append((f"{type(exc).__name__}: {exc}", message_id))
                continue
            if response.status_code == 200:
                outcomes.append(("ok", message_id))
            else:
                outcomes.append((f"{response.status_code} {response.text[:200]}", message_id))


@pytest.fixture
def rolling_tmp() -> Iterator[Path]:
    directory = traversable_tmpdir("rolling")
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


async def test_rolling_restart_behind_haproxy_loses_nothing_duplicates_nothing_shows_no_error(
    rolling_tmp: Path,
) -> None:
    """Two instances behind HAProxy (checks every 1 s, fall 2, as documented); one gets SIGTERM
    under load from four concurrent senders and is started again. Every request succeeds and
    every acknowledged message reaches the next hop exactly once."""
    drain_delay = 3.0  # above HAProxy's inter 1s x fall 2, with room for a check's own time
    with smtp_server(Script(data_delay=0.15)) as sink:  # a next hop that takes its time, as real ones do
        config = rolling_tmp / "mailrelay.yaml"
        config.write_text(ROLLING.format(port=sink.port, drain_delay=drain_delay))
        ports = {"mailrelay1": free_port(), "mailrelay2": free_port()}
        instances = {name: Instance(config, port) for name, port in ports.items()}
        for instance in instances.values():
            instance.start()
        front = free_port("127.0.0.79")
        sections = _haproxy_sections(f"127.0.0.79:{front}", ports)
        backend = _backend_name(sections)
        try:
            with haproxy(sections) as balancer:
                await asyncio.to_thread(balancer.wait_states, backend, {"mailrelay1": "UP", "mailrelay2": "UP"})
                stop = asyncio.Event()
                outcomes: list[tuple[str, str]] = []
                senders = [
                    asyncio.create_task(_send_steadily(f"http://127.0.0.79:{front}", stop, outcomes)) for _ in range(4)
                ]
                await asyncio.sleep(1.0)
                restarted = instances["mailrelay1"]
                started = restarted.sigterm()
                down = await asyncio.to_thread(
                    balancer.wait_states, backend, {"mailrelay1": "DOWN", "mailrelay2": "UP"}, 10
                )
                await asyncio.to_thread(restarted.wait, drain_delay + 2 + EXIT_SLACK + 5)
                exited = time.monotonic() - started
                await asyncio.to_thread(restarted.start)
                up = await asyncio.to_thread(balancer.wait_states, backend, {"mailrelay1": "UP", "mailrelay2": "UP"})
                await asyncio.sleep(1.0)  # both serve again
                stop.set()
                await asyncio.gather(*senders)
                log = balancer.log()
        finally:
            for instance in instances.values():
                instance.kill()
        print(  # noqa: T201
            f"\nmailrelay1 DOWN at HAProxy {down:.2f} s after SIGTERM, exited after {exited:.2f} s, "
            f"UP again {up:.2f} s after its restart"
        )
        _check_rolling(outcomes, sink.received, log)
    assert exited <= drain_delay + 2 + EXIT_SLACK


def _check_rolling(outcomes: list[tuple[str, str]], received: list[Received], log: str) -> None:
    """No client-visible error; every acknowledged message at the next hop exactly once."""
    counts = collections.Counter(message_from_bytes(r.content).get("Message-ID", "").strip("<>") for r in received)
    errors = [what for what, _ in outcomes if what != "ok"]
    acknowledged = [message_id for what, message_id in outcomes if what == "ok"]
    print(f"{len(outcomes)} requests, {len(errors)} errors, {len(received)} messages at the sink")  # noqa: T201
    assert errors == [], f"{len(errors)} client-visible errors, first: {errors[:3]}\n{log[-3000:]}"
    assert len(acknowledged) > 40, "too little load to show anything"
    assert [m for m in acknowledged if counts[m] != 1] == [], "acknowledged but not at the sink exactly once"
    assert sum(counts.values()) == len(acknowledged), "the sink got messages nobody acknowledged"


def _nginx_config(directory: Path, listen: str, servers: dict[str, int]) -> Path:
    """The nginx block of docs/deployment.md in a minimal main context, listening on `listen`,
    its upstream servers (their parameters kept) replaced by ours."""
    lines: list[str] = []
    for line in _docs_block("nginx").splitlines():
        words = line.split()
        if words[:1] == ["listen"]:
            line = f"    listen {listen};"
        elif words[:1] == ["server"] and len(words) > 1 and ":" in words[1]:
            if lines[-1].split()[:1] == ["server"]:
                continue
            parameters = " ".join(words[2:])
            lines.extend(f"    server 127.0.0.1:{port} {parameters}" for port in servers.values())
            continue
        lines.append(line)
    config = directory / "nginx.conf"
    config.write_text(
        textwrap.dedent(f"""\
        pid {directory}/nginx.pid;
        error_log {directory}/error.log info;
        worker_processes 1;
        events {{}}
        http {{
            access_log {directory}/access.log;
            client_body_temp_path {directory}/body;
            proxy_temp_path {directory}/proxy;
        """)
        + textwrap.indent("\n".join(lines) + "\n", "    ")
        + "}\n"
    )
    return config


def test_the_documented_nginx_configuration_is_valid() -> None:
    """`nginx -t` on the nginx block of docs/deployment.md."""
    nginx = require_program("nginx", "/usr/sbin/nginx")
    directory = traversable_tmpdir("nginx")
    try:
        config = _nginx_config(directory, "127.0.0.80:8080", {"a": 8081, "b": 8082})
        result = subprocess.run([nginx, "-t", "-c", str(config), "-p", str(directory)], capture_output=True, text=True)  # noqa: S603
        assert result.returncode == 0, result.stderr + config.read_text()
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def _start_nginx(nginx: str, config: Path, url: str) -> subprocess.Popen[bytes]:
    """nginx in the foreground, ready once it passes /readyz on to a backend."""
    process = subprocess.Popen(  # noqa: S603
        [nginx, "-c", str(config), "-p", str(config.parent), "-g", "daemon off;"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while True:
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return process
        except httpx.TransportError:
            pass
        assert process.poll() is None, (config.parent / "error.log").read_text()
        assert time.monotonic() < deadline, "nginx not ready within 10 s"
        time.sleep(0.05)


async def test_rolling_restart_behind_nginx_loses_nothing_duplicates_nothing_shows_no_error(
    rolling_tmp: Path,
) -> None:
    """The same rolling restart behind the documented nginx configuration, which does not read
    /readyz: the drain delay serves what still comes, then the closed port makes nginx pass each
    request to the other server; the default drain_delay (5 s) outlasts nginx's idle upstream
    connections (4 s), so none is reused once the port is closed."""
    nginx = require_program("nginx", "/usr/sbin/nginx")
    drain_delay = 5.0
    with smtp_server(Script(data_delay=0.15)) as sink:
        config = rolling_tmp / "mailrelay.yaml"
        config.write_text(ROLLING.format(port=sink.port, drain_delay=drain_delay))
        ports = {"mailrelay1": free_port(), "mailrelay2": free_port()}
        instances = {name: Instance(config, port) for name, port in ports.items()}
        front = free_port("127.0.0.80")
        nginx_conf = _nginx_config(rolling_tmp, f"127.0.0.80:{front}", ports)
        process = None
        try:
            for instance in instances.values():
                instance.start()
            url = f"http://127.0.0.80:{front}"
            process = await asyncio.to_thread(_start_nginx, nginx, nginx_conf, url)
            stop = asyncio.Event()
            outcomes: list[tuple[str, str]] = []
            senders = [asyncio.create_task(_send_steadily(url, stop, outcomes)) for _ in range(4)]
            await asyncio.sleep(1.0)
            restarted = instances["mailrelay1"]
            started = restarted.sigterm()
            await asyncio.to_thread(restarted.wait, drain_delay + 2 + EXIT_SLACK + 5)
            exited = time.monotonic() - started
            await asyncio.to_thread(restarted.start)
            await asyncio.sleep(1.0)
            stop.set()
            await asyncio.gather(*senders)
            log = (rolling_tmp / "error.log").read_text()
        finally:
            if process is not None:
                stop_process(process)
            for instance in instances.values():
                instance.kill()
        print(f"\nmailrelay1 exited {exited:.2f} s after SIGTERM")  # noqa: T201
        _check_rolling(outcomes, sink.received, log)
