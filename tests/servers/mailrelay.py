"""mailrelay itself, run as `python -m app serve` in a subprocess (uvicorn on uvloop, as in production)."""

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

from app.logs import FLUSH_INTERVAL
from tests.servers.process import free_port, stop

ROOT = Path(__file__).resolve().parent.parent.parent


class Server:
    def __init__(self, process: subprocess.Popen[str], port: int) -> None:
        self.process, self.url = process, f"http://127.0.0.1:{port}"


def start_server(config: Path | None, env: dict[str, str] | None = None) -> tuple[subprocess.Popen[str], int]:
    port = free_port()
    args = [sys.executable, "-m", "app", "serve", "--port", str(port)]
    if config:
        args += ["--config", str(config)]
    process = subprocess.Popen(  # noqa: S603
        args,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return process, port


def wait_ready(url: str, process: subprocess.Popen[str]) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"server exited with {process.returncode}: {process.communicate()[1]}")
        try:
            if httpx.get(f"{url}/readyz", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            time.sleep(0.05)
    raise AssertionError("server did not become ready within 20 s")


@dataclass
class Service:
    """A running mailrelay: its URL, its process, and everything it logged."""

    process: subprocess.Popen[bytes]
    url: str
    log_path: Path

    def logs(self) -> str:
        """The output so far, once it has stopped growing: the service writes its log lines in
        batches, up to FLUSH_INTERVAL apart."""
        size = -1
        for _ in range(20):
            current = self.log_path.stat().st_size
            if current == size:
                break
            size = current
            time.sleep(3 * FLUSH_INTERVAL)
        return self.log_path.read_text(encoding="utf-8", errors="replace")


@contextmanager
def service(config: Path, env: dict[str, str] | None = None, *args: str) -> Iterator[Service]:
    """mailrelay serving `config` on a free loopback port; its output goes to a file (a pipe could fill up)."""
    port = free_port()
    log_path = config.parent / f"mailrelay-{port}.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(  # noqa: S603
            [sys.executable, "-m", "app", "serve", "--port", str(port), "--config", str(config), *args],
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    running = Service(process, f"http://127.0.0.1:{port}", log_path)
    try:
        deadline = time.monotonic() + 20
        while True:
            if process.poll() is not None:
                raise AssertionError(f"mailrelay exited with {process.returncode}: {running.logs()[-3000:]}")
            try:
                if httpx.get(f"{running.url}/readyz", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"mailrelay was not ready within 20 s: {running.logs()[-3000:]}")
            time.sleep(0.05)
        yield running
    finally:
        # SIGINT: the drain without drain_delay (SIGTERM would hold every fixture's end 5 s).
        stop(process, sig=signal.SIGINT)
