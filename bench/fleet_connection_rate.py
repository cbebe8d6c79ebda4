"""What a fleet-wide connection rate check (max_connection_rate) costs a new connection.

bench/fleet_rates.py's method: one process, a real redis-server and Postfix's smtp-sink, a static
relay with `idle_timeout: 0` (every delivery opens a connection and QUITs it) without a connection
rate and the same relay with `max_connection_rate: 1000000/s` (never waits: only the check is
measured), in alternating rounds at concurrency 1 and 8; per delivery, i.e. per new connection, the
wall time and this process's CPU. Then with `idle_timeout: 10` (connections reused): the check is
never made, so on and off should match.
Run: .venv/bin/python -m bench.fleet_connection_rate [rounds] [deliveries per round]
"""

from bench.fleet_leases import compare, run_against_sink
from relays.context import RelayContext
from relays.static import StaticRelay
from schemas.config import FleetSettings, ServiceSettings
from schemas.relay_options import StaticOptions


async def main(redis_url: str, sink_port: int, rounds: int, count: int) -> None:
    settings = ServiceSettings(fleet=FleetSettings(redis_url=redis_url))
    context = RelayContext.from_settings(settings)
    for idle_timeout, what in ((0, "new connection each"), (10, "reused connections")):
        base = {
            "type": "static",
            "host": "127.0.0.1",
            "port": sink_port,
            "concurrent_connections": 8,
            "idle_timeout": idle_timeout,
        }
        off = StaticRelay("off", StaticOptions.model_validate(base), context)
        on = StaticRelay("on", StaticOptions.model_validate({**base, "max_connection_rate": "1000000/s"}), context)
        try:
            for concurrency in (1, 8):
                await compare(off, on, rounds, count, concurrency, what)
        finally:
            await off.aclose()
            await on.aclose()


if __name__ == "__main__":
    run_against_sink(main)
