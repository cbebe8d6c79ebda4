"""STARTTLS to the next hop against clear text: `static` relays to one private Postfix, in one run.

    PYTHONPATH=. .venv/bin/python bench/tls.py [--seconds S] [--rounds N] [--concurrency C]

Postfix (tests/servers/postfix.py, accepted mail discarded) offers STARTTLS (TLS 1.3, session
tickets); five relays deliver 1 KiB messages to it with C senders each, in alternating rounds of
S seconds, on uvloop (the service's loop):

- plain / tls: pooled connections (`concurrent_connections: 8`), clear text and STARTTLS
  (verified with the test CA): the steady state, where the handshake is paid once per connection;
- plain-new / tls-new: `idle_timeout: 0`, a new connection per message: what a handshake costs,
  resumed (relays/smtp/resumption.py: every connection but the first resumes the last session);
- tls-new-full: the same with a context that keeps no session: every handshake a full one
  (certificate chain sent and verified, a signature made by Postfix and checked by mailrelay).

Per row: messages per second, mailrelay's own CPU per message (process_time, the delivery side
only; Postfix runs beside it on the same cores) and the median time of one delivery, medians over
the rounds; then the TLS/plain ratios and the CPU a new TLS connection adds to a new clear-text
one, full and resumed. The issue's goal: pooled STARTTLS at least 0.9 x clear text.

Then, without sockets or Postfix (less noisy on a loaded machine): the CPU of one TLS 1.3
handshake in-process over memory BIOs, client (mailrelay's ResumingContext) and server (Python's
ssl) timed apart with thread_time, full against resumed, for an ECDSA P-256 and an RSA-2048
server certificate (trustme, one CA); and the cost of reading a connection's session, which
resumption.py avoids on resumed connections (offering one copies it too: counted in the client's
CPU of a resumed handshake).
"""

import argparse
import asyncio
import ssl
import statistics
import time
import timeit
from collections.abc import Callable

import trustme
import uvloop

from relays.base import DeliveryContext, Relay
from relays.smtp.resumption import ResumingContext, resuming_for
from relays.static import StaticRelay
from tests.conftest import envelope, opened
from tests.servers.postfix import postfix

MESSAGE = b"From: a@example.com\r\nTo: b@example.net\r\nSubject: tls\r\n\r\n" + (b"x" * 74 + b"\r\n") * 13


def config(port: int, ca_file: str) -> str:
    relay = "    type: static\n    host: 127.0.0.1\n    port: {port}\n    concurrent_connections: 8\n"
    tls = f"    tls: {{mode: starttls, ca_certs: '{ca_file}'}}\n"
    new = "    idle_timeout: 0\n"
    base = relay.format(port=port)
    return (
        f"relay:\n  plain:\n{base}  tls:\n{base}{tls}  plain-new:\n{base}{new}  tls-new:\n{base}{tls}{new}"
        f"  tls-new-full:\n{base}{tls}{new}"
    )


def without_resumption(relay: Relay) -> None:
    """The relay's context keeps no session, so that every handshake is a full one."""
    context = relay.pool.settings.tls_context if isinstance(relay, StaticRelay) else None
    if not isinstance(context, ResumingContext):
        raise SystemExit(f"{relay!r}: not a static relay with a resuming TLS context")
    setattr(context, "remember", lambda key, tls: False)  # noqa: B010 - an instance's method replaced


async def load(relay: Relay, seconds: float, concurrency: int) -> tuple[int, float, list[float]]:
    """Messages delivered in `seconds` by `concurrency` senders, the CPU time it took, and the
    wall time of each delivery."""
    done = 0
    times: list[float] = []
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds

    async def sender() -> None:
        nonlocal done
        while loop.time() < end:
            start = time.perf_counter()  # uvloop's loop.time() counts whole milliseconds
            context = DeliveryContext(loop.time() + 60)
            (result,) = await relay.deliver(envelope("b@example.net", message=MESSAGE), context)
            if result.status != "delivered":
                raise SystemExit(f"not delivered: {result.reply}")
            times.append(time.perf_counter() - start)
            done += 1

    cpu = time.process_time()
    await asyncio.gather(*(sender() for _ in range(concurrency)))
    return done, time.process_time() - cpu, times


