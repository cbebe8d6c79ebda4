"""CHUNKING (BDAT, RFC 3030) against DATA: one `static` relay each, to one private Postfix, in one run.

    PYTHONPATH=. .venv/bin/python bench/chunking.py [--rounds N]

Delivers 1 MiB and 10 MiB messages (base64-like 76-character lines, as attachments are) in
alternating rounds, BDAT then DATA, and prints per size the median wall time per delivery and
mailrelay's own CPU time per delivery (process_time), with the BDAT/DATA ratios. Postfix does
the same work either way after smtpd (cleanup, queue, pipe to a file), so its delivery agents
run on the same machine in both columns.
"""

import argparse
import asyncio
import base64
import os
import statistics
import time

from relays.base import DeliveryContext
from tests.conftest import envelope, opened
from tests.servers.postfix import postfix


def message(size: int) -> bytes:
    head = b"From: alice@example.com\r\nTo: bob@mail.test\r\nSubject: chunking\r\n\r\n"
    raw = base64.b64encode(os.urandom(size * 3 // 4))
    lines = [raw[i : i + 76] for i in range(0, len(raw), 76)]
    return head + b"\r\n".join(lines) + b"\r\n"


def config(port: int) -> str:
    relay = "    type: static\n    host: 127.0.0.1\n    port: {port}\n    data_timeout: 120\n"
    return (
        "relay:\n  bdat:\n" + relay.format(port=port) + "  data:\n" + relay.format(port=port) + "    chunking: false\n"
    )


async def main(rounds: int) -> None:
    with postfix(message_size_limit=64 * 1024 * 1024) as pf:
        async with opened(config(pf.port)) as relays:
            for size in (1024 * 1024, 10 * 1024 * 1024):
                body = message(size)
                wall: dict[str, list[float]] = {"bdat": [], "data": []}
                cpu: dict[str, list[float]] = {"bdat": [], "data": []}
                for name in ("bdat", "data"):  # warm-up: connections open, code paths hot
                    await relays[name].deliver(envelope("bob@elsewhere.example", message=body), _context())
                for _ in range(rounds):
                    for name in ("bdat", "data"):
                        c0, t0 = time.process_time(), time.perf_counter()
                        (result,) = await relays[name].deliver(
                            envelope("bob@elsewhere.example", message=body), _context()
                        )
                        wall[name].append(time.perf_counter() - t0)
                        cpu[name].append(time.process_time() - c0)
                        if result.status != "delivered":
                            raise SystemExit(f"{name}: {result.reply}")
                w = {k: statistics.median(v) * 1000 for k, v in wall.items()}
                c = {k: statistics.median(v) * 1000 for k, v in cpu.items()}
                print(
                    f"{size // 1024 // 1024:>3} MiB x{rounds}: wall BDAT {w['bdat']:.1f} ms, DATA {w['data']:.1f} ms "
                    f"(ratio {w['bdat'] / w['data']:.2f}); mailrelay CPU BDAT {c['bdat']:.2f} ms, DATA {c['data']:.2f} ms "
                    f"(ratio {c['bdat'] / c['data']:.2f})"
                )


def _context() -> DeliveryContext:
    return DeliveryContext(asyncio.get_running_loop().time() + 300)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    asyncio.run(main(parser.parse_args().rounds))
