"""mailrelay's benchmark: the service against its ceilings and its peer, in one run.

Run it through `bench/run`, which installs what this needs first. Rows:

  bare       bare FastAPI (uvicorn, uvloop, httptools): reads the JSON body, answers a small JSON
  direct     a pool of aiosmtplib connections to smtp-sink, no HTTP (bench/direct_smtp.py)
  sketch     ~50 lines of FastAPI + pooled aiosmtplib, pool 8 (bench/sketch_app.py)
  slimta     slimta 5.0.5: HTTP edge -> proxy queue -> static SMTP relay, pool 8 (bench/slimta_edge.py)
  blackhole  mailrelay, `blackhole` relay, JSON form
  static     mailrelay, `static` relay to smtp-sink, pool 8, JSON form
  static822  the same, message/rfc822 form (slimta's wire format)
  mx         mailrelay, `mx` relay (local dnslib DNS, warm cache) to smtp-sink, pool 8, JSON form
  workers    mailrelay `static` JSON with `serve --workers N` (the multi-core row)
  keyed      mailrelay `static` JSON with an Idempotency-Key on every request (a fresh key each),
             the store on a redis-server this script starts on loopback; compared with `static`
  batch      mailrelay `static`, 100 deliveries per request (POST /relays/sink/deliveries, NDJSON);
             msg/s counts each 200 as its 100 lines, checked against smtp-sink; compared with `static`
  plain      mailrelay `static` in clear text to a private Postfix (tests/servers/postfix.py) whose smtpd
             passes each message to smtp-sink (smtpd_proxy_filter): the twin of `tls`, same receiver
  tls        the same with STARTTLS (verified against the Postfix's private CA); compared with `plain`
  starttls   mailrelay `static` with STARTTLS (verified) to stunnel, which speaks SMTP's STARTTLS for
             smtp-sink behind it: the receiver of `static` plus a TLS front end; compared with `static`
  dkim-ed25519, dkim-rsa
             mailrelay `static` to smtp-sink, every message DKIM-signed (keys made at start);
             compared with `static`, the RSA row also with one raw RSA-2048 signature's cost
  fleet      mailrelay `static` with fleet_connections and a never-binding max_message_rate on the
             bench's redis-server: a shared lease and a shared rate check per delivery; vs `static`
  ROW@base   with --baseline REV: the same mailrelay row, the service's code as committed at REV,
             its runs interleaved with the row's at every point (before/after in one run)

Load: wrk, one thread, N connections, Lua bodies precomputed (bench/post.lua). Every
point: a warm-up run per row, then several measured runs, the rows' runs interleaved; the table gives the median, the
spread, p50/p99 latency, the server's peak RSS during the point (VmHWM, reset before
it through /proc/PID/clear_refs), errors (non-2xx and socket errors, from wrk's Lua
done(), since wrk exits 0 even on errors), and whether smtp-sink counted at least as
many messages as there were 2xx answers.
"""

# ruff: noqa: S603, S607
import argparse
import base64
import collections
import contextlib
import datetime
import importlib.metadata
import json
import os
import platform
import re
import shutil
import signal
import smtplib
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
VENV_PY = ROOT / ".venv" / "bin" / "python"
MAILRELAY = ROOT / ".venv" / "bin" / "mailrelay"
SLIMTA_PY = BENCH / ".venv-slimta" / "bin" / "python"
SENDER, RECIPIENT, DOMAIN = "bench@example.com", "sink@bench.test", "bench.test"
POOL = 8
BATCH = 100  # lines in one request of the batch row
KIB, MIB = 1024, 1024 * 1024

sys.path.insert(0, str(BENCH))
from direct_smtp import make_message  # noqa: E402
from dns_server import start as start_dns  # noqa: E402


@dataclass(frozen=True)
class Target:
    key: str
    label: str
    form: str  # "json", "rfc822", or "smtp" (direct)
    path: str
    sink: bool  # deliveries reach smtp-sink (checked against its counter)
    per_request: int = 1  # messages in one request (the batch row: its NDJSON lines)


TARGETS = [
    Target("bare", "bare FastAPI [ceiling]", "json", "/relays/bench/deliver", False),
    Target("direct", "aiosmtplib pool, no HTTP [ceiling]", "smtp", "", True),
    Target("sketch", "sketch FastAPI+aiosmtplib", "json", "/relays/sink/deliver", True),
    Target("slimta", "slimta 5.0.5 edge->static [peer]", "rfc822", "/relays/sink/deliver", True),
    Target("blackhole", "mailrelay blackhole", "json", "/relays/blackhole/deliver", False),
    Target("static", "mailrelay static json", "json", "/relays/sink/deliver", True),
    Target("static822", "mailrelay static rfc822", "rfc822", "/relays/sink/deliver", True),
    Target("mx", "mailrelay mx json (warm)", "json", "/relays/mx/deliver", True),
    Target("workers", "mailrelay static json --workers N", "json", "/relays/sink/deliver", True),
    Target("keyed", "mailrelay static keyed (Redis)", "json", "/relays/sink/deliver", True),
    Target("batch", "mailrelay static batch x100 (NDJSON)", "ndjson", "/relays/sink/deliveries", True, BATCH),
    Target("dkim-ed25519", "mailrelay static DKIM Ed25519", "json", "/relays/sink/deliver", True),
    Target("dkim-rsa", "mailrelay static DKIM RSA-2048", "json", "/relays/sink/deliver", True),
    Target("fleet", "mailrelay static fleet lease+rate", "json", "/relays/sink/deliver", True),
    Target("plain", "mailrelay static clear -> Postfix", "json", "/relays/sink/deliver", True),
    Target("tls", "mailrelay static STARTTLS -> Postfix", "json", "/relays/sink/deliver", True),
    Target("starttls", "mailrelay static STARTTLS -> stunnel", "json", "/relays/sink/deliver", True),
]
BY_KEY = {t.key: t for t in TARGETS}
#: The rows that run mailrelay (and get a ROW@base twin with --baseline).
MAILRELAY_ROWS = (
    "blackhole",
    "static",
    "static822",
    "mx",
    "workers",
    "keyed",
    "batch",
    "dkim-ed25519",
    "dkim-rsa",
    "fleet",
    "plain",
    "tls",
    "starttls",
)
#: Rows whose server needs the bench's redis-server.
REDIS_ROWS = ("keyed", "fleet")
#: Rows that deliver to the private Postfix (STARTTLS) instead of smtp-sink.
POSTFIX_ROWS = ("plain", "tls")
#: Rows that deliver to stunnel (STARTTLS) in front of smtp-sink.
STUNNEL_ROWS = ("starttls",)
BASE = "@base"


def add_baseline_targets(keys: list[str], rev: str) -> list[str]:
    """Every mailrelay row in `keys` followed by its twin measured on the code of `rev`."""
    out = []
    for key in keys:
        out.append(key)
        if key in MAILRELAY_ROWS:
            target = BY_KEY[key]
            tag = f" @{rev[:12]}"
            label = target.label[: 36 - len(tag)] + tag
            twin = Target(key + BASE, label, target.form, target.path, target.sink, target.per_request)
            BY_KEY[twin.key] = twin
            TARGETS.insert(TARGETS.index(target) + 1, twin)
            out.append(twin.key)
    return out


def base_key(key: str) -> str:
    return key.removesuffix(BASE)


def size_label(size: int) -> str:
    if size >= MIB and size % MIB == 0:
        return f"{size // MIB} MiB"
    if size >= KIB and size % KIB == 0:
        return f"{size // KIB} KiB"
    return f"{size} B"


def parse_size(text: str) -> int:
    match = re.fullmatch(r"(\d+)\s*([kKmM]?)i?[bB]?", text.strip())
    if not match:
        raise argparse.ArgumentTypeError(f"{text!r}: give a size like 1K, 100K, 10M")
    return int(match[1]) * {"": 1, "k": KIB, "m": MIB}[match[2].lower()]


def listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 10) -> bool:
    """Whether a server started as `proc` takes connections on 127.0.0.1:`port` within `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), 0.5).close()
            return True
        except OSError:
            if time.monotonic() > deadline or proc.poll() is not None:
                return False
            time.sleep(0.05)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


# --------------------------------------------------------------------------- processes


class Pinning:
    """Server (and the in-process direct client) on CPU 0; wrk, smtp-sink, DNS and this script on CPU 1."""

    def __init__(self, enabled: bool) -> None:
        self.cpus = os.cpu_count() or 1
        self.enabled = enabled and self.cpus > 1 and shutil.which("taskset") is not None
        self.server = "0" if self.enabled else ""
        self.client = "1" if self.enabled else ""
        self.all = f"0-{self.cpus - 1}"

    def cmd(self, cpus: str) -> list[str]:
        return ["taskset", "-c", cpus] if self.enabled and cpus else []

    def describe(self) -> str:
        if not self.enabled:
            return f"no CPU pinning ({self.cpus} CPU(s){'' if shutil.which('taskset') else ', no taskset'})"
        return (
            "pinned with taskset: the server under test (and the direct aiosmtplib client) on CPU 0; wrk, "
            "smtp-sink, the DNS server, redis-server, Postfix and the orchestrator on CPU 1; the --workers row spans CPUs "
            f"{self.all}. Other users' processes are not pinned and share both CPUs."
        )


def descendants(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        current = todo.pop()
        out.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            with contextlib.suppress(OSError):
                todo.extend(int(c) for c in (task / "children").read_text().split())
    return out


def reset_peak_rss(pid: int) -> None:
    for p in descendants(pid):
        with contextlib.suppress(OSError):
            Path(f"/proc/{p}/clear_refs").write_text("5")


def peak_rss_mib(pid: int) -> float | None:
    """VmHWM of the process, summed over its children (the --workers case)."""
    total, seen = 0, False
    for p in descendants(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    total += int(line.split()[1])
                    seen = True
    return total / 1024 if seen else None


def _ticks(pid: int, reaped: bool = False) -> int:
    """CPU ticks of a process; `reaped`: with those of the children it has waited for (cutime, cstime)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    return int(fields[11]) + int(fields[12]) + (int(fields[13]) + int(fields[14]) if reaped else 0)


