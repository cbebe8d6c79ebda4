"""A private Postfix: its own config, queue and data directories, smtpd on 127.0.0.1 and a free port.

Nothing under /etc/postfix or /var/spool/postfix is read or written; the system's instance is
never started or stopped. Every accepted message goes through pipe(8) into a file, so a test
compares the bytes Postfix received with the bytes it sent. Slow to start (about 0.3 s):
start it once per module or session.
"""

import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.servers.process import free_port, require_program, traversable_tmpdir

MAIN_CF = """\
compatibility_level = 3.6
queue_directory = {d}/spool
data_directory = {d}/data
mail_owner = postfix
setgid_group = postdrop
myhostname = mx.mail.test
mydestination =
mynetworks = 127.0.0.0/8
inet_interfaces = 127.0.0.1
inet_protocols = ipv4
local_header_rewrite_clients =
maillog_file = {d}/postfix.log
maillog_file_prefixes = {d}
alias_maps =
alias_database =
biff = no
smtpd_relay_restrictions = permit_mynetworks, reject
default_transport = capture
relay_transport = capture
local_transport = capture
smtputf8_enable = yes
message_size_limit = {size}
"""

MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
cleanup   unix  n - n -     0 cleanup
qmgr      unix  n - n 300   1 qmgr
rewrite   unix  - - n -     - trivial-rewrite
bounce    unix  - - n -     0 bounce
defer     unix  - - n -     0 bounce
trace     unix  - - n -     0 bounce
proxymap  unix  - - n -     - proxymap
error     unix  - - n -     - error
anvil     unix  - - n -     1 anvil
postlog   unix-dgram n - n - 1 postlogd
capture   unix  - n n -     - pipe
  flags= user=nobody argv={d}/capture.sh ${{queue_id}}
"""

# Run by pipe(8) as nobody: one file per queue file, written whole then renamed.
CAPTURE_SH = """\
#!/bin/sh
f="{d}/capture/$1.$$"
cat > "$f.tmp" || exit 75
mv "$f.tmp" "$f.eml"
"""


@dataclass
class Postfix:
    directory: Path
    port: int
    message_size_limit: int

    @property
    def log(self) -> str:
        path = self.directory / "postfix.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def wait_log(self, text: str, since: int = 0, timeout: float = 10.0) -> str:
        """The log from offset `since` once `text` appears in it."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            tail = self.log[since:]
            if text in tail:
                return tail
            time.sleep(0.05)
        raise TimeoutError(f"{text!r} not logged within {timeout} s:\n{self.log[since:][-2000:]}")

    def captured(self) -> list[Path]:
        return sorted((self.directory / "capture").glob("*.eml"))

    def received(self, queue_id: str, timeout: float = 15.0) -> bytes:
        """The message pipe(8) got for `queue_id`, without Postfix's own Received: header (LF line ends)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            files = sorted((self.directory / "capture").glob(f"{queue_id}.*.eml"))
            if files:
                return _strip_received(files[0].read_bytes())
            time.sleep(0.05)
        raise TimeoutError(f"nothing delivered for {queue_id} within {timeout} s:\n{self.log[-2000:]}")


def queue_id(reply_message: str) -> str:
    """The queue id in Postfix's `250 2.0.0 Ok: queued as Q`."""
    match = re.search(r"queued as (\w+)", reply_message)
    assert match is not None, reply_message
    return match.group(1)


def _strip_received(stored: bytes) -> bytes:
    lines = stored.split(b"\n")
    assert lines[0].startswith(b"Received:"), stored[:200]
    lines.pop(0)
    while lines and lines[0][:1] in (b" ", b"\t"):
        lines.pop(0)
    return b"\n".join(lines)


@contextmanager
def postfix(message_size_limit: int = 10240000) -> Iterator[Postfix]:
    """`postfix -c DIR start` with everything under DIR; `postfix -c DIR stop` at the end."""
    binary = require_program("postfix", "/usr/sbin/postfix")
    directory = traversable_tmpdir("pf")
    port = free_port()
    etc = directory / "etc"
    for sub in ("etc", "spool", "data", "capture"):
        (directory / sub).mkdir()
    shutil.chown(directory / "data", "postfix")
    shutil.chown(directory / "capture", "nobody")
    (etc / "main.cf").write_text(MAIN_CF.format(d=directory, size=message_size_limit))
    (etc / "master.cf").write_text(MASTER_CF.format(d=directory, port=port))
    capture = directory / "capture.sh"
    capture.write_text(CAPTURE_SH.format(d=directory))
    capture.chmod(0o755)
    # Postfix re-reads a config file whose mtime is the current second (seconds of delay).
    past = time.time() - 5
    for path in etc.iterdir():
        os.utime(path, (past, past))
    started = False
    try:
        _run(binary, etc, "start", directory)
        started = True
        _wait_banner(port, directory)
        yield Postfix(directory=directory, port=port, message_size_limit=message_size_limit)
    finally:
        if started:
            pid = int((directory / "spool/pid/master.pid").read_text().split()[0])
            _run(binary, etc, "stop", directory)
            _wait_gone(pid)
        shutil.rmtree(directory, ignore_errors=True)


def _run(binary: str, etc: Path, command: str, directory: Path) -> None:
    done = subprocess.run([binary, "-c", str(etc), command], capture_output=True, check=False)  # noqa: S603
    if done.returncode != 0:
        log = (directory / "postfix.log").read_text(errors="replace") if (directory / "postfix.log").exists() else ""
        raise RuntimeError(f"postfix {command} exited with {done.returncode}: {done.stdout!r} {done.stderr!r}\n{log}")


def _wait_gone(pid: int, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.05)
    raise TimeoutError(f"postfix master {pid} still running after stop")


def _wait_banner(port: int, directory: Path, timeout: float = 20.0) -> None:
    """Ready = smtpd answers 220 (the master runs detached: no process of ours to watch)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), 0.5) as sock:
                stream = sock.makefile("rwb")
                if stream.readline().startswith(b"220"):
                    stream.write(b"QUIT\r\n")
                    stream.flush()
                    stream.readline()
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise TimeoutError(f"postfix on 127.0.0.1:{port} gave no 220 within {timeout} s")
