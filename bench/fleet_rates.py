"""What a fleet-wide rate check (relays/rates.py, max_message_rate) costs a delivery.

In one process against a real redis-server and Postfix's smtp-sink (no dump files): a static
relay without a rate and the same relay with `max_message_rate: 1000000/s` (never waits, so
only the check is measured), in alternating rounds at concurrency 1 and 8; per delivery the
wall time and this process's CPU. Then the check alone (RelayRate.admit), sequential and 8 at
once. Run: .venv/bin/python -m bench.fleet_rates [rounds] [deliveries per round]
"""

import asyncio
import statistics
import time

from bench.fleet_leases import per_delivery, run_against_sink
from relays.base import DeliveryContext
from relays.context import RelayContext
from relays.rates import RelayRate
from relays.static import StaticRelay
from schemas.config import FleetSettings, ServiceSettings
from schemas.relay_options import StaticOptions


async def _admits(rate: RelayRate, count: int, concurrency: int) -> tuple[float, float]:
    loop = asyncio.get_running_loop()
    left = count

    async def worker() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            await rate.admit("127.0.0.1:25", DeliveryContext(loop.time() + 30))

    wall, cpu = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return (time.perf_counter() - wall) / count, (time.process_time() - cpu) / count


async def main(redis_url: str, sink_port: int, rounds: int, count: int) -> None:
    settings = ServiceSettings(fleet=FleetSettings(redis_url=redis_url))
    context = RelayContext.from_settings(settings)
    base = {"type": "static", "host": "127.0.0.1", "port": sink_port, "concurrent_connections": 8}
    off = StaticRelay("off", StaticOptions.model_validate(base), context)
    on = StaticRelay("on", StaticOptions.model_validate({**base, "max_message_rate": "1000000/s"}), context)
    try:
        for concurrency in (1, 8):
            await per_delivery(off, 200, concurrency)  # warm: connections open, scripts loaded
            await per_delivery(on, 200, concurrency)
            samples: dict[str, list[tuple[float, float]]] = {"off": [], "on": []}
            for _ in range(rounds):
                samples["off"].append(await per_delivery(off, count, concurrency))
                samples["on"].append(await per_delivery(on, count, concurrency))
            wall = {k: statistics.median(s[0] for s in v) * 1e6 for k, v in samples.items()}
            cpu = {k: statistics.median(s[1] for s in v) * 1e6 for k, v in samples.items()}
            print(
                f"static delivery c{concurrency}: off {wall['off']:.0f} us wall / {cpu['off']:.0f} us CPU, "
                f"on {wall['on']:.0f} us / {cpu['on']:.0f} us: +{wall['on'] - wall['off']:.0f} us wall "
                f"(x{wall['on'] / wall['off']:.2f}), +{cpu['on'] - cpu['off']:.0f} us CPU (x{cpu['on'] / cpu['off']:.2f})"
            )
        assert on.rate is not None  # noqa: S101
        for concurrency in (1, 8):
            await _admits(on.rate, 500, concurrency)
            checks = [await _admits(on.rate, count, concurrency) for _ in range(rounds)]
            print(
                f"rate check alone c{concurrency}: {statistics.median(c[0] for c in checks) * 1e6:.0f} us wall, "
                f"{statistics.median(c[1] for c in checks) * 1e6:.0f} us CPU per check"
            )
    finally:
        await off.aclose()
        await on.aclose()


if __name__ == "__main__":
    run_against_sink(main)
