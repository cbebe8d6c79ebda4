"""A private Postfix: its own config, queue and data directories, smtpd on 127.0.0.1 and free ports.

Nothing under /etc/postfix or /var/spool/postfix is read or written; the system's instance is
never started or stopped. Every accepted message goes through pipe(8) into a file (with its
envelope beside it), so a test compares the bytes Postfix received with the bytes it sent.
Slow to start (about 0.3 s): start it once per module or session.

Besides the main listener (`ports["main"]`), one listener per variant in LISTENERS; with
`sasl=True`, also `sub`: STARTTLS (a trustme CA, `Postfix.ca`) and SASL AUTH through a private
dovecot's auth socket (user `relay@mail.test`, password `s3cret`; PLAIN and LOGIN offered).
"""

import os
import re
import shutil
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import trustme

from tests.servers.process import fail_if_exited, free_port, require_program, stop, traversable_tmpdir

#: Extra smtpd listeners: name -> the main.cf settings it overrides.
LISTENERS: dict[str, tuple[str, ...]] = {
    "noutf8": ("smtputf8_enable=no",),
    "rcptlim": ("smtpd_recipient_limit=2",),
    "nochunking": ("smtpd_discard_ehlo_keywords=chunking",),
    "notls": ("smtpd_tls_security_level=none",),
    # TLS details logged, "Reusing old session" among them (with sasl=True: TLS on): for the
    # resumption tests, on listeners of their own so that the others' logs stay short.
    "tlslog": ("smtpd_tls_loglevel=2",),
    "tls12": ("smtpd_tls_loglevel=2", "smtpd_tls_protocols=<=TLSv1.2"),
}
SASL_USER, SASL_PASSWORD = "relay@mail.test", "s3cret"
#: The names smtpd's certificate holds (with sasl=True): the MX hosts of the TLS tests.
CERT_NAMES = ("mx.mail.test", "mx.dane.test", "ta.dane.test", "127.0.0.1")

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
default_transport = {transport}
relay_transport = {transport}
local_transport = {transport}
smtputf8_enable = yes
message_size_limit = {size}
"""

SASL_CF = """\
smtpd_tls_chain_files = {d}/tls/chain.pem
smtpd_tls_security_level = may
smtpd_sasl_type = dovecot
smtpd_sasl_path = {d}/auth/run/auth-postfix
smtpd_sasl_auth_enable = no
"""

# Dovecot with no protocols: only the auth socket smtpd's SASL uses. No failure delay and no
# auth penalty, so that a test counts failed logins without waiting seconds for each.
DOVECOT_AUTH_CONF = """\
instance_name = mailrelay-auth-{port}
base_dir = {d}/auth/run
state_dir = {d}/auth/state
log_path = {d}/auth/dovecot.log
ssl = no
protocols =
auth_mechanisms = plain login
auth_failure_delay = 0
passdb {{
  driver = passwd-file
  args = {d}/auth/passwd
}}
userdb {{
  driver = static
  args = uid=65534 gid=65534 home=/nonexistent
}}
service auth {{
  unix_listener auth-postfix {{
    mode = 0666
  }}
}}
service anvil {{
  unix_listener anvil-auth-penalty {{
    mode = 0
  }}
}}
"""

MASTER_CF = """\
127.0.0.1:{port} inet n - n - - smtpd
{listeners}cleanup   unix  n - n -     0 cleanup
qmgr      unix  n - n 300   1 qmgr
tlsmgr    unix  - - n 1000? 1 tlsmgr
rewrite   unix  - - n -     - trivial-rewrite
bounce    unix  - - n -     0 bounce
defer     unix  - - n -     0 bounce
trace     unix  - - n -     0 bounce
proxymap  unix  - - n -     - proxymap
error     unix  - - n -     - error
anvil     unix  - - n -     1 anvil
postlog   unix-dgram n - n - 1 postlogd
discard   unix  - - n -     - discard
capture   unix  - n n -     - pipe
  flags= user=nobody argv={d}/capture.sh ${{queue_id}} ${{sender}} ${{recipient}}
