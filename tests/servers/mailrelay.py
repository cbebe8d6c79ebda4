"""mailrelay itself, run as `python -m app serve` in a subprocess (uvicorn on uvloop, as in production)."""

import os
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.servers.process import free_port

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
