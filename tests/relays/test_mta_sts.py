"""MTA-STS (RFC 8461) for mx against real parts: the private Postfix (its certificate for mx.mail.test
from one CA), a policy server over HTTPS on 127.0.0.75:443 (a certificate from a second CA), and
the test DNS server with the MX, `_mta-sts` TXT and `mta-sts` A records."""

import asyncio
import re
import ssl
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import trustme

from relays.mta_sts import Policy, PolicyError, parse_policy, record_id
from schemas.delivery import RecipientResult
from tests.conftest import context, envelope, opened
from tests.servers.dns import DnsServer, dns_server
from tests.servers.postfix import Postfix, postfix

POLICY_IP = "127.0.0.75"  # the policy host's address in the zone; HTTPS is port 443 by definition
POLICIES = {
    "mta-sts.sts.test": "version: STSv1\nmode: enforce\nmx: mx.mail.test\nmax_age: 86400\n",
    "mta-sts.nomatch.test": "version: STSv1\nmode: enforce\nmx: *.elsewhere.test\nmax_age: 86400\n",
    "mta-sts.testing.test": "version: STSv1\r\nmode: testing\r\nmx: *.mail.test\r\nmax_age: 600\r\n",
    "mta-sts.xn--bcher-kva.test": "version: STSv1\nmode: enforce\nmx: mx.mail.test\nmax_age: 86400\n",
}
ZONE = """
mx.mail.test.            300 IN A   127.0.0.1
sts.test.                300 IN MX  10 mx.mail.test.
_mta-sts.sts.test.       300 IN TXT "v=STSv1; id=20261130;"
mta-sts.sts.test.        300 IN A   127.0.0.75
nomatch.test.            300 IN MX  10 mx.mail.test.
_mta-sts.nomatch.test.   300 IN TXT "v=STSv1; id=1;"
mta-sts.nomatch.test.    300 IN A   127.0.0.75
testing.test.            300 IN MX  10 mx.mail.test.
_mta-sts.testing.test.   300 IN TXT "v=STSv1; id=1;"
mta-sts.testing.test.    300 IN A   127.0.0.75
plain.test.              300 IN MX  10 mx.mail.test.
xn--bcher-kva.test.      300 IN MX  10 mx.mail.test.
_mta-sts.xn--bcher-kva.test. 300 IN TXT "v=STSv1; id=1;"
mta-sts.xn--bcher-kva.test.  300 IN A   127.0.0.75
"""
MESSAGE = b"From: a@example.com\r\nSubject: sts\r\n\r\nhi\r\n"


@dataclass
class Parts:
    postfix: Postfix
    dns: DnsServer
    trusted: Path  # both CAs: the policy server's and Postfix's
    policy_only: Path  # the policy server's CA only: Postfix's certificate does not verify
    fetched: list[str] = field(default_factory=list)


@pytest.fixture(scope="module")
def parts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Parts]:
    directory = tmp_path_factory.mktemp("sts")
    policy_ca = trustme.CA()
    with postfix(sasl=True) as pf, dns_server(ZONE) as dns:
        assert pf.ca is not None
        trusted, policy_only = directory / "both.pem", directory / "policy.pem"
        policy_only.write_bytes(policy_ca.cert_pem.bytes())
        trusted.write_bytes(policy_ca.cert_pem.bytes() + pf.ca.cert_pem.bytes())
        state = Parts(pf, dns, trusted, policy_only)
        with _policy_server(policy_ca, state.fetched):
            yield state


def _policy_server(ca: trustme.CA, fetched: list[str]) -> "_Running":
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(*POLICIES).configure_cert(context)

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: object) -> None:
            pass

        def do_GET(self) -> None:
            host = (self.headers.get("Host") or "").split(":")[0]
            fetched.append(host)
            body = POLICIES.get(host, "").encode()
            if self.path != "/.well-known/mta-sts.txt" or not body:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer((POLICY_IP, 443), Handler)
    server.daemon_threads = True
    server.socket = context.wrap_socket(server.socket, server_side=True)
    return _Running(server)


class _Running:
    def __init__(self, server: ThreadingHTTPServer) -> None:
        self.server = server

    def __enter__(self) -> None:
        threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def mx(parts: Parts, ca_file: Path) -> str:
    return (
        "relay:\n  out:\n    type: mx\n"
        f"    port: {parts.postfix.port}\n"
        "    allow_internal_destinations: true\n"
        f"    tls: {{mode: opportunistic, ca_certs: '{ca_file}'}}\n"
        f"mailrelay:\n  dns_nameservers: ['{parts.dns.nameserver}']\n"
    )


async def deliver(parts: Parts, ca_file: Path, rcpt: str) -> RecipientResult:
    async with opened(mx(parts, ca_file)) as relays:
        (result,) = await relays["out"].deliver(envelope(rcpt, message=MESSAGE), context())
    return result


async def sessions(parts: Parts, since: int) -> list[str]:
    """Postfix's summaries of the client sessions that ended since `since` on its main listener."""
    await asyncio.sleep(0.3)  # an aborted connection is logged as it closes
    return re.findall(r"postfix/smtpd\[\d+\]: disconnect from \S+ (.*)", parts.postfix.log[since:])


