"""What STARTTLS costs mailrelay's SMTP client per message, without HTTP: `static` to smtp-sink in
clear text against `static` with STARTTLS to stunnel in front of the same smtp-sink (bench.py's
starttls row's receiver), 1 KiB messages, 8 senders, pooled connections, on uvloop.

    PYTHONPATH=. .venv/bin/python bench/tls_cost.py [--messages N] [--rounds R] [--only plain|tls]

prints the process's user and system CPU per message for each, medians over the rounds. On a
machine others load, CPU time is noisy; instructions are not. Count them with callgrind, only
inside the event loop (start-up, imports and the CA store's loading left out), for two message
counts: the difference, divided by the difference of the counts, is one message (the 8
handshakes cancel too):

    for n in 80 480; do PYTHONPATH=. valgrind --tool=callgrind --collect-atstart=no \\
        --toggle-collect=uv_run --callgrind-out-file=/dev/null \\
        .venv/bin/python bench/tls_cost.py --messages $n --rounds 1 --warmup 0 --only tls; done
"""

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
from pathlib import Path

import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import Pinning, Sink, StunnelReceiver
from relays.base import DeliveryContext, Relay
from tests.conftest import envelope, opened

MESSAGE = b"From: a@example.com\r\nTo: b@example.net\r\nSubject: tls\r\n\r\n" + (b"x" * 74 + b"\r\n") * 13
SENDERS = 8


def config(sink_port: int, tls_port: int, ca_file: Path) -> str:
    relay = "    type: static\n    host: 127.0.0.1\n    port: {}\n    concurrent_connections: 8\n"
    tls = f"    tls: {{mode: starttls, ca_certs: '{ca_file}'}}\n"
    return f"relay:\n  plain:\n{relay.format(sink_port)}  tls:\n{relay.format(tls_port)}{tls}"


async def deliver(relay: Relay, messages: int) -> tuple[float, float]:
    """(user, system) CPU seconds for `messages` deliveries by SENDERS concurrent senders."""

    async def sender(count: int) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(count):
            await relay.deliver(envelope("b@example.net", message=MESSAGE), DeliveryContext(loop.time() + 60))

    before = os.times()
    await asyncio.gather(*(sender(messages // SENDERS) for _ in range(SENDERS)))
    after = os.times()
    return after.user - before.user, after.system - before.system


async def main(args: argparse.Namespace, sink: Sink, stunnel: StunnelReceiver) -> None:
    names = [args.only] if args.only else ["plain", "tls"]
    async with opened(config(sink.port, stunnel.port, stunnel.ca_file)) as relays:
        for name in names:
            if args.warmup:
                await deliver(relays[name], args.warmup)
        per: dict[str, list[tuple[float, float]]] = {name: [] for name in names}
        for _ in range(args.rounds):
            for name in names:
                per[name].append(await deliver(relays[name], args.messages))
    count = args.messages // SENDERS * SENDERS
    for name, runs in per.items():
        user = statistics.median(u for u, _ in runs) / count * 1e6
        system = statistics.median(s for _, s in runs) / count * 1e6
        print(f"{name:>5}: user {user:6.1f} us, system {system:6.1f} us per message (median of {len(runs)})")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--messages", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=400)
    parser.add_argument("--only", choices=["plain", "tls"])
    arguments = parser.parse_args()
    with tempfile.TemporaryDirectory() as directory:
        pin = Pinning(False)
        sink = Sink(pin, Path(directory))
        try:
            stunnel = StunnelReceiver(pin, sink, Path(directory))
            try:
                uvloop.run(main(arguments, sink, stunnel))
            finally:
                stunnel.stop()
        finally:
            sink.stop()
