"""Postfix's smtp-sink: a real SMTP (or LMTP) sink that dumps each transaction and logs each connection."""

import os
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from tests.servers.process import free_port, require_program, stop, traversable_tmpdir, wait_greeting


@dataclass
class Sink:
    port: int
    dump_dir: Path
    connects: int = 0
    disconnects: int = 0
    most_at_once: int = 0
    log: list[str] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def messages(self) -> list[str]:
        """Each transaction's dump (LF line ends, smtp-sink's X-* headers first)."""
        return [p.read_text(errors="replace") for p in sorted(self.dump_dir.iterdir())]

    def _line(self, line: str) -> None:
        with self._lock:
            self.log.append(line)
            if re.search(r"smtp-sink: connect \(", line):
                self.connects += 1
                self.most_at_once = max(self.most_at_once, self.connects - self.disconnects)
            elif line.rstrip().endswith("smtp-sink: disconnect"):
                self.disconnects += 1


@contextmanager
def smtp_sink(*flags: str) -> Iterator[Sink]:
    """smtp-sink on 127.0.0.1 and a free port; `flags` are its error-injection options (-e, -8, -t 1, ...).

    The readiness probe connects once; its connection is not counted.
    """
    binary = require_program("smtp-sink")
    directory = traversable_tmpdir("sink")
    port = free_port()
    user = ["-u", "root"] if os.geteuid() == 0 else []  # mandatory as root, refused otherwise
    args = [
        binary,
        *user,
        "-v",
        "-d",
        f"{directory}/%Y%m%d%H%M%S.",
        "-h",
        "sink.test",
        *flags,
        f"127.0.0.1:{port}",
        "256",
    ]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)  # noqa: S603
    sink = Sink(port=port, dump_dir=directory)
    probed = threading.Event()

    def read_log() -> None:
        assert process.stderr is not None
        for raw in process.stderr:
            line = raw.decode(errors="replace")
            if probed.is_set():
                sink._line(line)
            elif line.rstrip().endswith("smtp-sink: disconnect"):
                probed.set()

    reader = threading.Thread(target=read_log, daemon=True)
    reader.start()
    try:
        wait_greeting(port, process)
        if not probed.wait(5):
            raise RuntimeError("smtp-sink did not log the readiness probe")
        yield sink
    finally:
        if process.poll() is None:
            process.terminate()
        reader.join(5)  # reads to EOF, so every connection is counted
        stop(process)
        shutil.rmtree(directory, ignore_errors=True)
