"""CPU per message of the whole service but HTTP parsing, for the goal rows, with their real receivers:
the ASGI app called in-process by 8 concurrent callers (as wrk -c8), on uvloop, pinned to CPU 0, its
receivers (smtp-sink, stunnel in front of it, redis-server) on CPU 1.

    PYTHONPATH=. .venv/bin/python bench/app_cost.py static tls keyed batch [--messages N] [--rounds R]

Rows: `static` (JSON to smtp-sink), `tls` (STARTTLS to stunnel -> smtp-sink, the starttls row's
receiver), `keyed` (static with a fresh Idempotency-Key each, Redis), `batch` (NDJSON, 100 lines per
request), `dkim` (static, signed with an Ed25519 key made at start: the From: domain's identity). Prints, per row, the median over the rounds of the process's CPU per message (user and
system) and of its context switches. No wrk and no HTTP parser: steadier than bench/run from one
run to the next (about +-3 us here), so it tells where a row's extra cost lies; it is not the
goals' measure (bench/run is). `--profile` also writes each row's cProfile to bench/.logs/.
"""

import argparse
import asyncio
import cProfile
import gc
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import uvloop
from cryptography.hazmat.primitives.asymmetric import ed25519
from cryptography.hazmat.primitives.serialization import Encoding, NoEncryption, PrivateFormat

sys.path.insert(0, str(Path(__file__).resolve().parent))
from inprocess import post_scope

from app.config import parse_config
from app.logs import setup_logging
from app.main import create_app
from bench import Pinning, Sink, StunnelReceiver, free_port

MESSAGE = "From: a@example.com\r\nTo: b@example.net\r\nSubject: x\r\n\r\n" + ("x" * 74 + "\r\n") * 13
BODY = json.dumps({"sender": "a@example.com", "recipients": ["b@example.net"], "message": MESSAGE}).encode()
LINES = 100
CALLERS = 8
ROWS = ("static", "tls", "keyed", "batch", "dkim")
#: Every keyed request's key is new (a row run twice would replay the first run's results).
KEYS = itertools.count()
PROFILES = Path(__file__).resolve().parent / ".logs"


def config(sink: Sink, stunnel: StunnelReceiver, redis_port: int, key_file: Path) -> str:
    relay = "    type: static\n    host: 127.0.0.1\n    port: {}\n    concurrent_connections: 8\n"
    return (
        f"mailrelay:\n  idempotency: {{backend: redis, redis_url: 'redis://127.0.0.1:{redis_port}/0'}}\n"
        f"relay:\n  static:\n{relay.format(sink.port)}  tls:\n{relay.format(stunnel.port)}"
        f"    tls: {{mode: starttls, ca_certs: '{stunnel.ca_file}'}}\n"
        f"  dkim:\n{relay.format(sink.port)}"
        f"    dkim:\n      - {{domain: example.com, selector: bench, key_file: '{key_file}'}}\n"
    )


class Caller:
    """Requests of one row, each a fresh ASGI call; counts the statuses."""

    def __init__(self, app: Any, state: Any, row: str) -> None:
        self.app, self.row = app, row
        relay = row if row in ("tls", "dkim") else "static"
        if row == "batch":
            self.body = b"\n".join([BODY] * LINES) + b"\n"
            path, kind = f"/relays/{relay}/deliveries", b"application/x-ndjson"
        else:
            self.body, path, kind = BODY, f"/relays/{relay}/deliver", b"application/json"
        self.scope = post_scope(path, len(self.body), state)
        self.scope["headers"] = [(b"host", b"x"), (b"content-type", kind), (b"content-length", b"%d" % len(self.body))]
        self.statuses: dict[int, int] = {}

    async def one(self) -> None:
        scope = dict(self.scope)
        if self.row == "keyed":
            scope["headers"] = [
                *self.scope["headers"],
                (b"idempotency-key", b"k%d-%d" % (os.getpid(), next(KEYS))),
            ]
        sent = False

        async def receive() -> dict[str, Any]:
            nonlocal sent
            if sent:  # the body was read: the client stays until the answer ends
                await asyncio.sleep(3600)
            sent = True
            return {"type": "http.request", "body": self.body, "more_body": False}

        async def send(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                self.statuses[message["status"]] = self.statuses.get(message["status"], 0) + 1

        await self.app(scope, receive, send)

    async def run(self, requests: int) -> None:
        async def caller(count: int) -> None:
            for _ in range(count):
                await self.one()

        await asyncio.gather(*(caller(requests // CALLERS) for _ in range(CALLERS)))


def switches() -> list[int]:
    with open("/proc/self/status") as status:
        return [int(line.split()[1]) for line in status if "ctxt_switches" in line]


async def main(args: argparse.Namespace, cfg: str) -> None:
    app = create_app(parse_config(cfg, "app_cost").config)
    async with app.router.lifespan_context(app) as state:
        for row in args.rows:
            caller = Caller(app, state, row)
            per = LINES if row == "batch" else 1
            requests = max(CALLERS, args.messages // per // CALLERS * CALLERS)
            await caller.run(max(CALLERS, requests // 5))  # warm-up: connections open, caches filled
            gc.collect()
            gc.freeze()  # as the service does once serving
            cpu: list[tuple[float, float, float]] = []
            for _ in range(args.rounds):
                before, sw = os.times(), switches()
                await caller.run(requests)
                after, sw2 = os.times(), switches()
                messages = requests * per
                cpu.append(
                    (
                        (after.user - before.user) / messages * 1e6,
                        (after.system - before.system) / messages * 1e6,
                        (sum(sw2) - sum(sw)) / messages,
                    )
                )
            user = statistics.median(u for u, _, _ in cpu)
            system = statistics.median(s for _, s, _ in cpu)
            total = statistics.median(u + s for u, s, _ in cpu)
            ctx = statistics.median(c for _, _, c in cpu)
            print(
                f"{row:>6}: {total:6.1f} us per message (user {user:.1f}, system {system:.1f}), "
                f"{ctx:.2f} context switches; median of {len(cpu)}; statuses {caller.statuses}",
                flush=True,
            )
            if args.profile:
                profile = cProfile.Profile()
                profile.enable()
                await caller.run(requests)
                profile.disable()
                profile.dump_stats(PROFILES / f"app_cost-{row}.prof")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rows", nargs="+", choices=ROWS)
    parser.add_argument("--messages", type=int, default=4000, help="per round (default 4000)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--profile", action="store_true")
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory, open(os.devnull, "w") as devnull:
        setup_logging("info", "json", devnull)  # the delivery line is written, as at the default level
        pin = Pinning(True)
        sink = Sink(pin, Path(directory))
        stunnel = StunnelReceiver(pin, sink, Path(directory))
        redis_port = free_port()
        redis = subprocess.Popen(  # noqa: S603 - our own arguments
            [*pin.cmd(pin.client), "redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", ""],
            stdout=subprocess.DEVNULL,
        )
        time.sleep(0.3)
        PROFILES.mkdir(exist_ok=True)
        try:
            if pin.enabled:
                os.sched_setaffinity(0, {0})
            key_file = Path(directory) / "ed25519.key"
            key = ed25519.Ed25519PrivateKey.generate()
            key_file.write_bytes(key.private_bytes(Encoding.PEM, PrivateFormat.PKCS8, NoEncryption()))
            uvloop.run(main(arguments, config(sink, stunnel, redis_port, key_file)))
        finally:
            redis.terminate()
            stunnel.stop()
            sink.stop()
