"""A tiny authoritative DNS server (dnslib) for the `mx` rows: MX of the bench domain -> 127.0.0.1.

    start(port, domain) -> the UDP and TCP servers, already answering in threads
    python bench/dns_server.py PORT [DOMAIN]      (stand-alone, until Ctrl-C)

`DOMAIN MX 10 mx.DOMAIN` and `mx.DOMAIN A 127.0.0.1`; every other name is NXDOMAIN.
Queries are counted (`Resolver.queries`), so the run can show that the cache was warm.
"""

import sys
import threading
import time
from typing import Any

from dnslib import QTYPE, RCODE, RR
from dnslib.server import BaseResolver, DNSLogger, DNSServer


class Resolver(BaseResolver):  # type: ignore[misc]
    def __init__(self, domain: str) -> None:
        zone = f"{domain}. 300 IN MX 10 mx.{domain}.\nmx.{domain}. 300 IN A 127.0.0.1\n"
        self.records = RR.fromZone(zone)
        self.queries = 0
        self._lock = threading.Lock()

    def resolve(self, request: Any, handler: Any) -> Any:
        with self._lock:
            self.queries += 1
        reply = request.reply()
        name, qtype = str(request.q.qname).lower(), QTYPE[request.q.qtype]
        matches = [rr for rr in self.records if str(rr.rname).lower() == name]
        if not matches:
            reply.header.rcode = RCODE.NXDOMAIN
        for rr in matches:
            if qtype in ("ANY", QTYPE[rr.rtype]):
                reply.add_answer(rr)
        return reply


def start(port: int, domain: str) -> tuple[Resolver, list[Any]]:
    resolver = Resolver(domain)
    quiet = DNSLogger("-request,-reply,-truncated,-error,-recv,-send,-data")
    servers = [
        DNSServer(resolver, port=port, address="127.0.0.1", logger=quiet),
        DNSServer(resolver, port=port, address="127.0.0.1", tcp=True, logger=quiet),
    ]
    for server in servers:
        server.start_thread()
    return resolver, servers


if __name__ == "__main__":
    _, running = start(int(sys.argv[1]), sys.argv[2] if len(sys.argv) > 2 else "bench.test")
    print("ready", flush=True)
    try:
        while running[0].isAlive():
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
