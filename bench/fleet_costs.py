"""What bench/run's `fleet` row does not show: a fleet lease per new connection, and each Redis call alone.

The `fleet` row (static with fleet_connections and a never-binding max_message_rate, pooled
connections) measures the overhead per delivery in the service. This measures, in one process
against a real redis-server and Postfix's smtp-sink:

- a connection per delivery (`idle_timeout: 0`), option off and on in alternating rounds: every
  delivery then takes a lease and gives it back (a pooled connection takes one when it opens);
- a lease take + release alone (relays/smtp/leases.py), and a rate check alone (relays/rates.py,
  RelayRate.admit, sequential and 8 at once).

Per figure the wall time and this process's CPU, medians over the rounds.
Run: .venv/bin/python -m bench.fleet_costs [rounds] [deliveries per round]   (defaults 5 and 2000)
"""

import asyncio
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable

from relays.base import DeliveryContext
from relays.context import RelayContext
from relays.rates import RelayRate
from relays.static import StaticRelay
from schemas.config import FleetSettings, ServiceSettings
from schemas.delivery import Envelope
from schemas.relay_options import StaticOptions
from tests.servers.process import free_port, require_program, stop, wait_greeting
from tests.servers.redis import redis_server

MESSAGE = b"From: a@example.com\r\nTo: b@example.net\r\nSubject: bench\r\n\r\n" + b"x" * 1024 + b"\r\n"


async def timed(call: Callable[[], Awaitable[object]], count: int, concurrency: int) -> tuple[float, float]:
    """Microseconds of wall time and of this process's CPU per call, `concurrency` callers at once."""
    left = count

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await call()

    wall, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return (time.perf_counter() - wall) / count * 1e6, (time.process_time() - cpu) / count * 1e6


def medians(samples: list[tuple[float, float]]) -> tuple[float, float]:
    return statistics.median(s[0] for s in samples), statistics.median(s[1] for s in samples)


async def main(redis_url: str, sink_port: int, rounds: int, count: int) -> None:
    loop = asyncio.get_running_loop()
    context = RelayContext.from_settings(ServiceSettings(fleet=FleetSettings(redis_url=redis_url)))
    base = {"type": "static", "host": "127.0.0.1", "port": sink_port, "concurrent_connections": 8, "idle_timeout": 0}
    off = StaticRelay("off", StaticOptions.model_validate(base), context)
    on = StaticRelay("on", StaticOptions.model_validate({**base, "fleet_connections": True}), context)
    envelope = Envelope(sender="a@example.com", recipients=["b@example.net"], message=MESSAGE)

    def delivery(relay: StaticRelay) -> Callable[[], Awaitable[None]]:
        async def deliver() -> None:
            (result,) = await relay.deliver(envelope, DeliveryContext(loop.time() + 30))
            if result.reply.code != 250:
                raise SystemExit(f"not delivered: {result.reply}")

        return deliver

    n = max(count // 4, 50)  # a connection each: slower
    try:
        await timed(delivery(off), 100, 1)  # warm: code paths hot, scripts loaded
        await timed(delivery(on), 100, 1)
        samples: dict[str, list[tuple[float, float]]] = {"off": [], "on": []}
        for _ in range(rounds):
            samples["off"].append(await timed(delivery(off), n, 1))
            samples["on"].append(await timed(delivery(on), n, 1))
        (wall_off, cpu_off), (wall_on, cpu_on) = medians(samples["off"]), medians(samples["on"])
        print(
            f"static, a connection per delivery, c1: off {wall_off:.0f} us wall / {cpu_off:.0f} us CPU, on "
            f"{wall_on:.0f} us / {cpu_on:.0f} us: +{wall_on - wall_off:.0f} us wall, +{cpu_on - cpu_off:.0f} us CPU"
        )
    finally:
        await off.aclose()
        await on.aclose()

    fleet = context.fleet_leases("alone")
    gate = fleet.gate("alone", "127.0.0.1:25", 1_000_000, "*")

    async def take_release() -> None:
        await gate.take()
        gate.closed_one()  # the release goes out without being waited for

    try:
        await timed(take_release, 200, 1)
        wall, cpu = medians([await timed(take_release, count, 1) for _ in range(rounds)])
        print(f"lease take + release alone: {wall:.0f} us wall, {cpu:.0f} us CPU")
    finally:
        await fleet.detach()

    rated = StaticRelay("rated", StaticOptions.model_validate({**base, "max_message_rate": "1000000/s"}), context)
    rate = rated.rate
    if not isinstance(rate, RelayRate):
        raise SystemExit("a relay with max_message_rate has no rate")

    async def admit() -> None:
        await rate.admit("127.0.0.1:25", DeliveryContext(loop.time() + 30))

    try:
        for concurrency in (1, 8):
            await timed(admit, 500, concurrency)
            wall, cpu = medians([await timed(admit, count, concurrency) for _ in range(rounds)])
            print(f"rate check alone, c{concurrency}: {wall:.0f} us wall, {cpu:.0f} us CPU per check")
    finally:
        await rated.aclose()


def run() -> None:
    rounds = int(sys.argv[1]) if len(sys.argv) > 1 else 5
    count = int(sys.argv[2]) if len(sys.argv) > 2 else 2000
    port = free_port()
    user = ["-u", "root"] if os.geteuid() == 0 else []  # smtp-sink refuses to run as root otherwise
    sink = subprocess.Popen(  # noqa: S603 - our own command line
        [require_program("smtp-sink", "/usr/sbin/smtp-sink"), *user, "-h", "sink.test", f"127.0.0.1:{port}", "256"],
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
    run()
