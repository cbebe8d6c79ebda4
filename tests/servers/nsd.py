"""NSD, an authoritative DNS server, serving one test zone on loopback (UDP and TCP on one port)."""

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import dns.exception
import dns.message
import dns.query

from tests.servers.process import fail_if_exited, require_program, stop, traversable_tmpdir

#: Its own loopback address: other DNS fixtures (MTA-STS, DANE) use theirs, with free ports each.
NSD_HOST = "127.0.0.83"

_CONF = """\
server:
    ip-address: {host}@{port}
    do-ip6: no
    username: ""
    chroot: ""
    zonesdir: "{d}"
    database: ""
    pidfile: "{d}/nsd.pid"
    zonelistfile: "{d}/zone.list"
    xfrdfile: "{d}/xfrd.state"
    xfrdir: "{d}"
    logfile: "{d}/nsd.log"
    server-count: 1
    verbosity: 1
remote-control:
    control-enable: no
"""


@dataclass(frozen=True)
class Nameserver:
    host: str
    port: int

    @property
    def address(self) -> str:
        """As unbound's forward-addr and mailrelay's dns_nameservers take it."""
        return f"{self.host}@{self.port}"


def txt_record(name: str, value: str) -> str:
    """A TXT record line; strings of at most 250 bytes (one may hold 255; an RSA-2048 key is ~400)."""
    parts = " ".join(f'"{value[i : i + 250]}"' for i in range(0, len(value), 250))
    return f"{name} IN TXT ( {parts} )\n"


def free_udp_and_tcp_port(host: str) -> int:
    while True:
        with socket.socket() as tcp, socket.socket(type=socket.SOCK_DGRAM) as udp:
            tcp.bind((host, 0))
            port: int = tcp.getsockname()[1]
            try:
                udp.bind((host, port))
            except OSError:
                continue
            return port


def zone_text(zone: str, host: str, records: str) -> str:
    """A zone file: SOA and NS (its name server `ns.<zone>` at `host`) made here, plus `records`
    (zone-file lines relative to the zone)."""
    return (
        f"$ORIGIN {zone}.\n$TTL 300\n@ IN SOA ns.{zone}. hostmaster.{zone}. 1 3600 600 86400 60\n"
        f"@ IN NS ns.{zone}.\nns IN A {host}\n{records}"
    )


def start_nsd(directory: Path, host: str, port: int, zones: dict[str, str]) -> "subprocess.Popen[bytes]":
    """NSD on `host`@`port` serving `zones` (name: zone file in `directory`), its state in `directory`."""
    program = require_program("nsd", "/usr/sbin/nsd")
    conf = _CONF.format(host=host, port=port, d=directory)
    conf += "".join(f"zone:\n    name: {name}\n    zonefile: {file}\n" for name, file in zones.items())
    (directory / "nsd.conf").write_text(conf)
    return subprocess.Popen(  # noqa: S603
        [program, "-d", "-c", str(directory / "nsd.conf")],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


@contextmanager
def nsd_server(zone: str, records: str, host: str = NSD_HOST) -> Iterator[Nameserver]:
    """NSD serving `zone` (SOA and NS made here) plus `records` (zone-file lines relative to it)."""
    directory = traversable_tmpdir("nsd-")
    port = free_udp_and_tcp_port(host)
    (directory / "zone").write_text(zone_text(zone, host, records))
    process = start_nsd(directory, host, port, {zone: "zone"})
    try:
        wait_answering(zone, host, port, process)
        yield Nameserver(host, port)
    finally:
        stop(process)
        shutil.rmtree(directory, ignore_errors=True)


def wait_answering(zone: str, host: str, port: int, process: subprocess.Popen[bytes], timeout: float = 10) -> None:
    """Ready = the zone's SOA is answered over UDP."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fail_if_exited(process)
        try:
            if dns.query.udp(dns.message.make_query(zone, "SOA"), host, port=port, timeout=0.2).answer:
                return
        except (OSError, dns.exception.Timeout):
            time.sleep(0.05)
    raise TimeoutError(f"{host}@{port} did not answer for {zone} within {timeout} s")