class CpuMeter:
    """CPU used on the machine by everything that is not this benchmark, in % of one CPU.

    Busy time from /proc/stat, minus our own: this process and the children it has
    waited for (wrk, the direct client), the servers and smtp-sink. A noise gauge: the
    machine is shared, and a point measured while another suite ran says so here.
    """

    tick = os.sysconf("SC_CLK_TCK")

    def __init__(self, pids: list[int], reapers: list[int] | None = None) -> None:
        self.pids = pids
        # Postfix's master: its children (cleanup serves 100 messages, then exits) are counted while they
        # live and, once it has reaped them, in its cutime.
        self.reapers = reapers or []
        self.start = self._snapshot()

    def _snapshot(self) -> tuple[float, float, float]:
        # irq and softirq time are left out: loopback TCP is processed there, for us, unattributed.
        user, nice, system = map(int, Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:4])
        busy = (user + nice + system) / self.tick
        ticks = sum(_ticks(p) for pid in self.pids for p in descendants(pid))
        ticks += sum(_ticks(pid, reaped=True) + sum(_ticks(p) for p in descendants(pid)[1:]) for pid in self.reapers)
        ours = sum(os.times()[:4]) + ticks / self.tick
        return time.monotonic(), busy, ours

    def others_percent(self) -> float:
        (t0, busy0, ours0), (t1, busy1, ours1) = self.start, self._snapshot()
        return max(0.0, ((busy1 - busy0) - (ours1 - ours0)) / (t1 - t0) * 100) if t1 > t0 else 0.0