async def main(seconds: float, rounds: int, concurrency: int) -> None:
    with postfix(sasl=True, keep=False) as pf:
        async with opened(config(pf.port, str(pf.ca_file))) as relays:
            without_resumption(relays["tls-new-full"])
            names = ("plain", "tls", "plain-new", "tls-new", "tls-new-full")
            rates: dict[str, list[float]] = {n: [] for n in names}
            cpus: dict[str, list[float]] = {n: [] for n in names}
            walls: dict[str, list[float]] = {n: [] for n in names}
            for name in names:  # warm-up: pools filled, code paths hot, the first session kept
                await load(relays[name], 0.5, concurrency)
            for _ in range(rounds):
                for name in names:
                    count, used, times = await load(relays[name], seconds, concurrency)
                    rates[name].append(count / seconds)
                    cpus[name].append(used / max(count, 1) * 1e6)
                    walls[name].append(statistics.median(times) * 1e3)
            rate = {n: statistics.median(v) for n, v in rates.items()}
            cpu = {n: statistics.median(v) for n, v in cpus.items()}
            wall = {n: statistics.median(v) for n, v in walls.items()}
            for name in names:
                print(
                    f"{name:>12}: {rate[name]:8.0f} msg/s, mailrelay CPU {cpu[name]:7.0f} us/msg, "
                    f"delivery {wall[name]:6.2f} ms (median)"
                )
            for plain, tls in (("plain", "tls"), ("plain-new", "tls-new"), ("plain-new", "tls-new-full")):
                print(
                    f"{tls} / {plain}: throughput {rate[tls] / rate[plain]:.2f}x, "
                    f"CPU per message {cpu[tls] / cpu[plain]:.2f}x"
                )
            full, resumed = cpu["tls-new-full"] - cpu["plain-new"], cpu["tls-new"] - cpu["plain-new"]
            print(
                f"a new TLS connection costs mailrelay {full:.0f} us of CPU with a full handshake, "
                f"{resumed:.0f} us resumed ({resumed / full:.2f}x); "
                f"delivery time {wall['tls-new-full'] - wall['plain-new']:+.2f} ms full, "
                f"{wall['tls-new'] - wall['plain-new']:+.2f} ms resumed, over a new clear-text connection"
            )


def _handshake(client: ResumingContext, server: ssl.SSLContext, keep: bool) -> tuple[float, float, ssl.SSLObject]:
    """One handshake over memory BIOs, then a first reply (which brings the TLS 1.3 ticket):
    the client's and the server's CPU seconds, and the client's SSLObject."""
    to_client, to_server, client_out, server_out = (ssl.MemoryBIO() for _ in range(4))
    used = {"client": 0.0, "server": 0.0}

    def step(side: str, call: Callable[[], object]) -> bool:
        start = time.thread_time()
        try:
            call()
            return True
        except ssl.SSLWantReadError:
            return False
        finally:
            used[side] += time.thread_time() - start

    start = time.thread_time()  # wrap_bio counts: offering a session copies it (CPython's _ssl_session_dup)
    with resuming_for("192.0.2.1", 25, "mx.bench.test"):
        tls = client.wrap_bio(to_client, client_out, server_hostname="mx.bench.test")
    used["client"] += time.thread_time() - start
    peer = server.wrap_bio(to_server, server_out, server_side=True)
    client_done = server_done = False
    while not (client_done and server_done):
        client_done = client_done or step("client", tls.do_handshake)
        to_server.write(client_out.read())
        server_done = server_done or step("server", peer.do_handshake)
        to_client.write(server_out.read())
    step("server", lambda: peer.write(b"220 ready\r\n"))
    to_client.write(server_out.read())
    step("client", lambda: tls.read(64))
    if keep and not tls.session_reused:
        step("client", lambda: client.remember(("192.0.2.1", 25, "mx.bench.test"), tls))
    return used["client"], used["server"], tls


def _session_read(tls: ssl.SSLObject, count: int) -> float:
    """Microseconds to read `tls.session`."""
    return timeit.timeit(lambda: tls.session, number=count) / count * 1e6


def handshake_cpu(count: int) -> None:
    """Median CPU per handshake, full and resumed, interleaved, per server key type."""
    ca = trustme.CA()
    for key in (trustme.KeyType.ECDSA, trustme.KeyType.RSA):
        server = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        ca.issue_cert("mx.bench.test", key_type=key).configure_cert(server)
        full, resumed = ResumingContext.default(), ResumingContext.default()
        for context in (full, resumed):
            ca.configure_trust(context)
        _handshake(resumed, server, keep=True)  # the session the resumed ones offer
        cpu: dict[str, list[tuple[float, float]]] = {"full": [], "resumed": []}
        for _ in range(count):
            client_cpu, server_cpu, _tls = _handshake(full, server, keep=False)
            cpu["full"].append((client_cpu, server_cpu))
            client_cpu, server_cpu, tls = _handshake(resumed, server, keep=True)
            if not tls.session_reused:
                raise SystemExit("the resumed handshake was a full one")
            cpu["resumed"].append((client_cpu, server_cpu))
        client = {k: statistics.median(c for c, _ in v) * 1e6 for k, v in cpu.items()}
        server_side = {k: statistics.median(s for _, s in v) * 1e6 for k, v in cpu.items()}
        print(
            f"TLS 1.3 handshake, {key.name} server key: client {client['full']:.0f} us full, "
            f"{client['resumed']:.0f} us resumed ({client['resumed'] / client['full']:.2f}x); "
            f"server {server_side['full']:.0f} us full, {server_side['resumed']:.0f} us resumed "
            f"({server_side['resumed'] / server_side['full']:.2f}x)"
        )
        read = _session_read(_handshake(full, server, keep=False)[2], count)
        print(f"  reading a connection's session (SSLObject.session, a copy with the certificate): {read:.0f} us")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--handshakes", type=int, default=500, help="in-process handshakes per kind (0: none)")
    parser.add_argument("--no-relays", action="store_true", help="only the in-process handshakes")
    args = parser.parse_args()
    if not args.no_relays:
        uvloop.run(main(args.seconds, args.rounds, args.concurrency))
    if args.handshakes:
        handshake_cpu(args.handshakes)
