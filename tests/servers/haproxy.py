"""HAProxy (Debian's `haproxy`) in front of HTTP backends, run in the foreground with its own config.

The caller gives the configuration's `defaults`, `frontend` and `backend` sections (the drain
tests take them from docs/deployment.md, so the documented configuration is the tested one);
this adds a `global` section with a log on stdout and an admin socket, from which `states()`
reads each server's state (UP, DOWN, MAINT, ...).
"""

import csv
import io
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.servers.process import require_program, stop, traversable_tmpdir

_GLOBAL = """\
global
    log stdout format raw local0 info
    stats socket {directory}/admin.sock mode 600 level admin

"""


@dataclass
class HAProxy:
    process: subprocess.Popen[bytes]
    directory: Path

    @property
    def log_path(self) -> Path:
        return self.directory / "haproxy.log"

    def command(self, line: str) -> str:
        """One command on the admin socket (it answers, then closes)."""
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(2)
            sock.connect(str(self.directory / "admin.sock"))
            sock.sendall(line.encode() + b"\n")
            chunks = []
            while chunk := sock.recv(65536):
                chunks.append(chunk)
        return b"".join(chunks).decode()

    def states(self, backend: str) -> dict[str, str]:
        """Each server of `backend` and its state, from `show stat`."""
        rows = csv.DictReader(io.StringIO(self.command("show stat").lstrip("# ")))
        return {
            row["svname"]: row["status"]
            for row in rows
            if row["pxname"] == backend and row["svname"] not in ("FRONTEND", "BACKEND")
        }

    def wait_states(self, backend: str, want: dict[str, str], timeout: float = 15.0) -> float:
        """Seconds until the servers of `backend` are in the states `want`."""
        started = time.monotonic()
        while (states := self.states(backend)) != want:
            if self.process.poll() is not None:
                raise AssertionError(f"haproxy exited with {self.process.returncode}: {self.log()[-2000:]}")
            if time.monotonic() - started > timeout:
                raise AssertionError(f"servers {states}, not {want}, after {timeout} s")
            time.sleep(0.05)
        return time.monotonic() - started

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextmanager
def haproxy(sections: str) -> Iterator[HAProxy]:
    """HAProxy running `sections` (defaults, frontend, backend) until the block ends; ready once
    its admin socket answers. Fails under CI=true, skips elsewhere, when haproxy is missing."""
    binary = require_program("haproxy", "/usr/sbin/haproxy")
    directory = traversable_tmpdir("haproxy")
    config = directory / "haproxy.cfg"
    config.write_text(_GLOBAL.format(directory=directory) + sections)
    check = subprocess.run([binary, "-c", "-f", str(config)], capture_output=True, text=True)  # noqa: S603
    if check.returncode != 0:
        raise AssertionError(
            f"haproxy -c refused the configuration:\n{check.stdout}{check.stderr}\n{config.read_text()}"
        )
    with (directory / "haproxy.log").open("wb") as log:
        process = subprocess.Popen(  # noqa: S603
            [binary, "-db", "-f", str(config)], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT
        )
    running = HAProxy(process, directory)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                running.command("show info")
                break
            except OSError:
                if process.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError(f"haproxy did not start: {running.log()[-2000:]}") from None
                time.sleep(0.05)
        yield running
    finally:
        stop(process)
        shutil.rmtree(directory, ignore_errors=True)
