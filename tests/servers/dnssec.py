"""A DNSSEC-signed zone and a validating resolver: ldns-signzone, NSD serving it (and an unsigned zone
beside it), unbound validating with the signed zone's trust anchor. A lookup through unbound gets
the AD bit for the signed zone's data, none for the unsigned zone's, and SERVFAIL for data changed
after signing (bogus)."""

import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.servers.nsd import free_udp_and_tcp_port, start_nsd, wait_answering, zone_text
from tests.servers.process import require_program, stop, traversable_tmpdir

NSD_HOST, UNBOUND_HOST = "127.0.0.84", "127.0.0.85"

# Without `local-zone: "test." nodefault` every .test name is NXDOMAIN (RFC 6761), without
# `do-not-query-localhost: no` nothing on 127.0.0.0/8 is asked (SERVFAIL).
_UNBOUND_CONF = """\
server:
    interface: {host}@{port}
    do-ip6: no
    access-control: 127.0.0.0/8 allow
    username: ""
    chroot: ""
    directory: "{d}"
    pidfile: "{d}/unbound.pid"
    use-syslog: no
    logfile: ""
    verbosity: 1
    do-not-query-localhost: no
    local-zone: "test." nodefault
    trust-anchor-file: "{d}/anchor.ds"
stub-zone:
    name: "{signed}."
    stub-addr: {nsd}
stub-zone:
    name: "{unsigned}."
    stub-addr: {nsd}
"""


@dataclass(frozen=True)
class Validating:
    host: str
    port: int

    @property
    def nameserver(self) -> str:
        """As mailrelay's dns_nameservers takes it."""
        return f"{self.host}:{self.port}"


@contextmanager
def validating_resolver(
    signed: str, signed_records: str, unsigned: str, unsigned_records: str, *, bogus: str | None = None
) -> Iterator[Validating]:
    """unbound validating `signed` (its records signed by a fresh key) and resolving `unsigned`;
    the TLSA record of `bogus` (an owner name with its final dot) is changed after signing."""
    unbound = require_program("unbound", "/usr/sbin/unbound")
    keygen, signzone = require_program("ldns-keygen"), require_program("ldns-signzone")
    directory = traversable_tmpdir("dnssec-")
    nsd_port, unbound_port = free_udp_and_tcp_port(NSD_HOST), free_udp_and_tcp_port(UNBOUND_HOST)
    (directory / "signed.zone").write_text(zone_text(signed, NSD_HOST, signed_records))
    (directory / "unsigned.zone").write_text(zone_text(unsigned, NSD_HOST, unsigned_records))
    key = _run([keygen, "-a", "ECDSAP256SHA256", "-k", signed], directory).strip()  # Kdane.test.+013+NNNNN
    _run([signzone, "-o", signed, "signed.zone", key], directory)
    if bogus is not None:
        _tamper(directory / "signed.zone.signed", bogus)
    (directory / "anchor.ds").write_text((directory / f"{key}.ds").read_text())
    (directory / "unbound.conf").write_text(
        _UNBOUND_CONF.format(
            host=UNBOUND_HOST,
            port=unbound_port,
            d=directory,
            signed=signed,
            unsigned=unsigned,
            nsd=f"{NSD_HOST}@{nsd_port}",
        )
    )
    processes: list[subprocess.Popen[bytes]] = []
    try:
        zones = {signed: "signed.zone.signed", unsigned: "unsigned.zone"}
        processes.append(start_nsd(directory, NSD_HOST, nsd_port, zones))
        wait_answering(signed, NSD_HOST, nsd_port, processes[-1])
        processes.append(_spawn([unbound, "-d", "-c", str(directory / "unbound.conf")]))
        wait_answering(signed, UNBOUND_HOST, unbound_port, processes[-1])
        yield Validating(UNBOUND_HOST, unbound_port)
    finally:
        for process in reversed(processes):
            stop(process)
        shutil.rmtree(directory, ignore_errors=True)


def _tamper(path: Path, owner: str) -> None:
    """Change the data of `owner`'s TLSA record in the signed zone: its signature no longer matches."""
    lines = path.read_text().splitlines()
    for i, text in enumerate(lines):
        fields = text.split()
        if len(fields) >= 5 and fields[0] == owner and fields[3] == "TLSA":
            lines[i] = text[:-4] + ("1111" if text.endswith("0000") else "0000")
            path.write_text("\n".join(lines) + "\n")
            return
    raise AssertionError(f"no TLSA record of {owner} in {path}")


def _run(command: list[str], cwd: Path) -> str:
    done = subprocess.run(command, cwd=cwd, capture_output=True, text=True, check=False)  # noqa: S603
    if done.returncode != 0:
        raise RuntimeError(f"{command[0]} exited with {done.returncode}: {done.stderr[-2000:]}")
    return done.stdout


def _spawn(command: list[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(  # noqa: S603
        command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
