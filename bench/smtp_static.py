"""Benchmark: mailrelay's `static` relay over HTTP vs. a direct pooled aiosmtplib client (the ceiling).

Both send the same 1 KB message to the same Postfix smtp-sink in one run. The
service runs as `mailrelay serve` pinned to CPU 0; the load generator (a small
keep-alive HTTP/1.1 client on raw asyncio streams, so the client is not the
bottleneck) and the direct SMTP client run pinned to CPU 1.

    .venv/bin/python bench/smtp_static.py [--seconds 10] [--concurrency 1 8]

Prints messages/second, p50/p99 latency, errors and the service's peak RSS,
and the ratio service/ceiling. Needs smtp-sink (Debian's postfix).
"""

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import aiosmtplib

ROOT = Path(__file__).resolve().parent.parent
MESSAGE = ("From: bench@example.com\r\nTo: sink@example.net\r\nSubject: bench\r\n\r\n" + "x" * 940 + "\r\n").encode()


@dataclass
class Result:
    name: str
    concurrency: int
    count: int
    errors: int
    seconds: float
    latencies: list[float]

    @property
    def rate(self) -> float:
        return self.count / self.seconds

    def percentile(self, p: float) -> float:
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(len(ordered) * p))] * 1000 if ordered else float("nan")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_port(port: int, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {port}")


def pin(cpu: int) -> list[str]:
    return ["taskset", "-c", str(cpu)] if shutil.which("taskset") and (os.cpu_count() or 1) > 1 else []


async def http_worker(port: int, body: bytes, stop_at: float, result: Result) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    request = (
        f"POST /relays/bench/deliver HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    try:
        while time.monotonic() < stop_at:
            started = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                int(line.split(b":")[1]) for line in head.split(b"\r\n") if line.lower().startswith(b"content-length:")
            )
            await reader.readexactly(length)
            result.latencies.append(time.perf_counter() - started)
            if head.startswith(b"HTTP/1.1 200"):
                result.count += 1
            else:
                result.errors += 1
    finally:
        writer.close()


async def smtp_worker(port: int, stop_at: float, result: Result) -> None:
    client = aiosmtplib.SMTP(hostname="127.0.0.1", port=port, local_hostname="bench.example.com", start_tls=False)
    await client.connect()
    try:
        while time.monotonic() < stop_at:
            started = time.perf_counter()
            try:
                await client.sendmail("bench@example.com", ["sink@example.net"], MESSAGE)
                result.count += 1
            except aiosmtplib.SMTPException:
                result.errors += 1
            result.latencies.append(time.perf_counter() - started)
    finally:
        await client.quit()


async def measure(name: str, concurrency: int, seconds: float, worker: str, port: int) -> Result:
    result = Result(name, concurrency, 0, 0, seconds, [])
    body = json.dumps(
        {"sender": "bench@example.com", "recipients": ["sink@example.net"], "message": MESSAGE.decode()}
    ).encode()
    stop_at = time.monotonic() + seconds
    started = time.monotonic()
    if worker == "http":
        await asyncio.gather(*(http_worker(port, body, stop_at, result) for _ in range(concurrency)))
    else:
        await asyncio.gather(*(smtp_worker(port, stop_at, result) for _ in range(concurrency)))
    result.seconds = time.monotonic() - started
    return result


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--pool", type=int, default=8, help="concurrent_connections of the relay")
    args = parser.parse_args()
    if not shutil.which("smtp-sink"):
        print("smtp-sink not found: install Debian's postfix (scripts/bootstrap --system)", file=sys.stderr)
        return 1
    os.sched_setaffinity(0, {1} if (os.cpu_count() or 1) > 1 else {0})

    sink_port, service_port = free_port(), free_port()
    user = ["-u", "root"] if os.geteuid() == 0 else []
    sink = subprocess.Popen(  # noqa: S603
        [*pin(1), "smtp-sink", *user, f"127.0.0.1:{sink_port}", "1024"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    workdir = Path(tempfile.mkdtemp(prefix="bench"))
    config = workdir / "bench.yaml"
    config.write_text(
        f"relay:\n  bench:\n    type: static\n    host: 127.0.0.1\n    port: {sink_port}\n"
        f"    concurrent_connections: {args.pool}\n    idle_timeout: 30\n    ehlo_as: bench.example.com\n"
    )
    service = subprocess.Popen(  # noqa: S603
        [
            *pin(0),
            sys.executable,
            "-m",
            "app",
            "serve",
            "--config",
            str(config),
            "--port",
            str(service_port),
            "--log-level",
            "warning",
        ],
        cwd=ROOT,
    )
    results: list[tuple[Result, Result]] = []
    try:
        wait_port(sink_port)
        wait_port(service_port)
        for concurrency in args.concurrency:
            workers = min(concurrency, args.pool)
            ceiling = asyncio.run(measure("aiosmtplib direct", workers, args.seconds, "smtp", sink_port))
            asyncio.run(measure("warm-up", concurrency, 1, "http", service_port))
            relay = asyncio.run(measure("mailrelay static", concurrency, args.seconds, "http", service_port))
            results.append((relay, ceiling))
        rss = peak_rss_mib(service.pid)
    finally:
        service.send_signal(signal.SIGTERM)
        service.wait(15)
        sink.terminate()
        sink.wait(5)
        shutil.rmtree(workdir, ignore_errors=True)

    print(f"1 KB messages to smtp-sink on loopback, {args.seconds:.0f} s per run; service on CPU 0, clients on CPU 1")
    print(f"{'what':<20} {'conc':>4} {'msg/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>6}")
    for relay, ceiling in results:
        for r in (ceiling, relay):
            print(
                f"{r.name:<20} {r.concurrency:>4} {r.rate:>9.0f} {r.percentile(0.5):>8.2f} {r.percentile(0.99):>8.2f} {r.errors:>6}"
            )
        print(f"{'ratio relay/ceiling':<20} {relay.concurrency:>4} {relay.rate / ceiling.rate:>9.2f}")
    print(f"peak RSS of the service: {rss:.0f} MiB")
    print(
        f"(median latency of the service at concurrency {results[0][0].concurrency}: {statistics.median(results[0][0].latencies) * 1000:.2f} ms)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
