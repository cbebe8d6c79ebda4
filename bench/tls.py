"""STARTTLS to the next hop against clear text: `static` relays to one private Postfix, in one run.

    PYTHONPATH=. .venv/bin/python bench/tls.py [--seconds S] [--rounds N] [--concurrency C]

Postfix (tests/servers/postfix.py, accepted mail discarded) offers STARTTLS; four relays deliver
1 KiB messages to it with C senders each, in alternating rounds of S seconds:

- plain / tls: pooled connections (`concurrent_connections: 8`), clear text and STARTTLS
  (verified with the test CA): the steady state, where the handshake is paid once per connection;
- plain-new / tls-new: `idle_timeout: 0`, a new connection per message: what a handshake costs.

Per row: messages per second and mailrelay's own CPU per message (process_time, the delivery
side only; Postfix runs beside it on the same cores), medians over the rounds, and the TLS/plain
ratios. The issue's goal: pooled STARTTLS at least 0.9 x clear text.
"""

import argparse
import asyncio
import statistics
import time

from relays.base import DeliveryContext, Relay
from tests.conftest import envelope, opened
from tests.servers.postfix import postfix

MESSAGE = b"From: a@example.com\r\nTo: b@example.net\r\nSubject: tls\r\n\r\n" + (b"x" * 74 + b"\r\n") * 13


def config(port: int, ca_file: str) -> str:
    relay = "    type: static\n    host: 127.0.0.1\n    port: {port}\n    concurrent_connections: 8\n"
    tls = f"    tls: {{mode: starttls, ca_certs: '{ca_file}'}}\n"
    new = "    idle_timeout: 0\n"
    base = relay.format(port=port)
    return f"relay:\n  plain:\n{base}  tls:\n{base}{tls}  plain-new:\n{base}{new}  tls-new:\n{base}{tls}{new}"


async def load(relay: Relay, seconds: float, concurrency: int) -> tuple[int, float]:
    """Messages delivered in `seconds` by `concurrency` senders, and the CPU time it took."""
    done = 0
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds

    async def sender() -> None:
        nonlocal done
        while loop.time() < end:
            context = DeliveryContext(loop.time() + 60)
            (result,) = await relay.deliver(envelope("b@example.net", message=MESSAGE), context)
            if result.status != "delivered":
                raise SystemExit(f"not delivered: {result.reply}")
            done += 1

    cpu = time.process_time()
    await asyncio.gather(*(sender() for _ in range(concurrency)))
    return done, time.process_time() - cpu


async def main(seconds: float, rounds: int, concurrency: int) -> None:
    with postfix(sasl=True, keep=False) as pf:
        async with opened(config(pf.port, str(pf.ca_file))) as relays:
            names = ("plain", "tls", "plain-new", "tls-new")
            rates: dict[str, list[float]] = {n: [] for n in names}
            cpus: dict[str, list[float]] = {n: [] for n in names}
            for name in names:  # warm-up: pools filled, code paths hot
                await load(relays[name], 0.5, concurrency)
            for _ in range(rounds):
                for name in names:
                    count, cpu = await load(relays[name], seconds, concurrency)
                    rates[name].append(count / seconds)
                    cpus[name].append(cpu / max(count, 1) * 1e6)
            rate = {n: statistics.median(v) for n, v in rates.items()}
            cpu = {n: statistics.median(v) for n, v in cpus.items()}
            for name in names:
                print(f"{name:>10}: {rate[name]:8.0f} msg/s, mailrelay CPU {cpu[name]:7.0f} us/msg")
            for plain, tls in (("plain", "tls"), ("plain-new", "tls-new")):
                print(
                    f"{tls} / {plain}: throughput {rate[tls] / rate[plain]:.2f}x, "
                    f"CPU per message {cpu[tls] / cpu[plain]:.2f}x"
                )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=8)
    args = parser.parse_args()
    asyncio.run(main(args.seconds, args.rounds, args.concurrency))
