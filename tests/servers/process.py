"""Helpers for servers that run as programs: free ports, readiness, shutdown, required programs."""

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def require_program(name: str, *also: str) -> str:
    """The program's path; a missing program skips locally but fails when CI=true."""
    path = shutil.which(name) or next((p for p in also if os.access(p, os.X_OK)), None)
    if path is None:
        message = f"{name} is not installed (scripts/bootstrap --system installs it)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path


def wait_greeting(port: int, process: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
    """Ready = answers with a greeting; reading it and saying QUIT keeps dovecot's shutdown fast."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fail_if_exited(process)
        try:
            with socket.create_connection(("127.0.0.1", port), 0.5) as sock:
                stream = sock.makefile("rwb")
                stream.readline()
                stream.write(b"QUIT\r\n")
                stream.flush()
                stream.readline()
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"127.0.0.1:{port} gave no greeting within {timeout} s")


def fail_if_exited(process: subprocess.Popen[bytes]) -> None:
    """A server that exited while a test waited for it to be ready: RuntimeError with its output."""
    if process.poll() is not None:
        output = process.stdout.read().decode(errors="replace") if process.stdout else ""
        raise RuntimeError(f"{process.args!r} exited with {process.returncode}: {output[-2000:]}")


def stop(process: subprocess.Popen[bytes], timeout: float = 10.0, sig: int = signal.SIGTERM) -> None:
    """`sig` (SIGTERM), then SIGKILL after `timeout`; the pipes are closed either way."""
    if process.poll() is None:
        process.send_signal(sig)
        try:
            process.wait(timeout)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()
    for stream in (process.stdout, process.stderr):
        if stream is not None:
            stream.close()


def traversable_tmpdir(prefix: str) -> Path:
    """Short (unix socket paths) and traversable by uid 65534 (pytest's tmp_path is 0700)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    path.chmod(0o755)
    return path
