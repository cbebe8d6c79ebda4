"""What a fleet-wide rate check (relays/rates.py, max_message_rate) costs, alone.

bench/run's `fleet` row measures a delivery with the check in the service. This measures the
check alone (RelayRate.admit against a real redis-server, a rate of 1000000/s that never waits),
sequential and 8 at once: the wall time and this process's CPU per check, medians over the rounds.
Run: .venv/bin/python -m bench.fleet_rates [rounds] [checks per round]
"""

import asyncio
import statistics

from bench.fleet_leases import per_call, run_against_sink
from relays.base import DeliveryContext
from relays.context import RelayContext
from relays.rates import RelayRate
from relays.static import StaticRelay
from schemas.config import FleetSettings, ServiceSettings
from schemas.relay_options import StaticOptions


async def _admits(rate: RelayRate, count: int, concurrency: int) -> tuple[float, float]:
    loop = asyncio.get_running_loop()
    return await per_call(lambda: rate.admit("127.0.0.1:25", DeliveryContext(loop.time() + 30)), count, concurrency)


async def main(redis_url: str, sink_port: int, rounds: int, count: int) -> None:
    settings = ServiceSettings(fleet=FleetSettings(redis_url=redis_url))
    context = RelayContext.from_settings(settings)
    base = {"type": "static", "host": "127.0.0.1", "port": sink_port, "max_message_rate": "1000000/s"}
    relay = StaticRelay("rated", StaticOptions.model_validate(base), context)
    try:
        assert relay.rate is not None  # noqa: S101
        for concurrency in (1, 8):
            await _admits(relay.rate, 500, concurrency)  # warm: the script loaded
            checks = [await _admits(relay.rate, count, concurrency) for _ in range(rounds)]
            print(
                f"rate check alone c{concurrency}: {statistics.median(c[0] for c in checks) * 1e6:.0f} us wall, "
                f"{statistics.median(c[1] for c in checks) * 1e6:.0f} us CPU per check"
            )
    finally:
        await relay.aclose()


if __name__ == "__main__":
    run_against_sink(main)
