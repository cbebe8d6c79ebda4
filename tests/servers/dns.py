"""An authoritative DNS server (dnslib) on 127.0.0.1, UDP and TCP, that counts the queries it answers."""

import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from dnslib import QTYPE, RCODE, RR
from dnslib.server import BaseResolver, DNSLogger, DNSServer

from tests.servers.process import free_port

#: The test zone. Names under servfail.test answer SERVFAIL; unknown names NXDOMAIN;
#: a known name asked for another type answers NODATA (which is how "no MX" looks).
ZONE = """
example.test.      300 IN MX 10 mx1.example.test.
example.test.      300 IN MX 20 mx2.example.test.
mx1.example.test.  300 IN A 127.0.0.2
mx2.example.test.  300 IN A 127.0.0.3
other.test.        300 IN MX 10 mx.other.test.
mx.other.test.     300 IN A 127.0.0.4
third.test.        300 IN MX 10 mx.third.test.
mx.third.test.     300 IN A 127.0.0.5
nomx.test.         300 IN A 127.0.0.6
nullmx.test.       300 IN MX 0 .
noaddr.test.       300 IN MX 10 gone.noaddr.test.
noaddr.test.       300 IN TXT "exists"
"""


@dataclass
class DnsServer:
    port: int
    queries: Counter[tuple[str, str]] = field(default_factory=Counter)

    @property
    def nameserver(self) -> str:
        return f"127.0.0.1:{self.port}"


class _Resolver(BaseResolver):  # type: ignore[misc]
    def __init__(self, zone: str, server: DnsServer) -> None:
        self.records = RR.fromZone(zone)
        self.server = server
        self.lock = threading.Lock()

    def resolve(self, request: Any, handler: Any) -> Any:
        reply = request.reply()
        name = str(request.q.qname).lower()
        qtype = QTYPE[request.q.qtype]
        with self.lock:
            self.server.queries[(name.rstrip("."), qtype)] += 1
        if name == "servfail.test." or name.endswith(".servfail.test."):
            reply.header.rcode = RCODE.SERVFAIL
            return reply
        matches = [rr for rr in self.records if str(rr.rname).lower() == name]
        if not matches:
            reply.header.rcode = RCODE.NXDOMAIN
            return reply
        for rr in matches:
            if QTYPE[rr.rtype] == qtype:
                reply.add_answer(rr)
        return reply


@contextmanager
def dns_server(zone: str = ZONE) -> Iterator[DnsServer]:
    server = DnsServer(port=free_port())
    resolver = _Resolver(zone, server)
    logger = DNSLogger("-request,-reply,-truncated,-error,-recv,-send,-data")
    servers = [
        DNSServer(resolver, port=server.port, address="127.0.0.1", logger=logger),
        DNSServer(resolver, port=server.port, address="127.0.0.1", tcp=True, logger=logger),
    ]
    for s in servers:
        s.start_thread()
    try:
        yield server
    finally:
        for s in servers:
            s.stop()
            s.server.server_close()
