"""The direct ceiling: no HTTP, N concurrent senders sharing a pool of aiosmtplib connections.

What a relay with a pool of POOL connections could do at best, measured in-process:
CONCURRENCY tasks each take a connection from the pool (waiting when all are busy,
as requests wait in mailrelay), send one message, give the connection back, and
record the time from asking for a connection to the server's reply. Runs on uvloop
like the service. Prints one JSON object per measured run on standard output.

    .venv/bin/python bench/direct_smtp.py --port 2525 --concurrency 8 --pool 8 --size 1024
"""

import argparse
import asyncio
import collections
import json
import resource
import time

import aiosmtplib
import uvloop

SENDER, RECIPIENT = "bench@example.com", "sink@bench.test"


def make_message(size: int) -> bytes:
    """A message of exactly `size` bytes: headers, then lines of 76 characters (SMTP's limit is 998)."""
    head = (
        f"From: {SENDER}\r\nTo: {RECIPIENT}\r\nSubject: bench {size}\r\nMessage-ID: <bench-{size}@example.com>\r\n\r\n"
    )
    room = max(0, size - len(head))
    line = "x" * 76 + "\r\n"
    body = line * (room // len(line))
    rest = room - len(body)
    body += ("y" * (rest - 2) + "\r\n") if rest >= 2 else "\r\n"[:rest]
    return (head + body).encode()


class Pool:
    """Connections handed to waiters first come, first served.

    (asyncio.Queue is not fair: a task that puts a connection back and at once asks
    for one again takes it before the waiter that was woken, which starves waiters
    when there are more senders than connections.)
    """

    def __init__(self, clients: list[aiosmtplib.SMTP]) -> None:
        self.idle = clients
        self.waiters: collections.deque[asyncio.Future[aiosmtplib.SMTP]] = collections.deque()

    async def get(self) -> aiosmtplib.SMTP:
        if self.idle and not self.waiters:
            return self.idle.pop()
        waiter: asyncio.Future[aiosmtplib.SMTP] = asyncio.get_running_loop().create_future()
        self.waiters.append(waiter)
        return await waiter

    def put(self, client: aiosmtplib.SMTP) -> None:
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(client)
                return
        self.idle.append(client)


async def run(args: argparse.Namespace) -> None:
    message = make_message(args.size)
    clients = []
    for _ in range(min(args.pool, args.concurrency)):
        client = aiosmtplib.SMTP(
            hostname="127.0.0.1", port=args.port, local_hostname="direct.example.com", start_tls=False
        )
        await client.connect()
        clients.append(client)
    idle = Pool(clients)
    sent = 0

    async def sender(stop_at: float, latencies: list[float], errors: list[int]) -> None:
        nonlocal sent
        while time.monotonic() < stop_at:
            started = time.perf_counter()
            client = await idle.get()
            try:
                await client.sendmail(SENDER, [RECIPIENT], message)
                sent += 1
                latencies.append(time.perf_counter() - started)
            except aiosmtplib.SMTPException:
                errors[0] += 1
                if not client.is_connected:
                    await client.connect()
            finally:
                idle.put(client)

    async def measure(seconds: float) -> dict[str, float]:
        latencies: list[float] = []
        errors = [0]
        started = time.monotonic()
        await asyncio.gather(*(sender(started + seconds, latencies, errors) for _ in range(args.concurrency)))
        elapsed = time.monotonic() - started
        latencies.sort()

        def pct(p: float) -> float:
            return latencies[min(len(latencies) - 1, int(len(latencies) * p))] * 1e6 if latencies else 0.0

        return {
            "requests": len(latencies) + errors[0],
            "ok": len(latencies),
            "errors": errors[0],
            "duration_us": elapsed * 1e6,
            "p50_us": pct(0.50),
            "p99_us": pct(0.99),
        }

    if args.warmup > 0:
        await measure(args.warmup)
    for _ in range(args.runs):
        result = await measure(args.duration)
        result["peak_rss_kib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps(result), flush=True)
    for client in clients:
        await client.quit()
    print(json.dumps({"sent_total": sent}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--pool", type=int, default=8)
    parser.add_argument("--size", type=int, default=1024)
    parser.add_argument("--duration", type=float, default=3)
    parser.add_argument("--warmup", type=float, default=1)
    parser.add_argument("--runs", type=int, default=3)
    uvloop.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
