"""A delivery's log line is handed to the OS before its answer is sent: `kill -9` right after
the last acknowledgement loses no line of an acknowledged delivery (issue 16, item 7).

A real `mailrelay serve` logs to a file (as under the bench) or to a pipe (as under a
container runtime); clients on a few threads deliver through the blackhole relay, each
request with its own X-Request-ID, and the process is killed the moment the N-th answer
arrives. Every request answered 200 must have its `delivery` line, by request id.
"""

import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

import httpx
import pytest

from tests.servers.mailrelay import ROOT, wait_ready
from tests.servers.process import free_port

CONFIG = "relay:\n  blackhole:\n    type: blackhole\n"
BODY = {"sender": "a@example.com", "recipients": ["b@example.net"], "message": "Subject: x\r\n\r\nhello\r\n"}
#: Acknowledged deliveries before the kill; threads sending at once (concurrent lines share writes).
DELIVERIES, THREADS = 400, 6


def serve(config: Path, output: "int | IO[bytes]") -> tuple["subprocess.Popen[bytes]", str]:
    port = free_port()
    process = subprocess.Popen(  # noqa: S603
        [sys.executable, "-m", "app", "serve", "--port", str(port), "--config", str(config), "--log-format", "json"],
        cwd=ROOT,
        stdout=output,
        stderr=subprocess.STDOUT,
    )
    return process, f"http://127.0.0.1:{port}"


def deliver_then_kill(process: "subprocess.Popen[bytes]", url: str) -> set[str]:
    """Request ids of the deliveries answered 200; the process is SIGKILLed as the last one arrives."""
    acknowledged: set[str] = set()
    lock = threading.Lock()
    killed = threading.Event()

    def client(number: int) -> None:
        with httpx.Client(base_url=url, timeout=10) as http:
            for i in range(DELIVERIES):
                if killed.is_set():
                    return
                request_id = f"t{number}-{i}"
                try:
                    reply = http.post("/relays/blackhole/deliver", json=BODY, headers={"X-Request-ID": request_id})
                except httpx.TransportError:
                    return  # killed while this one ran: not acknowledged
                if reply.status_code != 200:
                    continue
                with lock:
                    if killed.is_set():
                        acknowledged.add(request_id)  # answered before the kill took effect: it counts
                        return
                    acknowledged.add(request_id)
                    if len(acknowledged) >= DELIVERIES:
                        os.kill(process.pid, signal.SIGKILL)  # at once: no time for a late write
                        killed.set()

    threads = [threading.Thread(target=client, args=(n,)) for n in range(THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    process.wait(10)
    assert process.returncode == -signal.SIGKILL
    return acknowledged


def logged_ids(text: str) -> set[str]:
    ids = set()
    for line in text.splitlines():
        if line.startswith("{"):
            entry = json.loads(line)
            if entry.get("event") == "delivery":
                ids.add(entry["request_id"])
    return ids


@pytest.fixture
def config(tmp_path: Path) -> Path:
    path = tmp_path / "mailrelay.yaml"
    path.write_text(CONFIG)
    return path


@contextmanager
def started(config: Path, output: "int | IO[bytes]") -> Iterator[tuple["subprocess.Popen[bytes]", str]]:
    process, url = serve(config, output)
    try:
        wait_ready(url, process)  # type: ignore[arg-type]
        yield process, url
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()


def test_every_acknowledged_delivery_is_in_the_log_file_after_kill_9(config: Path, tmp_path: Path) -> None:
    log_path = tmp_path / "mailrelay.log"
    with log_path.open("wb") as log, started(config, log) as (process, url):
        acknowledged = deliver_then_kill(process, url)
    missing = acknowledged - logged_ids(log_path.read_text(errors="replace"))
    assert len(acknowledged) >= DELIVERIES
    assert not missing, f"{len(missing)} of {len(acknowledged)} acknowledged deliveries have no log line"


def test_every_acknowledged_delivery_is_in_the_log_pipe_after_kill_9(config: Path) -> None:
    read, write = os.pipe()
    chunks: list[bytes] = []
    # Read as it comes, so the pipe never fills; EOF once the service (the only writer left) is dead.
    thread = threading.Thread(target=lambda: chunks.extend(iter(lambda: os.read(read, 65536), b"")))
    try:
        with started(config, write) as (process, url):
            os.close(write)
            thread.start()
            acknowledged = deliver_then_kill(process, url)
        thread.join(10)
    finally:
        os.close(read)
    missing = acknowledged - logged_ids(b"".join(chunks).decode(errors="replace"))
    assert len(acknowledged) >= DELIVERIES
    assert not missing, f"{len(missing)} of {len(acknowledged)} acknowledged deliveries have no log line"
