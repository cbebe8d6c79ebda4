"""DANE for SMTP (RFC 7672): an MX host's TLSA records, and whether its certificate matches them.

TLSA records count only when the resolver validated them (the AD bit of a DNSSEC-validating
resolver the operator configured and trusts, as Postfix's `smtp_dns_support_level = dnssec`).
Usable records are DANE-TA(2) and DANE-EE(3) with selector 0 (the certificate) or 1 (its
public key) and matching type 0 (exact), 1 (SHA-256) or 2 (SHA-512) (RFC 7672 3.1). DANE-EE
matches the server's own certificate and ignores names and dates (RFC 7672 3.1.1); DANE-TA
matches a certificate of the chain the server sent (or, for `2 0 0`, the record's own
certificate) that must then validate the server's certificate for the MX host's name.

Python's ssl module has no public access to the chain the server sent before 3.13:
`peer_chain` reads it through the SSLObject's `_sslobj.get_unverified_chain()`
(tests/canaries/test_stdlib.py names it if it goes).
"""

import datetime
import hashlib
import ssl
from collections.abc import Sequence
from dataclasses import dataclass

from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat
from cryptography.x509.verification import Criticality, ExtensionPolicy, PolicyBuilder, Store, VerificationError

from relays.dns import Tlsa

_DANE_TA, _DANE_EE = 2, 3
# A DANE-TA anchor is the domain's own (often private) CA, not the web PKI's: the chain must be
# sound (a CA that is a CA, the name in subjectAltName, dates, signatures), not follow the CA/B
# Forum's profile, whose extension rules (a critical subjectAltName, say) private CAs break.
_CA_POLICY = ExtensionPolicy.permit_all().require_present(x509.BasicConstraints, Criticality.AGNOSTIC, None)
_EE_POLICY = ExtensionPolicy.permit_all().require_present(x509.SubjectAlternativeName, Criticality.AGNOSTIC, None)
_DIGESTS = {1: hashlib.sha256, 2: hashlib.sha512}


@dataclass(frozen=True)
class DaneHost:
    """What DNSSEC says about one MX host: its usable TLSA records (empty: records exist but none is
    usable, so TLS is required and the server is not authenticated, RFC 7672 2.2)."""

    name: str
    records: tuple[Tlsa, ...]


def usable(records: Sequence[Tlsa]) -> tuple[Tlsa, ...]:
    return tuple(
        r for r in records if r.usage in (_DANE_TA, _DANE_EE) and r.selector in (0, 1) and r.mtype in (0, 1, 2)
    )


def _matches(record: Tlsa, certificate: bytes) -> bool:
    data = certificate if record.selector == 0 else _public_key(certificate)
    if data is None:
        return False
    if record.mtype == 0:
        return data == record.data
    return _DIGESTS[record.mtype](data).digest() == record.data


def _public_key(certificate: bytes) -> bytes | None:
    try:
        key = x509.load_der_x509_certificate(certificate).public_key()
    except ValueError:
        return None
    return key.public_bytes(Encoding.DER, PublicFormat.SubjectPublicKeyInfo)


def peer_chain(tls: ssl.SSLObject) -> list[bytes]:
    """The certificates the server sent, its own first, DER-encoded."""
    chain = tls._sslobj.get_unverified_chain()  # type: ignore[attr-defined]  # public only from Python 3.13
    return [c.public_bytes(ssl._ssl.ENCODING_DER) for c in chain or ()]  # type: ignore[attr-defined]


def check(host: DaneHost, chain: Sequence[bytes]) -> str | None:
    """None when a record of `host` matches the server's `chain`; else why not."""
    if not chain:
        return "the server sent no certificate"
    leaf = chain[0]
    for record in host.records:
        if record.usage == _DANE_EE and _matches(record, leaf):
            return None
    anchors = [c for c in chain for r in host.records if r.usage == _DANE_TA and _matches(r, c)]
    anchors += [r.data for r in host.records if r.usage == _DANE_TA and r.selector == 0 and r.mtype == 0]
    for anchor in anchors:
        if _chains_to(anchor, chain, host.name):
            return None
    if anchors:
        return "a DANE-TA record matches, but the certificate does not validate to it for " + host.name
    return "no TLSA record matches the server's certificate"


def _chains_to(anchor: bytes, chain: Sequence[bytes], name: str) -> bool:
    try:
        root = x509.load_der_x509_certificate(anchor)
        certificates = [x509.load_der_x509_certificate(c) for c in chain]
        verifier = (
            PolicyBuilder()
            .store(Store([root]))
            .time(datetime.datetime.now(datetime.UTC))
            .extension_policies(ca_policy=_CA_POLICY, ee_policy=_EE_POLICY)
            .build_server_verifier(x509.DNSName(name))
        )
        verifier.verify(certificates[0], certificates[1:])
    except (ValueError, VerificationError):
        return False
    return True
