"""DANE (RFC 7672) for mx against real parts: a zone signed with ldns-signzone and served by NSD, a
validating unbound as mailrelay's resolver (the AD bit), and the private Postfix as every MX host
(its certificate holds mx.dane.test and ta.dane.test)."""

import asyncio
import dataclasses
import hashlib
import re
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from relays.dane import DaneHost, check, usable
from relays.dns import Tlsa
from schemas.delivery import RecipientResult
from tests.conftest import context, envelope, opened
from tests.servers.dnssec import Validating, validating_resolver
from tests.servers.postfix import Postfix, postfix

MESSAGE = b"From: a@example.com\r\nSubject: dane\r\n\r\nhi\r\n"


@dataclass
class Parts:
    postfix: Postfix
    resolver: Validating


def spki_sha256(certificate: bytes) -> str:
    key = x509.load_der_x509_certificate(certificate).public_key()
    return hashlib.sha256(key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)).hexdigest()


@pytest.fixture(scope="module")
def parts() -> Iterator[Parts]:
    with postfix(sasl=True) as pf:
        assert pf.ca is not None
        ee = spki_sha256(pf.certificate())
        ca = pf.ca.cert_pem.bytes().decode()
        ca_der = x509.load_pem_x509_certificate(ca.encode()).public_bytes(Encoding.DER).hex()
        zeros, port = "00" * 32, pf.port  # records for the port mx connects to (25 in real life)
        signed = (
            "mx            IN A    127.0.0.1\n"
            f"_{port}._tcp.mx   IN TLSA 3 1 1 {ee}\n"
            "ta            IN A    127.0.0.1\n"
            f"_{port}._tcp.ta   IN TLSA 2 0 0 {ca_der}\n"
            "wrong         IN A    127.0.0.1\n"
            f"_{port}._tcp.wrong IN TLSA 3 1 1 {zeros}\n"
            "unusable      IN A    127.0.0.1\n"
            f"_{port}._tcp.unusable IN TLSA 1 1 1 {ee}\n"  # PKIX-EE: not for SMTP (RFC 7672 3.1.3)
            "bogus         IN A    127.0.0.1\n"
            f"_{port}._tcp.bogus IN TLSA 3 1 1 {ee}\n"
            "notlsa        IN A    127.0.0.1\n"
        )
        unsigned = f"mx IN A 127.0.0.1\n_{port}._tcp.mx IN TLSA 3 1 1 {zeros}\n"
        with validating_resolver(
            "dane.test", signed, "plain.test", unsigned, bogus=f"_{port}._tcp.bogus.dane.test."
        ) as r:
            yield Parts(pf, r)


def mx(parts: Parts, *extra: str) -> str:
    lines = "".join(f"    {e}\n" for e in extra)
    return (
        "relay:\n  out:\n    type: mx\n"
        f"    port: {parts.postfix.port}\n"
        "    allow_internal_destinations: true\n"
        "    dane: true\n" + lines + f"mailrelay:\n  dns_nameservers: ['{parts.resolver.nameserver}']\n"
    )


async def deliver(parts: Parts, rcpt: str, *extra: str) -> RecipientResult:
    async with opened(mx(parts, *extra)) as relays:
        (result,) = await relays["out"].deliver(envelope(rcpt, message=MESSAGE), context())
    return result


async def sessions(parts: Parts, since: int) -> list[str]:
    await asyncio.sleep(0.3)  # an aborted connection is logged as it closes
    return re.findall(r"postfix/smtpd\[\d+\]: disconnect from \S+ (.*)", parts.postfix.log[since:])


@pytest.mark.parametrize("host", ["mx.dane.test", "ta.dane.test"])  # DANE-EE(3), DANE-TA(2)
async def test_a_matching_tlsa_record_authenticates_the_mx_host(parts: Parts, host: str) -> None:
    result = await deliver(parts, f"bob@{host}")
    assert result.status == "delivered", result.reply
    assert result.security is not None
    assert (result.security.encrypted, result.security.authenticated) == (True, "dane")


async def test_a_certificate_no_record_matches_is_deferred_and_nothing_is_sent(parts: Parts) -> None:
    logged = len(parts.postfix.log)
    result = await deliver(parts, "bob@wrong.dane.test")
    assert (result.status, result.reply.code, result.reply.enhanced_status) == ("transient_failure", 451, "4.7.5")
    assert "no TLSA record matches" in result.reply.message
    assert all("mail=" not in s for s in await sessions(parts, logged))


async def test_a_bogus_tlsa_answer_defers_the_host(parts: Parts) -> None:
    logged = len(parts.postfix.log)
    result = await deliver(parts, "bob@bogus.dane.test")
    assert (result.reply.code, result.reply.enhanced_status) == (451, "4.7.5")
    assert "TLSA lookup" in result.reply.message
    assert await sessions(parts, logged) == []  # not even a connection


async def test_records_present_but_unusable_mean_encrypted_but_not_authenticated(parts: Parts) -> None:
    result = await deliver(parts, "bob@unusable.dane.test")
    assert result.status == "delivered", result.reply
    assert result.security is not None
    assert (result.security.encrypted, result.security.authenticated) == (True, "none")


@pytest.mark.parametrize("host", ["notlsa.dane.test", "mx.plain.test"])  # secure "no records"; an unsigned zone
async def test_without_validated_records_there_is_no_dane(parts: Parts, host: str) -> None:
    result = await deliver(parts, f"bob@{host}")
    assert result.status == "delivered", result.reply  # mx.plain.test's wrong record is not validated: ignored
    assert result.security is not None
    assert (result.security.encrypted, result.security.authenticated) == (True, "none")


async def test_require_tls_is_met_by_dane(parts: Parts) -> None:
    async with opened(mx(parts)) as relays:
        env = dataclasses.replace(envelope("bob@mx.dane.test", message=MESSAGE), require_tls=True)
        (result,) = await relays["out"].deliver(env, context())
    assert result.status == "delivered", result.reply
    assert result.security is not None
    assert result.security.authenticated == "dane"


def test_only_dane_ta_and_dane_ee_records_are_usable() -> None:
    records = [Tlsa(u, s, m, b"x") for u, s, m in [(0, 0, 1), (1, 1, 1), (2, 1, 1), (3, 1, 1), (3, 2, 1), (3, 1, 3)]]
    assert [(r.usage, r.selector, r.mtype) for r in usable(records)] == [(2, 1, 1), (3, 1, 1)]
    assert check(DaneHost("mx.example", usable(records)), []) == "the server sent no certificate"