async def test_enforce_delivers_to_a_named_host_over_verified_tls(parts: Parts) -> None:
    result = await deliver(parts, parts.trusted, "bob@sts.test")
    assert result.status == "delivered", result.reply
    assert result.security is not None
    assert (result.security.encrypted, result.security.authenticated) == (True, "mta-sts")
    assert "mta-sts.sts.test" in parts.fetched


async def test_enforce_with_a_certificate_that_does_not_verify_defers_and_sends_nothing(parts: Parts) -> None:
    logged = len(parts.postfix.log)
    result = await deliver(parts, parts.policy_only, "bob@sts.test")
    assert (result.status, result.reply.code, result.reply.enhanced_status) == ("transient_failure", 451, "4.7.5")
    assert "CERTIFICATE_VERIFY_FAILED" in result.reply.message
    assert all("mail=" not in s for s in await sessions(parts, logged))  # never in clear text


async def test_enforce_skips_mx_hosts_the_policy_does_not_name(parts: Parts) -> None:
    logged = len(parts.postfix.log)
    result = await deliver(parts, parts.trusted, "bob@nomatch.test")
    assert (result.reply.code, result.reply.enhanced_status) == (451, "4.7.5")
    assert "names none of its MX hosts (mx.mail.test)" in result.reply.message
    assert await sessions(parts, logged) == []  # not even a connection


async def test_testing_mode_delivers_as_usual_when_tls_does_not_verify(parts: Parts) -> None:
    result = await deliver(parts, parts.policy_only, "bob@testing.test")
    assert result.status == "delivered", result.reply
    assert result.security is not None
    assert (result.security.encrypted, result.security.authenticated) == (True, "none")


async def test_without_a_policy_mx_is_opportunistic(parts: Parts) -> None:
    result = await deliver(parts, parts.policy_only, "bob@plain.test")
    assert result.status == "delivered", result.reply
    assert result.security is not None
    assert (result.security.encrypted, result.security.authenticated) == (True, "none")


async def test_a_policy_is_fetched_once_while_its_id_stands(parts: Parts) -> None:
    async with opened(mx(parts, parts.trusted)) as relays:
        before = parts.fetched.count("mta-sts.sts.test")
        for _ in range(3):
            (result,) = await relays["out"].deliver(envelope("bob@sts.test", message=MESSAGE), context())
            assert result.status == "delivered", result.reply
    assert parts.fetched.count("mta-sts.sts.test") == before + 1


# The parts of RFC 8461 that need no server.


def test_a_record_needs_one_sts_version_and_a_plain_id() -> None:
    assert record_id(["v=STSv1; id=20160831085700Z;"]) == "20160831085700Z"
    assert record_id(["v=spf1 -all", "v=STSv1;id=abc"]) == "abc"
    assert record_id(["v=STSv1; id=1;", "v=STSv1; id=2;"]) is None  # two records: none (RFC 8461 3.1)
    assert record_id(["v=STSv1; id=no-dashes;"]) is None
    assert record_id([]) is None


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ("version: STSv1\nmode: enforce\nmax_age: 1\n", "no mx pattern"),
        ("version: STSv2\nmode: enforce\nmx: a\nmax_age: 1\n", "version"),
        ("version: STSv1\nmode: strict\nmx: a\nmax_age: 1\n", "mode"),
        ("version: STSv1\nmode: enforce\nmx: a\nmax_age: -1\n", "max_age"),
        ("version: STSv1\nmode enforce\n", "colon"),
    ],
)
def test_a_broken_policy_is_refused(body: str, problem: str) -> None:
    with pytest.raises(PolicyError, match=problem):
        parse_policy(body)


def test_max_age_is_capped_at_a_year_and_a_wildcard_covers_one_label() -> None:
    mode, patterns, max_age = parse_policy("version: STSv1\nmode: enforce\nmx: *.Example.NET.\nmax_age: 9999999999\n")
    assert (mode, patterns, max_age) == ("enforce", ("*.example.net",), 31_557_600)
    policy = Policy("example.net", "1", mode, patterns, 0.0)
    assert policy.matches("mx1.example.net.")
    assert not policy.matches("example.net")
    assert not policy.matches("a.b.example.net")


async def test_an_internationalised_domain_has_its_policy_fetched_by_its_a_label(parts: Parts) -> None:
    """bücher.test's policy lives at mta-sts.xn--bcher-kva.test: the fetch names the host so (the
    Host header and SNI are ASCII), and the delivery follows the policy (it was a 500: the
    Unicode Host header raised out of deliver())."""
    since = len(parts.fetched)
    result = await deliver(parts, parts.trusted, "bob@bücher.test")
    assert parts.fetched[since:] == ["mta-sts.xn--bcher-kva.test"]
    assert result.status == "delivered", result.reply
    assert result.security is not None
    assert result.security.authenticated == "mta-sts"


async def test_without_allow_internal_destinations_no_policy_is_fetched_from_a_private_address(parts: Parts) -> None:
    """mta-sts.sts.test resolves to 127.0.0.75: mx connects to no such address for mail, and the
    policy fetch (an HTTPS connection chosen by the recipient domain's DNS) must not either."""
    since = len(parts.fetched)
    config = mx(parts, parts.trusted).replace("    allow_internal_destinations: true\n", "")
    async with opened(config) as relays:
        (result,) = await relays["out"].deliver(envelope("bob@sts.test", message=MESSAGE), context())
    assert parts.fetched[since:] == []
    assert result.status == "permanent_failure", result.reply  # mx.mail.test is 127.0.0.1: refused too
