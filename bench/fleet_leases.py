"""What a fleet-wide connection lease (fleet_connections, relays/smtp/leases.py) costs a new connection.

bench/run's `fleet` row measures the pooled case in the service (a lease only when a connection
opens, a rate check per delivery). This measures what it does not show, in one process against a
real redis-server and Postfix's smtp-sink: a connection per delivery (idle_timeout 0: a take and a
release each), a static relay without the option and the same relay with it, in alternating rounds,
per delivery the wall time and this process's CPU; then a take and a release alone.
Run: .venv/bin/python -m bench.fleet_leases [rounds] [deliveries]
(`per_delivery` and `run_against_sink` are shared with fleet_rates.py and fleet_connection_rate.py.)
"""

import asyncio
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

from relays.base import DeliveryContext
from relays.context import RelayContext
from relays.static import StaticRelay
from schemas.config import FleetSettings, ServiceSettings
from schemas.delivery import Envelope
from schemas.relay_options import StaticOptions
from tests.servers.process import free_port, require_program, stop, wait_greeting
from tests.servers.redis import redis_server

MESSAGE = b"From: a@example.com\r\nTo: b@example.net\r\nSubject: bench\r\n\r\n" + b"x" * 1024 + b"\r\n"


async def per_call(work: Callable[[], Awaitable[object]], count: int, concurrency: int) -> tuple[float, float]:
    """Seconds of wall time and of CPU per call of `work`, `count` calls, `concurrency` at a time."""
    left = count

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await work()

    wall, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return (time.perf_counter() - wall) / count, (time.process_time() - cpu) / count


async def per_delivery(relay: StaticRelay, count: int, concurrency: int) -> tuple[float, float]:
    """Seconds of wall time and of CPU per delivery."""
    envelope = Envelope(sender="a@example.com", recipients=["b@example.net"], message=MESSAGE)
    loop = asyncio.get_running_loop()

    async def deliver() -> None:
        results = await relay.deliver(envelope, DeliveryContext(loop.time() + 30))
        assert results[0].reply.code == 250, results[0].reply  # noqa: S101 - a benchmark's sanity check

    return await per_call(deliver, count, concurrency)


async def compare(
    off: StaticRelay, on: StaticRelay, rounds: int, count: int, concurrency: int, what: str, warm: int = 200
) -> None:
    """Prints what `on` costs per delivery over `off`: medians of `rounds` alternating rounds."""
    await per_delivery(off, warm, concurrency)  # warm: code paths hot, scripts loaded, pools open
    await per_delivery(on, warm, concurrency)
    samples: dict[str, list[tuple[float, float]]] = {"off": [], "on": []}
    for _ in range(rounds):
        samples["off"].append(await per_delivery(off, count, concurrency))
        samples["on"].append(await per_delivery(on, count, concurrency))
    wall = {k: statistics.median(s[0] for s in v) * 1e6 for k, v in samples.items()}
    cpu = {k: statistics.median(s[1] for s in v) * 1e6 for k, v in samples.items()}
    print(
        f"static, {what}, c{concurrency}: off {wall['off']:.0f} us wall / {cpu['off']:.0f} us CPU, "
        f"on {wall['on']:.0f} us / {cpu['on']:.0f} us: +{wall['on'] - wall['off']:.0f} us wall "
        f"(x{wall['on'] / wall['off']:.2f}), +{cpu['on'] - cpu['off']:.0f} us CPU (x{cpu['on'] / cpu['off']:.2f})"
    )


async def main(redis_url: str, sink_port: int, rounds: int, count: int) -> None:
    settings = ServiceSettings(fleet=FleetSettings(redis_url=redis_url))
    context = RelayContext.from_settings(settings)
    base = {"type": "static", "host": "127.0.0.1", "port": sink_port, "concurrent_connections": 8, "idle_timeout": 0}
    off = StaticRelay("off", StaticOptions.model_validate(base), context)
    on = StaticRelay("on", StaticOptions.model_validate({**base, "fleet_connections": True}), context)
    n = count // 4  # a connection each: slower
    try:
        await compare(off, on, rounds, n, 1, "a connection each", warm=100)
    finally:
        await off.aclose()
        await on.aclose()
    fleet = context.fleet_leases("alone")
    gate = fleet.gate("alone", "127.0.0.1:25", 1_000_000, "*")
    try:
        for _ in range(200):
            await gate.take()
            gate.closed_one()
        takes = []
        for _ in range(rounds):
            started, cpu_started = time.perf_counter(), time.process_time()
            for _ in range(count):
                await gate.take()
                gate.closed_one()  # the release goes out without being waited for
            takes.append(((time.perf_counter() - started) / count, (time.process_time() - cpu_started) / count))
        print(
            f"take + release alone: {statistics.median(t[0] for t in takes) * 1e6:.0f} us wall, "
            f"{statistics.median(t[1] for t in takes) * 1e6:.0f} us CPU"
        )
    finally:
        await fleet.detach()


def run_against_sink(main: Callable[[str, int, int, int], Coroutine[Any, Any, None]]) -> None:
    """`main(redis_url, sink_port, rounds, count)` with a redis-server and smtp-sink started for it;
    rounds and count from the command line (defaults 5 and 2000). Shared with bench/fleet_rates.py."""
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
    port = free_port()
    user = ["-u", "root"] if os.geteuid() == 0 else []
    sink = subprocess.Popen(  # noqa: S603
        [require_program("smtp-sink"), *user, "-h", "sink.test", f"127.0.0.1:{port}", "256"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_greeting(port, sink)
        with redis_server() as url:
            asyncio.run(main(url, port, rounds, count))
    finally:
        stop(sink)


if __name__ == "__main__":
    run_against_sink(main)