class Server:
    def __init__(
        self,
        name: str,
        cmd: list[str],
        port: int,
        logdir: Path,
        env: dict[str, str] | None = None,
        pipe_to: list[str] | None = None,
    ) -> None:
        self.name, self.port = name, port
        self.logfile = logdir / f"{name}.log"
        # Appending, so the file can be emptied between points (`new_log_text`): at the default log
        # level mailrelay writes a line per delivery, hundreds of MB in a full run.
        self._log = self.logfile.open("ab")
        self.reader: subprocess.Popen[bytes] | None = None
        if pipe_to is not None:  # output through a pipe, as under a container runtime: `cat` appends it
            self.reader = subprocess.Popen([*pipe_to, "cat"], stdin=subprocess.PIPE, stdout=self._log)
        self.proc = subprocess.Popen(
            cmd,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            stdout=self.reader.stdin if self.reader else self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, **(env or {})},
        )
        if self.reader and self.reader.stdin:
            self.reader.stdin.close()  # the server holds the write end

    def wait_ready(self, http: bool, timeout: float = 60) -> str | None:
        """None when it answers; else why not."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return f"exited with {self.proc.returncode}: {self.log_tail()}"
            try:
                if http:
                    with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/healthz", timeout=1) as reply:
                        if reply.status == 200:
                            return None
                else:
                    socket.create_connection(("127.0.0.1", self.port), 0.5).close()
                    return None
            except OSError:
                time.sleep(0.1)
        return f"not answering on port {self.port} after {timeout:.0f} s: {self.log_tail()}"

    def new_log_text(self) -> str:
        """What the server logged since the last call (then dropped from the file; the tail is kept)."""
        self._log.flush()
        with self.logfile.open("r+b") as f:
            data = f.read()
            f.truncate(0)
        self._tail = data[-4096:] or getattr(self, "_tail", b"")
        return data.decode(errors="replace")

    def log_tail(self, lines: int = 8) -> str:
        self._log.flush()
        data = self.logfile.read_bytes() or getattr(self, "_tail", b"")
        text = data.decode(errors="replace").strip().splitlines()
        return " | ".join(text[-lines:]) if text else "(no output)"

    def stop(self) -> None:
        if self.proc.poll() is None:
            # mailrelay drains without its drain_delay (5 s of /readyz 503) on SIGINT: nothing balances here.
            mailrelay = base_key(self.name) in MAILRELAY_ROWS
            self.proc.send_signal(signal.SIGINT if mailrelay else signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.reader:
            self.reader.wait(5)
        self._log.close()


class Sink:
    """Postfix's smtp-sink with -c: its stdout carries running counters `sess=N quit=N mesg=N`."""

    def __init__(self, pin: Pinning, logdir: Path) -> None:
        self.port = free_port()
        self.counter_file = logdir / "smtp-sink.counters"
        self._out = self.counter_file.open("wb")
        user = ["-u", "root"] if os.geteuid() == 0 else []
        binary = shutil.which("smtp-sink") or "/usr/sbin/smtp-sink"
        self.proc = subprocess.Popen(
            [*pin.cmd(pin.client), binary, *user, "-c", "-h", "sink.bench.test", f"127.0.0.1:{self.port}", "1024"],
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=subprocess.STDOUT,
        )
        if not listening(self.port, self.proc):
            raise RuntimeError(f"smtp-sink did not start: {self.counter_file.read_text()}")

    def count(self) -> int:
        with self.counter_file.open("rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 200))
            found = re.findall(rb"mesg=(\d+)", f.read())
        return int(found[-1]) if found else 0

    def settle(self, quiet: float, limit: float = 60) -> int:
        """The counter once it has stopped moving for `quiet` seconds (deliveries still in flight land first)."""
        last, since, deadline = self.count(), time.monotonic(), time.monotonic() + limit
        while time.monotonic() < deadline:
            time.sleep(0.05)
            now = self.count()
            if now != last:
                last, since = now, time.monotonic()
            elif time.monotonic() - since >= quiet:
                break
        return last

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(5)
        self._out.close()


class StunnelReceiver:
    """The starttls row's receiver: stunnel in server mode with `protocol = smtp` in front of smtp-sink. It
    passes smtp-sink's greeting, answers the first EHLO itself offering STARTTLS, takes the handshake
    (a certificate of a CA made at start) and from then on relays the decrypted session to smtp-sink.
    smtp-sink has no TLS and Postfix's smtpd is slower than smtp-sink (the plain row): this receiver is
    the `static` row's plus a TLS front end written in C, so `starttls` against `static` is what TLS costs
    mailrelay, and a little more (stunnel's hop, on CPU 1 with wrk and smtp-sink)."""

    def __init__(self, pin: Pinning, sink: Sink, logdir: Path) -> None:
        binary = shutil.which("stunnel4") or shutil.which("stunnel")
        if not binary:
            raise RuntimeError("stunnel not found (bench/run installs Debian's stunnel4)")
        import trustme

        directory = logdir / "stunnel"
        directory.mkdir()
        ca = trustme.CA()
        ca.issue_cert("127.0.0.1", "localhost").private_key_and_cert_chain_pem.write_to_path(directory / "server.pem")
        self.ca_file = directory / "ca.pem"
        ca.cert_pem.write_to_path(self.ca_file)
        self.port = free_port()
        (directory / "stunnel.conf").write_text(
            "foreground = yes\npid =\ndebug = 3\n"
            f"output = {directory / 'stunnel.log'}\n"
            f"[smtp]\naccept = 127.0.0.1:{self.port}\nconnect = 127.0.0.1:{sink.port}\n"
            f"protocol = smtp\ncert = {directory / 'server.pem'}\n"
        )
        self.proc = subprocess.Popen(
            [*pin.cmd(pin.client), binary, str(directory / "stunnel.conf")],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        if not listening(self.port, self.proc):
            self.stop()
            raise RuntimeError("stunnel did not start (bench/.logs/*/stunnel/stunnel.log)")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(5)


class PostfixReceiver:
    """The tls and plain rows' receiver. smtp-sink has no STARTTLS, so a private Postfix (the test suite's
    tests/servers/postfix.py, bench/tls.py's choice) whose smtpd offers STARTTLS with a certificate of a CA
    made at start. Its smtpd hands each message to smtp-sink as a before-queue proxy filter
    (smtpd_proxy_filter, set with postconf): no cleanup, queue file or delivery agent, so the receiver is
    nearly as fast as smtp-sink, and smtp-sink's counter checks these rows too. Its processes run on the
    orchestrator's CPU (they inherit its affinity)."""

    def __init__(self, sink: Sink) -> None:
        for program in ("postfix", "postconf", "dovecot"):  # the fixture's STARTTLS comes with dovecot's SASL
            if not shutil.which(program) and not Path(f"/usr/sbin/{program}").exists():
                raise RuntimeError(f"{program} not found (bench/run installs it)")
        sys.path.insert(0, str(ROOT))
        from tests.servers.postfix import postfix

        self._stack = contextlib.ExitStack()
        found = self._stack.enter_context(postfix(sasl=True, keep=False))
        self.port, self.ca_file = found.port, found.ca_file
        self.master = int((found.directory / "spool/pid/master.pid").read_text().split()[0])
        try:
            etc = str(found.directory / "etc")
            postconf = shutil.which("postconf") or "/usr/sbin/postconf"
            subprocess.run([postconf, "-c", etc, "-e", f"smtpd_proxy_filter = 127.0.0.1:{sink.port}"], check=True)
            # Postfix takes a main.cf changed within the current second for one still being written.
            past = time.time() - 5
            os.utime(found.directory / "etc/main.cf", (past, past))
            subprocess.run([shutil.which("postfix") or "/usr/sbin/postfix", "-c", etc, "reload"], check=True)
            self._wait_proxying(sink)
        except BaseException:
            self._stack.close()
            raise

    def _wait_proxying(self, sink: Sink, timeout: float = 20) -> None:
        """Until a message to Postfix reaches smtp-sink: smtpd processes started before the reload discard."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            before = sink.count()
            with smtplib.SMTP("127.0.0.1", self.port, timeout=5) as smtp:
                smtp.sendmail(SENDER, [RECIPIENT], make_message(KIB))
            if sink.settle(0.2, limit=2) > before:
                return
        raise RuntimeError(f"Postfix did not pass messages to smtp-sink within {timeout:.0f} s of its reload")

    def stop(self) -> None:
        self._stack.close()


# --------------------------------------------------------------------------- measuring


@dataclass
class Run:
    ok: int  # 2xx answers (or messages sent, for the direct client)
    seconds: float
    p50_ms: float
    p99_ms: float
    non2xx: int = 0
    socket_errors: int = 0
    delivered: int | None = None  # smtp-sink's count for this run
    cpu_us: float | None = None  # the server's CPU time per 2xx answer in this run

    @property
    def rate(self) -> float:
        return self.ok / self.seconds if self.seconds else 0.0

    @classmethod
    def of(cls, result: dict[str, int], target: "Target", ticks: int) -> "Run":
        """A run from what wrk's post.lua printed and the server's CPU ticks during it."""
        # A batch's 200 counts its lines; the sink check catches a line answered but not delivered.
        ok = (result["requests"] - result["non2xx"]) * target.per_request
        return cls(
            ok=ok,
            seconds=result["duration_us"] / 1e6,
            p50_ms=result["p50_us"] / 1000,
            p99_ms=result["p99_us"] / 1000,
            non2xx=result["non2xx"],
            socket_errors=sum(result[k] for k in ("connect", "read", "write", "timeout")),
            cpu_us=ticks / CpuMeter.tick / ok * 1e6 if ok else None,
        )


@dataclass
class Point:
    target: str
    size: int
    conc: int
    runs: list[Run] = field(default_factory=list)
    rss_mib: float | None = None
    #: The server's CPU time (user + system, all its threads and processes) per 2xx answer during the
    #: measured runs: the figure to compare on a machine others load, where msg/s swings with them.
    cpu_us_per_msg: float | None = None
    warmup_errors: int = 0
    others_cpu: float | None = None  # % of one CPU used by other users' processes during the point
    log_events: dict[str, int] = field(default_factory=dict)  # what the server logged as errors during the point
    retried: bool = False  # measured twice because of other load; the quieter measurement is kept
    skipped: str | None = None
    failures: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        return statistics.median(r.rate for r in self.runs) if self.runs else float("nan")

    @property
    def spread(self) -> float:
        rates = [r.rate for r in self.runs]
        return (max(rates) - min(rates)) / 2 / self.rate if len(rates) > 1 and self.rate else 0.0

    @property
    def p50(self) -> float:
        return statistics.median(r.p50_ms for r in self.runs) if self.runs else float("nan")

    @property
    def p99(self) -> float:
        return statistics.median(r.p99_ms for r in self.runs) if self.runs else float("nan")

    @property
    def errors(self) -> int:
        return sum(r.non2xx + r.socket_errors for r in self.runs) + self.warmup_errors

    def verified(self) -> str:
        """smtp-sink's count against the 2xx answers: never fewer (a 2xx for a lost message)."""
        if not BY_KEY[self.target].sink or not self.runs:
            return "-"
        lost = sum(max(0, r.ok - (r.delivered or 0)) for r in self.runs)
        if lost:
            return f"LOST {lost}"
        # Requests cut off when wrk stops may still be delivered after it: up to `conc` per run.
        extra = sum((r.delivered or 0) - r.ok for r in self.runs)
        if extra > self.conc * len(self.runs) * BY_KEY[self.target].per_request:
            return f"+{extra}?"
        return "ok"

    def to_json(self) -> dict[str, Any]:
        return {
            "target": self.target,
            "size": self.size,
            "concurrency": self.conc,
            "skipped": self.skipped,
            "msg_per_s_median": None if not self.runs else round(self.rate, 1),
            "spread": None if not self.runs else round(self.spread, 4),
            "p50_ms": None if not self.runs else round(self.p50, 3),
            "p99_ms": None if not self.runs else round(self.p99, 3),
            "peak_rss_mib": None if self.rss_mib is None else round(self.rss_mib, 1),
            "cpu_us_per_msg": None if self.cpu_us_per_msg is None else round(self.cpu_us_per_msg, 1),
            "others_cpu_percent": None if self.others_cpu is None else round(self.others_cpu, 1),
            "retried_for_noise": self.retried,
            "errors": self.errors,
            "sink_check": self.verified(),
            "failures": self.failures,
            "server_log_errors": self.log_events,
            "runs": [r.__dict__ | {"rate": round(r.rate, 1)} for r in self.runs],
        }


@dataclass
class Pair:
    """Two rows loaded at the same time, both servers on the server CPU (`Bench.side_by_side`).

    Measured one after the other, even interleaved, the same code's CPU per message swung from 411 to
    547 us between runs seconds apart (2026-12-01 04:00, the static row, its server busy 99% of every
    run): the host, not the code, sets the speed of the moment. Loaded together, both servers run
    at every moment's speed, alternating on one CPU, so the ratio of their costs holds while that
    speed swings. A saturated server's msg/s is 1 / its CPU per message, so `cost_ratio` (b's CPU per
    message / a's) is the msg/s ratio each would reach alone on the CPU."""

    a: str
    b: str
    size: int
    conc: int
    runs: list[tuple[Run, Run]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)

    def per_run(self) -> list[float]:
        return [rb.cpu_us / ra.cpu_us for ra, rb in self.runs if ra.cpu_us and rb.cpu_us]

    @property
    def cost_ratio(self) -> float | None:
        ratios = self.per_run()
        return statistics.median(ratios) if ratios else None

    def describe(self) -> str:
        ratios = self.per_run()
        a = [ra.cpu_us or 0 for ra, _ in self.runs]
        b = [rb.cpu_us or 0 for _, rb in self.runs]
        return (
            f"side by side {len(ratios)} runs: CPU/msg {statistics.median(b):.0f} / {statistics.median(a):.0f} us, "
            f"per run {' '.join(f'{r:.2f}' for r in ratios)}"
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "a": self.a,
            "b": self.b,
            "size": self.size,
            "concurrency": self.conc,
            "cost_ratio": self.cost_ratio,
            "failures": self.failures,
            "runs": [[ra.__dict__, rb.__dict__] for ra, rb in self.runs],
        }


WRK_LINE = re.compile(r"^BENCH (.*)$", re.MULTILINE)


def wrk_values(returncode: int, stdout: str, stderr: str) -> dict[str, int] | str:
    """What post.lua's done() printed, or why there is nothing."""
    found = WRK_LINE.search(stdout)
    if returncode != 0 or not found:
        return f"wrk exit {returncode}: {(stderr or stdout).strip()[-300:]}"
    values = {k: int(float(v)) for k, v in (item.split("=") for item in found[1].split())}
    # wrk's own summary counts 3xx too; Lua's errors.status only counts > 399.
    other = re.search(r"Non-2xx or 3xx responses: (\d+)", stdout)
    values["non2xx"] = max(values["non2xx"], int(other[1]) if other else 0)
    return values


class Bench:
    def __init__(
        self,
        args: argparse.Namespace,
        pin: Pinning,
        sink: Sink,
        logdir: Path,
        servers: dict[str, Server],
        postfix: PostfixReceiver | None = None,
        stunnel: StunnelReceiver | None = None,
    ) -> None:
        self.args, self.pin, self.sink, self.logdir = args, pin, sink, logdir
        self.servers = servers
        self.postfix = postfix
        self.stunnel = stunnel
        self.bodies: dict[tuple[str, int], tuple[Path, Path]] = {}

    def body_files(self, form: str, size: int) -> tuple[Path, Path]:
        key = (form, size)
        if key not in self.bodies:
            message = make_message(size)
            body, headers = self.logdir / f"body-{form}-{size}", self.logdir / f"headers-{form}-{size}"
            if form == "json":
                body.write_text(json.dumps({"sender": SENDER, "recipients": [RECIPIENT], "message": message.decode()}))
                headers.write_text("Content-Type: application/json\n")
            elif form == "ndjson":  # the batch row: BATCH lines, each the JSON request above
                one = json.dumps({"sender": SENDER, "recipients": [RECIPIENT], "message": message.decode()})
                body.write_text((one + "\n") * BATCH)
                headers.write_text("Content-Type: application/x-ndjson\n")
            else:
                body.write_bytes(message)

                def b64(text: str) -> str:
                    return base64.b64encode(text.encode()).decode()

                headers.write_text(
                    "Content-Type: message/rfc822\n"
                    f"X-Envelope-Sender: {b64(SENDER)}\nX-Envelope-Recipient: {b64(RECIPIENT)}\n"
                    "X-Ehlo: client.example.com\n"
                )
            self.bodies[key] = (body, headers)
        return self.bodies[key]

    def timing(self, size: int) -> tuple[int, int, int]:
        """(warm-up seconds, runs, seconds per run): large messages take longer runs, fewer of them."""
        if size >= MIB:
            return self.args.large_warmup, self.args.large_runs, self.args.large_duration
        return self.args.warmup, self.args.runs, self.args.duration

    def meter(self) -> CpuMeter:
        readers = [s.reader.pid for s in self.servers.values() if s.reader]  # --mailrelay-log-to pipe
        reapers = [self.postfix.master] if self.postfix else []
        receivers = [self.sink.proc.pid, *([self.stunnel.proc.pid] if self.stunnel else [])]
        return CpuMeter([*receivers, *(s.proc.pid for s in self.servers.values()), *readers], reapers)

    def check_setup(self, key: str) -> str | None:
        """One delivery through a row whose answer shows what it measures (a DKIM signature, TLS or not):
        None when it does, else why not. A row that silently went unsigned or in clear text would time
        the wrong thing. A baseline twin whose code does not report it passes."""
        row = base_key(key)
        if row not in ("dkim-ed25519", "dkim-rsa", "plain", "tls", "starttls"):
            return None
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.servers[key].port}{BY_KEY[key].path}",
            data=self.body_files("json", KIB)[0].read_bytes(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as reply:  # noqa: S310 - http://127.0.0.1
                answer = json.loads(reply.read())
        except (OSError, ValueError) as error:
            return f"its first delivery failed: {error}"
        if row.startswith("dkim"):
            shown, wanted, what = (answer.get("dkim") or {}).get("signed"), True, "dkim.signed"
        else:
            first = (answer.get("recipients") or [{}])[0]
            shown, wanted, what = (first.get("security") or {}).get("encrypted"), row != "plain", "security.encrypted"
        if shown == wanted or (shown is None and key != row):
            return None
        return f"not run: its first answer has {what} {shown}, not {wanted}: {json.dumps(answer)[:300]}"

    def quiet(self, size: int) -> float:
        return 0.6 if size >= MIB else 0.25

    def wrk(self, target: Target, server: Server, size: int, conc: int, seconds: int) -> dict[str, int] | str:
        cmd, env, limit = self.wrk_command(target, server, size, conc, seconds)
        try:
            done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=limit)
        except subprocess.TimeoutExpired:
            return "wrk did not finish"
        return wrk_values(done.returncode, done.stdout, done.stderr)

    def wrk_together(
        self, loads: list[tuple[Target, Server]], size: int, conc: int, seconds: int
    ) -> list[dict[str, int] | str]:
        """wrk against each server at once (one wrk process each, all on the client CPU)."""
        procs = []
        for target, server in loads:
            cmd, env, limit = self.wrk_command(target, server, size, conc, seconds)
            procs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
        results: list[dict[str, int] | str] = []
        for proc in procs:
            try:
                out, err = proc.communicate(timeout=limit)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()
                results.append("wrk did not finish")
                continue
            results.append(wrk_values(proc.returncode, out, err))
        return results

    def wrk_command(
        self, target: Target, server: Server, size: int, conc: int, seconds: int
    ) -> tuple[list[str], dict[str, str], int]:
        body, headers = self.body_files(target.form, size)
        timeout = 60 if size >= MIB else 10
        cmd = [
            *self.pin.cmd(self.pin.client),
            "wrk",
            "-t1",
            f"-c{conc}",
            f"-d{seconds}s",
            "--timeout",
            f"{timeout}s",
            "-s",
            str(BENCH / "post.lua"),
            f"http://127.0.0.1:{server.port}",
        ]
        env = {**os.environ, "BENCH_PATH": target.path, "BENCH_BODY": str(body), "BENCH_HEADERS": str(headers)}
        if base_key(target.key) == "keyed":  # a fresh Idempotency-Key on every request, unique across runs
            env["BENCH_KEY_PREFIX"] = f"bench-{time.time_ns()}-{target.key}-"
        return cmd, env, seconds + timeout + 60

    def measure(self, targets: list[Target], size: int, conc: int) -> list[Point]:
        """The points of `targets` at one size and concurrency; all measured again, once, when others
        used more than --retry-noisy % of a CPU during one of them, and the quieter set kept whole (the
        rows of a point compared are always from the same interleaved runs)."""

        def noise(points: list[Point]) -> float:
            return max((p.others_cpu or 0 for p in points if p.runs), default=0.0)

        points = self.measure_once(targets, size, conc)
        if noise(points) > self.args.retry_noisy:
            again = self.measure_once(targets, size, conc)
            if all(p.runs for p in again) and noise(again) < noise(points):
                for old, new in zip(points, again, strict=True):
                    new.log_events = dict(collections.Counter(old.log_events) + collections.Counter(new.log_events))
                points = again
            for point in points:
                point.retried = True
        return points

    def measure_once(self, targets: list[Target], size: int, conc: int) -> list[Point]:
        if [t.key for t in targets] == ["direct"]:
            return [self.measure_direct(size, conc)]
        return self.measure_http(targets, size, conc)

    def measure_http(self, targets: list[Target], size: int, conc: int) -> list[Point]:
        """The HTTP rows of one point with their runs interleaved (run 1 of each row, then run 2 of
        each, ...): load that comes and goes during the point falls on every row alike, so the rows'
        ratios hold better than those of rows measured one after another (the keyed row once read
        +201 us for load that began after the static row's runs). Each row's warm-up comes first."""
        points = [Point(t.key, size, conc) for t in targets]
        live: list[tuple[Target, Server, Point]] = []
        meters: dict[str, CpuMeter] = {}
        warmup, runs, duration = self.timing(size)
        for target, point in zip(targets, points, strict=True):
            server = self.servers[target.key]
            if server.proc.poll() is not None:
                point.skipped = f"server exited ({server.proc.returncode})"
                continue
            reset_peak_rss(server.proc.pid)
            server.new_log_text()
            meters[target.key] = self.meter()
            warm = self.wrk(target, server, size, conc, warmup)
            if isinstance(warm, str):
                point.failures.append(f"warm-up: {warm}")
            else:
                point.warmup_errors = warm["non2xx"] + sum(warm[k] for k in ("connect", "read", "write", "timeout"))
            live.append((target, server, point))
        cpu_ticks = dict.fromkeys(meters, 0)
        answered = dict.fromkeys(meters, 0)
        for round_ in range(runs):
            for target, server, point in live:
                if round_ and len(live) > 1:
                    # Warm again after the other rows' runs: a server idle that long starts its run
                    # cold (CPU caches, the allocator, its connections), and rows whose runs follow
                    # long gaps read slower than rows measured in one go (the 10-row run of
                    # 2026-12-01 02:37: DKIM +148 us over static, +74 in a 3-row run right after).
                    self.wrk(target, server, size, conc, max(1, warmup // 2))
                before = self.sink.settle(self.quiet(size)) if target.sink else 0
                ticks = sum(_ticks(p) for p in descendants(server.proc.pid))
                result = self.wrk(target, server, size, conc, duration)
                if isinstance(result, str):
                    point.failures.append(result)
                    continue
                spent = sum(_ticks(p) for p in descendants(server.proc.pid)) - ticks
                cpu_ticks[target.key] += spent
                answered[target.key] += (result["requests"] - result["non2xx"]) * target.per_request
                run = Run.of(result, target, spent)
                if target.sink:
                    run.delivered = self.sink.settle(self.quiet(size)) - before
                point.runs.append(run)
        for target, server, point in live:
            done = answered[target.key]
            point.rss_mib = peak_rss_mib(server.proc.pid)
            point.cpu_us_per_msg = cpu_ticks[target.key] / CpuMeter.tick / done * 1e6 if done else None
            point.others_cpu = meters[target.key].others_percent()  # from its warm-up to the point's end
            point.log_events = dict(log_events(server.new_log_text()))
            if server.proc.poll() is not None:
                point.failures.append(f"server exited ({server.proc.returncode}) during the point")
        return points

    def side_by_side(self, a: Target, b: Target, size: int, conc: int) -> Pair:
        """`a` and `b` under load at once (see `Pair`): a warm-up together, then --runs runs."""
        pair = Pair(a.key, b.key, size, conc)
        servers = [self.servers[a.key], self.servers[b.key]]
        if any(server.proc.poll() is not None for server in servers):
            pair.failures.append("a server had exited")
            return pair
        loads = list(zip((a, b), servers, strict=True))
        warmup, runs, duration = self.timing(size)
        for result in self.wrk_together(loads, size, conc, warmup):
            if isinstance(result, str):
                pair.failures.append(f"warm-up: {result}")
        for _ in range(runs):
            before = self.sink.settle(self.quiet(size))
            ticks = [sum(_ticks(p) for p in descendants(server.proc.pid)) for server in servers]
            results = self.wrk_together(loads, size, conc, duration)
            spent = [
                sum(_ticks(p) for p in descendants(server.proc.pid)) - t
                for server, t in zip(servers, ticks, strict=True)
            ]
            made: list[Run] = []
            for target, result, cpu in zip((a, b), results, spent, strict=True):
                if isinstance(result, str):
                    pair.failures.append(result)
                    break
                made.append(Run.of(result, target, cpu))
            if len(made) != 2:
                continue
            delivered = self.sink.settle(self.quiet(size)) - before
            answered = sum(run.ok for target, run in zip((a, b), made, strict=True) if target.sink)
            if delivered < answered:
                pair.failures.append(f"LOST {answered - delivered}: 2xx answers without a message at the sink")
            errors = sum(run.non2xx + run.socket_errors for run in made)
            if errors:
                pair.failures.append(f"{errors} errors")
            pair.runs.append((made[0], made[1]))
        return pair

    def measure_direct(self, size: int, conc: int) -> Point:
        point = Point("direct", size, conc)
        before = self.sink.settle(self.quiet(size))
        meter = self.meter()
        warmup, runs, duration = self.timing(size)
        cmd = [
            *self.pin.cmd(self.pin.server),
            str(VENV_PY),
            str(BENCH / "direct_smtp.py"),
            f"--port={self.sink.port}",
            f"--concurrency={conc}",
            f"--pool={POOL}",
            f"--size={size}",
            f"--duration={duration}",
            f"--warmup={warmup}",
            f"--runs={runs}",
        ]
        try:
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=120 + runs * (duration + 60))
        except subprocess.TimeoutExpired:
            point.failures.append("direct client did not finish")
            return point
        if done.returncode != 0:
            point.failures.append(f"direct client exit {done.returncode}: {done.stderr.strip()[-300:]}")
        sent_total = None
        for line in done.stdout.splitlines():
            item = json.loads(line)
            if "sent_total" in item:
                sent_total = item["sent_total"]
                continue
            point.runs.append(
                Run(
                    ok=item["ok"],
                    seconds=item["duration_us"] / 1e6,
                    p50_ms=item["p50_us"] / 1000,
                    p99_ms=item["p99_us"] / 1000,
                    socket_errors=item["errors"],
                )
            )
            point.rss_mib = item["peak_rss_kib"] / 1024
        delivered = self.sink.settle(self.quiet(size)) - before
        point.others_cpu = meter.others_percent()
        if sent_total is not None and delivered != sent_total:
            point.failures.append(f"smtp-sink counted {delivered} messages, the client sent {sent_total}")
        for run in point.runs:  # the client awaited every reply: the sink check is the total above
            run.delivered = run.ok
        return point


# --------------------------------------------------------------------------- servers


class Redis:
    """A redis-server for the keyed and fleet rows: loopback, no persistence, on the client's CPU (the store is
    another machine in production; what the row measures is mailrelay's own cost per key)."""

    def __init__(self, pin: Pinning, logdir: Path) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self._out = (logdir / "redis.log").open("wb")
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.proc = subprocess.Popen(
            [
                *pin.cmd(pin.client),
                binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(logdir),
                "--daemonize",
                "no",
                "--loglevel",
                "warning",
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 10
        while True:
            try:
                with socket.create_connection(("127.0.0.1", self.port), 0.5) as conn:
                    conn.sendall(b"PING\r\n")
                    if conn.recv(64).startswith(b"+PONG"):
                        break
            except OSError:
                pass
            if time.monotonic() > deadline or self.proc.poll() is not None:
                raise RuntimeError(f"redis-server did not start: {(logdir / 'redis.log').read_text()[-500:]}")
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(5)
        self._out.close()


def mailrelay_config(path: Path, sink_port: int, service: str = "", sink_options: str = "") -> None:
    """The relays every mailrelay row uses; `sink_options` added to the `sink` relay, `service` at the end."""
    # max_waiting above the largest concurrency: c128 with 8 connections queues 120 per destination.
    smtp = (
        f"    concurrent_connections: {POOL}\n    max_waiting: 128\n    idle_timeout: 60\n"
        "    ehlo_as: mailrelay.example.com\n"
    )
    path.write_text(
        "relay:\n"
        "  blackhole:\n    type: blackhole\n"
        f"  sink:\n    type: static\n    host: 127.0.0.1\n    port: {sink_port}\n{smtp}{sink_options}"
        f"  mx:\n    type: mx\n    port: {sink_port}\n    allow_internal_destinations: true\n{smtp}" + service
    )


@dataclass
class Backends:
    """What the rows beyond plain `static` need, started by main(); `missing`: row -> why it cannot run."""

    redis_url: str | None = None
    dkim_keys: dict[str, Path] = field(default_factory=dict)  # "ed25519" / "rsa" -> PEM private key file
    postfix: PostfixReceiver | None = None
    stunnel: StunnelReceiver | None = None
    missing: dict[str, str] = field(default_factory=dict)


#: The fleet row's rate: far above what one process delivers, so it never makes a delivery wait and the
#: row measures the shared check itself.
FLEET_RATE = "100000/s"


def row_configs(logdir: Path, sink_port: int, backends: Backends) -> dict[str, Path]:
    """The configuration file of each mailrelay row that has one of its own, and `static`'s (the rest's)."""
    configs: dict[str, Path] = {}

    def write(row: str, port: int = sink_port, service: str = "", options: str = "") -> None:
        configs[row] = logdir / ("mailrelay.yaml" if row == "static" else f"mailrelay-{row}.yaml")
        mailrelay_config(configs[row], port, service, options)

    write("static")
    if backends.redis_url:
        redis = f"    redis_url: {backends.redis_url}\n"
        write("keyed", service=f"mailrelay:\n  idempotency:\n    backend: redis\n{redis}")
        fleet = (
            f"    fleet_connections: true\n    max_message_rate: {FLEET_RATE}\n    max_connection_rate: {FLEET_RATE}\n"
        )
        write("fleet", service=f"mailrelay:\n  fleet:\n{redis}", options=fleet)
        # The baseline's twin in a Redis database of its own: the same relay name and destination would
        # otherwise share one fleet-wide limit of 8 connections with the row, and wait for its leases.
        twin = f"    redis_url: {backends.redis_url.rsplit('/', 1)[0]}/1\n"
        write("fleet" + BASE, service=f"mailrelay:\n  fleet:\n{twin}", options=fleet)
    for algorithm, key_file in backends.dkim_keys.items():  # make_message's From: is bench@example.com
        identity = f"{{domain: example.com, selector: bench, key_file: '{key_file}'}}"
        write(f"dkim-{algorithm}", options=f"    dkim:\n      - {identity}\n")
    if backends.postfix:
        write("plain", port=backends.postfix.port)
        tls = f"    tls: {{mode: starttls, ca_certs: '{backends.postfix.ca_file}'}}\n"
        write("tls", port=backends.postfix.port, options=tls)
    if backends.stunnel:
        tls = f"    tls: {{mode: starttls, ca_certs: '{backends.stunnel.ca_file}'}}\n"
        write("starttls", port=backends.stunnel.port, options=tls)
    return configs


def workers_supported(env: dict[str, str]) -> bool:
    done = subprocess.run(
        [str(MAILRELAY), "serve", "--help"], capture_output=True, text=True, check=False, env={**os.environ, **env}
    )
    return "--workers" in done.stdout


def start_servers(
    wanted: list[str],
    pin: Pinning,
    sink: Sink,
    dns_port: int,
    logdir: Path,
    workers: int,
    source: Path | None,
    log_level: str,
    base_source: Path | None = None,
    backends: Backends | None = None,
    log_to: str = "file",
) -> tuple[dict[str, Server], dict[str, str]]:
    backends = backends or Backends()
    configs = row_configs(logdir, sink.port, backends)
    config = configs["static"]
    uvicorn_flags = ["--loop", "uvloop", "--http", "httptools", "--log-level", "warning"]
    dns_env = {"MAILRELAY_DNS_NAMESERVERS": f"127.0.0.1:{dns_port}"}
    if source is not None:  # --rev: the service's code from a snapshot, ahead of the editable install
        dns_env["PYTHONPATH"] = str(source)
    servers: dict[str, Server] = {}
    problems: dict[str, str] = {}

    def serve_cmd(port: int, config: Path = config) -> list[str]:
        return [str(MAILRELAY), "serve", "--config", str(config), "--host", "127.0.0.1", "--port", str(port)]

    for key in wanted:
        port = free_port()
        server_pin = pin.cmd(pin.server)
        row = base_key(key)
        env = dns_env if key == row else {**dns_env, "PYTHONPATH": str(base_source)}  # ROW@base: that code
        pipe = pin.cmd(pin.client) if log_to == "pipe" and row in MAILRELAY_ROWS else None
        if key == "bare":
            cmd = [
                *server_pin,
                str(VENV_PY),
                "-m",
                "uvicorn",
                "bench.bare_app:app",
                "--port",
                str(port),
                *uvicorn_flags,
            ]
            servers[key] = Server(key, cmd, port, logdir)
        elif key == "sketch":
            cmd = [*server_pin, str(VENV_PY), "-m", "uvicorn", "bench.sketch_app:app", "--port", str(port)]
            env = {"SKETCH_SMTP_PORT": str(sink.port), "SKETCH_POOL": str(POOL)}
            servers[key] = Server(key, [*cmd, *uvicorn_flags], port, logdir, env)
        elif key == "slimta":
            cmd = [*server_pin, str(SLIMTA_PY), str(BENCH / "slimta_edge.py"), "--port", str(port)]
            servers[key] = Server(key, [*cmd, "--smtp-port", str(sink.port), "--pool", str(POOL)], port, logdir)
        elif row in MAILRELAY_ROWS and row != "workers":
            if row in backends.missing:
                problems[key] = backends.missing[row]
                continue
            cmd = [
                *server_pin,
                *serve_cmd(port, configs.get(key) or configs.get(row, config)),
                "--log-level",
                log_level,
            ]
            servers[key] = Server(key, cmd, port, logdir, env, pipe)
        elif row == "workers":
            if workers < 1:
                problems[key] = "not run (--workers 0)"
                continue
            if not workers_supported(env):
                problems[key] = (
                    "SKIPPED: `mailrelay serve` has no --workers option yet; "
                    "rerun `bench/run --only workers` once it has"
                )
                continue
            cmd = [*pin.cmd(pin.all), *serve_cmd(port), "--log-level", log_level, "--workers", str(workers)]
            servers[key] = Server(key, cmd, port, logdir, env, pipe)
    for key, server in list(servers.items()):
        why = server.wait_ready(http=key != "slimta")
        if why:
            problems[key] = f"did not start: {why}"
            server.stop()
            del servers[key]
    return servers, problems


# --------------------------------------------------------------------------- report


def versions(rev: str | None) -> list[str]:
    def dist(name: str) -> str:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return "-"

    def run(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, check=False, cwd=ROOT).stdout.strip()
        except OSError:
            return "-"

    ours = " ".join(
        f"{n} {dist(n)}"
        for n in ("fastapi", "starlette", "uvicorn", "uvloop", "httptools", "pydantic", "aiosmtplib", "dnspython")
    )
    slimta = run(
        [
            str(SLIMTA_PY),
            "-c",
            "import importlib.metadata as m, platform; print('Python', platform.python_version(), *("
            "f'{n} {m.version(n)}' for n in ('python-slimta', 'gevent', 'greenlet', 'pycares')))",
        ]
    )
    if rev:
        where = f"commit {run(['git', 'rev-parse', '--short', rev])} (--rev {rev}: a snapshot, not the working tree)"
    else:
        dirty = run(["git", "status", "--porcelain", "--", "app", "relays", "schemas"])
        where = f"working tree at commit {run(['git', 'rev-parse', '--short', 'HEAD'])}"
        where += " + uncommitted changes in app/relays/schemas" if dirty else ""
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor() or "?",
    )
    mem = next(
        (line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines() if line.startswith("MemTotal")), "0"
    )
    postfix = run(["dpkg-query", "-W", "-f=${Version}", "postfix"]) or run(["postconf", "-dh", "mail_version"])
    wrk = run(["dpkg-query", "-W", "-f=${Version}", "wrk"])
    return [
        f"CPU: {model}, {os.cpu_count()} cores; memory {int(mem) // 1024 // 1024} GiB",
        f"kernel: {platform.system()} {platform.release()}; "
        f"Debian {Path('/etc/debian_version').read_text().strip() if Path('/etc/debian_version').exists() else '-'}",
        f"mailrelay: {where}; Python {platform.python_version()}; {ours}",
        f"peer: {slimta or 'slimta venv missing'}",
        f"tools: postfix smtp-sink {postfix}, wrk {wrk} (one thread)",
    ]


def versions_commit(rev: str) -> str:
    done = subprocess.run(["git", "rev-parse", "--short", rev], capture_output=True, text=True, cwd=ROOT, check=False)
    return done.stdout.strip() or "?"


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None or value != value else format(value, spec)


def table(points: list[Point], args: argparse.Namespace) -> list[str]:
    by = {(p.target, p.size, p.conc): p for p in points}

    def ratio(point: Point, other: str) -> str:
        base = by.get((other, point.size, point.conc))
        if not base or not base.runs or not point.runs or point.target == other or not base.rate:
            return "-"
        return f"{point.rate / base.rate:.2f}"

    ceiling = {"blackhole": "bare", "sketch": "direct", "slimta": "direct", "static": "direct"}
    ceiling |= {"static822": "direct", "mx": "direct", "workers": "direct", "keyed": "direct", "batch": "direct"}
    # (plain and tls go to Postfix, not to the direct pool's smtp-sink: no ceiling)
    ceiling |= {"dkim-ed25519": "direct", "dkim-rsa": "direct", "fleet": "direct"}
    head = (
        f"{'size':>7} {'conc':>4}  {'what':<36} {'msg/s':>8} {'±':>4} {'p50 ms':>7} {'p99 ms':>8} "
        f"{'RSS MiB':>7} {'CPU us':>6} {'errors':>6} {'sink':>6} {'other%':>6}  {'÷slimta':>7} {'÷sketch':>7} "
        f"{'÷ceil':>6}"
    )
    lines = [head, "-" * len(head)]
    keys = sorted({(p.size, p.conc) for p in points})
    for size, conc in keys:
        for target in TARGETS:
            point = by.get((target.key, size, conc))
            if point is None:
                continue
            label = target.label.replace("--workers N", f"--workers {args.workers}")
            if point.skipped or not point.runs:
                why = point.skipped or "; ".join(point.failures) or "no runs"
                lines.append(f"{size_label(size):>7} {conc:>4}  {label:<36} {'':>8} {why}"[:200])
                continue
            row = base_key(target.key)
            mr = row in ("static", "static822", "mx", "workers", "keyed", "batch", "sketch", "dkim-ed25519", "dkim-rsa")
            mr = mr or row in ("fleet", "plain", "tls", "starttls")
            lines.append(
                f"{size_label(size):>7} {conc:>4}  {label:<36} {point.rate:>8.0f} {point.spread * 100:>3.0f}% "
                f"{point.p50:>7.2f} {point.p99:>8.2f} {fmt(point.rss_mib, '.0f'):>7} "
                f"{fmt(point.cpu_us_per_msg, '.0f'):>6} {point.errors:>6} "
                f"{point.verified():>6} {fmt(point.others_cpu, '.0f') + ('r' if point.retried else ''):>6}  {ratio(point, 'slimta') if mr else '-':>7} "
                f"{ratio(point, 'sketch') if mr and target.key != 'sketch' else '-':>7} "
                f"{ratio(point, ceiling[row]) if row in ceiling else '-':>6}"
            )
        lines.append("")
    return lines


#: The rows whose ratio to another is a goal or a figure an issue asks for, as (row, compared with):
#: measured side by side too (`Pair`) at 1 KiB c8.
RATIO_PAIRS = (
    ("mx", "static"),
    ("keyed", "static"),
    ("batch", "static"),
    ("starttls", "static"),
    ("tls", "plain"),
    ("dkim-ed25519", "static"),
    ("dkim-rsa", "static"),
    ("fleet", "static"),
)


def side_by_side_pairs(targets: list[str]) -> list[tuple[str, str]]:
    """The RATIO_PAIRS both measured, and with --baseline every mailrelay row with its twin."""
    pairs = [(a, b) for a, b in RATIO_PAIRS if a in targets and b in targets]
    pairs += [(key, key + BASE) for key in targets if key + BASE in targets]
    return pairs


def goals(points: list[Point], rsa_signature_us: float | None = None, pairs: Sequence[Pair] = ()) -> list[str]:
    by = {(p.target, p.size, p.conc): p for p in points if p.runs}
    together = {(p.a, p.b, p.size, p.conc): p for p in pairs if p.cost_ratio is not None}
    out: list[str] = []

    def check(name: str, ok: bool | None, detail: str) -> None:
        verdict = "n/a " if ok is None else ("PASS" if ok else "FAIL")
        out.append(f"{verdict}  {name}: {detail}")

    def cpu(pa: Point, pb: Point) -> str:
        """Server CPU per message of both, and the difference: steadier than msg/s on a loaded machine."""
        if not pa.cpu_us_per_msg or not pb.cpu_us_per_msg:
            return ""
        return (
            f"; CPU {pa.cpu_us_per_msg:.0f} vs {pb.cpu_us_per_msg:.0f} us/msg "
            f"({pa.cpu_us_per_msg - pb.cpu_us_per_msg:+.0f} us, {pa.cpu_us_per_msg / pb.cpu_us_per_msg:.2f}x)"
        )

    def rate_ratio(name: str, a: str, b: str, size: int, conc: int, floor: float | None, note: str = "") -> None:
        """`floor` None: a figure to report (INFO), not a goal."""
        pa, pb = by.get((a, size, conc)), by.get((b, size, conc))
        if not pa or not pb:
            check(name, None, f"{a} or {b} at {size_label(size)} c{conc} not measured")
            return
        r = pa.rate / pb.rate
        needs = f" (needs >= {floor})" if floor is not None else ""
        pair = together.get((a, b, size, conc))
        if pair is not None and pair.cost_ratio is not None:
            # judged side by side (Pair): the one-after-the-other figures follow the host's speed
            r = pair.cost_ratio
            detail = (
                f"{r:.2f}{needs}, {pair.describe()}; one after the other: {pa.rate:.0f} / {pb.rate:.0f} msg/s = "
                f"{pa.rate / pb.rate:.2f}{cpu(pa, pb)}{note}"
            )
        else:
            detail = f"{pa.rate:.0f} / {pb.rate:.0f} msg/s = {r:.2f}{needs}{cpu(pa, pb)}{note}"
        if floor is None:
            out.append(f"INFO  {name}: {detail}")
        else:
            check(name, r >= floor, detail)

    rate_ratio("static json 1 KiB c8 >= 5x slimta", "static", "slimta", KIB, 8, 5)
    rate_ratio("static rfc822 1 KiB c8 >= 5x slimta (same wire format)", "static822", "slimta", KIB, 8, 5)
    rate_ratio("static json 1 KiB c8 >= 0.9x the sketch", "static", "sketch", KIB, 8, 0.9)
    for key in ("static", "static822"):
        p = by.get((key, KIB, 1))
        check(
            f"{BY_KEY[key].label} 1 KiB p50 at c1 < 1 ms",
            None if not p else p.p50 < 1.0,
            "not measured" if not p else f"p50 {p.p50:.2f} ms",
        )
    rate_ratio("blackhole 1 KiB c8 >= 0.8x bare FastAPI", "blackhole", "bare", KIB, 8, 0.8)
    concs = sorted({c for (t, s, c) in by if t == "static" and s == 100 * KIB})
    for conc in concs or [8]:
        rate_ratio(
            f"static json 100 KiB c{conc} within 10% of the direct pool", "static", "direct", 100 * KIB, conc, 0.9
        )
    bound = 3 * (10 * MIB * 8) / MIB + 100
    for key in ("static", "static822"):
        p = by.get((key, 10 * MIB, 8))
        check(
            f"{BY_KEY[key].label} 10 MiB c8 peak RSS < 3x(10 MiB x 8) + 100 MiB = {bound:.0f} MiB",
            None if not p or p.rss_mib is None else p.rss_mib < bound,
            "not measured" if not p or p.rss_mib is None else f"{p.rss_mib:.0f} MiB",
        )
    rate_ratio("mx (warm cache) 1 KiB c8 within 5% of static", "mx", "static", KIB, 8, 0.95)
    # issue 16: the cost of an Idempotency-Key with the Redis store
    rate_ratio("keyed (Redis) 1 KiB c8 >= 0.85x unkeyed static", "keyed", "static", KIB, 8, 0.85)
    # issue 19: a batch pays the HTTP cost once for its 100 messages
    rate_ratio("batch x100 1 KiB c8 >= 1.5x single static json", "batch", "static", KIB, 8, 1.5)
    # issue 18: STARTTLS to the next hop, pooled, against the plain-text static row (smtp-sink; the
    # STARTTLS receiver is stunnel in front of the same smtp-sink)
    rate_ratio(
        "starttls (STARTTLS via stunnel, pooled) 1 KiB c8 >= 0.9x plain-text static", "starttls", "static", KIB, 8, 0.9
    )
    rate_ratio(
        "tls / plain (STARTTLS / clear text to the same Postfix, whose smtpd is the bottleneck), 1 KiB c8",
        "tls",
        "plain",
        KIB,
        8,
        None,
    )
    rate_ratio(
        "plain (clear text to Postfix) / static (to smtp-sink), 1 KiB c8: the receivers",
        "plain",
        "static",
        KIB,
        8,
        None,
    )
    rate_ratio("dkim-ed25519 1 KiB c8 >= 0.85x unsigned static", "dkim-ed25519", "static", KIB, 8, 0.85)
    raw = f"; one RSA-2048 signature alone: {rsa_signature_us:.0f} us" if rsa_signature_us else ""
    rate_ratio("dkim-rsa (RSA-2048) 1 KiB c8 / unsigned static", "dkim-rsa", "static", KIB, 8, None, raw)
    # issue 17: a fleet-wide lease and a fleet-wide rate check per delivery
    rate_ratio(
        f"fleet (fleet_connections + max_message_rate and max_connection_rate {FLEET_RATE}, Redis) 1 KiB c8 / static",
        "fleet",
        "static",
        KIB,
        8,
        None,
    )
    return out


def signing_costs(found: dict[str, bytes]) -> tuple[list[str], float | None]:
    """bench/signing.py's in-process costs (raw signatures, our signer, dkimpy's) for its 1 KiB message,
    and the raw RSA-2048 signature's microseconds among them."""
    try:
        from signing import message, raw_costs

        # signing.py's own message: its From: is the domain its signers sign for (make_message's is not)
        lines = raw_costs(found, message(KIB))
    except Exception as error:  # a figure missing from the report, not a failed run
        return [f"  not measured: bench/signing.py's raw_costs(): {error!r}"], None
    rsa = next((float(line.split()[-2]) for line in lines if "RSA-2048 signature alone" in line), None)
    return lines, rsa


def baseline_lines(points: list[Point], rev: str, pairs: Sequence[Pair] = ()) -> list[str]:
    """Each mailrelay point against its twin on the code of `rev`, measured seconds apart, and side
    by side (`Pair`) at 1 KiB c8."""
    by = {(p.target, p.size, p.conc): p for p in points if p.runs}
    out = [
        f"side by side {size_label(p.size)} c{p.conc} {p.a}: msg/s per CPU-second / its twin's = {p.cost_ratio:.3f}x "
        f"({p.describe()})"
        for p in pairs
        if p.b == p.a + BASE and p.cost_ratio is not None
    ]
    ratios: list[float] = []
    cpus: list[float] = []
    for (key, size, conc), point in by.items():
        base = by.get((key + BASE, size, conc))
        if key.endswith(BASE) or base is None or not base.rate:
            continue
        ratio = point.rate / base.rate
        ratios.append(ratio)
        cpu = "-"
        if point.cpu_us_per_msg and base.cpu_us_per_msg:
            cpus.append(point.cpu_us_per_msg / base.cpu_us_per_msg)
            cpu = f"{point.cpu_us_per_msg:.0f} vs {base.cpu_us_per_msg:.0f} us = {cpus[-1]:.3f}x"
        out.append(
            f"{size_label(size):>7} c{conc:<4} {BY_KEY[key].label:<36} {point.rate:>7.0f} ±{point.spread * 100:.0f}% vs "
            f"{base.rate:>7.0f} ±{base.spread * 100:.0f}%  = {ratio:.3f}x   p50 {point.p50:.2f} vs {base.p50:.2f} ms   "
            f"CPU/msg {cpu}"
        )
    if ratios:
        out.append(
            f"msg/s, all points: median {statistics.median(ratios):.3f}x, lowest {min(ratios):.3f}x, "
            f"highest {max(ratios):.3f}x"
        )
    if cpus:
        out.append(
            f"server CPU per message, all points: median {statistics.median(cpus):.3f}x, lowest {min(cpus):.3f}x, "
            f"highest {max(cpus):.3f}x (under 1: cheaper than the baseline)"
        )
    return out


#: mailrelay's events when the fleet-wide limits fall back to local ones (Redis did not answer in time).
FLEET_FALLBACKS = ("fleet_fallback", "fleet_limits_local")
EXCEPTION_LINE = re.compile(r"^(?:[a-z_][\w.]*\.)?([A-Z]\w*(?:Error|Exception|Disconnect|Exit|Timeout))\b")
SLIMTA_EXCEPTION = re.compile(r"exception:(\w+):")


def log_events(text: str) -> collections.Counter[str]:
    """Error events in a server's log: ERROR/CRITICAL lines, and the exception type ending each traceback."""
    events: collections.Counter[str] = collections.Counter()
    for line in text.splitlines():
        if line.startswith("{"):  # mailrelay's JSON log lines
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if record.get("event") in FLEET_FALLBACKS:  # the fleet row then measured local limits, not Redis
                events[f"WARNING {record['event']}: the fleet's Redis did not answer in time, limits were local"] += 1
            if str(record.get("level", "")).lower() in ("error", "critical"):
                where = f"{record.get('logger', '')}: " if record.get("logger") else ""
                events[re.sub(r"\s+", " ", f"ERROR: {where}{record.get('message', '')}").strip()[:120]] += 1
                # (uvicorn.error repeats the traceback app.problems already logged for the same request)
                same = record.get("logger") == "uvicorn.error"
                trace = [] if same else str(record.get("exception") or "").strip().splitlines()
                if trace and (match := EXCEPTION_LINE.match(trace[-1])):
                    events[f"exception {match[1]}"] += 1
        elif line.startswith(("ERROR:", "CRITICAL:")):
            events[re.sub(r"\s+", " ", line.strip())[:120]] += 1
        elif match := EXCEPTION_LINE.match(line) or SLIMTA_EXCEPTION.search(line):
            events[f"exception {match[1]}"] += 1
    return events


def describe_events(events: collections.Counter[str]) -> str:
    return "; ".join(f"{n} x {what}" for what, n in events.most_common(4))


# --------------------------------------------------------------------------- main


def plan(args: argparse.Namespace, targets: list[str]) -> list[tuple[int, int, str]]:
    """(size, concurrency, target) in the order they run: point by point, every target in turn,
    so that the ratios compare figures taken a few seconds apart on a noisy machine."""
    out = []
    for size in args.sizes:
        for conc in args.conc:
            if size >= MIB and conc not in args.large_conc:
                continue
            for key in targets:
                if base_key(key) == "workers" and (size not in args.worker_sizes or conc not in args.worker_conc):
                    continue
                if base_key(key) == "keyed" and size not in args.keyed_sizes:
                    continue
                if base_key(key) == "batch" and (size != KIB or conc > 8):  # 100 lines of 1 KiB, at c1 and c8
                    continue
                if base_key(key) in ("dkim-ed25519", "dkim-rsa", "fleet", "starttls") and size != KIB:
                    continue
                # Postfix refuses 10 MiB (its fixture's message_size_limit); 100 KiB at c1 and c8 only (run time)
                if base_key(key) in POSTFIX_ROWS and (size >= MIB or (size > KIB and conc > 8)):
                    continue
                out.append((size, conc, key))
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        prog="bench/run", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="c1 and c8; 1 KiB, 100 KiB, and 10 MiB at c8 only")
    parser.add_argument("--sizes", type=parse_size, nargs="+", help="message sizes (default 1K 100K 10M)")
    parser.add_argument("--conc", type=int, nargs="+", help="concurrencies (default 1 8 32 128)")
    parser.add_argument("--runs", type=int, help="measured runs per point (default 4; --quick 3)")
    parser.add_argument("--duration", type=int, help="seconds per run (default 2)")
    parser.add_argument("--warmup", type=int, default=1, help="seconds of warm-up per point (default 1)")
    parser.add_argument(
        "--max-conc-large",
        type=int,
        default=8,
        help="highest concurrency for messages of 1 MiB and more (default 8: at about 10 messages/s a 10 MiB "
        "request at c32 waits 3 s, so a point needs minutes, and 128 x 10 MiB in flight per hop measures memory "
        "pressure on a shared machine, not throughput)",
    )
    parser.add_argument("--large-runs", type=int, help="runs per point for 1 MiB and more (default 2; --quick 1)")
    parser.add_argument("--large-duration", type=int, help="seconds per run for 1 MiB and more (6; --quick 5)")
    parser.add_argument("--large-warmup", type=int, default=2, help="warm-up for 1 MiB and more (default 2)")
    parser.add_argument(
        "--workers", type=int, help="`mailrelay serve --workers N` for the multi-core row (default: CPU count; 0: off)"
    )
    parser.add_argument(
        "--retry-noisy",
        type=float,
        default=40,
        help="measure a point again, once, when other processes used more than this %% of a CPU during it (40)",
    )
    parser.add_argument("--only", nargs="+", choices=[t.key for t in TARGETS], help="run only these rows")
    parser.add_argument("--no-pin", action="store_true", help="do not pin with taskset")
    parser.add_argument(
        "--mailrelay-log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="mailrelay's --log-level (default info, the service's default: a JSON line per delivery)",
    )
    parser.add_argument(
        "--rev",
        help="benchmark mailrelay as committed at this git revision (a `git archive` snapshot run from the "
        "project's .venv) instead of the working tree, which others may be editing",
    )
    parser.add_argument(
        "--mailrelay-log-to",
        default="file",
        choices=["file", "pipe"],
        help="where mailrelay's output goes: a file (default), or a pipe to `cat` appending to that file (as "
        "under a container runtime; its lines are then written by the log writer thread, not on the loop)",
    )
    parser.add_argument(
        "--baseline",
        metavar="REV",
        help="also measure every mailrelay row on the code as committed at REV (a `git archive` snapshot), "
        "right after the row itself at each point, and print the ratios: before/after in one run",
    )
    parser.add_argument(
        "--no-side-by-side",
        action="store_true",
        help="skip the side-by-side runs (each goal's pair of rows loaded at once, 1 KiB c8) that the goals are judged on",
    )
    parser.add_argument("--output", type=Path, help="results file (default bench/results/DATE-TIME-bench.txt)")
    args = parser.parse_args()
    quick = args.quick
    args.sizes = args.sizes or [KIB, 100 * KIB, 10 * MIB]
    args.conc = args.conc or ([1, 8] if quick else [1, 8, 32, 128])
    args.runs = args.runs or (3 if quick else 4)
    args.duration = args.duration or 2
    args.large_runs = args.large_runs or (1 if quick else 2)
    args.large_duration = args.large_duration or (5 if quick else 6)
    args.workers = (os.cpu_count() or 1) if args.workers is None else args.workers
    args.worker_sizes = [KIB]
    args.keyed_sizes = [KIB]  # a fresh key per request is built in wrk's Lua: a copy of the body each
    args.worker_conc = [8] if quick else [c for c in args.conc if c >= 8]
    # --quick: large messages only at c8, where the RSS goal is
    args.large_conc = [8] if quick else [c for c in args.conc if c <= args.max_conc_large]
    targets = args.only or [t.key for t in TARGETS]
    if "tls" in targets and "plain" not in targets:  # compared with plain: the same Postfix in clear text
        targets.insert(targets.index("tls"), "plain")
    if "starttls" in targets and "static" not in targets:  # its goal is against static
        targets.insert(targets.index("starttls"), "static")
    if args.baseline:
        targets = add_baseline_targets(targets, args.baseline)
    steps = plan(args, targets)

    for tool in ("wrk", "smtp-sink"):
        if not shutil.which(tool) and not Path(f"/usr/sbin/{tool}").exists():
            log(f"{tool} not found: run bench/run, which installs it")
            return 1
    if "slimta" in targets and not SLIMTA_PY.exists():
        log(f"{SLIMTA_PY} missing: run bench/run, which installs it")
        return 1

    started = datetime.datetime.now()
    logdir = BENCH / ".logs" / started.strftime("%Y%m%d-%H%M%S")
    logdir.mkdir(parents=True)

    def snapshot(rev: str, name: str) -> Path | None:
        where = logdir / name
        where.mkdir()
        archive = subprocess.run(
            ["git", "archive", "--format=tar", rev, "app", "relays", "schemas"], cwd=ROOT, capture_output=True
        )
        if archive.returncode != 0:
            log(f"git archive {rev}: {archive.stderr.decode().strip()}")
            return None
        subprocess.run(["tar", "-x", "-C", str(where)], input=archive.stdout, check=True)
        return where

    source = base_source = None
    if args.rev and (source := snapshot(args.rev, "src")) is None:
        return 1
    if args.baseline and (base_source := snapshot(args.baseline, "base-src")) is None:
        return 1
    pin = Pinning(not args.no_pin)
    if pin.enabled:
        os.sched_setaffinity(0, {1})

    def per_step(size: int) -> float:
        # each run after the first is warmed again (Bench.measure_http)
        if size >= MIB:
            rewarm = (args.large_runs - 1) * max(1, args.large_warmup // 2)
            return float(args.large_warmup + rewarm + args.large_runs * (args.large_duration + 1.5) + 2)
        return float(args.warmup + (args.runs - 1) * max(1, args.warmup // 2) + args.runs * (args.duration + 0.6) + 1)

    estimate = sum(per_step(size) for size, _, _ in steps)
    log(f"bench: {len(steps)} points, about {estimate / 60:.0f} min; logs in {logdir.relative_to(ROOT)}")
    load_before = Path("/proc/loadavg").read_text().split()[:3]

    sink = Sink(pin, logdir)
    redis = postfix = stunnel = None
    backends = Backends()
    rows = {base_key(k) for k in targets}
    if rows & set(REDIS_ROWS):
        if shutil.which("redis-server") or Path("/usr/bin/redis-server").exists():
            redis = Redis(pin, logdir)
            backends.redis_url = redis.url
        else:
            backends.missing |= dict.fromkeys(REDIS_ROWS, "not run: no redis-server (bench/run installs it)")
    dkim_found: dict[str, bytes] = {}
    if rows & {"dkim-ed25519", "dkim-rsa"}:
        try:  # bench/signing.py's keys: an RSA-2048 and an Ed25519 key, PEM files in the directory given
            from signing import keys

            (logdir / "dkim").mkdir()
            dkim_found = keys(logdir / "dkim")
            backends.dkim_keys = {name: logdir / "dkim" / f"{name}.key" for name in dkim_found}
        except Exception as error:  # the rest of the run goes on without the DKIM rows
            why = f"not run: no DKIM keys (bench/signing.py's keys(): {error!r})"
            backends.missing |= {"dkim-ed25519": why, "dkim-rsa": why}
    if rows & set(POSTFIX_ROWS):
        try:
            postfix = backends.postfix = PostfixReceiver(sink)
        except Exception as error:  # the rest of the run goes on without the Postfix rows
            backends.missing |= dict.fromkeys(POSTFIX_ROWS, f"not run: Postfix did not start: {error}")
    if rows & set(STUNNEL_ROWS):
        try:
            stunnel = backends.stunnel = StunnelReceiver(pin, sink, logdir)
        except Exception as error:  # the rest of the run goes on without it
            backends.missing |= dict.fromkeys(STUNNEL_ROWS, f"not run: {error}")
    dns_port = free_port()
    resolver, dns_servers = start_dns(dns_port, DOMAIN)
    http_targets = [k for k in dict.fromkeys(k for _, _, k in steps) if k != "direct"]
    servers: dict[str, Server] = {}
    points: list[Point] = []
    pairs: list[Pair] = []
    try:
        servers, problems = start_servers(
            http_targets,
            pin,
            sink,
            dns_port,
            logdir,
            args.workers,
            source,
            args.mailrelay_log_level,
            base_source,
            backends,
            args.mailrelay_log_to,
        )
        for key, why in problems.items():
            log(f"{key}: {why}")
        bench = Bench(args, pin, sink, logdir, servers, postfix, stunnel)
        for key in list(servers):
            if wrong := bench.check_setup(key):
                problems[key] = wrong
                servers.pop(key).stop()
        # The HTTP rows of one size and concurrency are measured together, their runs interleaved
        # (Bench.measure_http); the direct client on its own.
        groups: dict[tuple[int, int, bool], list[str]] = {}
        for size, conc, key in steps:
            groups.setdefault((size, conc, key == "direct"), []).append(key)
        index = 0
        for (size, conc, _), keys in groups.items():
            measured = [k for k in keys if k == "direct" or k in servers]
            found = dict(zip(measured, bench.measure([BY_KEY[k] for k in measured], size, conc), strict=True))
            for key in keys:
                index += 1
                target = BY_KEY[key]
                point = found.get(key) or Point(key, size, conc, skipped=problems.get(key, "not started"))
                points.append(point)
                if point.runs:
                    log(
                        f"[{index}/{len(steps)}] {size_label(size)} c{conc} {target.label}: {point.rate:.0f} msg/s "
                        f"p50 {point.p50:.2f} ms p99 {point.p99:.2f} ms errors {point.errors} sink {point.verified()}"
                        + (f" ({'; '.join(point.failures)})" if point.failures else "")
                    )
                else:
                    log(
                        f"[{index}/{len(steps)}] {size_label(size)} c{conc} {target.label}: "
                        f"{point.skipped or point.failures}"
                    )
        if not args.no_side_by_side:
            planned = set(steps)
            for a, b in side_by_side_pairs(targets):
                if a in servers and b in servers and {(KIB, 8, a), (KIB, 8, b)} <= planned:
                    pair = bench.side_by_side(BY_KEY[a], BY_KEY[b], KIB, 8)
                    pairs.append(pair)
                    log(f"side by side 1 KiB c8 {a} / {b}: {pair.describe() if pair.runs else pair.failures}")
        dns_queries = resolver.queries
    finally:
        for server in servers.values():
            server.stop()
        sink.stop()
        if redis:
            redis.stop()
        if postfix:
            postfix.stop()
        if stunnel:
            stunnel.stop()
        for dns in dns_servers:
            with contextlib.suppress(Exception):
                dns.stop()
    signing: list[str] = []
    rsa_signature_us = None
    if dkim_found and any(p.runs and base_key(p.target) == "dkim-rsa" for p in points):
        if pin.enabled:  # the servers have stopped: CPU 0, where they ran, is the one to compare with
            os.sched_setaffinity(0, {0})
        signing, rsa_signature_us = signing_costs(dkim_found)
        if pin.enabled:
            os.sched_setaffinity(0, {1})
    finished = datetime.datetime.now()
    load_after = Path("/proc/loadavg").read_text().split()[:3]

    skipped_large = [c for c in args.conc if c not in args.large_conc]
    report = [
        f"# mailrelay benchmark, {started:%Y-%m-%d %H:%M} to {finished:%H:%M} ({(finished - started).seconds // 60} min)",
        f"# command: bench/run {' '.join(sys.argv[1:])}".rstrip(),
        *(f"# {line}" for line in versions(args.rev)),
        f"# {pin.describe()}",
        f"# logs: mailrelay at --log-level {args.mailrelay_log_level} (JSON, to a "
        + ("file" if args.mailrelay_log_to == "file" else "pipe read by `cat` on the client CPU, appending to a file")
        + ("; the service's default: one line per delivery" if args.mailrelay_log_level == "info" else "")
        + "); bare and sketch at uvicorn's warning (no access log).",
        f"# load average before {' '.join(load_before)}, after {' '.join(load_after)}: the machine is shared "
        "(other engineers run test suites), so figures are noisy; compare rows of one point, taken seconds apart.",
        f"# each point: {args.warmup} s warm-up, then {args.runs} runs of {args.duration} s ({args.large_warmup} s and "
        f"{args.large_runs} x {args.large_duration} s from 1 MiB), the runs of a point's rows interleaved (run 1 of "
        "each row, then run 2, ..., each after a warm-up of half the first's);\n#   msg/s is the median of the runs (± half their"
        " range, in % of the median), p50/p99 the median of the runs' wrk percentiles.",
        "# msg/s counts 2xx answers only. errors: non-2xx answers plus socket errors (connect/read/write/timeout)",
        "#   from wrk's Lua done(), warm-up included. sink: smtp-sink's message count checked against the 2xx",
        "#   answers (ok; LOST n = 2xx answers without a message at the sink). RSS: the server's peak RSS during",
        "#   the point (VmHWM; summed over processes for --workers). CPU us: the server's CPU time (user+system,",
        "#   every thread and process) per 2xx answer in the measured runs, in microseconds: steadier than msg/s",
        "#   when others load the machine (the direct client's row has none). ÷slimta/÷sketch/÷ceil: msg/s ratios at the",
        "#   same size and concurrency; the ceiling is bare FastAPI for blackhole, the direct pool for the rest.",
        "#   other%: CPU used by processes not of this benchmark during the point, in % of one CPU (of 200%",
        f"#   on 2 cores): a point with a high figure was measured while someone else's work ran. Over "
        f"{args.retry_noisy:.0f}% the point",
        "#   was measured again and the quieter of the two kept (marked r).",
        f"# pool: {POOL} SMTP connections everywhere (mailrelay concurrent_connections, slimta pool_size, sketch,",
        "#   direct client). Messages: exactly the given size, 76-character lines; one recipient; JSON form for",
        "#   bare/sketch/mailrelay json, message/rfc822 with base64 X-Envelope-* headers for slimta and rfc822.",
        f"# mx: dnslib server on 127.0.0.1:{dns_port} (MX {DOMAIN} -> mx.{DOMAIN} A 127.0.0.1, relay `port:` = "
        f"the sink's); it answered {dns_queries} queries in the whole run (a warm cache asks once per TTL).",
    ]
    if "slimta" in targets:
        report.append(
            "# slimta: its pooled SMTP client waits 10 ms on every reused connection for a reply the server might have "
            "sent\n#   (slimta/smtp/client.py has_reply_waiting), which puts a floor of about 11 ms under each message; "
            "without reuse\n#   (its default idle_timeout, QUIT after each) it measured slower still (about 280 msg/s at c8),"
            " so the row keeps\n#   connections open (idle_timeout 60), its best configuration."
        )
    if rows & set(POSTFIX_ROWS):
        report.append(
            "# plain / tls: `static` to a private Postfix (tests/servers/postfix.py) on CPU 1 with wrk: smtpd with "
            "STARTTLS (a certificate of a CA\n#   made at start; tls verifies it), each message passed on to "
            "smtp-sink by smtpd_proxy_filter (no queue). It is\n#   slower than smtp-sink alone, so tls is "
            "compared with plain, the same receiver in clear text."
        )
    if rows & set(STUNNEL_ROWS):
        report.append(
            "# starttls: `static` with STARTTLS (tls: starttls, verified) to stunnel (server mode, protocol = smtp) on "
            "CPU 1, which\n#   offers STARTTLS for smtp-sink behind it: the static row's receiver plus a TLS front end,"
            " so starttls is compared with static."
        )
    if rows & {"dkim-ed25519", "dkim-rsa", "fleet"}:
        report.append(
            "# dkim-*: `static` with a DKIM identity for the messages' From: domain (keys made at start by "
            "bench/signing.py's keys()).\n#   fleet: `static` with fleet_connections: true, max_connection_rate and max_message_rate "
            f"{FLEET_RATE} (never binding) on the bench's redis-server\n#   (CPU 1, no persistence): a shared lease "
            "per connection opened and a shared rate check per delivery."
        )
    if "workers" in targets:
        report.append(
            "# the --workers row runs on both CPUs, which it shares with wrk and smtp-sink: it shows scaling, "
            "not a clean ceiling."
        )
    if skipped_large:
        report.append(
            f"# messages of 1 MiB and more: concurrency {', '.join(map(str, skipped_large))} skipped"
            + (
                " (--quick: only c8, where the RSS goal is)."
                if quick
                else f" (--max-conc-large {args.max_conc_large}): {max(skipped_large)} x 10 MiB in flight per hop "
                "measures memory pressure on a shared 24 GiB machine, not throughput."
            )
        )
    report.append("")
    report += table(points, args)
    report += [
        "Goals (issue 8; keyed: issue 16; batch: issue 19; tls and dkim: issue 18; fleet: issue 17; INFO: a figure "
        "the issue asks for, no goal):",
        *goals(points, rsa_signature_us, pairs),
        "",
    ]
    if signing:
        report += [
            "DKIM signing in-process (bench/signing.py's raw_costs, best of 5, its 1 KiB message, on the server's "
            "CPU after the run):",
            *signing,
            "",
        ]
    if args.baseline:
        report += [
            f"Against the baseline (--baseline {args.baseline}, commit "
            f"{versions_commit(args.baseline)}): msg/s of each mailrelay row / its twin on the baseline's code, "
            "their runs interleaved at each point:",
            *baseline_lines(points, args.baseline, pairs),
            "",
        ]
    notes = [f"{k}: {v}" for k, v in problems.items()]
    notes += [
        f"{p.target} {size_label(p.size)} c{p.conc}: {'; '.join(p.failures)}"
        for p in points
        if p.failures and not p.skipped
    ]
    notes += [
        f"{p.target} {size_label(p.size)} c{p.conc}: {p.errors} errors "
        f"({sum(r.non2xx for r in p.runs)} non-2xx, {sum(r.socket_errors for r in p.runs)} socket, "
        f"{p.warmup_errors} in warm-up)"
        for p in points
        if p.errors
    ]
    notes += [
        f"{p.target} {size_label(p.size)} c{p.conc}: the server logged {describe_events(collections.Counter(p.log_events))}"
        for p in points
        if p.log_events
    ]
    if any("ClientDisconnect" in event or "OSError" in event for p in points for event in p.log_events):
        notes.append(
            "(ClientDisconnect / OSError: requests cut off mid-body when wrk stops at the end of a run; "
            "uvicorn logs each as an unhandled error in the bare app and the sketch, slimta as an OSError; "
            "mailrelay answers them with a quiet 400.)"
        )
    report += ["Problems seen:", *(notes or ["none"]), ""]
    text = "\n".join(report)
    print(text)

    output = args.output or BENCH / "results" / f"{started:%Y-%m-%d-%H%M}-bench{'-quick' if quick else ''}.txt"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text)
    output.with_suffix(".json").write_text(
        json.dumps(
            {"args": vars(args), "points": [p.to_json() for p in points], "side_by_side": [p.to_json() for p in pairs]},
            indent=1,
            default=str,
        )
        + "\n"
    )
    log(f"bench: results in {output.relative_to(ROOT) if output.is_relative_to(ROOT) else output} (and .json)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
