"""The lease calls across a Redis restart (no persistence: its scripts are gone), in process.

Every connection the instance had is dead after the restart; the first calls must find Redis
back on new connections and load the scripts there, not fall back to the local limits (the
module test_fleet_leases.py saw a second fallback, and 6-8 connections for a limit of 4, when
a script was reloaded through a pooled connection from before the restart).
"""

import asyncio
import contextlib

import pytest

from relays.smtp.leases import FleetLeases
from schemas.config import FleetSettings, ServiceSettings
from tests.servers.process import free_port
from tests.servers.redis import redis_instance

pytestmark = pytest.mark.asyncio


async def test_the_first_calls_after_a_restart_find_redis_back() -> None:
    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    settings = ServiceSettings(fleet=FleetSettings(redis_url=url, expected_instances=3))
    with contextlib.ExitStack() as redis:
        redis.enter_context(redis_instance(port=port))
        leases = FleetLeases(settings)
        gates = [leases.gate("out", f"h{n}:25", 4, f"h{n}") for n in range(4)]
        try:
            # Concurrent takes that each find their script missing: their fallbacks open connections.
            assert await asyncio.gather(*(gate.take() for gate in gates)) == [True] * len(gates)
            redis.close()
            redis.enter_context(redis_instance(port=port))
            for _ in range(3):
                assert await asyncio.gather(*(gate.take() for gate in gates)) == [True] * len(gates)
            await leases.renew()
            assert leases.available
        finally:
            await leases.aclose()