"""

# Run by pipe(8) as nobody: one file per queue file, written whole then renamed; the sender and
# the recipients (one a line) in a .env file beside it.
CAPTURE_SH = """\
#!/bin/sh
q=$1; shift
f="{d}/capture/$q.$$"
cat > "$f.tmp" || exit 75
printf '%s\\n' "$@" > "$f.env"
mv "$f.tmp" "$f.eml"
"""


@dataclass
class Postfix:
    directory: Path
    ports: dict[str, int]
    message_size_limit: int
    ca: trustme.CA | None = None  # with sasl=True: the CA of the `sub` listener's certificate

    @property
    def port(self) -> int:
        return self.ports["main"]

    @property
    def ca_file(self) -> Path:
        return self.directory / "tls" / "ca.pem"

    def certificate(self) -> bytes:
        """smtpd's own certificate, DER-encoded (what a DANE-EE record matches)."""
        pem = (self.directory / "tls" / "chain.pem").read_text()
        block = pem[pem.index("-----BEGIN CERTIFICATE-----") : pem.index("-----END CERTIFICATE-----") + 25]
        return ssl.PEM_cert_to_DER_cert(block)

    def sasl_failures(self) -> int:
        """Failed SASL logins smtpd logged so far (one line per attempt, whatever the mechanism)."""
        return self.log.count("authentication failed")

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

    def envelope(self, queue_id: str, timeout: float = 15.0) -> list[str]:
        """The sender, then the recipients, that pipe(8) got for `queue_id`."""
        self.received(queue_id, timeout)
        (path,) = (self.directory / "capture").glob(f"{queue_id}.*.env")
        return path.read_text().splitlines()


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
def postfix(message_size_limit: int = 10240000, *, sasl: bool = False, keep: bool = True) -> Iterator[Postfix]:
    """`postfix -c DIR start` with everything under DIR; `postfix -c DIR stop` at the end.
    `keep=False`: accepted messages are discarded, not captured (for benchmarks)."""
    binary = require_program("postfix", "/usr/sbin/postfix")
    directory = traversable_tmpdir("pf")
    ports = {"main": free_port(), **{name: free_port() for name in LISTENERS}}
    etc = directory / "etc"
    for sub in ("etc", "spool", "data", "capture", "tls", "auth"):
        (directory / sub).mkdir()
    shutil.chown(directory / "data", "postfix")
    shutil.chown(directory / "capture", "nobody")
    main_cf = MAIN_CF.format(d=directory, size=message_size_limit, transport="capture" if keep else "discard")
    listeners = {name: list(settings) for name, settings in LISTENERS.items()}
    ca = auth = None
    if sasl:
        ca = _tls_files(directory)
        auth = _dovecot_auth(directory)
        main_cf += SASL_CF.format(d=directory)
        ports["sub"] = free_port()
        listeners["sub"] = ["smtpd_sasl_auth_enable=yes", "smtpd_relay_restrictions=permit_sasl_authenticated,reject"]
    lines = "".join(
        f"127.0.0.1:{ports[name]} inet n - n - - smtpd\n  -o syslog_name=postfix/{name}\n"
        + "".join(f"  -o {setting}\n" for setting in settings)
        for name, settings in listeners.items()
    )
    (etc / "main.cf").write_text(main_cf)
    (etc / "master.cf").write_text(MASTER_CF.format(d=directory, port=ports["main"], listeners=lines))
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
        for port in ports.values():
            _wait_banner(port, directory)
        yield Postfix(directory=directory, ports=ports, message_size_limit=message_size_limit, ca=ca)
    finally:
        if started:
            pid = int((directory / "spool/pid/master.pid").read_text().split()[0])
            _run(binary, etc, "stop", directory)
            _wait_gone(pid)
        if auth is not None:
            stop(auth)
        shutil.rmtree(directory, ignore_errors=True)


def _tls_files(directory: Path) -> trustme.CA:
    """smtpd's certificate (for CERT_NAMES) and the CA that signed it."""
    ca = trustme.CA()
    chain = directory / "tls" / "chain.pem"
    ca.issue_cert(*CERT_NAMES).private_key_and_cert_chain_pem.write_to_path(str(chain))
    chain.chmod(0o600)  # smtpd reads it as root, before dropping privileges
    ca.cert_pem.write_to_path(str(directory / "tls" / "ca.pem"))
    return ca


def _dovecot_auth(directory: Path) -> "subprocess.Popen[bytes]":
    """A dovecot whose only service is the auth socket smtpd's SASL talks to."""
    binary = require_program("dovecot")
    auth = directory / "auth"
    (auth / "passwd").write_text(f"{SASL_USER}:{{PLAIN}}{SASL_PASSWORD}::::::\n")
    config = auth / "dovecot.conf"
    config.write_text(DOVECOT_AUTH_CONF.format(d=directory, port=free_port()))
    process = subprocess.Popen([binary, "-F", "-c", str(config)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)  # noqa: S603
    try:
        wait_unix_socket(auth / "run" / "auth-postfix", process)
    except BaseException:
        stop(process)
        raise
    return process


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


def wait_unix_socket(path: Path, process: "subprocess.Popen[bytes]", timeout: float = 10.0) -> None:
    """Ready = the socket accepts a connection."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fail_if_exited(process)
        try:
            with socket.socket(socket.AF_UNIX) as sock:
                sock.connect(str(path))
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"{path} accepted no connection within {timeout} s")
